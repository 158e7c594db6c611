"""Frontends that ignore kernel provisioners (VS Code, PyCharm, emacs-jupyter, jupyter_client in
an environment without hpc-kernels) run the kernelspec's argv with a connection file they wrote.
These tests do exactly that: a copy of an installed kernelspec without its provisioner metadata,
started by jupyter_client's own LocalProvisioner and by `jupyter console`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECOND_USER, as_second_user, hk
from jupyter_client import KernelManager
from test_cluster_jupyter import execute, interrupt_a_busy_loop, jupyter_dirs  # noqa: F401 (a fixture)
from test_cluster_kernel import LOGIN_ADDRESS
from test_cluster_lifecycle import squeue_ids

GONE_WITHIN = 60.0


def install_argv_only(profile: str, jupyter_data: Path) -> str:
    """`hpc-kernel kernelspec install`, then a copy of it whose provisioner metadata is removed:
    what a frontend that ignores provisioners sees."""
    hk("kernelspec", "install", "--profile", profile, "--name", f"hk-{profile}", "--user")
    spec = json.loads((jupyter_data / "kernels" / f"hk-{profile}" / "kernel.json").read_text())
    del spec["metadata"]["kernel_provisioner"]
    copy = jupyter_data / "kernels" / f"hk-{profile}-argv"
    copy.mkdir(parents=True)
    (copy / "kernel.json").write_text(json.dumps(spec))
    return copy.name


@pytest.fixture
def argv_kernelspec(jupyter_dirs: Path, runtime_profile: str) -> Iterator[str]:  # noqa: F811
    yield install_argv_only(runtime_profile, jupyter_dirs / "jupyter-data")
    hk("kernelspec", "remove", f"hk-{runtime_profile}", check=False)


def only_kernel() -> dict[str, object]:
    rows = json.loads(hk("list", "--json").stdout)
    assert len(rows) == 1 and str(rows[0]["name"]).startswith("argv-"), rows
    return rows[0]  # type: ignore[no-any-return]


def our_processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if marker in line and os.stat(f"/proc/{pid}").st_uid == os.getuid():
                    found.append(f"{pid}: {line}")
            except OSError:
                continue
    return found


def wait_all_gone(job_id: str, timeout: float = GONE_WITHIN) -> float:
    """Seconds until no kernel, no job, no bridge and no watcher is left; fails after ``timeout``."""
    started = time.monotonic()
    while True:
        left = (json.loads(hk("list", "--json").stdout), job_id in squeue_ids(), our_processes("hpc_kernels.bridge"),
                our_processes("hpc_kernels.frontend_watch"))
        if not any(left):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still there after {timeout:.0f} s: {left}"
        time.sleep(1)


def test_the_argv_runs_interrupts_restarts_in_the_job_and_shuts_down(argv_kernelspec: str, workspace: Path) -> None:
    km = KernelManager(kernel_name=argv_kernelspec)
    assert "kernel_provisioner" not in km.kernel_spec.metadata
    km.start_kernel(cwd=str(workspace))
    assert type(km.provisioner).__name__ == "LocalProvisioner", "the frontend runs the argv itself"
    assert km.connection_file and json.loads(Path(km.connection_file).read_text())["transport"] == "tcp"
    try:
        assert execute(km, "import socket, os; print(socket.gethostname(), os.getcwd())").split() == [
            "c1" if "c1" in str(only_kernel()["node"]) else "c2", str(workspace)]
        row = only_kernel()
        job_id = str(row["job_id"])
        assert "Network is unreachable" in execute(
            km, f"import socket\ntry:\n    socket.create_connection(('{LOGIN_ADDRESS}', 6817), timeout=5)\n"
                "except OSError as e:\n    print(e)")

        # Interrupt: the frontend signals the argv's process (SIGINT), the kernel lives on.
        execute(km, "kept = 1")
        assert interrupt_a_busy_loop(km) == "KeyboardInterrupt"
        assert execute(km, "print(kept)").strip() == "1"

        # input() crosses stdin, whose requests go to the identity of the shell request.
        client = km.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            reply = client.execute_interactive("answer = input('? ')", timeout=60,
                                               stdin_hook=lambda msg: client.input("forty-two"))
            assert reply["content"]["status"] == "ok"
        finally:
            client.stop_channels()
        assert execute(km, "print(answer)").strip() == "forty-two"

        # Restart: a new kernel process in the same job (no second wait in the queue).
        km.restart_kernel()
        assert "NameError" in execute(km, "try:\n    kept\nexcept NameError as e:\n    print('NameError')")
        assert str(only_kernel()["job_id"]) == job_id
        # A forced restart kills the argv's process: the next one still takes the job over.
        km.restart_kernel(now=True)
        assert execute(km, "print(6 * 7)").strip() == "42"
        assert str(only_kernel()["job_id"]) == job_id
    finally:
        km.shutdown_kernel()
    assert wait_all_gone(job_id, timeout=15) < 15, "a shutdown ends the job before it returns, or nearly"


FRONTEND = textwrap.dedent("""
    import json, subprocess, sys, time
    from jupyter_client import KernelManager
    km = KernelManager(kernel_name=sys.argv[1])
    km.start_kernel(cwd=sys.argv[2])
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=300)
    print("ready", flush=True)
    time.sleep(3600)
""")


def test_a_frontend_killed_with_sigkill_ends_the_job(argv_kernelspec: str, workspace: Path) -> None:
    frontend = subprocess.Popen([sys.executable, "-c", FRONTEND, argv_kernelspec, str(workspace)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert frontend.stdout is not None and frontend.stdout.readline().strip() == "ready"
        job_id = str(only_kernel()["job_id"])
        assert job_id in squeue_ids()
    finally:
        frontend.send_signal(signal.SIGKILL)
        frontend.wait()
    wait_all_gone(job_id)


def test_the_argv_killed_by_a_forced_shutdown_ends_the_job(argv_kernelspec: str, workspace: Path) -> None:
    """jupyter_client's shutdown_kernel(now=True) SIGKILLs the argv's process: its kernel's watcher ends the job."""
    km = KernelManager(kernel_name=argv_kernelspec)
    km.start_kernel(cwd=str(workspace))
    try:
        assert execute(km, "print(1 + 1)").strip() == "2"
        job_id = str(only_kernel()["job_id"])
    finally:
        km.shutdown_kernel(now=True)
    wait_all_gone(job_id)


def test_jupyter_console_runs_the_argv(jupyter_dirs: Path, workspace: Path) -> None:  # noqa: F811
    name = install_argv_only("local", jupyter_dirs / "jupyter-data")
    try:
        # In the workspace, as a user starts it: the kernel's workspace is the frontend's directory.
        proc = subprocess.run(["jupyter", "console", "--kernel", name, "--simple-prompt",
                               "--ZMQTerminalInteractiveShell.kernel_timeout=120"],
                              input="print(6 * 7)\nimport socket, os; print('host', socket.gethostname(), os.getcwd())\n"
                                    "exit\n", capture_output=True, text=True, timeout=180, cwd=workspace)
        assert "42" in proc.stdout, (proc.stdout, proc.stderr)
        assert f"host c1 {workspace}" in proc.stdout or f"host c2 {workspace}" in proc.stdout, proc.stdout
    finally:
        hk("kernelspec", "remove", "hk-local", check=False)
    rows = json.loads(hk("list", "--json").stdout)
    assert not rows or wait_all_gone(str(rows[0]["job_id"])) >= 0


def test_another_user_on_the_login_node_cannot_run_code_through_the_frontends_port(
        argv_kernelspec: str, workspace: Path) -> None:
    """The frontend chose TCP on 127.0.0.1, which every user of the login node can reach: without
    the key (in the frontend's private connection file), nothing they send runs."""
    km = KernelManager(kernel_name=argv_kernelspec)
    km.start_kernel(cwd=str(workspace))
    try:
        assert execute(km, "print('up')").strip() == "up"
        info = json.loads(Path(km.connection_file).read_text())
        os.chmod(workspace, 0o777)  # so that a command run there could leave its mark
        attack = textwrap.dedent(f"""
            import zmq
            from jupyter_client.session import Session
            session = Session(key=b"not-the-key")
            sock = zmq.Context().socket(zmq.DEALER)
            sock.connect("tcp://127.0.0.1:{info['shell_port']}")
            session.send(sock, "execute_request", {{"code": "open({str(workspace / 'pwned')!r}, 'w')",
                         "silent": False}})
            print("answered" if sock.poll(5000) else "no answer")
        """)
        proc = as_second_user(["/opt/hpc-kernels/venv/bin/python", "-c", attack])
        assert proc.stdout.strip() == "no answer", (proc.stdout, proc.stderr, SECOND_USER)
        assert not (workspace / "pwned").exists()
        assert execute(km, "print('still up')").strip() == "still up"
    finally:
        km.shutdown_kernel()


def test_a_frontend_that_gives_up_while_the_job_is_queued_leaves_nothing(
        jupyter_dirs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The queue counts against an argv frontend's startup timeout: when it expires, the frontend
    shuts the kernel down (SIGTERM, then SIGKILL), and the queued job is cancelled."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "never.yaml").write_text("extends: local\nslurm: {partition: down}\n")
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(profiles))
    name = install_argv_only("never", jupyter_dirs / "jupyter-data")
    before = squeue_ids()
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        with pytest.raises(RuntimeError, match="Kernel didn't respond"):
            client.wait_for_ready(timeout=6)
        queued = squeue_ids() - before
        assert len(queued) == 1, "the job waits in the queue, the ports are taken"
    finally:
        client.stop_channels()
        km.shutdown_kernel()
    wait_all_gone(queued.pop(), timeout=30)
    hk("kernelspec", "remove", "hk-never", check=False)

"""A Jupyter server that stops or dies under a kernel running on a compute node (real
jupyter_server, real jupyter_client, real jobs), and a kernel taken over by another process
through the provisioner's info.

jupyter_server keeps its kernels in memory: a restarted server does not find them again (it
calls no ``load_provisioner_info``). A clean stop shuts them down; a server gone without that
(SIGKILL, or SIGINT with no terminal, which stops the server without its clean-up) leaves them
to the frontend watch (hpc_kernels.frontend_watch), which ends them ``orphan_timeout`` (20 s)
after the server is gone. The lifetime does not depend on the sandbox runtime or the relay's
transport: these tests use the bubblewrap profile over srun."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import default_sigint, hk
from jupyter_client import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from test_cluster_jupyter import api, run_cell
from test_cluster_lifecycle import STATE_ROOT, processes_mentioning, squeue_ids

PROFILE = "local"
ORPHAN_TIMEOUT = 20.0  # the provisioner's default
WATCH_MODULE = "hpc_kernels.frontend_watch"


@pytest.fixture
def kernelspec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("JUPYTER_PATH", "")
    name = f"hk-restart-{uuid.uuid4().hex[:6]}"
    hk("kernelspec", "install", "--profile", PROFILE, "--name", name, "--user")
    yield name
    hk("kernelspec", "remove", name, check=False)


def set_provisioner_config(spec: str, **config: Any) -> None:
    """Set keys of the provisioner's config in the kernelspec (kernel.json's metadata)."""
    path = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / spec / "kernel.json"
    data = json.loads(path.read_text())
    data["metadata"]["kernel_provisioner"]["config"].update(config)
    path.write_text(json.dumps(data))


class Server:
    """A real ``jupyter server`` process of the test's own, on loopback with a token."""

    def __init__(self, workspace: Path, log_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.token = uuid.uuid4().hex
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        with open(log_path, "a") as log:  # stdin is not a terminal: as a server started by a script or nohup
            self.proc = subprocess.Popen(
                ["jupyter", "server", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                 f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={workspace}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=default_sigint)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("GET", "/api/status")
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.3)

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return api(self.base, self.token, method, path, body)

    def cell(self, kernel_id: str, code: str) -> dict[str, Any]:
        return asyncio.run(run_cell(self.base, self.token, kernel_id, code))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(120)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Start servers with ``servers.append(Server(...))``; each is stopped at the end."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def jupyter_kernels() -> list[dict[str, Any]]:
    return [r for r in json.loads(hk("list", "--json").stdout) if r["name"].startswith("jupyter-")]


def watchers(name: str) -> list[str]:
    return processes_mentioning(f"{WATCH_MODULE} {STATE_ROOT / name} ")


def wait_until_gone(name: str, job_id: str, timeout: float) -> float:
    """Seconds until the kernel's job has left the queue, its state and its watcher are gone."""
    started = time.monotonic()
    while job_id in squeue_ids() or (STATE_ROOT / name).exists() or watchers(name):
        assert time.monotonic() - started < timeout, (
            f"kernel {name} (job {job_id}) still there {timeout:.0f} s later: "
            f"queue {sorted(squeue_ids())}, state {(STATE_ROOT / name).exists()}, watchers {watchers(name)}")
        time.sleep(0.5)
    return time.monotonic() - started


def start_a_notebook_kernel(server: Server, spec: str) -> tuple[str, dict[str, Any]]:
    """A kernel through the REST API by kernelspec name, as JupyterLab starts one, with a
    variable set by a cell: (kernel id, its row in `hpc-kernel list`)."""
    assert not jupyter_kernels()
    kernel_id = server.api("POST", "/api/kernels", {"name": spec})["id"]
    ours = jupyter_kernels()
    assert len(ours) == 1 and ours[0]["state"] == "ready", ours
    out = server.cell(kernel_id, "import socket; x = 41 + 1; print(socket.gethostname())")
    assert out["status"] == "ok" and out["stdout"].strip() == ours[0]["node"], out
    assert len(watchers(ours[0]["name"])) == 1, "one watch per kernel, on this login node"
    return kernel_id, ours[0]


def test_a_clean_server_stop_ends_the_job(kernelspec: str, servers: list[Server], workspace: Path,
                                          tmp_path: Path) -> None:
    """SIGTERM (what systemd, OnDemand or `kill` send; a terminal's second Ctrl-C does the same):
    jupyter_server shuts its kernels down before it exits, and so the job ends."""
    servers.append(server := Server(workspace, tmp_path / "server.log"))
    _, row = start_a_notebook_kernel(server, kernelspec)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0, server.log_path.read_text()
    assert row["job_id"] not in squeue_ids(), "the job ended before the server exited"
    assert not (STATE_ROOT / row["name"]).exists()
    print(f"\nSIGTERM: the job ended with the server; its watch left {wait_until_gone(row['name'], row['job_id'], 10):.1f} s later")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_server_gone_without_its_clean_up_leaves_no_job_behind(how: str, kernelspec: str, servers: list[Server],
                                                                 workspace: Path, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, `kill -9`), or SIGINT to a server with no terminal (jupyter_server
    then leaves its event loop without shutting its kernels down): the kernel outlives the server
    for the grace period, listed and reachable, and a new server does not know it; then the
    watch shuts it down as `hpc-kernel shutdown` would. Nothing is left."""
    servers.append(server := Server(workspace, tmp_path / "server.log"))
    _, row = start_a_notebook_kernel(server, kernelspec)
    server.proc.send_signal(getattr(signal, how))
    server.proc.wait(60)
    gone = time.monotonic()
    log = server.log_path.read_text()
    assert "Shutting down 1 kernel" not in log, f"{how}: the server shut its kernels down itself:\n{log}"

    listed = jupyter_kernels()
    assert [(r["name"], r["job_id"], r["state"]) for r in listed] == [(row["name"], row["job_id"], "ready")], (
        "until the grace period ends, `hpc-kernel list` shows it (and `hpc-kernel shutdown` would end it)")
    servers.append(again := Server(workspace, tmp_path / "server-again.log"))
    assert again.api("GET", "/api/kernels") == [], "a restarted jupyter_server does not find the kernel"

    wait_until_gone(row["name"], row["job_id"], 60 - (time.monotonic() - gone))
    took = time.monotonic() - gone
    assert took >= ORPHAN_TIMEOUT - 1, f"the kernel ended {took:.1f} s after the server, before the grace period"
    assert not jupyter_kernels()
    print(f"\n{how}: the job and the kernel's state were gone {took:.1f} s after the server")


def test_a_server_killed_while_its_kernel_waits_in_the_queue_leaves_no_job(
        servers: list[Server], workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server is killed while the kernel's job waits in the queue (the DOWN partition: it
    would wait forever): the job is cancelled after the grace period."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "never.yaml").write_text("extends: local\nslurm: {partition: down}\n")
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(profiles))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_PATH", "")
    hk("kernelspec", "install", "-p", "never", "--name", "never", "--user")
    servers.append(server := Server(workspace, tmp_path / "server.log"))

    def start_kernel() -> None:
        with contextlib.suppress(OSError):  # the server dies under the request
            server.api("POST", "/api/kernels", {"name": "never"})

    threading.Thread(target=start_kernel, daemon=True).start()
    deadline = time.monotonic() + 60
    while not (pending := [r for r in jupyter_kernels() if r["state"] == "pending" and r["job_id"]]):
        assert time.monotonic() < deadline, "no pending kernel"
        time.sleep(0.5)
    time.sleep(1)
    assert len(watchers(pending[0]["name"])) == 1, "a kernel in the queue is claimed too"
    server.proc.kill()
    server.proc.wait(60)
    took = wait_until_gone(pending[0]["name"], pending[0]["job_id"], 60)
    print(f"\nSIGKILL while queued: the job was cancelled {took:.1f} s after the server")


FIRST_FRONTEND = r"""
import asyncio, json, os, sys
from jupyter_client import KernelManager

spec, info_path = sys.argv[1:3]
km = KernelManager(kernel_name=spec)
km.start_kernel()
client = km.blocking_client()
client.start_channels()
client.wait_for_ready(60)
reply = client.execute_interactive("x = 41 + 1", timeout=60)
assert reply["content"]["status"] == "ok", reply
info = asyncio.run(km.provisioner.get_provisioner_info())
fd = os.open(info_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, json.dumps(info).encode())
os.close(fd)
print("ready", flush=True)
sys.stdin.read()  # until the test kills it
"""


async def take_over(spec: str, info: dict[str, Any]) -> AsyncKernelManager:
    """A new KernelManager given the saved provisioner info, through jupyter_client's public API
    (as an application that persists its kernels would do it)."""
    km = AsyncKernelManager(kernel_name=spec)
    km.provisioner = KernelProvisionerFactory.instance(parent=km.parent).create_provisioner_instance(
        info["kernel_id"], km.kernel_spec, parent=km)
    await km.provisioner.load_provisioner_info(info)
    km.load_connection_info(km.provisioner.connection_info)
    return km


async def execute(km: AsyncKernelManager, code: str) -> str:
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = await client.execute_interactive(
            code, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", "")))
        assert reply["content"]["status"] == "ok", reply
        return "".join(out)
    finally:
        client.stop_channels()


def test_a_kernel_manager_takes_over_a_kernel_from_the_provisioner_info(kernelspec: str, tmp_path: Path) -> None:
    """A first frontend saves ``get_provisioner_info()`` and is killed; a new KernelManager given
    that info takes the still-running kernel over (same job, variables kept), keeps it past the
    first one's grace period, restarts it in its job and shuts it down: the job ends."""
    set_provisioner_config(kernelspec, orphan_timeout=8)
    info_path = tmp_path / "provisioner-info.json"
    first = subprocess.Popen([sys.executable, "-c", FIRST_FRONTEND, kernelspec, str(info_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "ready", first.communicate(timeout=30)
        info = json.loads(info_path.read_text())
        name = info["name"]
        job_id = json.loads(hk("status", name, "--json").stdout)["job_id"]
        key = (STATE_ROOT / name / "key").read_text().strip()
        assert key not in info_path.read_text(), "the saved info holds no key"
    finally:
        first.kill()
        first.wait()

    async def scenario() -> None:
        km = await take_over(kernelspec, info)
        try:
            assert await km.is_alive()
            assert (await execute(km, "print(x)")).strip() == "42", "the same kernel: its variables are there"
            await asyncio.sleep(8 + 6)  # past the first frontend's grace period
            assert await km.is_alive()
            assert json.loads(hk("status", name, "--json").stdout)["job_id"] == job_id
            assert len(watchers(name)) == 1, "the first frontend's watch left; this one's watches"

            await km.restart_kernel()
            assert (await execute(km, "print('x' in globals())")).strip() == "False"
            assert json.loads(hk("status", name, "--json").stdout)["job_id"] == job_id, "restarted in its job"
        finally:
            await km.shutdown_kernel()
        assert not await km.is_alive()

    asyncio.run(scenario())
    wait_until_gone(name, job_id, 15)


def test_a_kernel_that_is_gone_cannot_be_taken_over(kernelspec: str) -> None:
    async def scenario() -> str:
        km = AsyncKernelManager(kernel_name=kernelspec)
        await km.start_kernel()
        info = await km.provisioner.get_provisioner_info()
        await km.shutdown_kernel()
        with pytest.raises(Exception, match="no kernel named") as caught:
            await take_over(kernelspec, info)
        return str(caught.value)

    said = asyncio.run(scenario())
    assert "jupyter-" in said
    assert not jupyter_kernels()

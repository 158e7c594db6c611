"""Submit, wait, shut down, and every way a start can go wrong, on the real cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import RUNTIME_PROFILES, default_sigint, hk, run, sigints_from_one_interrupt, start_kernel

from hpc_kernels.profiles import load_profile

STATE_ROOT = Path.home() / ".local" / "share" / "hpc-kernels" / "kernels"


def squeue_ids() -> set[str]:
    return set(run(["squeue", "--me", "-h", "-o", "%i"]).stdout.split())


def processes_mentioning(text: str) -> list[str]:
    """Command lines on this machine (login node and, sharing /proc, the compute nodes) containing ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie and pid != str(os.getpid()):
            found.append(f"{pid}: {cmdline}")
    return found


def node_tmp_listing(node: str) -> list[str]:
    return run(["srun", f"--nodelist={node}", "--mem=100M", "--time=1", "ls", "/tmp"]).stdout.split()


@pytest.fixture
def profile_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    return tmp_path


def test_shutdown_leaves_nothing_behind(cluster: None, workspace: Path, flavour: tuple[str, str]) -> None:
    k = start_kernel(workspace, prefix="bye", profile=flavour[0], relay=flavour[1])
    state_dir = STATE_ROOT / k.name
    agent = json.loads((state_dir / "agent.json").read_text())
    node_dir = agent["node_dir"]
    assert ("tcp" in agent) == (k.relay == "tcp"), "only a tcp kernel's agent listens"
    assert k.job_id in squeue_ids()
    assert processes_mentioning(str(state_dir)), "the agent and relay run while the kernel lives"

    out = hk("shutdown", k.name)
    assert "shut down" in out.stderr

    assert k.job_id not in squeue_ids()
    assert not k.connection_file.parent.exists(), "login-side socket directory removed"
    assert not state_dir.exists(), "state (key, record) removed"
    assert processes_mentioning(str(state_dir)) == [], "no agent or relay process left"
    assert processes_mentioning(node_dir) == [], "no node-side relay, runtime or kernel left"
    assert Path(node_dir).name not in node_tmp_listing(k.node), "node-side directory removed"
    if k.relay == "tcp":
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((agent["tcp"]["host"], agent["tcp"]["port"]), timeout=5).close()
    job = run(["scontrol", "show", "job", "-o", k.job_id]).stdout
    assert "JobState=COMPLETED" in job, "a graceful shutdown ends the job by itself, not by scancel"


def test_submit_no_wait_returns_the_job_id_and_connect_waits(cluster: None, workspace: Path) -> None:
    name = f"nowait-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    job_id = hk("submit", "--profile", "local", "--name", name, "--workspace", str(workspace), "--no-wait").stdout.strip()
    assert job_id.isdigit() and time.monotonic() - started < 10
    try:
        assert job_id in squeue_ids()
        connection_file = hk("connect", name).stdout.strip()
        assert Path(connection_file).exists()
        assert hk("exec", name, "print('ok')").stdout.strip() == "ok"
    finally:
        hk("shutdown", name)


def test_a_live_name_cannot_be_reused(cluster: None, workspace: Path) -> None:
    k = start_kernel(workspace, prefix="dup")
    try:
        proc = hk("submit", "--profile", "local", "--name", k.name, "--workspace", str(workspace), check=False)
        assert proc.returncode == 1
        assert f"a kernel named {k.name!r} already exists" in proc.stderr
        assert k.exec("print('unharmed')").stdout.strip() == "unharmed"
    finally:
        hk("shutdown", k.name)


def test_unknown_profile_lists_known_ones(cluster: None) -> None:
    proc = hk("submit", "--profile", "no-such-site", "--name", "x", check=False)
    assert proc.returncode == 1
    assert "unknown profile 'no-such-site'" in proc.stderr and "local" in proc.stderr
    assert not (STATE_ROOT / "x").exists()


def test_slurm_refusal_shows_sbatch_message_and_leaves_nothing(cluster: None, workspace: Path) -> None:
    name = f"refused-{uuid.uuid4().hex[:6]}"
    before = squeue_ids()
    proc = hk("submit", "--profile", "local", "--name", name, "--partition", "nosuch", "--workspace", str(workspace),
              check=False)
    assert proc.returncode == 1
    assert "sbatch refused the job" in proc.stderr
    assert "Invalid partition name specified" in proc.stderr
    assert not (STATE_ROOT / name).exists()
    assert squeue_ids() == before


def test_a_kernel_that_fails_to_start_is_reported_with_the_log_tail(
    cluster: None, workspace: Path, profile_path: Path
) -> None:
    (profile_path / "broken.yaml").write_text("""
slurm: {partition: debug, time: "00:05:00"}
kernel:
  command: ["{python}", "-c", "import sys; print('kernel exploded: bad image', file=sys.stderr); sys.exit(3)",
            "{connection_file}"]
""")
    name = f"broken-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "broken", "--name", name, "--workspace", str(workspace), check=False)
    assert proc.returncode == 1, proc.stdout
    assert "failed before its kernel was ready" in proc.stderr
    assert "the kernel exited with code 3" in proc.stderr
    assert "kernel exploded: bad image" in proc.stderr, "the job's log tail is shown"
    status = json.loads(hk("status", name, "--json").stdout)
    assert status["state"] == "failed"
    assert status["job_id"] not in squeue_ids(), "the job is gone"
    hk("shutdown", name)
    assert not (STATE_ROOT / name).exists()


def test_a_missing_workspace_is_reported(cluster: None) -> None:
    name = f"nows-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "local", "--name", name, "--workspace", "/tmp/only-on-the-login-node", check=False)
    assert proc.returncode == 1
    assert "workspace /tmp/only-on-the-login-node does not exist on c" in proc.stderr
    hk("shutdown", name)


def _pending_profile(profile_path: Path) -> None:
    # A begin time in the future keeps the job PENDING with reason BeginTime.
    (profile_path / "later.yaml").write_text('slurm: {partition: debug, extra_options: ["--begin=now+1hour"]}\n')


def test_pending_reason_is_shown_and_timeout_cancels(cluster: None, workspace: Path, profile_path: Path) -> None:
    _pending_profile(profile_path)
    name = f"later-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "later", "--name", name, "--workspace", str(workspace), "--timeout", "3",
              check=False)
    assert proc.returncode == 1
    assert "PENDING (BeginTime), expected to start " in proc.stderr
    assert "was not ready within 3 s; it was cancelled" in proc.stderr
    status = json.loads(hk("status", name, "--json").stdout)
    assert status["job_id"] not in squeue_ids()
    hk("shutdown", name)


def test_ctrl_c_while_waiting_cancels_the_job(cluster: None, workspace: Path, profile_path: Path) -> None:
    _pending_profile(profile_path)
    name = f"intr-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(["hpc-kernel", "submit", "--profile", "later", "--name", name, "--workspace", str(workspace)],
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert proc.stderr is not None
    seen = ""
    while "PENDING" not in seen:
        line = proc.stderr.readline()
        assert line, f"submit ended early: {seen}"
        seen += line
    job_id = seen.split("submitted job ")[1].split()[0]
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(60) == 130, rest
    assert f"interrupted: ending kernel {name}" in rest and f"cancelled job {job_id}" in rest
    assert job_id not in squeue_ids()
    assert not (STATE_ROOT / name).exists()


def test_two_commands_at_once_start_one_relay(cluster: None, workspace: Path) -> None:
    name = f"race-{uuid.uuid4().hex[:6]}"
    hk("submit", "--profile", "local", "--name", name, "--workspace", str(workspace), "--no-wait")
    try:
        procs = [subprocess.Popen(["hpc-kernel", "connect", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True) for _ in range(4)]
        outputs = {p.communicate(timeout=120)[0].strip() for p in procs}
        assert len(outputs) == 1 and all(p.returncode == 0 for p in procs)
        node_dir = json.loads((STATE_ROOT / name / "agent.json").read_text())["node_dir"]
        node_sides = [p for p in processes_mentioning(f"hpc_kernels.relay node {node_dir}")
                      if os.path.basename(p.split(": ", 1)[1].split()[0]).startswith("python")]  # not the sruns
        assert len(node_sides) == 1, f"one node side, one relay: {node_sides}"
    finally:
        hk("shutdown", name)


def test_home_as_workspace_is_refused_and_not_the_default(cluster: None) -> None:
    name = f"home-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "local", "--name", name, "--workspace", str(Path.home()), check=False)
    assert proc.returncode == 1
    assert "would show the kernel your home directory" in proc.stderr
    assert not (STATE_ROOT / name).exists()

    proc = subprocess.run(["hpc-kernel", "submit", "--profile", "local", "--name", name], cwd=Path.home(),
                          capture_output=True, text=True, timeout=180)
    try:
        assert proc.returncode == 0, proc.stderr
        assert f"not binding {Path.home()} as the workspace" in proc.stderr
        assert (Path.home() / ".bashrc").exists()
        out = hk("exec", name, f"import os; print(os.getcwd(), os.path.exists({str(Path.home() / '.bashrc')!r}))").stdout
        assert out.split() == ["/tmp", "False"]
    finally:
        hk("shutdown", name)


def test_render_test_only_asks_slurm_and_submits_nothing(cluster: None) -> None:
    """Every shipped profile passes `sbatch --test-only` here. A GPU type of a real centre (Puhti's
    v100) is not on the test cluster (its one GPU is of type "standin"): such a request is made
    untyped with --gpus N, so that the rest of the profile is still judged by Slurm."""
    before = squeue_ids()
    for profile in shipped_profiles():
        gpus = load_profile(profile).get("slurm", "gpus") or ""
        untyped = ["--gpus", gpus.rsplit(":", 1)[1]] if ":" in gpus else []
        out = hk("render", "--profile", profile, "--name", "probe", "--no-workspace", "--test-only", *untyped)
        assert "to start at" in out.stdout, out.stdout
    refused = hk("render", "--profile", "local", "--name", "probe", "--no-workspace", "--partition", "nosuch",
                 "--test-only", check=False)
    assert refused.returncode == 1 and "Invalid partition name specified" in refused.stderr
    assert squeue_ids() == before
    assert not (STATE_ROOT / "probe").exists()


def shipped_profiles() -> list[str]:
    """Every shipped profile (the suite runs with no profile path of its own)."""
    lines = hk("profiles", "list").stdout.splitlines()[1:]
    return [line.split()[0] for line in lines]


def test_list_asks_slurm_once_for_all_kernels(cluster: None, workspace: Path, tmp_path: Path) -> None:
    """Two kernels listed with one squeue call for just their jobs (wrappers on PATH count calls)."""
    names = [f"many-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for name in names:
        hk("submit", "--profile", "local", "--name", name, "--workspace", str(workspace), "--no-wait")
    try:
        log = tmp_path / "calls"
        (tmp_path / "bin").mkdir()
        for tool in ("squeue", "scontrol"):
            wrapper = tmp_path / "bin" / tool
            wrapper.write_text(f'#!/bin/sh\necho "{tool} $@" >> {log}\nexec /usr/bin/{tool} "$@"\n')
            wrapper.chmod(0o755)
        rows = json.loads(hk("list", "--json", env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}).stdout)
        assert {r["name"] for r in rows} >= set(names)
        ids = sorted(r["job_id"] for r in rows)
        assert all(r["slurm_state"] in ("PENDING", "RUNNING") for r in rows if r["name"] in names)
        calls = log.read_text().splitlines()
        assert len(calls) == 1 and calls[0].startswith("squeue ") and f"--jobs={','.join(ids)}" in calls[0], calls
    finally:
        for name in names:
            hk("shutdown", name)


def test_profile_binds_are_mounted_as_asked(cluster: None, workspace: Path, profile_path: Path,
                                           runtime_profile: str) -> None:
    data, out = workspace / "dataset", workspace / "results"
    data.mkdir()
    (data / "x.csv").write_text("1,2,3\n")
    out.mkdir()
    (profile_path / "binds.yaml").write_text(
        f"extends: {runtime_profile}\nruntime:\n  binds: ['{data}:ro', '{out}:rw']\n")
    name = f"binds-{uuid.uuid4().hex[:6]}"
    hk("submit", "--profile", "binds", "--name", name, "--no-workspace")
    try:
        code = f"""
print(open({str(data / 'x.csv')!r}).read().strip())
try:
    open({str(data / 'new')!r}, 'w')
except OSError as e:
    print(e.strerror)
_ = open({str(out / 'result.txt')!r}, 'w').write('done')
"""
        assert hk("exec", name, code).stdout.splitlines() == ["1,2,3", "Read-only file system"]
        assert (out / "result.txt").read_text() == "done"
    finally:
        hk("shutdown", name)


def test_a_bind_missing_on_the_node_is_reported(cluster: None, profile_path: Path) -> None:
    (profile_path / "nobind.yaml").write_text("extends: local\nruntime:\n  binds: ['/tmp/only-on-the-login-node']\n")
    Path("/tmp/only-on-the-login-node").mkdir(exist_ok=True)
    name = f"nobind-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "nobind", "--name", name, "--no-workspace", check=False)
    assert proc.returncode == 1
    assert "runtime.binds: /tmp/only-on-the-login-node does not exist on c" in proc.stderr
    hk("shutdown", name)


def test_inside_an_allocation_the_kernel_is_a_step_of_it(cluster: None, workspace: Path,
                                                         runtime_profile: str) -> None:
    granted = run(["salloc", "--no-shell", "--nodes=1", "--time=10", "--partition=debug"]).stderr
    allocation = granted.split("Granted job allocation ")[1].split()[0]
    env = {"SLURM_JOB_ID": allocation}
    name = f"step-{uuid.uuid4().hex[:6]}"
    try:
        script = hk("render", "--profile", "local", "--name", name, "--no-workspace", env=env).stdout
        assert f"exec srun --jobid={allocation} --overlap" in script and "#SBATCH" not in script
        before = squeue_ids()
        proc = hk("submit", "--profile", runtime_profile, "--name", name, "--workspace", str(workspace), env=env)
        assert f"started kernel {name} as a step of job {allocation}" in proc.stderr
        assert squeue_ids() == before, "no new job"
        status = json.loads(hk("status", name, "--json").stdout)
        assert status["job_id"] == allocation and status["mode"] == "step of your allocation"
        node = run(["squeue", "-h", "-j", allocation, "-o", "%N"]).stdout.strip()
        assert hk("exec", name, "import socket; print(socket.gethostname())").stdout.strip() == node
        # Slurm's own signalling of a step would reach every process in it (and kill bubblewrap).
        assert sigints_from_one_interrupt(name) == 1
        assert hk("exec", name, "print('alive')").stdout.strip() == "alive"
        hk("shutdown", name)
        assert run(["squeue", "-h", "-j", allocation, "-o", "%T"]).stdout.strip() == "RUNNING", \
            "the allocation is the user's: shutdown leaves it running"
        steps = run(["squeue", "-h", "-s", "-j", allocation, "-o", "%j"]).stdout.split()
        assert f"hk-{name}" not in steps, steps
        assert not (STATE_ROOT / name).exists()
    finally:
        run(["scancel", allocation], check=False)


def test_new_job_flag_inside_an_allocation_and_a_stale_job_id(cluster: None) -> None:
    proc = hk("render", "--profile", "local", "--name", "x", "--no-workspace", "--new-job",
              env={"SLURM_JOB_ID": "999999"})
    assert "#SBATCH --job-name=hk-x" in proc.stdout
    name = f"stale-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "local", "--name", name, "--no-workspace", env={"SLURM_JOB_ID": "999999"},
              check=False)
    assert proc.returncode == 1 and "SLURM_JOB_ID is 999999, but that job is not known to Slurm" in proc.stderr
    assert not (STATE_ROOT / name).exists()


def test_a_failing_kernel_in_an_allocation_stops_its_step_not_the_allocation(
    cluster: None, profile_path: Path
) -> None:
    (profile_path / "broken.yaml").write_text(
        'extends: local\nkernel:\n  command: ["{python}", "-c", "import sys; sys.exit(4)", "{connection_file}"]\n')
    granted = run(["salloc", "--no-shell", "--nodes=1", "--time=10", "--partition=debug"]).stderr
    allocation = granted.split("Granted job allocation ")[1].split()[0]
    env = {"SLURM_JOB_ID": allocation}
    name = f"stepfail-{uuid.uuid4().hex[:6]}"
    try:
        proc = hk("submit", "--profile", "broken", "--name", name, "--no-workspace", env=env, check=False)
        assert proc.returncode == 1 and "the kernel exited with code 4" in proc.stderr, proc.stderr
        refused = hk("submit", "--profile", "local", "--name", name, "--cpus", "2", env=env, check=False)
        assert refused.returncode == 1 and "--cpus: inside an allocation" in refused.stderr
        hk("shutdown", name)
        assert run(["squeue", "-h", "-j", allocation, "-o", "%T"]).stdout.strip() == "RUNNING"
        assert f"hk-{name}" not in run(["squeue", "-h", "-s", "-j", allocation, "-o", "%j"]).stdout.split()
    finally:
        run(["scancel", allocation], check=False)


def test_state_lives_where_paths_state_says(cluster: None, workspace: Path) -> None:
    """`paths.state` (here from the environment; a site sets it in /etc/hpc-kernels/config.yaml):
    every command finds the kernel there, and the default root holds nothing of it."""
    root = Path.home() / f"hk-alt-state-{uuid.uuid4().hex[:6]}"
    env = {"HPC_KERNELS_PATHS_STATE": str(root)}
    name = f"alt-{uuid.uuid4().hex[:6]}"
    try:
        hk("submit", "-p", "local", "-n", name, "--workspace", str(workspace), env=env)
        assert (root / "kernels" / name / "record.json").is_file()
        assert not (STATE_ROOT / name).exists()
        assert f"--chdir={root}/kernels/{name}" in (root / "kernels" / name / "job.sh").read_text()
        assert hk("exec", name, "print(6 * 7)", env=env).stdout.strip() == "42"
        assert name in hk("list", env=env).stdout and name not in hk("list").stdout
        refused = hk("submit", "-p", "local", "-n", "x", "--workspace", str(root), env=env, check=False)
        assert refused.returncode == 1 and f"would show the kernel {root}" in refused.stderr
        hk("shutdown", name, env=env)
        assert not (root / "kernels" / name).exists()
    finally:
        hk("shutdown", name, env=env, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_a_damaged_record_is_named_and_shutdown_still_ends_the_job(cluster: None) -> None:
    """record.json lost its end (a file system that dropped a write): every command says which
    file is damaged and what to do, with exit 1; `shutdown` finds the job by its name, ends it
    and removes the state. A damaged agent.json only costs what the agent said."""
    k = start_kernel(None, prefix="dmg")
    state = STATE_ROOT / k.name
    (state / "agent.json").write_text('{"state": "rea')
    assert json.loads(hk("status", k.name, "--json").stdout)["slurm_state"] == "RUNNING"
    record = (state / "record.json").read_text()
    (state / "record.json").write_text(record[: len(record) // 2])
    for command in (["list"], ["status", k.name], ["exec", k.name, "1"], ["connect", k.name]):
        proc = hk(*command, check=False)
        assert proc.returncode == 1, (command, proc.stderr)
        assert f"kernel '{k.name}': its state file {state / 'record.json'} is damaged" in proc.stderr, proc.stderr
        assert f"`hpc-kernel shutdown {k.name}`" in proc.stderr and "Traceback" not in proc.stderr
    assert f"{k.name} (damaged)" in hk("status", "nosuch", check=False).stderr
    proc = hk("shutdown", k.name)
    assert f"cancelled job {k.job_id}" in proc.stderr and "removed its damaged state" in proc.stderr
    assert k.job_id not in squeue_ids() and not state.exists()
    assert not k.connection_file.parent.exists(), "its relay stopped, its login-side directory gone"


def _gone_everywhere(state: Path, node_dir: str) -> None:
    assert processes_mentioning(str(state)) == [], "no agent or relay process"
    assert processes_mentioning(node_dir) == [], "no node side, runtime or kernel"
    assert not [name for name in ("key", "curve.json", "tls-ca.pem", "tls-node.pem", "tls-login.pem")
                if (state / name).exists()], "no secret left once the kernel is over"


def test_a_kernel_that_crashes_is_reported_dead_and_leaves_no_process_or_secret(cluster: None) -> None:
    """`os._exit(1)` in a cell: exec says the kernel died, status says it ended and why, the job
    is over, the relay has ended and removed its sockets, and the key is gone from disk."""
    k = start_kernel(None, prefix="crash", relay="tcp")
    state = STATE_ROOT / k.name
    node_dir = json.loads((state / "agent.json").read_text())["node_dir"]
    proc = k.exec("import os; os._exit(1)", check=False, timeout=120)
    assert proc.returncode != 0
    deadline = time.monotonic() + 30
    while k.job_id in squeue_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    status = json.loads(hk("status", k.name, "--json").stdout)
    assert status["state"] == "ended" and "exit code 1" in status["message"], status
    assert k.job_id not in squeue_ids()
    deadline = time.monotonic() + 15
    while k.connection_file.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not k.connection_file.parent.exists(), "the relay saw the kernel end and removed its sockets"
    _gone_everywhere(state, node_dir)
    hk("shutdown", k.name)
    assert not state.exists()


def test_a_job_cancelled_behind_our_back_is_reported_and_leaves_nothing(cluster: None) -> None:
    """`scancel` by hand (or an admin, or preemption): status says so at once, nothing runs on
    either side, and the key is gone once anyone has looked."""
    k = start_kernel(None, prefix="scan")
    state = STATE_ROOT / k.name
    node_dir = json.loads((state / "agent.json").read_text())["node_dir"]
    run(["scancel", k.job_id])
    deadline = time.monotonic() + 30
    while k.job_id in squeue_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    status = json.loads(hk("status", k.name, "--json").stdout)
    assert status["state"] == "ended" and status["slurm_state"] in ("CANCELLED", "(gone)"), status
    assert "SIGTERM" in status["message"] or status["slurm_state"] == "CANCELLED", status
    deadline = time.monotonic() + 15
    while k.connection_file.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not k.connection_file.parent.exists()
    _gone_everywhere(state, node_dir)
    proc = hk("exec", k.name, "1", check=False)
    assert proc.returncode == 1 and "ended" in proc.stderr, proc.stderr
    hk("shutdown", k.name)


def test_a_job_at_its_time_limit_warns_then_is_reported_and_leaves_nothing(cluster: None, runtime_profile: str) -> None:
    """`--time 1 --time-warning 40s`: the cell that runs when the time comes gets the warning in
    its output (ipykernel 6 in the Apptainer image, 7 under bubblewrap). Slurm then ends the job
    after the minute (SIGTERM, then SIGKILL after KillWait): status says TIMEOUT; exec, waiting
    on the cell, says why; nothing is left."""
    k = start_kernel(None, "--time", "1", "--time-warning", "40s", prefix="tl", profile=runtime_profile)
    state = STATE_ROOT / k.name
    node_dir = json.loads((state / "agent.json").read_text())["node_dir"]
    proc = k.exec("import time\nwhile True: time.sleep(1)", check=False, timeout=150)
    assert proc.returncode == 1 and "has ended" in proc.stderr, proc.stderr
    warning = f"[hpc-kernels] WARNING: job {k.job_id} reaches its time limit in"
    assert proc.stderr.count(warning) == 1, proc.stderr
    assert "save your work" in proc.stderr.split(warning)[1].split("has ended")[0]
    assert "time limit: the job ends at" in hk("logs", k.name).stdout
    deadline = time.monotonic() + 30
    while (k.job_id in squeue_ids() or k.connection_file.parent.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert k.job_id not in squeue_ids() and not k.connection_file.parent.exists()
    status = json.loads(hk("status", k.name, "--json").stdout)
    assert status["state"] == "ended" and status["slurm_state"] == "TIMEOUT", status
    _gone_everywhere(state, node_dir)
    hk("shutdown", k.name)


HIBERNATING_STATE = """
x = 41
import json, threading
lock = threading.Lock()
def f():
    return 1
try:
    import pandas as pd
    df = pd.DataFrame({"a": [1, 2], "b": [3.5, 4.5]})
except ImportError:
    df = None
"""


def wait_for_state(name: str, state: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(hk("status", name, "--json").stdout)
        if status["state"] == state:
            return status
        assert time.monotonic() < deadline, f"{name} is {status['state']}, not {state}, after {timeout:.0f} s: {status}"
        time.sleep(1)


def test_an_idle_kernel_hibernates_and_resumes_with_its_variables(cluster: None, workspace: Path,
                                                                  runtime_profile: str) -> None:
    """`--idle-timeout 8s`: a connected client keeps the kernel awake; once it has gone and no cell
    ran for 8 s, the variables are saved in the workspace (0600), the job ends and status says
    hibernated, naming what could not be saved; the name is not taken over by a plain submit.
    `submit --resume` brings them back on a new job
    (a pandas DataFrame where the kernel has pandas; the Apptainer image has not) and says at the
    first cell what came back and what did not; the saved copy stays until the shutdown."""
    from jupyter_client import BlockingKernelClient

    k = start_kernel(workspace, "--idle-timeout", "8s", prefix="hib", profile=runtime_profile)
    has_pandas = k.exec(HIBERNATING_STATE + "print(df is not None)").stdout.strip() == "True"
    assert has_pandas == (runtime_profile == RUNTIME_PROFILES["bwrap"]), "the site venv has pandas, the image not"
    client = BlockingKernelClient(connection_file=str(k.connection_file))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        time.sleep(14)
        assert json.loads(hk("status", k.name, "--json").stdout)["state"] == "ready", "a client keeps it awake"
    finally:
        client.stop_channels()
    status = wait_for_state(k.name, "hibernated", 60)
    assert k.job_id not in squeue_ids()
    snapshot = workspace / ".hpc-kernels-hibernated" / k.name / "namespace.pickle"
    assert str(snapshot) in str(status["message"]) and "not saved: f, lock" in str(status["message"]), status
    assert snapshot.stat().st_mode & 0o777 == 0o600 and snapshot.parent.stat().st_mode & 0o777 == 0o700
    assert not (STATE_ROOT / k.name / "key").exists()

    proc = hk("submit", "--profile", runtime_profile, "--name", k.name, "--no-workspace", check=False)
    assert proc.returncode == 1 and f"kernel {k.name!r} is hibernated" in proc.stderr, proc.stderr
    proc = hk("submit", "--resume", k.name)
    resumed = json.loads(hk("status", k.name, "--json").stdout)
    assert resumed["state"] == "ready" and resumed["job_id"] != k.job_id, resumed
    assert "resuming kernel" in proc.stderr
    proc = k.exec("print(x, json.dumps([1]), 'lock' in globals(), 'f' in globals(), "
                  "'x' in get_ipython().user_ns_hidden)")
    assert proc.stdout.strip() == "41 [1] False False False", proc.stdout  # x is the user's again (%who)
    assert "[hpc-kernels] Resumed" in proc.stderr and "not restored: lock: cannot be pickled" in proc.stderr
    assert "not restored: f: a function defined in a cell" in proc.stderr
    if has_pandas:
        assert k.exec("print(df.b.sum(), list(df.columns))").stdout.strip() == "8.0 ['a', 'b']"
    assert "restored" not in k.exec("print(1)").stderr.lower()
    assert snapshot.exists(), "the saved copy stays while the resumed kernel runs (it may crash)"
    proc = hk("shutdown", k.name)
    assert "removed the saved variables" in proc.stderr and not snapshot.exists() and not snapshot.parent.exists()


def test_resume_refuses_a_kernel_that_did_not_hibernate(cluster: None) -> None:
    k = start_kernel(None, prefix="nohib")
    try:
        proc = hk("submit", "--resume", k.name, check=False)
        assert proc.returncode == 1 and "is ready, not hibernated: there is nothing to resume" in proc.stderr
    finally:
        hk("shutdown", k.name)

"""Runtime-specific behaviour on the real cluster: GPUs, kernel images, and the runtimes' own failures.

GPUs: no GPU exists on these machines. The test cluster's node c1 declares one GPU in gres.conf,
backed by a stand-in device node (/dev/nvidia0, the NVIDIA major number, no driver; see
cluster/up.sh). Slurm schedules it and sets CUDA_VISIBLE_DEVICES for real, and the runtimes bind
it for real (`apptainer --nv`, bwrap --dev-bind); CUDA itself cannot run. docs/admin-guide.md
gives the command a site runs on a real GPU node.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RUNTIME_PROFILES, hk, run, start_kernel
from test_cluster_lifecycle import STATE_ROOT, processes_mentioning, squeue_ids

IMAGES = Path("/opt/hpc-kernels/images")
GPU_PROBE = ("import os; print(os.environ.get('CUDA_VISIBLE_DEVICES')); "
             "print(sorted(d for d in os.listdir('/dev') if d.startswith('nvidia')))")


@pytest.fixture
def profile_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    return tmp_path


def slurm_gpu_indices(job_id: str) -> str:
    """The GPU indices Slurm gave the job, from `scontrol show job -d` (GRES=gpu:standin:1(IDX:0))."""
    detail = run(["scontrol", "show", "job", "-d", job_id]).stdout
    found = re.search(r"GRES=\S*gpu\S*\(IDX:([0-9,\-]+)\)", detail)
    assert found, detail
    return found.group(1)


def runtime_command_line(kernel_name: str) -> str:
    """The runtime command line the agent started, as it says in the job log (Apptainer's starter
    rewrites its own /proc/PID/cmdline)."""
    log = (STATE_ROOT / kernel_name / "job.log").read_text()
    found = re.search(r"runtime command: (.*)", log)
    assert found, log
    return found.group(1)


def runtime_pid(kernel_name: str) -> int:
    """The runtime process: the node agent's child (the node shares this machine's /proc)."""
    agent = json.loads((STATE_ROOT / kernel_name / "agent.json").read_text())["pid"]
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    # podman's conmon and pause process are the agent's children too (they daemonize; the agent
    # is a subreaper): the runtime is `podman run`
    runtimes = [c for c in children if len(children) == 1 or b"\0run\0" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(runtimes) == 1, children
    return int(runtimes[0])


def test_a_gpu_kernel_gets_the_gpu_slurm_chose(cluster: None, runtime_profile: str) -> None:
    """A stand-in GPU (see the module docstring): Slurm's request, --nv or the device bind, and
    CUDA_VISIBLE_DEVICES are real; no CUDA call is made."""
    k = start_kernel(None, "--gpus", "1", "--partition", "gpu", prefix="gpu", profile=runtime_profile)
    try:
        script = (STATE_ROOT / k.name / "job.sh").read_text()
        assert "#SBATCH --gres=gpu:1" in script
        assert k.node == "c1"
        visible, devices = k.exec(GPU_PROBE).stdout.splitlines()
        assert visible == slurm_gpu_indices(k.job_id) == "0"
        assert devices == "['nvidia0', 'nvidiactl']"
        argv = runtime_command_line(k.name)
        if runtime_profile == RUNTIME_PROFILES["apptainer"]:
            assert " --nv " in argv, argv
        elif runtime_profile == RUNTIME_PROFILES["podman"]:  # runtime.podman_gpus devices
            assert "--device /dev/nvidia0:/dev/nvidia0:rwm --device /dev/nvidiactl:/dev/nvidiactl:rwm" in argv, argv
        else:
            assert "--dev-bind /dev/nvidia0 /dev/nvidia0" in argv, argv
    finally:
        hk("shutdown", k.name)


def test_a_kernel_without_gpus_sees_no_gpu_device(kernel) -> None:  # type: ignore[no-untyped-def]
    """The stand-in device nodes exist on every node's /dev; a sandbox without a GPU request shows none."""
    visible, devices = kernel.exec(GPU_PROBE).stdout.splitlines()
    assert visible == "None" and devices == "[]"


def test_the_gpu_profile_asks_for_a_gpu_and_runs_with_nv(cluster: None) -> None:
    k = start_kernel(None, prefix="lgpu", profile="local-gpu")
    try:
        assert k.exec(GPU_PROBE).stdout.splitlines() == ["0", "['nvidia0', 'nvidiactl']"]
    finally:
        hk("shutdown", k.name)


# --- images -------------------------------------------------------------------------------------


def test_image_check_tells_a_kernel_image_from_one_without_ipykernel(cluster: None) -> None:
    good = hk("image", "check", "--profile", "local-apptainer", "--json")
    report = json.loads(good.stdout)
    assert report["ok"] is True and report["ipykernel"] and report["python"].startswith("3.")
    bad = hk("image", "check", str(IMAGES / "no-ipykernel"), check=False)
    assert bad.returncode == 1
    assert "problem: ipykernel cannot be imported (ModuleNotFoundError" in bad.stdout
    assert "cannot run a kernel" in bad.stdout


def test_image_build_from_an_existing_image_is_atomic_and_checked(cluster: None, tmp_path: Path) -> None:
    """A real `apptainer build --fakeroot` as the test user, on top of the cluster's image (no
    download): the %test section runs, and the image appears only when the build succeeded."""
    out = Path.home() / "hk-test-images" / f"derived-{uuid.uuid4().hex[:6]}.sif"
    try:
        proc = hk("image", "build", str(out), "--from", str(IMAGES / "kernel.sif"), timeout=600)
        assert out.is_file() and "ipykernel" in proc.stdout + proc.stderr
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == [], "no partial file left"
        assert json.loads(hk("image", "check", str(out), "--json").stdout)["ok"] is True
        # An image whose %test fails is not written at all.
        broken = tmp_path / "broken.def"
        broken.write_text(f"Bootstrap: localimage\nFrom: {IMAGES / 'no-ipykernel'}\n\n%test\n    python3 -c 'import ipykernel'\n")
        failed = hk("image", "build", str(out.with_name("broken.sif")), "--definition", str(broken),
                    check=False, timeout=600)
        assert failed.returncode == 1 and "apptainer build failed" in failed.stderr
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


# --- the runtimes' own failures -------------------------------------------------------------------


def assert_nothing_left(name: str, jobs_before: set[str]) -> None:
    assert squeue_ids() <= jobs_before, "no job left running"
    status = hk("status", name, "--json", check=False)
    if status.returncode == 0:  # a failed kernel stays listed until shut down, with its reason
        assert json.loads(status.stdout)["state"] == "failed"
        hk("shutdown", name)
    assert not (STATE_ROOT / name).exists()
    assert processes_mentioning(str(STATE_ROOT / name)) == []


def test_a_missing_image_is_refused_before_submit(cluster: None) -> None:
    name = f"noimg-{uuid.uuid4().hex[:6]}"
    before = squeue_ids()
    proc = hk("submit", "-p", "local-apptainer", "-n", name, "--no-workspace", "--image", str(IMAGES / "nope.sif"),
              check=False)
    assert proc.returncode == 1
    assert f"runtime.image (command line (--image)): {IMAGES / 'nope.sif'} does not exist" in proc.stderr
    assert squeue_ids() == before and not (STATE_ROOT / name).exists()


def test_an_image_without_ipykernel_fails_at_submit_with_the_reason(cluster: None) -> None:
    name = f"noipy-{uuid.uuid4().hex[:6]}"
    before = squeue_ids()
    proc = hk("submit", "-p", "local-apptainer", "-n", name, "--no-workspace", "--image",
              str(IMAGES / "no-ipykernel"), check=False)
    assert proc.returncode == 1
    first = proc.stderr.split("last lines of")[0]
    assert "the kernel exited with code 1 before it was ready" in first
    assert "No module named ipykernel_launcher" in first, "the reason is in the message, not only in the log"
    assert_nothing_left(name, before)


@pytest.mark.parametrize("runtime", sorted(RUNTIME_PROFILES))
def test_a_runtime_that_is_not_installed_is_a_clear_error(cluster: None, profile_path: Path, runtime: str) -> None:
    key = "podman_command" if runtime == "podman" else "executable"
    (profile_path / "noruntime.yaml").write_text(
        f"extends: {RUNTIME_PROFILES[runtime]}\nruntime:\n  {key}: /opt/nowhere/{runtime}\n")
    name = f"nort-{uuid.uuid4().hex[:6]}"
    before = squeue_ids()
    proc = hk("submit", "-p", "noruntime", "-n", name, "--no-workspace", check=False)
    assert proc.returncode == 1
    assert f"runtime {runtime}: '/opt/nowhere/{runtime}' is not installed on c" in proc.stderr
    assert_nothing_left(name, before)


def test_an_apptainer_failure_comes_back_as_its_own_message(cluster: None, profile_path: Path) -> None:
    """Apptainer refusing to start (here: an image file that is not an image) is reported with
    Apptainer's own FATAL line, not as a silent timeout."""
    fake = Path.home() / "hk-test-images" / "not-an-image.sif"
    fake.parent.mkdir(exist_ok=True)
    fake.write_bytes(os.urandom(4096))
    name = f"fatal-{uuid.uuid4().hex[:6]}"
    before = squeue_ids()
    try:
        proc = hk("submit", "-p", "local-apptainer", "-n", name, "--no-workspace", "--image", str(fake), check=False)
        assert proc.returncode == 1
        first = proc.stderr.split("last lines of")[0]
        assert "the kernel exited with code 255 before it was ready" in first and "FATAL" in first, proc.stderr
        assert_nothing_left(name, before)
    finally:
        shutil.rmtree(fake.parent, ignore_errors=True)


def test_the_runtime_is_called_without_the_key_and_with_its_isolation_flags(kernel) -> None:  # type: ignore[no-untyped-def]
    argv = runtime_command_line(kernel.name)
    if kernel.profile == RUNTIME_PROFILES["apptainer"]:
        flags = ("--containall", "--no-home", "--cleanenv", "--network none", "--no-mount bind-paths")
    elif kernel.profile == RUNTIME_PROFILES["podman"]:
        # the kernel's environment goes by name: only HOME has a value on the command line
        flags = ("--network none", "--userns keep-id", "--cap-drop ALL", "--security-opt no-new-privileges",
                 "--read-only", "--pull never", "--env SLURM_JOB_ID ", "--env HOME=/tmp ")
        assert "--env SLURM_JOB_ID=" not in argv and "--volume /home/hk-alice:" not in argv, argv
    else:
        # deny by default: the system paths, never the node's root; no user namespaces inside
        flags = ("--unshare-all", "--die-with-parent", "--new-session", "--disable-userns", "--ro-bind /usr /usr")
        assert "--ro-bind / /" not in argv, argv
    for flag in flags:
        assert flag in argv, argv
    key = (STATE_ROOT / kernel.name / "key").read_text().strip()
    assert key not in argv
    assert key not in Path(f"/proc/{runtime_pid(kernel.name)}/cmdline").read_text()
    environ = Path(f"/proc/{runtime_pid(kernel.name)}/environ").read_bytes().decode(errors="replace")
    assert key not in environ and "BINDPATH" not in environ


@pytest.fixture
def test_network_server() -> Iterator[int]:
    """An HTTP server on the login node's address on the cluster network (10.77.7.1), which the
    compute nodes reach: a host the sandbox may be allowed to reach."""
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            body = b"hello from the test network"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOGIN_ADDRESS, 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


LOGIN_ADDRESS = "10.77.7.1"
THROUGH_PROXY = """
import http.client, os
host, port = os.environ["HTTPS_PROXY"].removeprefix("http://").split(":")
def fetch(target_port):
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.set_tunnel("{address}", target_port)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    except OSError as e:
        return f"refused: {{e}}"
print(fetch({port}))
print(fetch({port} + 1))
import socket
try:
    socket.create_connection(("{address}", {port}), timeout=5)
    print("direct: connected")
except OSError as e:
    print("direct:", e)
import subprocess
print("child:", subprocess.run(["sh", "-c", "echo $https_proxy"], capture_output=True, text=True).stdout.strip())
"""


def test_an_allowed_host_is_reached_through_the_nodes_proxy_and_nothing_else(
        cluster: None, runtime_profile: str, test_network_server: int) -> None:
    """`--allow-host 10.77.7.1:PORT`: inside the sandbox, HTTPS_PROXY leads to the node's proxy,
    which opens a tunnel to that host and port only (403 for another port); a direct connection
    still finds no network; programs the kernel starts inherit the proxy; the job log has each decision."""
    port = test_network_server
    k = start_kernel(None, "--allow-host", f"{LOGIN_ADDRESS}:{port}", prefix="egr", profile=runtime_profile)
    try:
        lines = k.exec(THROUGH_PROXY.format(address=LOGIN_ADDRESS, port=port)).stdout.splitlines()
        assert lines[0] == "hello from the test network", lines
        assert lines[1].startswith("refused: ") and "403" in lines[1], lines
        assert lines[2] == "direct: [Errno 101] Network is unreachable", lines
        assert lines[3].startswith("child: http://127.0.0.1:"), lines
        log = hk("logs", k.name).stdout
        assert f"egress: allowed CONNECT {LOGIN_ADDRESS}:{port}" in log
        assert f"egress: refused CONNECT {LOGIN_ADDRESS}:{port + 1} (not in runtime.allow_hosts)" in log
    finally:
        hk("shutdown", k.name)


def test_without_allowed_hosts_there_is_no_proxy(kernel) -> None:  # type: ignore[no-untyped-def]
    out = kernel.exec("import os; print(sorted(k for k in os.environ if 'proxy' in k.lower()))").stdout
    assert out.strip() == "[]"


MEMORY_HOG = """
import subprocess, sys, time
hog = "import time; x = b'\\\\x01' * (150 << 20); time.sleep(120)"
children = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(4)]
time.sleep(120)
"""
# At most 2**8 processes even if nothing stopped it: the test must not be a real fork bomb.
BOUNDED_FORK_BOMB = """
import os, time
for _ in range(8):
    try:
        os.fork()
    except OSError:
        pass
time.sleep(120)
"""


def test_a_memory_hog_and_a_fork_bomb_end_the_kernel_with_the_reason(
        cluster: None, runtime_profile: str, profile_path: Path) -> None:
    """`limits: {memory: 400M, processes: 64}`. One allocation over the limit fails in its cell
    and the kernel lives on; four processes of 150 MiB each (none over it alone) end the kernel,
    and exec and status say it went over limits.memory. A fork bomb stops growing at the process
    limit (RLIMIT_NPROC, in the sandbox's user namespace) and the kernel is ended, citing
    limits.processes. Nothing is left running on the node."""
    (profile_path / "limited.yaml").write_text(
        f"extends: {runtime_profile}\nlimits:\n  memory: 400M\n  processes: 64\n")
    k = start_kernel(None, prefix="lim", profile="limited")
    proc = k.exec("x = b'\\x01' * (600 << 20)", check=False)
    assert proc.returncode == 1 and "MemoryError" in proc.stderr, proc.stderr
    assert k.exec("print('alive')").stdout.strip() == "alive"
    proc = k.exec(MEMORY_HOG, check=False, timeout=150)
    assert proc.returncode == 1 and "has ended" in proc.stderr, proc.stderr
    assert "over the limit of 400.0 MiB (limits.memory)" in proc.stderr, proc.stderr
    status = k.status()
    assert status["state"] == "ended" and "limits.memory" in str(status["message"]), status
    hk("shutdown", k.name)

    k = start_kernel(None, prefix="lim", profile="limited")
    proc = k.exec(BOUNDED_FORK_BOMB, check=False, timeout=150)
    assert proc.returncode == 1 and "limit of 64 processes (limits.processes) for 3 s" in proc.stderr, proc.stderr
    node_dir = json.loads((STATE_ROOT / k.name / "agent.json").read_text())["node_dir"]
    assert processes_mentioning(node_dir) == []
    hk("shutdown", k.name)

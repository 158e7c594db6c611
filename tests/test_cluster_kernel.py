"""A kernel on a compute node of the real cluster, used through the relay from the login node."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient

from conftest import RELAY_RECORD, Kernel, default_sigint, hk, run, sigints_from_one_interrupt, start_kernel

LOGIN_ADDRESS = "10.77.7.1"


@pytest.fixture
def client(kernel: Kernel):
    c = BlockingKernelClient()
    c.load_connection_file(str(kernel.connection_file))
    c.start_channels()
    c.wait_for_ready(timeout=30)
    yield c
    c.stop_channels()


def test_code_runs_on_the_compute_node(kernel: Kernel) -> None:
    out = kernel.exec("import socket; print(socket.gethostname())").stdout.strip()
    assert out == kernel.node
    assert out in ("c1", "c2") and out != socket.gethostname()


def test_variables_persist_between_exec_calls(kernel: Kernel) -> None:
    kernel.exec("counter = 41")
    assert kernel.exec("counter += 1; print(counter)").stdout.strip() == "42"


def test_login_side_connection_file_is_ipc_in_a_private_dir(kernel: Kernel) -> None:
    info = json.loads(kernel.connection_file.read_text())
    assert info["transport"] == "ipc"
    assert Path(info["ip"]).parent == kernel.connection_file.parent
    assert oct(os.stat(kernel.connection_file.parent).st_mode & 0o777) == "0o700"
    assert oct(os.stat(kernel.connection_file).st_mode & 0o777) == "0o600"


def test_jupyter_client_gets_every_reply(client: BlockingKernelClient) -> None:
    info = client.kernel_info(reply=True, timeout=30)
    assert info["content"]["status"] == "ok" and info["content"]["language_info"]["name"] == "python"

    reply = client.execute_interactive("import math\nresult = math.factorial(10)\nresult", timeout=30,
                                       output_hook=lambda msg: None)
    assert reply["content"]["status"] == "ok"

    complete = client.complete("math.facto", reply=True, timeout=30)
    content = complete["content"]
    assert any(m.endswith("factorial") for m in content["matches"]), content
    assert content["cursor_end"] == len("math.facto")

    inspect = client.inspect("math.factorial", reply=True, timeout=30)
    assert inspect["content"]["found"] is True


PAYLOAD_CODE = """
import hashlib, os
from ipykernel.comm import Comm
payload = bytes(range(256)) * 64 + b"\\r\\n\\n\\r\\x00\\x03\\x04\\x1a\\x7f" + os.urandom(3_000_000)
Comm(target_name="hk-test", data={"sha256": hashlib.sha256(payload).hexdigest()}, buffers=[payload])
"""

HASHING_TARGET_CODE = """
import hashlib
try:
    from comm import get_comm_manager
except ImportError:  # ipykernel < 6.18 (Debian bookworm's, in the Apptainer image) has its own
    get_comm_manager = lambda: get_ipython().kernel.comm_manager
def _hash_buffers(comm, msg):
    data = bytes(msg["buffers"][0])
    comm.send({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
get_comm_manager().register_target("hk-hash", _hash_buffers)
"""


def _iopub_until(client: BlockingKernelClient, match, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = client.get_iopub_msg(timeout=timeout)
        if match(msg):
            return msg
    pytest.fail("the expected message did not arrive")


def test_binary_payloads_cross_the_relay_unchanged_kernel_to_client(client: BlockingKernelClient) -> None:
    """Every byte value, in a 3 MB message buffer, node to login (srun's stdout is a pty: it must be raw)."""
    client.execute(PAYLOAD_CODE)
    msg = _iopub_until(client, lambda m: m["msg_type"] == "comm_open" and m["content"].get("target_name") == "hk-test")
    buffer = bytes(msg["buffers"][0])
    assert hashlib.sha256(buffer).hexdigest() == msg["content"]["data"]["sha256"]
    assert len(buffer) == 256 * 64 + 9 + 3_000_000


def test_binary_payloads_cross_the_relay_unchanged_client_to_kernel(client: BlockingKernelClient) -> None:
    """Every byte value, in a 3 MB message buffer, login to node (srun's stdin)."""
    reply = client.execute_interactive(HASHING_TARGET_CODE, output_hook=lambda m: None, timeout=60)
    assert reply["content"]["status"] == "ok"
    payload = bytes(range(256)) * 64 + b"\r\n\n\r\x00\x03\x04\x1a\x7f" + os.urandom(3_000_000)
    comm_id = uuid.uuid4().hex
    client.session.send(client.shell_channel.socket, "comm_open",
                        {"comm_id": comm_id, "target_name": "hk-hash", "data": {}}, buffers=[payload])
    msg = _iopub_until(client, lambda m: m["msg_type"] == "comm_msg" and m["content"].get("comm_id") == comm_id)
    assert msg["content"]["data"] == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


def test_exec_streams_output_as_it_comes(kernel: Kernel) -> None:
    """The code sleeps 3 s between two prints: the first line must arrive well before the second."""
    started = time.monotonic()
    proc = subprocess.Popen(
        ["hpc-kernel", "exec", kernel.name, "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "first"
    first_at = time.monotonic()
    assert proc.stdout.readline().strip() == "second"
    second_at = time.monotonic()
    assert proc.wait(30) == 0
    assert second_at - first_at >= 2.5, "the first line came as soon as it was printed"
    assert first_at - started < second_at - started - 2.5


def test_exec_shows_errors_and_exits_nonzero(kernel: Kernel) -> None:
    proc = kernel.exec("print('before')\n1 / 0", check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip() == "before"
    assert "ZeroDivisionError" in proc.stderr and "Traceback" in proc.stderr
    assert "\x1b[" not in proc.stderr, "no terminal colours when stderr is not a terminal"


def test_exec_reads_code_from_stdin(kernel: Kernel) -> None:
    assert hk("exec", kernel.name, "-", input="print(6 * 7)\n").stdout.strip() == "42"


def test_stderr_and_results_are_shown(kernel: Kernel) -> None:
    proc = kernel.exec("import sys; print('to stderr', file=sys.stderr)\n'a result'")
    assert "to stderr" in proc.stderr
    assert proc.stdout.strip() == "'a result'"


def test_jupyter_console_existing_works(kernel: Kernel) -> None:
    connection_file = hk("connect", kernel.name).stdout.strip()
    proc = run(["jupyter", "console", "--existing", connection_file, "--simple-prompt"],
               input="import socket\nprint('console on', socket.gethostname())\n", timeout=120, check=False)
    assert f"console on {kernel.node}" in proc.stdout, proc.stdout + proc.stderr


def test_network_is_unreachable_inside_the_kernel(kernel: Kernel) -> None:
    out = kernel.exec(f"""
import socket
try:
    socket.create_connection(("{LOGIN_ADDRESS}", 6817), timeout=5)
    print("connected")
except OSError as e:
    print(e)
""").stdout
    assert "Network is unreachable" in out


SANDBOX_PROBE = """
import json, os, socket
found = {}
def attempt(what, action):
    try:
        found[what] = action() or "ok"
    except OSError as e:
        found[what] = e.strerror or type(e).__name__
attempt("tcp", lambda: socket.create_connection(("%(login)s", 6817), timeout=5) and "connected")
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("%(login)s", 53)) and "sent")
attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443) and "resolved")
attempt("write /opt", lambda: open("/opt/hk-probe", "w") and "written")
attempt("write /etc", lambda: open("/etc/hk-probe", "w") and "written")
attempt("write /usr", lambda: open("/usr/hk-probe", "w") and "written")
attempt("write /tmp", lambda: open("/tmp/hk-probe", "w").write("x") and "written")
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
found["capabilities"] = status["CapEff"].strip()
names = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        names.add(open(f"/proc/{pid}/comm").read().strip())
    except OSError:
        pass
found["host processes"] = sorted(names & {"slurmd", "slurmstepd", "sshd", "munged", "slurmctld"})
print(json.dumps(found))
"""


def test_the_sandbox_has_no_network_no_host_processes_no_capabilities_and_a_read_only_system(
        kernel: Kernel) -> None:
    """From inside the kernel: TCP and UDP to the login node fail, no name resolves, the node's
    daemons (slurmd, sshd, munged) are not in its process list, it holds no capability, and the
    system is read-only: outside the workspace only the sandbox's own tmpfs mounts (/tmp, and
    the hidden /home, /var/tmp, ...) take writes, and they vanish with it."""
    found = json.loads(kernel.exec(SANDBOX_PROBE % {"login": LOGIN_ADDRESS}).stdout.strip().splitlines()[-1])
    assert found["tcp"] == "Network is unreachable" and found["udp"] == "Network is unreachable", found
    assert found["dns"] != "resolved", found
    assert found["host processes"] == [], found
    assert found["capabilities"] == "0000000000000000", found
    for path in ("/opt", "/etc", "/usr"):
        assert found[f"write {path}"] in ("Read-only file system", "Permission denied",
                                          "No such file or directory"), found
    assert found["write /tmp"] == "written", found


def test_home_is_hidden_and_workspace_is_read_only(kernel: Kernel) -> None:
    home = str(Path.home())
    out = kernel.exec(f"""
import os
print(os.path.exists({home + '/.local/share/hpc-kernels'!r}), os.path.exists({home + '/.bashrc'!r}))
print(os.getcwd())
print(open("data.txt").read().strip())
try:
    open("new.txt", "w")
    print("written")
except OSError as e:
    print(e.strerror)
""").stdout.splitlines()
    assert out == ["False False", str(kernel.workspace), "shared data", "Read-only file system"]
    assert not (kernel.workspace / "new.txt").exists()


def test_workspace_is_writable_when_asked(cluster: None, workspace: Path, runtime_profile: str) -> None:
    k = start_kernel(workspace, "--rw", prefix="rw", profile=runtime_profile)
    try:
        k.exec("open('from-the-kernel.txt', 'w').write('hello from ' + __import__('socket').gethostname())")
        assert (workspace / "from-the-kernel.txt").read_text() == f"hello from {k.node}"
    finally:
        hk("shutdown", k.name)


def test_relay_is_restarted_by_connect_and_the_kernel_keeps_its_state(kernel: Kernel) -> None:
    kernel.exec("survivor = 'still here'")
    relay_pid = json.loads((Path(kernel.status()["log"]).parent / RELAY_RECORD).read_text())["pid"]
    os.kill(relay_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{relay_pid}").exists() and time.monotonic() < deadline:
        if open(f"/proc/{relay_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    connection_file = hk("connect", kernel.name).stdout.strip()
    new_pid = json.loads((Path(kernel.status()["log"]).parent / RELAY_RECORD).read_text())["pid"]
    assert new_pid != relay_pid
    assert Path(connection_file).exists()
    assert kernel.exec("print(survivor)").stdout.strip() == "still here"


def test_list_status_and_logs(kernel: Kernel) -> None:
    listing = hk("list").stdout
    assert any(line.split()[:2] == [kernel.name, "ready"] for line in listing.splitlines())
    rows = json.loads(hk("list", "--json").stdout)
    row = next(r for r in rows if r["name"] == kernel.name)
    assert row["job_id"] == kernel.job_id and row["node"] == kernel.node and row["slurm_state"] == "RUNNING"
    status = hk("status", kernel.name).stdout
    assert f"job id           {kernel.job_id}" in status
    logs = hk("logs", kernel.name).stdout
    assert f"starting the kernel on {kernel.node}" in logs and "kernel ready after" in logs
    assert "--existing" not in logs, "no node-side connection hint for terminal users"


def test_only_the_srun_transport_carries_the_tcp_tuning_and_never_the_node_side(kernel: Kernel) -> None:
    """srun gets the TCP_NODELAY/QUICKACK shim (Slurm's stdio forwarding needs it); ssh does not
    (OpenSSH sets TCP_NODELAY itself), tcp has no process of its own (a thread of the agent
    on the node, a task of the relay daemon here); no node-side process ever has LD_PRELOAD."""
    hk("connect", kernel.name)
    state = Path(kernel.status()["log"]).parent
    daemon = json.loads((state / RELAY_RECORD).read_text())["pid"]
    node_dir = json.loads((state / "agent.json").read_text())["node_dir"]
    children = Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split()
    carriers = [pid for pid in children if node_dir in Path(f"/proc/{pid}/cmdline").read_text()]
    if kernel.relay == "tcp":
        assert carriers == []
    else:
        assert len(carriers) == 1, children
        assert Path(f"/proc/{carriers[0]}/comm").read_text().strip() == kernel.relay
        assert ("_srun_tcp_tune" in Path(f"/proc/{carriers[0]}/maps").read_text()) == (kernel.relay == "srun")

    node_side = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        module = argv.index(b"-m") + 1 if b"-m" in argv else 0  # python -I -m hpc_kernels.relay node DIR
        if os.path.basename(argv[0]).startswith(b"python") and module and \
                [b"hpc_kernels.relay", b"node", node_dir.encode()] == argv[module:module + 3]:
            node_side[pid] = [v for v in environ if v.startswith(b"LD_PRELOAD=")]
    assert list(node_side.values()) == ([] if kernel.relay == "tcp" else [[]]), node_side


def test_ctrl_c_in_exec_interrupts_the_code_and_the_kernel_lives_on(kernel: Kernel) -> None:
    kernel.exec("state_before_interrupt = 'kept'")
    proc = subprocess.Popen(["hpc-kernel", "exec", kernel.name, "print('looping', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "looping"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "interrupted" in err
    assert kernel.exec("print(state_before_interrupt)").stdout.strip() == "kept"


def test_signal_interrupt_reaches_the_kernel_in_the_sandbox(kernel: Kernel) -> None:
    """`hpc-kernel interrupt`: SIGINT through Slurm to the node agent, which signals the kernel
    process inside the sandbox (bubblewrap forwards no signal); the kernel lives on."""
    kernel.exec("kept_across_the_signal = 7")
    proc = subprocess.Popen(["hpc-kernel", "exec", kernel.name, "print('spinning', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "spinning"
    hk("interrupt", kernel.name)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "KeyboardInterrupt" in err, err
    assert kernel.exec("print(kept_across_the_signal)").stdout.strip() == "7"
    assert sigints_from_one_interrupt(kernel.name) == 1, "one interrupt, one SIGINT (no second one via Slurm)"


def test_the_kernel_runs_in_its_runtime(kernel: Kernel) -> None:
    out = kernel.exec("import os, sys; print(sys.executable); print('APPTAINER_CONTAINER' in os.environ); "
                      "print(os.environ['HOME']); print(os.environ.get('container'))").stdout.split()
    if kernel.profile == "local-apptainer":
        assert out == ["/usr/bin/python3", "True", "/tmp", "None"], "the image's own Python"
    elif kernel.profile == "local-podman":
        assert out == ["/usr/bin/python3", "False", "/tmp", "podman"], "the image's own Python, in podman"
    else:
        assert out == ["/opt/hpc-kernels/venv/bin/python3", "False", "/tmp", "None"], "the node's Python"


def test_output_written_straight_to_file_descriptors_reaches_the_client(kernel: Kernel) -> None:
    """As C extensions write: os.write(1/2), not sys.stdout (the kernel's own stdout is discarded)."""
    proc = kernel.exec("import os, time\nos.write(1, b'fd one\\n')\nos.write(2, b'fd two\\n')\ntime.sleep(0.5)")
    assert "fd one" in proc.stdout and "fd two" in proc.stderr

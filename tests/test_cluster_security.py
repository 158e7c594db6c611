"""Another user on the cluster must not reach someone's kernel, and the key stays out of sight.

The second user is the real Unix user hk-bob (``sudo -n -u hk-bob``, allowed by the test
cluster's sudoers drop-in), on the login node and on the kernel's compute node.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import RELAY_RECORD, SECOND_USER, Kernel, as_second_user, run

PROBE = r"""
import json, os, socket, sys
results = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        elif path.rsplit("-", 1)[-1].isdigit():
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
        else:
            open(path, "rb").read()
        results[path] = "ok"
    except OSError as e:
        results[path] = type(e).__name__ + ": " + (e.strerror or str(e))
print(json.dumps(results))
"""


def probe_as_second_user(paths: list[str], *, on_node: str | None = None) -> dict[str, str]:
    """Try to list, read or connect to each path as hk-bob, on the login node or via srun on a node."""
    argv = ["/usr/bin/python3", "-c", PROBE, *paths]
    if on_node:
        argv = ["srun", f"--nodelist={on_node}", "--nodes=1", "--ntasks=1", "--mem=100M", "--time=1", *argv]
    proc = as_second_user(argv, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_dir(kernel: Kernel) -> Path:
    return Path(str(kernel.status()["log"])).parent


def node_dir(kernel: Kernel) -> str:
    return json.loads((state_dir(kernel) / "agent.json").read_text())["node_dir"]


def test_second_user_exists_and_is_someone_else() -> None:
    proc = as_second_user(["id", "-un"])
    assert proc.returncode == 0 and proc.stdout.strip() == SECOND_USER != os.environ.get("USER")


def test_second_user_cannot_reach_login_side(kernel: Kernel) -> None:
    login_dir = kernel.connection_file.parent
    sd = state_dir(kernel)
    paths = [str(login_dir), str(kernel.connection_file), str(login_dir / "kernel-1"), str(login_dir / "kernel-4"),
             str(sd), str(sd / "key"), str(sd / "job.log"), str(login_dir.parent / "relay.sock")]
    if kernel.relay == "tcp":
        paths += [str(sd / "tls-ca.pem"), str(sd / "tls-node.pem"), str(sd / "tls-login.pem")]
    results = probe_as_second_user(paths)
    for path, outcome in results.items():
        assert outcome.startswith("PermissionError"), f"{SECOND_USER} reached {path}: {outcome}"
    # The same probe as ourselves succeeds: the probe itself works.
    proc = run(["/usr/bin/python3", "-c", PROBE, str(login_dir / "kernel-1"), str(sd / "key")])
    assert set(json.loads(proc.stdout).values()) == {"ok"}


def test_second_user_cannot_reach_node_side(kernel: Kernel) -> None:
    nd = node_dir(kernel)
    results = probe_as_second_user([nd, f"{nd}/kernel.json", f"{nd}/kernel-1", f"{nd}/kernel-5"], on_node=kernel.node)
    for path, outcome in results.items():
        assert outcome.startswith("PermissionError"), f"{SECOND_USER} reached {path} on {kernel.node}: {outcome}"


def test_node_side_directory_is_private_and_on_node_local_tmp(kernel: Kernel) -> None:
    nd = node_dir(kernel)
    assert nd.startswith("/tmp/hk-")
    assert not os.path.exists(nd), "node-local tmp must not be visible on the login node"
    proc = run(["srun", f"--jobid={kernel.job_id}", "--overlap", "stat", "-c", "%a %U", nd])
    mode, owner = proc.stdout.split()
    # ipykernel < 6.18 adds the sticky bit (jupyter_client 7 does so against tmp cleaners): harmless.
    assert (int(mode, 8) & 0o777, owner) == (0o700, os.environ["USER"])


TCP_PROBE = r"""
import json, os, socket, ssl, sys, tempfile
from pathlib import Path
from hpc_kernels.tls import NODE_NAME, CredentialFiles, make_credentials, write_credentials, login_context

host, port = sys.argv[1], int(sys.argv[2])
results = {}
# Plain TCP, speaking ZMTP as a Jupyter client would: nothing of the kernel answers.
s = socket.create_connection((host, port), timeout=10)
s.sendall(bytes([0xFF] + [0] * 8 + [0x7F, 3, 0]) + b"NULL" + bytes(32 - 4) + bytes(16))
try:
    results["plain"] = "got " + repr(s.recv(4096)[:40])
except OSError as e:
    results["plain"] = type(e).__name__
s.close()
# Mutual TLS with credentials of one's own making (a valid chain, the right names, another CA),
# not caring who the node is: only the node side's check of the client can stop this.
mine = CredentialFiles(Path(tempfile.mkdtemp()))
write_credentials(mine, make_credentials("bobs"))
context = login_context(mine)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
try:
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NODE_NAME) as t:
            t.sendall(b"x")
            results["own-ca"] = "got " + repr(t.recv(4096)[:40])
except (OSError, ssl.SSLError) as e:
    results["own-ca"] = type(e).__name__ + ": " + str(e)[:80]
print(json.dumps(results))
"""


@pytest.mark.parametrize("kernel", ["bwrap-tcp"], indirect=True)
def test_second_user_cannot_use_the_tcp_transport(kernel: Kernel) -> None:
    """The tcp transport's port is reachable from the login node (that is its point), but hk-bob,
    without this kernel's login certificate, gets no byte of the kernel: plain TCP is refused by
    the TLS listener, and a certificate from a CA of his own fails the handshake."""
    listener = json.loads((state_dir(kernel) / "agent.json").read_text())["tcp"]
    proc = as_second_user(["/opt/hpc-kernels/venv/bin/python", "-c", TCP_PROBE, listener["host"],
                           str(listener["port"])])
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not results["plain"].startswith("got b'\\xff"), results  # no ZMTP greeting came back
    assert results["own-ca"] == "got b''" or "alert" in results["own-ca"], results  # refused by the node side
    assert kernel.exec("print('still mine')").stdout.strip() == "still mine"


def test_second_user_cannot_step_into_the_job(kernel: Kernel) -> None:
    assert kernel.status()["slurm_state"] == "RUNNING"
    assert run(["srun", f"--jobid={kernel.job_id}", "--overlap", "hostname"]).stdout.strip() == kernel.node
    proc = as_second_user(["srun", f"--jobid={kernel.job_id}", "--overlap", "hostname"])
    assert proc.returncode != 0
    assert re.search(r"Access/permission denied|not owned", proc.stderr), proc.stderr


def test_key_is_nowhere_to_be_seen(kernel: Kernel) -> None:
    """Not on a command line or in an environment (login node and the job's processes on the node),
    not in `scontrol show job`, the batch script, or a log."""
    key = (state_dir(kernel) / "key").read_text().strip()
    assert len(key) == 64
    kernel.exec("print('kernel busy')")  # the relay and kernel have exchanged signed messages

    scontrol = run(["scontrol", "show", "job", "-dd", kernel.job_id]).stdout
    script = run(["scontrol", "write", "batch_script", kernel.job_id, "-"]).stdout
    assert kernel.job_id in scontrol and "hpc_kernels.agent" in script
    assert key not in scontrol and key not in script

    for log in ("job.log", "relay.log"):
        assert key not in (state_dir(kernel) / log).read_text()
    for log in state_dir(kernel).parent.parent.glob("relay-daemon-*.log"):
        assert key not in log.read_text()

    # Every process visible here: the login node and, the nodes sharing this kernel's /proc, the job's.
    dump = r"""
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                print(pid, what, f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
"""
    login_side = run(["/usr/bin/python3", "-c", dump]).stdout
    node_side = run(["srun", f"--jobid={kernel.job_id}", "--overlap", "/usr/bin/python3", "-c", dump]).stdout
    assert "hpc_kernels.relay" in login_side and "ipykernel_launcher" in node_side
    assert key not in login_side
    assert key not in node_side


@pytest.mark.parametrize("squatted", ["file", "foreign-dir"])
def test_a_squatted_runtime_dir_is_refused(squatted: str, tmp_path: Path) -> None:
    """Another user could create /tmp/hpc-kernels-<uid> first; we must not use what we don't own."""
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.paths import ensure_private_dir

    target = tmp_path / "rt"
    if squatted == "file":
        target.write_text("")
        with pytest.raises(HpcKernelsError, match="not a directory"):
            ensure_private_dir(target)
    else:
        shared = Path("/tmp") / f"hk-squat-{os.getpid()}"
        proc = as_second_user(["mkdir", "-m", "0777", str(shared)])
        assert proc.returncode == 0, proc.stderr
        try:
            with pytest.raises(HpcKernelsError, match="owned by uid"):
                ensure_private_dir(shared)
        finally:
            as_second_user(["rmdir", str(shared)])


PEER_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(b"\xff" * 10)
    s.settimeout(10)
    print("closed" if s.recv(100) == b"" else "answered")
except (ConnectionResetError, BrokenPipeError):
    print("closed")
"""


def test_login_side_sockets_refuse_another_uid_even_if_reachable(tmp_path: Path) -> None:
    """Beyond the 0700 directory: the relay checks each client's uid (SO_PEERCRED).

    Here the listening socket is deliberately put where hk-bob can reach it; his connection must
    be closed without a single frame going to the node side, while ours is carried.
    """
    import asyncio

    from hpc_kernels.multiplexer import Multiplexer

    reachable = Path("/tmp") / f"hk-peercred-{os.getpid()}"
    reachable.mkdir(mode=0o711)
    os.chmod(reachable, 0o711)
    path = reachable / "kernel-1"

    async def main() -> tuple[list[bytes], str, str]:
        sent: list[bytes] = []
        mux = Multiplexer(sent.append)
        server = await asyncio.get_running_loop().create_unix_server(lambda: mux.local_end(0), path=str(path))
        os.chmod(path, 0o777)
        loop = asyncio.get_running_loop()
        bob = await loop.run_in_executor(None, lambda: as_second_user(["/usr/bin/python3", "-c", PEER_PROBE, str(path)]))
        frames_after_bob = list(sent)
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"mine")
        await writer.drain()
        await asyncio.sleep(0.2)
        server.close()
        writer.close()
        return frames_after_bob, bob.stdout.strip() + bob.stderr, b"".join(sent).hex()

    try:
        frames_after_bob, bob_saw, ours = asyncio.run(main())
    finally:
        path.unlink(missing_ok=True)
        reachable.rmdir()
    assert bob_saw == "closed"
    assert frames_after_bob == [], "nothing of hk-bob's connection reached the stream"
    assert b"mine".hex() in ours, "our own connection is carried"


def test_a_state_directory_under_another_users_directory_is_refused() -> None:
    """paths.state (here from the environment) inside a directory hk-bob made and may change:
    refused before anything is written or submitted."""
    theirs = f"/tmp/hk-bob-{os.urandom(3).hex()}"
    made = as_second_user(["mkdir", "-m", "0777", theirs])
    assert made.returncode == 0, made.stderr
    try:
        proc = run(["hpc-kernel", "submit", "-p", "local", "-n", "stolen", "--no-workspace"], check=False,
                   env={"HPC_KERNELS_PATHS_STATE": f"{theirs}/state"})
        assert proc.returncode == 1
        assert f"{theirs} belongs to uid" in proc.stderr and "not to you or root" in proc.stderr, proc.stderr
        assert not os.path.exists(f"{theirs}/state")
    finally:
        as_second_user(["rm", "-rf", theirs])


def test_second_user_cannot_signal_the_kernels_processes(kernel: Kernel) -> None:
    """Not the relay daemon on the login node, not the agent or the kernel on the node (from a
    job of his own there): the kernel runs on, its state intact."""
    sd = state_dir(kernel)
    daemon = json.loads((sd / RELAY_RECORD).read_text())["pid"]
    agent = json.loads((sd / "agent.json").read_text())["pid"]
    proc = as_second_user(["kill", "-TERM", str(daemon)])
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stderr
    proc = as_second_user(["srun", f"--nodelist={kernel.node}", "--nodes=1", "--ntasks=1", "--mem=100M", "--time=1",
                           "/usr/bin/python3", "-c",
                           f"import os\ntry:\n    os.kill({agent}, 15)\nexcept OSError as e:\n    print(type(e).__name__)"],
                          timeout=120)
    assert proc.stdout.strip() == "PermissionError", proc.stdout + proc.stderr
    assert kernel.exec("print('unharmed')").stdout.strip() == "unharmed"

"""The relay's transports on the real cluster: doctor, refusals, and failures that say why.

The kernel suite itself runs over every transport (conftest.FLAVOURS); this file covers what is
particular to choosing one."""

from __future__ import annotations

import json
import os
import signal
import socket
import shlex
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import RELAY_RECORD, hk, run, start_kernel

STATE_ROOT = Path.home() / ".local/share/hpc-kernels/kernels"


def our_jobs() -> set[str]:
    return set(run(["squeue", "-h", "--me", "-o", "%i"]).stdout.split())


def kernel_names() -> set[str]:
    return {row["name"] for row in json.loads(hk("list", "--json").stdout)}


@pytest.fixture
def profile_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    return tmp_path


def test_doctor_tries_every_transport_the_profile_allows_and_leaves_nothing(cluster: None) -> None:
    jobs_before = our_jobs()
    proc = hk("doctor", "--profile", "local", "--json")
    verdicts = {v["transport"]: v for v in json.loads(proc.stdout)}
    assert set(verdicts) == {"srun", "tcp", "ssh"}
    for verdict in verdicts.values():
        assert verdict["works"], verdict
        assert 0 < verdict["round_trip_ms"] < 1000, verdict
    assert our_jobs() == jobs_before, "the test job ended"
    assert not [n for n in kernel_names() if n.startswith("doctor-")]


def test_doctor_says_why_a_transport_fails_in_the_transports_own_words(cluster: None, profile_path: Path) -> None:
    (profile_path / "wrong-port.yaml").write_text(
        "extends: local\nrelay:\n  ssh_options: ['-p', '2999']\n")
    proc = hk("doctor", "--profile", "wrong-port", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line[:1].isalpha()}
    assert " works " in lines["srun"] and " works " in lines["tcp"]
    assert " FAILS " in lines["ssh"]
    assert "port 2999: Connection refused" in proc.stdout, proc.stdout  # OpenSSH's own message
    assert not [n for n in kernel_names() if n.startswith("doctor-")]


def test_a_transport_the_profile_does_not_allow_is_refused_before_anything_is_submitted(
        cluster: None, profile_path: Path) -> None:
    (profile_path / "srun-only.yaml").write_text("extends: local\nrelay:\n  allow: [srun]\n")
    jobs_before = our_jobs()
    name = f"deny-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "srun-only", "--name", name, "--no-workspace", "--relay", "tcp", check=False)
    assert proc.returncode != 0
    assert "command line (--relay): relay.transport: tcp is not in relay.allow (srun)" in proc.stderr
    assert our_jobs() == jobs_before and not (STATE_ROOT / name).exists()


def test_a_kernel_its_relay_cannot_reach_is_shut_down_with_the_reason(cluster: None, profile_path: Path) -> None:
    """Ready on its node but unreachable (here: ssh to a port nobody listens on): submit says
    what ssh said, and ends the job rather than leave it holding its allocation."""
    (profile_path / "wrong-port.yaml").write_text(
        "extends: local\nrelay:\n  transport: ssh\n  ssh_options: ['-p', '2999']\n")
    jobs_before = our_jobs()
    name = f"unreach-{uuid.uuid4().hex[:6]}"
    proc = hk("submit", "--profile", "wrong-port", "--name", name, "--no-workspace", check=False)
    assert proc.returncode != 0
    assert "relay (ssh) to c" in proc.stderr and "Connection refused" in proc.stderr, proc.stderr
    assert f"kernel {name} was shut down" in proc.stderr
    assert our_jobs() == jobs_before and not (STATE_ROOT / name).exists()


def test_a_tcp_kernel_refuses_another_kernels_login_certificate(cluster: None) -> None:
    """Both kernels are ours; each has its own CA. Kernel B's login certificate, valid and
    ours, opens nothing on kernel A's listener, and A's own still does."""
    a = start_kernel(None, prefix="tlsa", relay="tcp")
    b = start_kernel(None, prefix="tlsb", relay="tcp")
    try:
        listener = json.loads((STATE_ROOT / a.name / "agent.json").read_text())["tcp"]

        def hello_with(certificate_of: str | None) -> bytes:
            """Trusting A's CA (so the node is A's), log in with this kernel's login certificate."""
            context = ssl.create_default_context(cafile=str(STATE_ROOT / a.name / "tls-ca.pem"))
            if certificate_of:
                context.load_cert_chain(str(STATE_ROOT / certificate_of / "tls-login.pem"))
            with socket.create_connection((listener["host"], listener["port"]), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="hpc-kernels-node") as tls:
                    return tls.recv(64)

        assert hello_with(a.name).startswith(b"HKR1"), "the kernel's own login side gets the stream's HELLO"
        for other in (b.name, None):
            try:
                got = hello_with(other)
            except (ssl.SSLError, ConnectionResetError) as e:  # TLS 1.3: the refusal comes after the client's Finished
                got = repr(e).encode()
            assert not got.startswith(b"HKR1"), f"{other}'s certificate opened kernel {a.name}'s stream"
            assert got == b"" or b"alert" in got or b"Reset" in got, got
        assert a.exec("print('unharmed')").stdout.strip() == "unharmed"
    finally:
        hk("shutdown", a.name, b.name)


def test_one_relay_daemon_serves_every_kernel_and_ends_after_the_last(cluster: None) -> None:
    """The login side of all of a user's relays is one process (its memory is paid once, see
    docs/performance.md); one kernel's shutdown leaves the others' relays alone; the daemon
    goes away by itself after the last one, and comes back when needed."""
    a = start_kernel(None, prefix="da")
    b = start_kernel(None, prefix="db", relay="tcp")
    try:
        daemons = {json.loads((STATE_ROOT / k.name / RELAY_RECORD).read_text())["pid"] for k in (a, b)}
        assert len(daemons) == 1
        daemon = daemons.pop()
        assert "hpc_kernels.relay_daemon" in Path(f"/proc/{daemon}/cmdline").read_text()
        hk("shutdown", a.name)
        assert b.exec("print('b lives')").stdout.strip() == "b lives"
        assert Path(f"/proc/{daemon}").exists()
    finally:
        both = hk("shutdown", a.name, b.name, check=False)
    assert both.returncode == 1 and f"no kernel named {a.name!r}" in both.stderr, both.stderr
    assert b.name not in kernel_names(), "a name that is gone does not keep the next one running"
    control = b.connection_file.parent.parent / "relay.sock"
    deadline = time.monotonic() + 30
    while (control.exists() or _alive(daemon)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(daemon) and not control.exists(), "the idle daemon ended and removed its socket"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("relay", ["srun", "ssh"])
def test_a_killed_transport_is_replaced_and_a_connected_client_goes_on(cluster: None, relay: str) -> None:
    """The process carrying the stream (the relay's srun, or its ssh) is killed under a client
    that stays connected: the relay opens a new stream by itself, the client's ZeroMQ sockets
    reconnect, and the kernel still has what it had. (Cutting a tcp kernel's connection needs
    privileges the tests do not have here; test_relay_daemon.py cuts one on this machine.)"""
    from jupyter_client import BlockingKernelClient

    k = start_kernel(None, prefix=f"cut{relay}", relay=relay)
    client = BlockingKernelClient()
    try:
        client.load_connection_file(str(k.connection_file))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        assert client.execute_interactive("x = 41", timeout=60)["content"]["status"] == "ok"
        state = STATE_ROOT / k.name
        daemon = json.loads((state / RELAY_RECORD).read_text())["pid"]
        node_dir = json.loads((state / "agent.json").read_text())["node_dir"]
        carriers = [int(pid) for pid in Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split()
                    if node_dir in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(carriers) == 1
        os.kill(carriers[0], signal.SIGKILL)
        started = time.monotonic()
        # What is in flight at the cut is lost, as on any dropped connection, and IOPub, like
        # any ZeroMQ subscription, misses what is published before it has joined again: the
        # client makes sure it is through (kernel_info, as JupyterLab does after a blip).
        while "reconnected" not in (state / "relay.log").read_text():
            assert time.monotonic() - started < 15, (state / "relay.log").read_text()
            time.sleep(0.05)
        client.wait_for_ready(timeout=30)
        out: list[str] = []
        reply = client.execute_interactive("x += 1; print(x)", timeout=60, output_hook=lambda m: out.append(
            m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok" and "".join(out).strip() == "42"
        assert time.monotonic() - started < 15, "back within a few seconds"
        assert json.loads((state / RELAY_RECORD).read_text())["pid"] == daemon, "the same relay, a new stream"
    finally:
        client.stop_channels()
        hk("shutdown", k.name)


LOGIN2 = "login2"


def on_login2(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command in a session on the second login node (cluster/up.sh: its own network, /tmp and
    /run/user; /home shared), as a user who logs in there."""
    return run(["ssh", "-o", "BatchMode=yes", LOGIN2, "--", shlex.join(argv)], check=check)


def test_a_second_login_node_reaches_the_same_kernel(cluster: None, flavour: tuple[str, str]) -> None:
    """A kernel started on this login node is reached from login2 over every transport: login2
    runs its own relay (its own daemon, sockets and connection file; this node's relay goes on),
    both see the same variables, and a shutdown from here ends login2's relay too."""
    profile, transport = flavour
    k = start_kernel(None, prefix="l2", profile=profile, relay=transport)
    k.exec("x = 41")
    assert on_login2("hostname").stdout.strip() == LOGIN2
    there = Path(on_login2("hpc-kernel", "connect", k.name).stdout.strip().splitlines()[-1])
    assert there != k.connection_file and not there.exists(), "login2's sockets are in its own /tmp"
    assert on_login2("test", "-S", str(there.parent / "kernel-1")).returncode == 0
    assert on_login2("hpc-kernel", "exec", k.name, "x += 1; print(x)").stdout.strip() == "42"
    assert k.exec("print(x)").stdout.strip() == "42", "this node's relay is still the one connect gives here"
    assert hk("connect", k.name).stdout.strip() == str(k.connection_file)
    status_there = json.loads(on_login2("hpc-kernel", "status", k.name, "--json").stdout)
    assert status_there["state"] == "ready" and status_there["connection_file"] == str(there)
    records = sorted(p.name for p in (STATE_ROOT / k.name).glob("relay-*.json"))
    assert records == sorted([RELAY_RECORD, f"relay-{LOGIN2}.json"]), records

    hk("shutdown", k.name)
    deadline = time.monotonic() + 30
    while on_login2("test", "-e", str(there.parent), check=False).returncode == 0:
        assert time.monotonic() < deadline, "login2's relay ended and removed its sockets"
        time.sleep(0.5)
    # login2's relay daemon, with nothing left to relay, ends and removes its control socket.
    control = there.parent.parent / "relay.sock"
    while on_login2("test", "-e", str(control), check=False).returncode == 0:
        assert time.monotonic() < deadline + 15, f"login2's relay daemon ended ({control})"
        time.sleep(0.5)

"""The bridge's pure parts: a frontend's connection file, the kernel's name, the shutdown_request
it watches for, the argv a kernelspec gets (no cluster needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from jupyter_client.session import Session

from hpc_kernels import kernelspecs
from hpc_kernels.bridge import (
    CHANNELS,
    argv_options,
    bridge_name,
    main,
    parse_connection,
    read_connection,
    shutdown_request,
)
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.profiles import load_profile

GOOD = {"transport": "tcp", "ip": "127.0.0.1", "key": "5f1c0e2a-frontend-key", "signature_scheme": "hmac-sha256",
        "shell_port": 5001, "iopub_port": 5002, "stdin_port": 5003, "control_port": 5004, "hb_port": 5005}


def test_a_frontends_connection_file_gives_its_endpoints_and_key() -> None:
    tcp = parse_connection(GOOD, "kernel-1.json")
    assert [tcp.endpoint(c) for c in CHANNELS] == [f"tcp://127.0.0.1:{p}" for p in (5001, 5002, 5003, 5004, 5005)]
    assert tcp.key == GOOD["key"]
    ipc = parse_connection({**GOOD, "transport": "ipc", "ip": "/run/user/1/kernel-x"}, "k.json")
    assert ipc.endpoint("shell") == "ipc:///run/user/1/kernel-x-5001"


@pytest.mark.parametrize("change, said", [
    ({"key": ""}, "no usable key"),
    ({"key": "has space"}, "no usable key"),
    ({"signature_scheme": "hmac-md5"}, "signature_scheme 'hmac-md5'"),
    ({"transport": "udp"}, "transport 'udp'"),
    ({"hb_port": 0}, "hb_port 0"),
    ({"shell_port": "5001"}, "shell_port '5001'"),
])
def test_a_connection_file_the_bridge_cannot_serve_is_refused_by_name(change: dict[str, object], said: str) -> None:
    with pytest.raises(HpcKernelsError, match="connection file kernel-9.json: " + said.replace("(", r"\(")):
        parse_connection({**GOOD, **change}, "kernel-9.json")


def test_the_kernels_name_comes_from_the_key_and_does_not_show_it() -> None:
    name = bridge_name(GOOD["key"])
    assert name == bridge_name(GOOD["key"]) and name.startswith("argv-") and len(name) <= 40
    assert name != bridge_name(GOOD["key"] + "x") and GOOD["key"][:6] not in name


def frames(session: Session, msg_type: str, content: dict[str, object]) -> list[bytes]:
    msg = session.msg(msg_type, content)
    return [b"frontend-identity", *session.serialize(msg)]


def test_a_signed_shutdown_request_says_whether_a_restart_follows() -> None:
    session = Session(key=b"k3y")
    assert shutdown_request(frames(session, "shutdown_request", {"restart": True}), b"k3y") is True
    assert shutdown_request(frames(session, "shutdown_request", {"restart": False}), b"k3y") is False
    assert shutdown_request(frames(session, "kernel_info_request", {}), b"k3y") is None
    assert shutdown_request(frames(session, "shutdown_reply", {"restart": True}), b"k3y") is None
    assert shutdown_request([b"no delimiter"], b"k3y") is None


def test_an_unsigned_or_badly_signed_shutdown_request_is_ignored() -> None:
    """Any user of the login node may connect to a tcp port the frontend chose."""
    forged = frames(Session(key=b"not-the-key"), "shutdown_request", {"restart": True})
    assert shutdown_request(forged, b"k3y") is None
    unsigned = frames(Session(key=b""), "shutdown_request", {"restart": True})
    assert shutdown_request(unsigned, b"k3y") is None


def test_the_kernelspec_argv_runs_the_bridge_with_the_provisioners_settings() -> None:
    spec = kernelspecs.kernelspec(load_profile("local"), relay="tcp", python="/site/bin/python", launch_timeout=60)
    assert spec["argv"] == ["/site/bin/python", "-I", "-m", "hpc_kernels.bridge", "-f", "{connection_file}",
                            "--profile", "local", "--relay", "tcp", "--launch-timeout", "60"]
    assert spec["metadata"]["kernel_provisioner"]["config"] == {"profile": "local", "relay": "tcp",
                                                                "launch_timeout": 60}
    assert argv_options({"profile": "p", "python_env": "/envs/a", "image": "/i.sif", "mode": "job"}) == [
        "--profile", "p", "--image", "/i.sif", "--mode", "job", "--python-env", "/envs/a"]


def test_the_bridge_says_what_is_wrong_with_the_connection_file(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "kernel-1.json"
    path.write_text(json.dumps({**GOOD, "key": ""}))
    assert main(["-f", str(path), "--profile", "local"]) == 1
    assert f"connection file {path}: no usable key" in capsys.readouterr().err
    with pytest.raises(HpcKernelsError, match="cannot read the connection file"):
        read_connection(tmp_path / "missing.json")


def test_the_forwarder_carries_every_channel_of_a_real_kernel(tmp_path: Path) -> None:
    """A real ipykernel behind unix sockets (as the relay's are), a real jupyter_client on the
    frontend's tcp ports: code, output, input() over stdin, heartbeat, and the shutdown_request
    the bridge acts on."""
    from jupyter_client import BlockingKernelClient, KernelManager

    from hpc_kernels.bridge import Connection, Forwarder

    kernel = KernelManager(transport="ipc", ip=str(tmp_path / "k"), kernel_name="python3")
    kernel.start_kernel()
    seen: list[bool | None] = []
    try:
        key = kernel.session.key
        behind = read_connection(kernel.connection_file)
        front = Connection(transport="tcp", ip="127.0.0.1", key=key.decode(),
                           ports={c: p for c, p in zip(CHANNELS, _free_ports(5))})
        forwarder = Forwarder(front, lambda frames: seen.append(shutdown_request(frames, key)))
        forwarder.connect(behind)
        try:
            client = BlockingKernelClient()
            client.load_connection_info({"transport": "tcp", "ip": "127.0.0.1", "key": key,
                                         "signature_scheme": "hmac-sha256",
                                         **{f"{c}_port": p for c, p in front.ports.items()}})
            client.start_channels()
            client.wait_for_ready(timeout=30)
            out: list[str] = []
            reply = client.execute_interactive(
                "name = input('who? ')\nprint('hello', name)", timeout=30,
                stdin_hook=lambda msg: client.input("bridge"),
                output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
            assert reply["content"]["status"] == "ok" and "".join(out) == "hello bridge\n"
            assert client.hb_channel.is_beating()
            client.shutdown(restart=True)
            assert client.get_control_msg(timeout=10)["content"]["restart"] is True
            client.stop_channels()
            time.sleep(0.5)
            assert True in seen, "the bridge saw the frontend's signed shutdown_request"
        finally:
            forwarder.close()
    finally:
        kernel.shutdown_kernel(now=True)


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports

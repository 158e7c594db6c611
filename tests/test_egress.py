"""The egress proxy and the kernel's bridge to it, with real sockets on this machine (the
cluster test, test_cluster_runtimes.py, runs them in the sandbox on a node)."""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc_kernels import kernel_egress
from hpc_kernels.egress import EgressProxy, ProxyRequestError, is_allowed, parse_allowed, parse_connect
from hpc_kernels.profiles import KernelRequest, ProfileError, apply_request, parse_profile
from hpc_kernels.resources import data_dir

SITE_CONFIGS = data_dir("site-configs")  # the installed ones: the tests run from a copy of tests/


@pytest.mark.parametrize(("entry", "rule"), [("pypi.org", ("pypi.org", 443)), ("PyPI.org:8443", ("pypi.org", 8443)),
                                             ("*.pythonhosted.org", ("*.pythonhosted.org", 443)),
                                             ("10.77.7.1:8000", ("10.77.7.1", 8000))])
def test_parse_allowed(entry: str, rule: tuple[str, int]) -> None:
    assert parse_allowed(entry) == rule


@pytest.mark.parametrize("entry", ["", "pypi.org:0", "pypi.org:99999", "pypi.org:https", "http://pypi.org",
                                   "*", "a b", "pypi.org/simple", "*.*.org"])
def test_parse_allowed_refuses(entry: str) -> None:
    with pytest.raises(ValueError, match="expected a host name"):
        parse_allowed(entry)


def test_is_allowed() -> None:
    rules = [("pypi.org", 443), ("*.pythonhosted.org", 443)]
    assert is_allowed("pypi.org", 443, rules) and is_allowed("PYPI.ORG.", 443, rules)
    assert not is_allowed("pypi.org", 80, rules)
    assert not is_allowed("evilpypi.org", 443, rules) and not is_allowed("pypi.org.evil.com", 443, rules)
    assert is_allowed("files.pythonhosted.org", 443, rules)
    assert not is_allowed("pythonhosted.org", 443, rules)  # *. is below the domain only
    assert not is_allowed("files.pythonhosted.org.evil", 443, rules)


def test_parse_connect() -> None:
    assert parse_connect(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n") == ("pypi.org", 443)
    assert parse_connect(b"CONNECT [::1]:8443 HTTP/1.0\r\n\r\n") == ("::1", 8443)
    for head, why in [(b"GET http://pypi.org/ HTTP/1.1\r\n\r\n", "only CONNECT"),
                      (b"CONNECT 10.0.0.1\t.pypi.org:443 HTTP/1.1\r\n\r\n", "not a host name"),
                      (b"CONNECT " + b"a" * 70 + b".org:443 HTTP/1.1\r\n\r\n", "not a host name"),
                      (b"CONNECT a\x00b.org:443 HTTP/1.1\r\n\r\n", "not a host name"),
                      (b"CONNECT pypi.org HTTP/1.1\r\n\r\n", "host:port"),
                      (b"CONNECT pypi.org:0 HTTP/1.1\r\n\r\n", "host:port"),
                      (b"\x16\x03\x01 hello\r\n\r\n", "not an HTTP/1 request")]:
        with pytest.raises(ProxyRequestError, match=why):
            parse_connect(head)


def test_allow_hosts_in_profiles_and_on_the_command_line() -> None:
    profile = parse_profile(SITE_CONFIGS / "local.yaml")
    assert profile.get("runtime", "allow_hosts") == []
    applied = apply_request(profile, KernelRequest(name="k", allow_hosts=("pypi.org", "*.pythonhosted.org", "pypi.org")))
    assert applied.get("runtime", "allow_hosts") == ["pypi.org:443", "*.pythonhosted.org:443"]
    assert applied.origins["runtime.allow_hosts"] == "command line (--allow-host)"
    with pytest.raises(ProfileError, match=r"--allow-host: item 0: expected a host name"):
        apply_request(profile, KernelRequest(name="k", allow_hosts=("http://pypi.org",)))


@pytest.fixture
def upstream() -> Iterator[int]:
    """A TCP server on loopback that answers what a connection sends, in capitals."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"upstream: " + conn.recv(100).upper())

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def proxy(tmp_path: Path, upstream: int) -> Iterator[tuple[Path, list[str]]]:
    said: list[str] = []
    egress = EgressProxy(tmp_path, [("127.0.0.1", upstream)], said.append)
    path = egress.start()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    yield path, said
    egress.stop()


def ask(path: Path, head: bytes) -> tuple[bytes, socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(head)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer, sock


def test_the_proxy_connects_allowed_hosts_and_refuses_the_rest(proxy: tuple[Path, list[str]], upstream: int) -> None:
    path, said = proxy
    answer, sock = ask(path, f"CONNECT 127.0.0.1:{upstream} HTTP/1.1\r\n\r\n".encode())
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
    sock.sendall(b"through the tunnel")
    assert sock.recv(100) == b"upstream: THROUGH THE TUNNEL"
    sock.close()

    answer, sock = ask(path, f"CONNECT 127.0.0.1:{upstream + 1} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 ") and b"not in this kernel's allowed hosts" in sock.recv(1000) + answer
    sock.close()
    answer, sock = ask(path, f"GET http://127.0.0.1:{upstream}/ HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 ")
    sock.close()
    assert said[0] == f"egress: allowed CONNECT 127.0.0.1:{upstream}"
    assert said[1] == f"egress: refused CONNECT 127.0.0.1:{upstream + 1} (not in runtime.allow_hosts)"
    assert said[2].startswith("egress: refused: only CONNECT")


def test_an_allowed_host_that_does_not_answer_is_a_502(tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    said: list[str] = []
    egress = EgressProxy(tmp_path, [("127.0.0.1", port)], said.append)
    path = egress.start()
    try:
        answer, sock = ask(path, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 502 ") and "it failed" in said[0]
        sock.close()
    finally:
        egress.stop()


def test_the_kernels_bridge_sets_the_proxy_and_carries_a_tunnel(proxy: tuple[Path, list[str]], upstream: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in kernel_egress.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path, _ = proxy
    port = kernel_egress.install(None, str(path))
    assert os.environ["HTTPS_PROXY"] == os.environ["http_proxy"] == f"http://127.0.0.1:{port}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.set_tunnel("127.0.0.1", upstream)
    conn.connect()  # CONNECT through the bridge and the proxy; raises on a refusal
    conn.sock.sendall(b"hi")
    assert conn.sock.recv(100) == b"upstream: HI"
    refused = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    refused.set_tunnel("127.0.0.1", upstream + 1)
    with pytest.raises(OSError, match="403"):
        refused.connect()

"""Mutual TLS for the relay's tcp transport, on real sockets on this machine (no cluster): the
node side's listener answers only the login side of its own kernel."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

import pytest

from hpc_kernels.tls import (
    NODE_NAME,
    CredentialFiles,
    login_context,
    make_credentials,
    node_context,
    write_credentials,
)

SECRET = b"kernel bytes"


def credentials_in(path: Path, kernel: str) -> CredentialFiles:
    path.mkdir(mode=0o700)
    files = CredentialFiles(path)
    write_credentials(files, make_credentials(kernel))
    return files


@pytest.fixture
def two_kernels(tmp_path: Path) -> tuple[CredentialFiles, CredentialFiles]:
    return credentials_in(tmp_path / "a", "a"), credentials_in(tmp_path / "b", "b")


async def serve(files: CredentialFiles) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SECRET)  # only ever after a completed handshake with a verified client
        try:
            await writer.drain()
            await reader.read(100)
        except (ssl.SSLError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=node_context(files))
    return server, server.sockets[0].getsockname()[1]


async def read_as(context: ssl.SSLContext | None, port: int) -> bytes:
    """What a client with ``context`` (None: plain TCP) receives; b"" when refused."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=NODE_NAME if context else None), 10)
        try:
            return await asyncio.wait_for(reader.read(100), 3)
        finally:
            writer.close()
    except (ssl.SSLError, ConnectionError, asyncio.TimeoutError):
        return b""


def test_files_are_private(two_kernels: tuple[CredentialFiles, CredentialFiles]) -> None:
    files, _ = two_kernels
    for path in (files.ca, files.node, files.login):
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" not in files.ca.read_bytes()  # the CA's key is gone


def test_only_the_kernels_own_login_side_gets_through(two_kernels: tuple[CredentialFiles, CredentialFiles]) -> None:
    mine, other = two_kernels

    async def scenario() -> dict[str, bytes]:
        server, port = await serve(mine)
        no_certificate = ssl.create_default_context(cafile=str(mine.ca))
        no_certificate.check_hostname = True
        try:
            return {
                "own": await read_as(login_context(mine), port),
                "another kernel's": await read_as(login_context(other), port),
                "no certificate": await read_as(no_certificate, port),
                "plain tcp": await read_as(None, port),
            }
        finally:
            server.close()
            await server.wait_closed()

    got = asyncio.run(scenario())
    assert got["own"] == SECRET
    for who in ("another kernel's", "no certificate", "plain tcp"):
        assert SECRET not in got[who], who


def test_the_login_side_refuses_a_node_from_another_kernel(two_kernels: tuple[CredentialFiles, CredentialFiles]) -> None:
    mine, other = two_kernels

    async def scenario() -> bytes:
        server, port = await serve(other)  # someone listening where our node side should be
        try:
            return await read_as(login_context(mine), port)
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == b""


def test_a_plain_tcp_peer_is_not_sent_a_byte(two_kernels: tuple[CredentialFiles, CredentialFiles]) -> None:
    mine, _ = two_kernels

    async def scenario() -> bytes:
        server, port = await serve(mine)
        try:
            loop = asyncio.get_running_loop()
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n")
            chunks = []
            while True:
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                except (ConnectionError, asyncio.TimeoutError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            sock.close()
            return b"".join(chunks)
        finally:
            server.close()
            await server.wait_closed()

    assert SECRET not in asyncio.run(scenario())


def test_the_relay_stream_over_tls_carries_every_byte(tmp_path: Path) -> None:
    """The tcp transport end to end on this machine: five echo servers stand in for the kernel's
    sockets (as in test_multiplexer.py); two login sides at once (a reconnect, a second login
    node) each carry 4 MiB exactly, through the node side's TLS listener."""
    import hashlib

    from test_multiplexer import echo_server

    from hpc_kernels.relay import connect_login_tcp, serve_node_tcp

    files = credentials_in(tmp_path / "state", "k")
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    payload = os.urandom(4 * 1024 * 1024)

    async def through(mux, index: int) -> bytes:  # type: ignore[no-untyped-def]
        path = tmp_path / f"login-{index}-{os.urandom(3).hex()}"
        server = await asyncio.get_running_loop().create_unix_server(lambda: mux.local_end(index), path=str(path))
        reader, writer = await asyncio.open_unix_connection(str(path))

        async def send() -> None:  # while the echo comes back, or both sides would wait on full buffers
            writer.write(payload)
            await writer.drain()

        sending = asyncio.ensure_future(send())
        got = await reader.readexactly(len(payload))
        await sending
        writer.close()
        server.close()
        return got

    async def scenario() -> list[bytes]:
        (node_dir / "rw").mkdir()
        kernel = [await echo_server(node_dir / "rw" / f"kernel-{i + 1}") for i in range(5)]
        listener = await serve_node_tcp(node_dir, files, host="127.0.0.1")
        port = listener.sockets[0].getsockname()[1]
        try:
            first, second = [(await connect_login_tcp("127.0.0.1", port, files))[1] for _ in range(2)]
            assert (await first.hello)["transport"] == "tcp"
            return list(await asyncio.gather(through(first, 0), through(second, 4)))
        finally:
            listener.close()
            for server in kernel:
                server.close()

    digests = {hashlib.sha256(got).hexdigest() for got in asyncio.run(scenario())}
    assert digests == {hashlib.sha256(payload).hexdigest()}


def test_a_login_side_without_the_kernels_credentials_cannot_open_the_stream(tmp_path: Path) -> None:
    from hpc_kernels.relay import connect_login_tcp, serve_node_tcp

    mine, other = credentials_in(tmp_path / "a", "a"), credentials_in(tmp_path / "b", "b")
    node_dir = tmp_path / "node"
    node_dir.mkdir()

    async def scenario() -> None:
        listener = await serve_node_tcp(node_dir, mine, host="127.0.0.1")
        port = listener.sockets[0].getsockname()[1]
        try:
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
                _, mux = await connect_login_tcp("127.0.0.1", port, other)
                await asyncio.wait_for(mux.ended, 5)  # TLS 1.3: the refusal may come after the handshake
                raise ConnectionError("the stream ended")
        finally:
            listener.close()

    asyncio.run(scenario())


def test_connections_that_never_finish_their_handshake_are_capped(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The tcp node side's port is open to every user: connections that never send a ClientHello
    are held for the handshake timeout at most, and no more than a cap of them at once (else the
    agent's file descriptors run out). The kernel's own login side still gets through."""
    import socket as sockets

    from test_multiplexer import echo_server

    import hpc_kernels.relay as relay
    from hpc_kernels.relay import connect_login_tcp, serve_node_tcp

    monkeypatch.setattr(relay, "MAX_PENDING_HANDSHAKES", 4)
    monkeypatch.setattr(relay, "HELLO_TIMEOUT", 2.0)
    files = credentials_in(tmp_path / "state", "k")
    node_dir = tmp_path / "node"
    (node_dir / "rw").mkdir(parents=True)

    async def scenario() -> tuple[int, int, bool]:
        kernel = [await echo_server(node_dir / "rw" / f"kernel-{i + 1}") for i in range(5)]
        listener = await serve_node_tcp(node_dir, files, host="127.0.0.1")
        port = listener.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        silent = []
        for _ in range(10):
            s = sockets.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            silent.append(s)
        await asyncio.sleep(0.5)

        async def closed(s: sockets.socket) -> bool:
            try:
                return await asyncio.wait_for(loop.sock_recv(s, 1), 0.2) == b""
            except asyncio.TimeoutError:  # (an OSError too, since Python 3.11: first)
                return False
            except OSError:  # reset
                return True

        refused_at_once = sum([await closed(s) for s in silent])
        await asyncio.sleep(2.5)  # past the handshake timeout
        dropped_later = sum([await closed(s) for s in silent])
        _, mux = await connect_login_tcp("127.0.0.1", port, files)
        hello = await asyncio.wait_for(mux.hello, 5)
        for s in silent:
            s.close()
        listener.close()
        for server in kernel:
            server.close()
        return refused_at_once, dropped_later, hello.get("transport") == "tcp"

    refused_at_once, dropped_later, through = asyncio.run(scenario())
    assert refused_at_once == 6, "four in their handshake, the other six closed at once"
    assert dropped_later == 10, "the four are dropped at the handshake timeout"
    assert through

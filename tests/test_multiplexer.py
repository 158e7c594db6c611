"""The relay's multiplexer over real sockets on this machine (no cluster): a login side and a
node side joined by a socketpair, the node side connecting to local unix-socket servers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import pytest

from hpc_kernels import protocol as p
from hpc_kernels.relay import Multiplexer


async def echo_server(path: Path) -> asyncio.AbstractServer:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(echo, path=str(path))


async def joined(tmp_path: Path, connector=None):
    """Two multiplexers over a socketpair; the node side connects socket i to tmp_path/kernel-(i+1)."""
    a, b = socket.socketpair()
    login_r, login_w = await asyncio.open_connection(sock=a)
    node_r, node_w = await asyncio.open_connection(sock=b)

    async def connect(index: int):
        return await asyncio.open_unix_connection(str(tmp_path / f"kernel-{index + 1}"))

    login = Multiplexer(login_r, login_w)
    node = Multiplexer(node_r, node_w, connector or connect)
    tasks = [asyncio.ensure_future(login.run()), asyncio.ensure_future(node.run())]
    return login, node, tasks, (login_w, node_w)


async def local_pair(tmp_path: Path, login: Multiplexer, index: int):
    """A client connection to a login-side listening socket for kernel socket ``index``."""
    path = tmp_path / f"login-{index}-{os.urandom(3).hex()}"
    server = await asyncio.start_unix_server(lambda r, w: login.attach(index, r, w), path=str(path))
    reader, writer = await asyncio.open_unix_connection(str(path))
    return server, reader, writer


def test_large_transfer_is_exact_and_bounded_by_credit(tmp_path: Path) -> None:
    async def main() -> None:
        server = await echo_server(tmp_path / "kernel-1")
        login, node, tasks, _ = await joined(tmp_path)
        listener, reader, writer = await local_pair(tmp_path, login, 0)
        payload = os.urandom(8 * 1024 * 1024) + bytes(range(256)) * 64

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                writer.write(payload[i:i + 100_000])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        received = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        for mux in (login, node):
            for channel in mux._channels.values():
                queued = sum(len(b) for b in channel.incoming._queue if b)  # type: ignore[attr-defined]
                assert queued <= p.INITIAL_WINDOW
        writer.close()
        for t in tasks:
            t.cancel()
        server.close()
        listener.close()

    asyncio.run(main())


def test_many_channels_on_all_five_sockets_do_not_mix(tmp_path: Path) -> None:
    async def main() -> None:
        servers = [await echo_server(tmp_path / f"kernel-{i + 1}") for i in range(5)]
        login, node, tasks, _ = await joined(tmp_path)
        pairs = [await local_pair(tmp_path, login, i % 5) for i in range(20)]

        async def talk(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for n in range(50):
                message = f"channel {i} message {n}\n".encode() * (n + 1)
                writer.write(message)
                await writer.drain()
                assert await reader.readexactly(len(message)) == message

        await asyncio.wait_for(asyncio.gather(*(talk(i, r, w) for i, (_, r, w) in enumerate(pairs))), 60)
        for t in tasks:
            t.cancel()
        for s in servers:
            s.close()

    asyncio.run(main())


def test_a_slow_reader_does_not_stall_other_channels(tmp_path: Path) -> None:
    async def main() -> None:
        servers = [await echo_server(tmp_path / f"kernel-{i + 1}") for i in range(2)]
        login, node, tasks, _ = await joined(tmp_path)
        _, slow_r, slow_w = await local_pair(tmp_path, login, 0)
        _, fast_r, fast_w = await local_pair(tmp_path, login, 1)
        # Fill the slow channel far past its window without reading its echo.
        blob = os.urandom(4 * p.INITIAL_WINDOW)
        slow_w.write(blob)
        await asyncio.sleep(0.5)
        for n in range(20):
            fast_w.write(b"ping %d\n" % n)
            await fast_w.drain()
            assert await asyncio.wait_for(fast_r.readline(), 5) == b"ping %d\n" % n
        assert await asyncio.wait_for(slow_r.readexactly(len(blob)), 30) == blob
        for t in tasks:
            t.cancel()
        for s in servers:
            s.close()

    asyncio.run(main())


def test_close_reaches_the_other_side(tmp_path: Path) -> None:
    async def main() -> None:
        accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

        async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put(reader)

        server = await asyncio.start_unix_server(keep, path=str(tmp_path / "kernel-1"))
        login, node, tasks, _ = await joined(tmp_path)
        _, reader, writer = await local_pair(tmp_path, login, 0)
        writer.write(b"bye")
        await writer.drain()
        kernel_side = await asyncio.wait_for(accepted.get(), 5)
        assert await kernel_side.readexactly(3) == b"bye"
        writer.close()
        assert await asyncio.wait_for(kernel_side.read(), 5) == b"", "the kernel side sees end of stream"
        for t in tasks:
            t.cancel()
        server.close()

    asyncio.run(main())


def test_a_refused_connection_closes_the_client(tmp_path: Path) -> None:
    async def main() -> None:
        login, node, tasks, _ = await joined(tmp_path)  # no server at kernel-1
        _, reader, writer = await local_pair(tmp_path, login, 0)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def test_an_unexpected_open_from_the_node_side_is_a_protocol_error(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        r, w = await asyncio.open_connection(sock=a)
        login = Multiplexer(r, w)
        b.sendall(p.encode(p.FrameType.OPEN, 1, b"\x00"))
        with pytest.raises(p.ProtocolError):
            await asyncio.wait_for(login.run(), 5)

    asyncio.run(main())

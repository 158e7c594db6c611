"""The relay's multiplexer over real sockets on this machine (no cluster): a login side and a
node side joined by a socketpair, the node side connecting to local unix-socket servers that
stand in for the kernel's sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import protocol as p
from hpc_kernels.multiplexer import Multiplexer, StreamEnd


async def echo_server(path: Path) -> asyncio.AbstractServer:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(echo, path=str(path))


class Relay:
    """Both ends of a relay over a socketpair, and login-side listening sockets."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.login: Multiplexer
        self.node: Multiplexer
        self.transports: list[asyncio.BaseTransport] = []
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, expect_hello: bool = False) -> Relay:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()

        async def connect(index: int, factory: Callable[[], Any]) -> None:
            await loop.create_unix_connection(factory, str(self.tmp_path / f"kernel-{index + 1}"))

        t1, login_end = await loop.create_connection(
            lambda: StreamEnd(lambda t: Multiplexer(t.write, expect_hello=expect_hello)), sock=a)
        t2, node_end = await loop.create_connection(lambda: StreamEnd(lambda t: Multiplexer(t.write, connect)), sock=b)
        self.login, self.node = login_end.mux, node_end.mux
        self.node_transport = t2
        self.transports += [t1, t2]
        return self

    async def client(self, index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self.tmp_path / f"login-{index}-{os.urandom(3).hex()}"
        self.servers.append(await asyncio.get_running_loop().create_unix_server(
            lambda: self.login.local_end(index), path=str(path)))
        return await asyncio.open_unix_connection(str(path))

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in self.transports:
            t.close()


def run(test: Callable[[Relay], Awaitable[None]], tmp_path: Path, servers: int = 5) -> None:
    async def main() -> None:
        kernel = [await echo_server(tmp_path / f"kernel-{i + 1}") for i in range(servers)]
        relay = await Relay(tmp_path).start()
        try:
            await test(relay)
        finally:
            relay.close()
            for s in kernel:
                s.close()

    asyncio.run(main())


def test_large_transfer_is_exact(tmp_path: Path) -> None:
    async def test(relay: Relay) -> None:
        reader, writer = await relay.client(0)
        payload = os.urandom(8 * 1024 * 1024) + bytes(range(256)) * 64

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                writer.write(payload[i:i + 100_000])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        received = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()

    run(test, tmp_path, servers=1)


def test_many_channels_on_all_five_sockets_do_not_mix(tmp_path: Path) -> None:
    async def test(relay: Relay) -> None:
        clients = [await relay.client(i % 5) for i in range(20)]

        async def talk(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for n in range(50):
                message = f"channel {i} message {n}\n".encode() * (n + 1)
                writer.write(message)
                await writer.drain()
                assert await reader.readexactly(len(message)) == message

        await asyncio.wait_for(asyncio.gather(*(talk(i, r, w) for i, (r, w) in enumerate(clients))), 60)
        assert relay.login.open_channels == 20 and relay.node.open_channels == 20

    run(test, tmp_path)


def test_a_slow_reader_stops_its_sender_and_does_not_stall_others(tmp_path: Path) -> None:
    """A client that writes but never reads its echo: the window stops it, the other channel flows."""

    async def test(relay: Relay) -> None:
        slow_r, slow_w = await relay.client(0)
        fast_r, fast_w = await relay.client(1)
        blob = os.urandom(8 * p.INITIAL_WINDOW)
        slow_w.write(blob)
        await asyncio.sleep(1.0)
        # Credit ran out: the slow client's socket is no longer read by the relay.
        slow_login_end = next(e for e in relay.login._channels.values() if e.credit <= 0)
        assert slow_login_end.reading_paused
        for n in range(20):
            fast_w.write(b"ping %d\n" % n)
            await fast_w.drain()
            assert await asyncio.wait_for(fast_r.readline(), 5) == b"ping %d\n" % n
        assert await asyncio.wait_for(slow_r.readexactly(len(blob)), 60) == blob

    run(test, tmp_path, servers=2)


def test_close_reaches_the_other_side(tmp_path: Path) -> None:
    async def main() -> None:
        accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

        async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put(reader)

        server = await asyncio.start_unix_server(keep, path=str(tmp_path / "kernel-1"))
        relay = await Relay(tmp_path).start()
        reader, writer = await relay.client(0)
        writer.write(b"bye")
        await writer.drain()
        kernel_side = await asyncio.wait_for(accepted.get(), 5)
        assert await kernel_side.readexactly(3) == b"bye"
        writer.close()
        assert await asyncio.wait_for(kernel_side.read(), 5) == b"", "the kernel side sees end of stream"
        await asyncio.sleep(0.1)
        assert relay.login.open_channels == 0 and relay.node.open_channels == 0
        relay.close()
        server.close()

    asyncio.run(main())


def test_a_refused_connection_closes_the_client(tmp_path: Path) -> None:
    async def test(relay: Relay) -> None:
        reader, _ = await relay.client(0)  # nothing listens at kernel-1
        assert await asyncio.wait_for(reader.read(), 5) == b""

    run(test, tmp_path, servers=0)


def test_end_of_stream_closes_every_client(tmp_path: Path) -> None:
    async def test(relay: Relay) -> None:
        clients = [await relay.client(i) for i in range(3)]
        for _, w in clients:
            w.write(b"x")
        await asyncio.sleep(0.2)
        relay.node_transport.close()  # the srun step died
        for r, _ in clients:
            assert await asyncio.wait_for(r.read(), 5) in (b"", b"x")
        await asyncio.wait_for(relay.login.ended, 5)

    run(test, tmp_path)


def test_hello_is_awaited_and_an_error_is_reported(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        loop = asyncio.get_running_loop()
        _, end = await loop.create_connection(lambda: StreamEnd(lambda t: Multiplexer(t.write, expect_hello=True)),
                                              sock=a)
        b.sendall(b"srun: warning: noise before the stream\n" + p.encode_error("kernel sockets missing on c1"))
        with pytest.raises(p.ProtocolError, match="kernel sockets missing on c1"):
            await asyncio.wait_for(end.mux.hello, 5)
        await asyncio.wait_for(end.mux.ended, 5)
        b.close()

    asyncio.run(main())


def test_an_unexpected_open_from_the_node_side_is_a_protocol_error(tmp_path: Path) -> None:
    async def main() -> None:
        mux = Multiplexer(lambda data: None)
        assert mux.feed(p.encode(p.FrameType.OPEN, 1, b"\x00")) is False
        assert isinstance(mux.error, p.ProtocolError) and mux.ended.done()

    asyncio.run(main())


def test_a_partial_frame_is_answered_with_a_nudge() -> None:
    async def main() -> None:
        sent: list[bytes] = []
        mux = Multiplexer(sent.append)
        mux.feed(p.encode(p.FrameType.CREDIT, 3, b"\0\0\0\1")[:5])
        await asyncio.sleep(0)
        assert sent == [p.NUDGE_FRAME]
        quiet: list[bytes] = []
        other = Multiplexer(quiet.append)
        other.feed(p.NUDGE_FRAME + p.encode(p.FrameType.CLOSE, 9))
        await asyncio.sleep(0)
        assert quiet == [], "complete frames (nudges included) are never answered"

    asyncio.run(main())


def test_a_corrupt_stream_ends_the_relay_instead_of_wedging_it(tmp_path: Path) -> None:
    """Through a real pipe, as in production: an oversized frame closes every channel and the stream."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        _, end = await loop.connect_read_pipe(lambda: StreamEnd(lambda t: Multiplexer(lambda d: None)),
                                              os.fdopen(read_fd, "rb", 0))
        os.write(write_fd, p.HEADER.pack(p.FrameType.DATA, 1, p.MAX_PAYLOAD + 1))
        await asyncio.wait_for(end.mux.ended, 5)
        assert isinstance(end.mux.error, p.ProtocolError)
        os.close(write_fd)

    asyncio.run(main())


def test_a_hello_of_another_version_is_refused() -> None:
    async def main() -> None:
        mux = Multiplexer(lambda d: None, expect_hello=True)
        bad = p.MAGIC + p.encode(p.FrameType.HELLO, 0, b'{"version": 99}')
        assert mux.feed(bad) is False
        with pytest.raises(p.ProtocolError, match="another protocol version"):
            await mux.hello
        assert mux.ended.done()

    asyncio.run(main())


def test_an_open_for_a_socket_that_does_not_exist_is_answered_with_close(tmp_path: Path) -> None:
    async def main() -> None:
        sent: list[bytes] = []

        async def connect(index: int, factory: Callable[[], Any]) -> None:
            raise IndexError(index)

        mux = Multiplexer(sent.append, connect)
        mux.feed(p.encode(p.FrameType.OPEN, 4, b"\x09"))
        await asyncio.sleep(0.05)
        frames = p.FrameDecoder().feed(b"".join(sent))
        assert [(f.type, f.channel) for f in frames] == [(p.FrameType.CLOSE, 4)]
        assert mux.open_channels == 0

    asyncio.run(main())

"""The relay's multiplexer over real sockets on this machine (no cluster): a login side and a
node side joined by a socketpair, the node side connecting to local unix-socket servers that
stand in for the kernel's sockets."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import protocol as p
from hpc_kernels.multiplexer import LocalEnd, Multiplexer, StreamEnd


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

    async def listen(self, index: int) -> Path:
        """A login-side listening socket for kernel socket ``index``, as the login relay makes."""
        path = self.tmp_path / f"login-{index}-{os.urandom(3).hex()}"
        self.servers.append(await asyncio.get_running_loop().create_unix_server(
            lambda: self.login.local_end(index), path=str(path)))
        return path

    async def client(self, index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(await self.listen(index)))

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
        writers = []  # Python 3.13 closes a connection whose StreamWriter is garbage-collected

        async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
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


# -- edge cases ---------------------------------------------------------------------------------

DATA, CLOSE, OPEN = p.FrameType.DATA, p.FrameType.CLOSE, p.FrameType.OPEN
# Deterministic payloads: a full-size frame, and one over srun's 1 KiB stdio chunks.
LARGE = random.Random(1).randbytes(p.MAX_PAYLOAD)
MEDIUM = random.Random(2).randbytes(3000)
CREDIT = 0x40000


class KernelStandIn:
    """A unix-socket server in place of one kernel socket. It echoes (unless told not to), counts
    its open connections, and queues all that each connection received once the relay closed it."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.accepted = 0
        self.open = 0
        self.finished: asyncio.Queue[bytes] = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, path: Path) -> KernelStandIn:
        self.server = await asyncio.start_unix_server(self._serve, path=str(path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        received = bytearray()
        try:
            while data := await reader.read(65536):
                received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()
            await self.finished.put(bytes(received))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class RawPeer:
    """One multiplexer whose far end the test plays by hand over a socketpair, frame by frame.

    Login side: the multiplexer listens for clients of kernel socket 0 at ``path``. Node side: it
    connects to ``<tmp_path>/kernel-<index + 1>`` when an OPEN comes.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.path = tmp_path / "login-0"
        self.decoder = p.FrameDecoder()
        self.received: list[p.Frame] = []
        self.mux: Multiplexer
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.closers: list[Callable[[], None]] = []

    async def start(self, side: str) -> RawPeer:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()

        async def connect(index: int, factory: Callable[[], Any]) -> None:
            await loop.create_unix_connection(factory, str(self.tmp_path / f"kernel-{index + 1}"))

        transport, end = await loop.create_connection(
            lambda: StreamEnd(lambda t: Multiplexer(t.write, connect if side == "node" else None)), sock=a)
        assert end.mux is not None
        self.mux = end.mux
        self.closers.append(transport.close)
        if side == "login":
            server = await loop.create_unix_server(lambda: self.mux.local_end(0), path=str(self.path))
            self.closers.append(server.close)
        self.reader, self.writer = await asyncio.open_unix_connection(sock=b)
        self.closers.append(self.writer.close)
        return self

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def frame(self) -> p.Frame:
        """The next frame the multiplexer sent, NUDGEs skipped."""
        while True:
            while self.received:
                frame = self.received.pop(0)
                if frame.type is not p.FrameType.NUDGE:
                    return frame
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, "the multiplexer closed the stream"
            self.received += self.decoder.feed(data)

    async def client(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
        """A client of the login-side socket, and its channel (from the OPEN the multiplexer sent)."""
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        frame = await self.frame()
        assert frame.type is OPEN and frame.payload == b"\x00", frame
        return reader, writer, frame.channel

    def close(self) -> None:
        for close in self.closers:
            close()


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for turn in itertools.count():
        if condition():
            return
        assert loop.time() < deadline, f"still not {what} after {timeout} s"
        await asyncio.sleep(0 if turn < 100 else 0.005)  # most conditions hold after a few turns


def frame_ends(parts: list[tuple[bytes, bytes]]) -> list[int]:
    return list(itertools.accumulate(len(encoded) for encoded, _ in parts))


def cut_points(parts: list[tuple[bytes, bytes]]) -> list[int]:
    """Every offset in the stream, except that inside a payload of more than 4 KiB only every
    509th one and those next to its ends are taken: they all leave the decoder in the same state
    (header known, payload incomplete), and a real socket per cut point must stay fast."""
    cuts: list[int] = []
    start = 0
    for (encoded, _), end in zip(parts, frame_ends(parts)):
        if len(encoded) > 4096:
            body = range(start + p.HEADER.size + 3, end - 3)
            cuts += [c for c in range(start, end) if c not in body or (c - body.start) % 509 == 0]
        else:
            cuts += range(start, end)
        start = end
    return cuts + [start]


def node_to_login_parts() -> list[tuple[bytes, bytes]]:
    """What a node side sends to a login side with one client (channel 1), frame by frame, each
    with the bytes it carries to that client: srun noise and the opening, then every kind of frame
    a node side may send (DATA empty, small, 3000 bytes and of the maximum size; frames for
    channels the login side does not have; a CLOSE with a reason and one without)."""
    return [
        (b"srun: noise, HKR but not the magic\n" + p.encode_hello({"node": "c1"}), b""),
        (p.encode(DATA, 1, b"first "), b"first "),
        (p.encode(DATA, 1, b""), b""),
        (p.NUDGE_FRAME, b""),
        (p.encode(DATA, 1, MEDIUM), MEDIUM),
        (p.encode(DATA, 7, b"for a channel already closed"), b""),
        (p.encode(CLOSE, 7, b"connection refused"), b""),
        (p.encode_credit(1, CREDIT), b""),
        (p.encode(DATA, 1, LARGE), LARGE),
        (p.encode(DATA, 1, b"last"), b"last"),
        (p.encode(CLOSE, 1), b""),
    ]


async def login_mux_with_client(sent: list[bytes]) -> tuple[Multiplexer, LocalEnd, asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
    """A login-side multiplexer awaiting HELLO, and one client connected to it (channel 1)."""
    loop = asyncio.get_running_loop()
    mux = Multiplexer(sent.append, expect_hello=True)
    ours, theirs = socket.socketpair()
    _, end = await loop.create_unix_connection(lambda: mux.local_end(0), sock=ours)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    await asyncio.sleep(0)  # the OPEN leaves
    assert end.channel == 1 and mux.open_channels == 1
    return mux, end, reader, writer


def check_login_after_the_whole_stream(mux: Multiplexer, end: LocalEnd, sent: list[bytes]) -> list[p.Frame]:
    assert mux.hello.result() == {"version": 1, "node": "c1"}
    assert mux.error is None and not mux.ended.done()
    assert mux.open_channels == 0 and end.closed
    assert end.credit == p.INITIAL_WINDOW + CREDIT
    frames = p.FrameDecoder().feed(b"".join(sent))
    assert frames[0] == p.Frame(OPEN, 1, b"\x00")
    assert {f.type for f in frames[1:]} <= {p.FrameType.NUDGE}, "nothing else is answered"
    return frames[1:]


def test_the_login_side_delivers_the_same_bytes_whatever_single_cut_splits_the_stream() -> None:
    parts = node_to_login_parts()
    stream = b"".join(encoded for encoded, _ in parts)
    ends = frame_ends(parts)
    cuts = cut_points(parts)
    large = [e for (encoded, _), e in zip(parts, ends) if encoded == p.encode(DATA, 1, LARGE)][0]
    skipped = set(range(len(stream) + 1)) - set(cuts)
    assert min(skipped) > large - len(LARGE) + 3 and max(skipped) < large - 3 and len(cuts) > 3200

    async def main() -> None:
        for cut in cuts:
            sent: list[bytes] = []
            mux, end, reader, writer = await login_mux_with_client(sent)
            assert mux.feed(stream[:cut])
            before = b"".join(data for (_, data), e in zip(parts, ends) if e <= cut)
            assert await asyncio.wait_for(reader.readexactly(len(before)), 5) == before, cut
            assert mux.hello.done() == (cut >= ends[0])
            assert mux.feed(stream[cut:])
            rest = await asyncio.wait_for(reader.read(), 5)  # then end of stream: the CLOSE
            assert before + rest == b"".join(data for _, data in parts), cut
            nudges = check_login_after_the_whole_stream(mux, end, sent)
            if cut >= ends[0]:  # after the opening: a partial frame is nudged, a whole one never
                assert len(nudges) == (0 if cut in ends else 1), cut
            writer.close()

    asyncio.run(main())


def test_the_login_side_fed_byte_by_byte_delivers_the_same_bytes() -> None:
    parts = node_to_login_parts()
    stream = b"".join(encoded for encoded, _ in parts)

    async def main() -> None:
        sent: list[bytes] = []
        mux, end, reader, writer = await login_mux_with_client(sent)
        for i in range(len(stream)):
            assert mux.feed(stream[i:i + 1])
            if i % 1000 == 0:
                await asyncio.sleep(0)
        assert await asyncio.wait_for(reader.read(), 5) == b"".join(data for _, data in parts)
        check_login_after_the_whole_stream(mux, end, sent)
        writer.close()

    asyncio.run(main())


def test_an_error_opening_fails_the_same_whatever_single_cut_splits_it() -> None:
    stream = b"srun: warning: HKR\n" + p.encode_error("kernel sockets missing on c1")

    async def main() -> None:
        for cut in range(len(stream) + 1):
            mux = Multiplexer(lambda d: None, expect_hello=True)
            results = [mux.feed(stream[:cut])]
            if results[0]:
                results.append(mux.feed(stream[cut:]))
            assert results == [True, False] or results == [False] and cut == len(stream), cut
            with pytest.raises(p.ProtocolError, match="^kernel sockets missing on c1$"):
                await mux.hello
            assert mux.ended.done()

    asyncio.run(main())


def test_the_node_side_delivers_the_same_bytes_to_the_kernel_whatever_single_cut_splits_the_stream(
        tmp_path: Path) -> None:
    """Also when DATA, or DATA and CLOSE, arrive before the kernel connection is made."""
    parts = [
        (p.encode(OPEN, 1, b"\x00"), b""),
        (p.encode(DATA, 1, b"first "), b"first "),
        (p.encode(DATA, 1, b""), b""),
        (p.NUDGE_FRAME, b""),
        (p.encode(DATA, 1, MEDIUM), MEDIUM),
        (p.encode_credit(1, CREDIT), b""),
        (p.encode(DATA, 1, b"last"), b"last"),
        (p.encode(CLOSE, 1), b""),
    ]
    stream = b"".join(encoded for encoded, _ in parts)
    expected = b"".join(data for _, data in parts)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        kernel = await KernelStandIn(echo=False).start(tmp_path / "kernel-1")

        async def connect(index: int, factory: Callable[[], Any]) -> None:
            await loop.create_unix_connection(factory, str(tmp_path / f"kernel-{index + 1}"))

        for cut in range(len(stream) + 1):
            sent: list[bytes] = []
            mux = Multiplexer(sent.append, connect)
            assert mux.feed(stream[:cut])
            # Let the kernel connection be made (if the OPEN came) before the rest arrives.
            await until(lambda: all(e.transport is not None for e in mux._channels.values()), "connected")
            assert mux.feed(stream[cut:])
            assert await asyncio.wait_for(kernel.finished.get(), 5) == expected, cut
            assert mux.open_channels == 0 and mux.error is None
            await asyncio.sleep(0)
            assert {f.type for f in p.FrameDecoder().feed(b"".join(sent))} <= {p.FrameType.NUDGE}, cut
        assert kernel.accepted == len(stream) + 1 and kernel.open == 0
        kernel.close()

    asyncio.run(main())


def test_an_empty_data_frame_is_a_no_op_not_an_end_of_channel_on_the_login_side(tmp_path: Path) -> None:
    async def main() -> None:
        peer = await RawPeer(tmp_path).start("login")
        reader, writer, channel = await peer.client()
        peer.send(p.encode(DATA, channel, b""), p.encode(DATA, channel, b""), p.encode(DATA, channel, b"after"))
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"after"
        writer.write(b"ping")
        assert await peer.frame() == p.Frame(DATA, channel, b"ping"), "no CLOSE, no CREDIT before it"
        assert peer.mux.open_channels == 1 and peer.mux.error is None
        writer.close()
        assert await peer.frame() == p.Frame(CLOSE, channel, b"")
        peer.close()

    asyncio.run(main())


def test_an_empty_data_frame_is_a_no_op_on_the_node_side_even_before_the_kernel_connection(
        tmp_path: Path) -> None:
    async def main() -> None:
        kernel = await KernelStandIn().start(tmp_path / "kernel-1")
        peer = await RawPeer(tmp_path).start("node")
        peer.send(p.encode(OPEN, 1, b"\x00"), p.encode(DATA, 1, b""))  # before the connection is made
        await until(lambda: kernel.accepted == 1, "connected")
        peer.send(p.encode(DATA, 1, b""), p.encode(DATA, 1, b"hello"))
        assert await peer.frame() == p.Frame(DATA, 1, b"hello"), "echoed; no CLOSE, no CREDIT before it"
        assert peer.mux.open_channels == 1 and kernel.open == 1 and peer.mux.error is None
        peer.close()
        kernel.close()

    asyncio.run(main())


def test_an_empty_payload_where_the_frame_needs_one_is_a_protocol_error(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def connect(index: int, factory: Callable[[], Any]) -> None:
            await loop.create_unix_connection(factory, str(tmp_path / "nothing-listens-here"))

        for stream in (p.encode(OPEN, 1, b""),  # OPEN needs the socket index
                       p.encode(OPEN, 1, b"\x00") + p.encode(p.FrameType.CREDIT, 1),  # CREDIT needs 4 bytes
                       p.encode(p.FrameType.CREDIT, 5)):  # ... also for a channel the receiver does not have
            mux = Multiplexer(lambda d: None, connect)
            assert mux.feed(stream) is False, stream
            assert isinstance(mux.error, p.ProtocolError) and mux.ended.done() and mux.open_channels == 0
        mux = Multiplexer(lambda d: None, expect_hello=True)
        assert mux.feed(p.MAGIC + p.encode(p.FrameType.HELLO)) is False
        with pytest.raises(p.ProtocolError, match="another protocol version"):
            await mux.hello

    asyncio.run(main())


def test_an_empty_error_still_fails_the_opening_and_says_so() -> None:
    async def main() -> None:
        mux = Multiplexer(lambda d: None, expect_hello=True)
        assert mux.feed(p.MAGIC + p.encode(p.FrameType.ERROR)) is False
        with pytest.raises(p.ProtocolError, match="the node side reported an error without a message"):
            await mux.hello
        assert mux.ended.done()

    asyncio.run(main())


@pytest.mark.parametrize("cut", [0, p.HEADER.size // 2, p.HEADER.size + 7],
                         ids=["at-a-frame-boundary", "halfway-through-a-header", "halfway-through-a-payload"])
def test_a_stream_closed_mid_frame_ends_the_login_side_closes_every_client_and_says_so(
        tmp_path: Path, cut: int, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: loop_errors.append(context))
        peer = await RawPeer(tmp_path).start("login")
        clients = [await peer.client() for _ in range(3)]
        first = clients[0][2]
        peer.send(p.encode(DATA, first, b"complete"), p.encode(DATA, first, b"never delivered")[:cut])
        await peer.writer.drain()
        peer.writer.close()  # the srun step died
        await asyncio.wait_for(peer.mux.ended, 5)
        for i, (reader, writer, _) in enumerate(clients):
            assert await asyncio.wait_for(reader.read(), 5) == (b"complete" if i == 0 else b"")
            writer.close()
        assert peer.mux.open_channels == 0
        if cut:
            assert isinstance(peer.mux.error, p.ProtocolError)
            assert f"the stream ended in the middle of a frame ({cut} bytes of it received)" in str(peer.mux.error)
        else:
            assert peer.mux.error is None
        peer.close()
        await asyncio.sleep(0.01)
        assert loop_errors == []

    asyncio.run(main())
    err = capsys.readouterr().err
    assert ("relay: the stream ended in the middle of a frame" in err) == bool(cut), err


def test_a_stream_closed_mid_frame_closes_the_kernel_connections_on_the_node_side(tmp_path: Path) -> None:
    async def main() -> None:
        kernel = await KernelStandIn(echo=False).start(tmp_path / "kernel-1")
        peer = await RawPeer(tmp_path).start("node")
        peer.send(p.encode(OPEN, 1, b"\x00"), p.encode(OPEN, 2, b"\x00"), p.encode(DATA, 1, b"whole"))
        await until(lambda: kernel.accepted == 2 and peer.mux.open_channels == 2, "connected")
        peer.send(p.encode(DATA, 2, b"cut short")[:p.HEADER.size + 3])
        await peer.writer.drain()
        peer.writer.close()  # stdin ended
        await asyncio.wait_for(peer.mux.ended, 5)
        received = sorted([await asyncio.wait_for(kernel.finished.get(), 5) for _ in range(2)])
        assert received == [b"", b"whole"] and kernel.open == 0
        assert "in the middle of a frame" in str(peer.mux.error)
        peer.close()
        kernel.close()

    asyncio.run(main())


def test_fifty_clients_of_one_socket_at_once_get_their_own_bytes_and_leave_no_channel_behind(
        tmp_path: Path) -> None:
    clients_count = 50

    async def main() -> None:
        kernel = await KernelStandIn().start(tmp_path / "kernel-1")
        relay = await Relay(tmp_path).start()
        path = await relay.listen(0)
        clients = await asyncio.gather(*(asyncio.open_unix_connection(str(path)) for _ in range(clients_count)))
        await until(lambda: relay.login.open_channels == relay.node.open_channels == kernel.open == clients_count,
                    f"{clients_count} channels open")
        assert sorted(relay.login._channels) == sorted(relay.node._channels) == list(range(1, clients_count + 1))

        async def talk(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for n, size in enumerate((1, 1500, p.MAX_PAYLOAD + 5000, 300)):
                message = f"<client {i} message {n}>".encode() + random.Random(i * 10 + n).randbytes(size)
                writer.write(message)
                await writer.drain()
                assert await reader.readexactly(len(message)) == message
            writer.write_eof()
            assert await reader.read() == b"", "the relay closes the client's connection in turn"
            writer.close()

        await asyncio.wait_for(asyncio.gather(*(talk(i, r, w) for i, (r, w) in enumerate(clients))), 30)
        await until(lambda: relay.login.open_channels == relay.node.open_channels == kernel.open == 0,
                    "all channels closed")
        assert kernel.accepted == clients_count and not relay.login.ended.done()
        relay.close()
        kernel.close()

    asyncio.run(main())


def test_late_frames_for_a_closed_channel_are_ignored_and_its_number_is_not_reused(tmp_path: Path) -> None:
    async def main() -> None:
        peer = await RawPeer(tmp_path).start("login")
        _, writer, first = await peer.client()
        writer.close()
        assert await peer.frame() == p.Frame(CLOSE, first, b"")
        reader, writer, second = await peer.client()
        assert second == first + 1
        # In flight when our CLOSE crossed them, then frames for a channel that never was.
        peer.send(p.encode(DATA, first, b"late"), p.encode_credit(first, 1000), p.encode(CLOSE, first, b"gone"),
                  p.encode(CLOSE, 99), p.encode(DATA, 99, b"stray"), p.encode_credit(99, 5),
                  p.encode(DATA, second, b"fresh"))
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"fresh"
        writer.write(b"x")
        assert await peer.frame() == p.Frame(DATA, second, b"x"), "nothing answered to the late frames"
        assert peer.mux.open_channels == 1 and peer.mux.error is None and not peer.mux.ended.done()
        writer.close()
        peer.close()

    asyncio.run(main())


def test_the_node_side_ignores_data_after_a_close_and_does_not_answer_the_close(tmp_path: Path) -> None:
    async def main() -> None:
        kernel = await KernelStandIn().start(tmp_path / "kernel-1")
        peer = await RawPeer(tmp_path).start("node")
        peer.send(p.encode(OPEN, 1, b"\x00"), p.encode(DATA, 1, b"before"), p.encode(CLOSE, 1),
                  p.encode(DATA, 1, b"after"), p.encode_credit(1, 10), p.encode(CLOSE, 1))
        assert await asyncio.wait_for(kernel.finished.get(), 5) == b"before"
        peer.send(p.encode(OPEN, 2, b"\x00"), p.encode(DATA, 2, b"ping"))
        assert await peer.frame() == p.Frame(DATA, 2, b"ping"), "no CLOSE of channel 1 came back"
        assert peer.mux.open_channels == 1 and peer.mux.error is None
        peer.close()
        kernel.close()

    asyncio.run(main())


def test_an_open_for_a_channel_already_open_is_a_protocol_error(tmp_path: Path) -> None:
    async def main() -> None:
        kernel = await KernelStandIn(echo=False).start(tmp_path / "kernel-1")
        peer = await RawPeer(tmp_path).start("node")
        peer.send(p.encode(OPEN, 1, b"\x00"))
        await until(lambda: kernel.accepted == 1, "connected")
        peer.send(p.encode(OPEN, 1, b"\x00"))
        await asyncio.wait_for(peer.mux.ended, 5)
        assert "unexpected OPEN frame on channel 1" in str(peer.mux.error)
        assert await asyncio.wait_for(kernel.finished.get(), 5) == b""
        peer.close()
        kernel.close()

    asyncio.run(main())


def test_a_hello_or_error_after_the_opening_is_a_protocol_error_on_any_channel() -> None:
    async def main() -> None:
        for kind in (p.FrameType.HELLO, p.FrameType.ERROR):
            for channel in (0, 1):
                mux = Multiplexer(lambda d: None, expect_hello=True)
                assert mux.feed(p.encode_hello())
                assert mux.feed(p.encode(kind, channel, b'{"version": 1}')) is False, (kind, channel)
                assert f"unexpected {kind.name} frame on channel {channel}" in str(mux.error)
                assert mux.ended.done()

    asyncio.run(main())

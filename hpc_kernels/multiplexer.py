"""Many local stream connections carried over one byte stream (the wire format is in protocol.py).

Built on asyncio Protocols rather than streams: bytes are forwarded from the callback that
receives them, with no task or queue per message, because every message of every kernel crosses
two of these (login side and node side) and the relay should cost little next to direct IPC.

Flow control, per channel and direction:

* a sender may have ``INITIAL_WINDOW`` bytes in flight; when its credit runs out it stops
  reading its local socket (``pause_reading``) until CREDIT comes back;
* a receiver writes DATA to its local socket at once and returns the bytes as CREDIT in batches,
  but holds the credit back while that socket's transport says its buffer is full
  (``pause_writing``), so a slow local reader stops the remote sender instead of growing memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
from collections.abc import Callable

from . import protocol as p

Write = Callable[[bytes], None]


class LocalEnd(asyncio.Protocol):
    """One local connection: a client on the login side, or a kernel socket on the node side."""

    def __init__(self, mux: Multiplexer, channel: int) -> None:
        self.mux = mux
        self.channel = channel
        self.index: int | None = None  # which of the kernel's five sockets (p.SOCKET_NAMES) it is for
        self.transport: asyncio.Transport | None = None
        self.credit = p.INITIAL_WINDOW  # bytes we may still send to the far side
        self.consumed = 0  # bytes written locally and not yet returned as CREDIT
        self.early = bytearray()  # DATA that arrived before the local connection was made
        self.reading_paused = False
        self.writing_paused = False
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:
            # CLOSE came before the connection was made: still write what came with it, then close.
            if self.early:
                transport.write(bytes(self.early))  # type: ignore[attr-defined]
                self.early.clear()
            transport.close()
            return
        if self.early:
            self.deliver(bytes(self.early))
            self.early.clear()

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), p.MAX_PAYLOAD):
            self.mux.send(p.encode(p.FrameType.DATA, self.channel, bytes(view[start:start + p.MAX_PAYLOAD])))
        self.credit -= len(data)
        if self.credit <= 0 and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.mux.close_channel(self, notify=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.mux.close_channel(self, notify=True)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._return_credit(force=True)

    # -- from the far side -----------------------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        if self.transport is None:
            self.early += payload
            return
        self.transport.write(payload)
        self.consumed += len(payload)
        self._return_credit()

    def add_credit(self, amount: int) -> None:
        self.credit += amount
        if self.credit > 0 and self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def _return_credit(self, force: bool = False) -> None:
        if self.writing_paused or not self.consumed:
            return
        if force or self.consumed >= p.CREDIT_BATCH:
            self.mux.send(p.encode_credit(self.channel, self.consumed))
            self.consumed = 0


Connect = Callable[[int, Callable[[], LocalEnd]], object]


class Multiplexer:
    """One end of the relay stream.

    ``write`` sends bytes down the stream. Bytes coming up the stream go to :meth:`feed`, and
    :meth:`stream_ended` when it ends. On the login side, :meth:`local_end` is the protocol
    factory for a listening socket; on the node side, ``connect(index, factory)`` must connect
    ``factory()`` to kernel socket ``index`` (an OPEN from the far side starts it). With
    ``expect_hello``, the stream must begin with MAGIC and a HELLO frame (see :attr:`hello`).
    """

    def __init__(self, write: Write, connect: Connect | None = None, *, expect_hello: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._write = write
        self._connect = connect
        self._decoder = p.FrameDecoder()
        self._channels: dict[int, LocalEnd] = {}
        self._next_channel = 1
        self._outgoing = bytearray()
        self._flush_scheduled = False
        self._before_hello: bytearray | None = bytearray() if expect_hello else None
        self.hello: asyncio.Future[dict[str, object]] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.error: p.ProtocolError | None = None
        if not expect_hello:
            self.hello.set_result({})

    # -- the stream ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one turn of the event loop leaves in one write.

        Fewer, larger writes matter for the srun transport, which turns every write into its own
        TCP send (see NUDGE in protocol.py).
        """
        self._outgoing += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing and not self.ended.done():
            self._write(bytes(self._outgoing))
        self._outgoing.clear()

    def feed(self, data: bytes) -> bool:
        """Take bytes from the stream. Returns False on a protocol error: the multiplexer has
        then ended (every channel closed) and the caller must close the stream."""
        try:
            if self._before_hello is not None:
                data = self._await_hello(data)
                if not data:
                    return True
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
        except p.ProtocolError as e:
            self.error = e
            print(f"relay: protocol error, closing the stream: {e}", file=sys.stderr, flush=True)
            self.stream_ended()
            return False
        if self._decoder.pending and not self._outgoing:
            self.send(p.NUDGE_FRAME)
        return True

    def _await_hello(self, data: bytes) -> bytes:
        """Skip to MAGIC, take the HELLO (or ERROR) frame; return what follows it."""
        assert self._before_hello is not None
        buffer = self._before_hello
        buffer += data
        start = buffer.find(p.MAGIC)
        if start < 0 or len(buffer) < start + len(p.MAGIC) + p.HEADER.size:
            return b""
        frames = start + len(p.MAGIC)
        kind, _, length = p.HEADER.unpack_from(buffer, frames)
        if length > p.MAX_PAYLOAD:
            raise p.ProtocolError(f"opening frame of {length} bytes exceeds {p.MAX_PAYLOAD}")
        end = frames + p.HEADER.size + length
        if len(buffer) < end:
            return b""
        payload = bytes(buffer[frames + p.HEADER.size:end])
        rest = bytes(buffer[end:])
        self._before_hello = None
        if kind == p.FrameType.HELLO:
            try:
                info = json.loads(payload)
            except ValueError:
                info = None
            if not isinstance(info, dict) or info.get("version") != p.VERSION:
                error = p.ProtocolError(f"the node side speaks another protocol version: {payload[:200]!r}")
                self.hello.set_exception(error)
                raise error
            self.hello.set_result(info)
        else:
            if kind == p.FrameType.ERROR:
                message = payload.decode(errors="replace") or "the node side reported an error without a message"
            else:
                message = f"frame type {kind}"
            error = p.ProtocolError(message)
            self.hello.set_exception(error)
            raise error  # nothing may follow ERROR: end the stream
        return rest

    def stream_ended(self) -> None:
        if self._decoder.pending and self.error is None and not self.ended.done():
            self.error = p.ProtocolError(
                f"the stream ended in the middle of a frame ({self._decoder.pending} bytes of it received)")
            print(f"relay: {self.error}", file=sys.stderr, flush=True)
        if not self.hello.done():
            seen = bytes(self._before_hello or b"")[-400:].decode(errors="replace").strip()
            self.hello.set_exception(p.ProtocolError(
                "the node side ended before it said hello" + (f": {seen}" if seen else "")))
        for end in list(self._channels.values()):
            self.close_channel(end, notify=False)
        if not self.ended.done():
            self.ended.set_result(None)

    def _dispatch(self, frame: p.Frame) -> None:
        kind = frame.type
        if kind is p.FrameType.NUDGE:
            return
        if kind is p.FrameType.OPEN:
            self._open_from_far_side(frame)
            return
        if kind not in (p.FrameType.DATA, p.FrameType.CREDIT, p.FrameType.CLOSE):
            raise p.ProtocolError(f"unexpected {kind.name} frame on channel {frame.channel}")
        credit = p.decode_credit(frame.payload) if kind is p.FrameType.CREDIT else 0  # checked on any channel
        end = self._channels.get(frame.channel)
        if end is None:
            return  # a late frame for a channel already closed here (our CLOSE crossed it)
        if kind is p.FrameType.DATA:
            end.deliver(frame.payload)  # an empty payload writes nothing: a no-op
        elif kind is p.FrameType.CREDIT:
            end.add_credit(credit)
        else:
            self.close_channel(end, notify=False)

    # -- channels --------------------------------------------------------------------------

    def local_end(self, index: int) -> LocalEnd:
        """Login side: a protocol for a new local connection to kernel socket ``index``."""
        end = _AcceptedEnd(self, self._next_channel, index)
        self._next_channel += 1
        return end

    def _register_accepted(self, end: LocalEnd, index: int) -> None:
        end.index = index
        self._channels[end.channel] = end
        self.send(p.encode(p.FrameType.OPEN, end.channel, bytes([index])))

    def _open_from_far_side(self, frame: p.Frame) -> None:
        if self._connect is None or len(frame.payload) != 1 or frame.channel in self._channels:
            raise p.ProtocolError(f"unexpected OPEN frame on channel {frame.channel}")
        end = LocalEnd(self, frame.channel)
        end.index = frame.payload[0]
        self._channels[end.channel] = end
        task = asyncio.ensure_future(self._connect_end(end, frame.payload[0]))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _connect_end(self, end: LocalEnd, index: int) -> None:
        assert self._connect is not None
        try:
            await self._connect(index, lambda: end)  # type: ignore[misc]
        except (OSError, IndexError) as e:
            self.close_channel(end, notify=True, reason=f"cannot connect to kernel socket {index}: {e}")

    def close_channel(self, end: LocalEnd, *, notify: bool, reason: str = "") -> None:
        end.closed = True
        if self._channels.pop(end.channel, None) is None:
            return
        if notify:
            self.send(p.encode(p.FrameType.CLOSE, end.channel, reason.encode()))
        if end.transport is not None:
            end.transport.close()

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    def open_on(self, index: int) -> int:
        """How many channels are open to kernel socket ``index`` (0: shell, one per client)."""
        return sum(1 for end in list(self._channels.values()) if end.index == index)


class _AcceptedEnd(LocalEnd):
    """A connection accepted on a login-side socket: only our own uid may use it."""

    def __init__(self, mux: Multiplexer, channel: int, index: int) -> None:
        super().__init__(mux, channel)
        self.index = index

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        # The stream is gone (a relay between two streams): close at once, the client reconnects.
        if sock is None or _peer_uid(sock) != os.getuid() or self.mux.ended.done():
            self.closed = True
            transport.close()
            return
        self.mux._register_accepted(self, self.index)
        super().connection_made(transport)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class StreamEnd(asyncio.Protocol):
    """Feeds a multiplexer from a readable transport (a pipe or a socket)."""

    def __init__(self, mux_factory: Callable[[asyncio.BaseTransport], Multiplexer]) -> None:
        self._mux_factory = mux_factory
        self.mux: Multiplexer | None = None
        self.transport: asyncio.BaseTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.mux = self._mux_factory(transport)

    def data_received(self, data: bytes) -> None:
        assert self.mux is not None
        if not self.mux.feed(data):
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.mux is not None:
            self.mux.stream_ended()

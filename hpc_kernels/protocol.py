"""The relay's wire format: many socket connections multiplexed over one byte stream.

Pure encoding and decoding, no I/O; docs/protocol.md describes the same format for people.

The node side opens the stream with the 4-byte magic ``HKR1`` followed by a HELLO frame (or an
ERROR frame, then end of stream). After that both sides send frames::

    +--------+------------+------------+-----------------+
    | type   | channel    | length     | payload         |
    | 1 byte | 4 bytes BE | 4 bytes BE | `length` bytes  |
    +--------+------------+------------+-----------------+

Flow control is by credit: each side may have at most ``INITIAL_WINDOW`` bytes of DATA in flight on
a channel; the receiver returns CREDIT once it has written the bytes to their local socket.

NUDGE exists because of the srun transport: srun and slurmstepd forward stdio in chunks of at
most 1 KiB, each its own TCP send, without TCP_NODELAY. When a frame arrives in part, the rest is
usually held back by the sender's Nagle algorithm until our side's TCP acknowledges the first
part, which a delayed ACK postpones by 40 ms. Any bytes sent back carry that acknowledgement at
once, so a receiver that sees an incomplete frame sends a NUDGE.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

MAGIC = b"HKR1"
VERSION = 1
HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 64 * 1024
INITIAL_WINDOW = 1024 * 1024
# Consumed bytes are returned as CREDIT once this many have piled up, not after every frame.
CREDIT_BATCH = INITIAL_WINDOW // 4

# The five kernel sockets, in the order of their ports (1..5) in both connection files.
SOCKET_NAMES = ("shell", "iopub", "stdin", "control", "hb")


class FrameType(IntEnum):
    HELLO = 1  # node -> login, channel 0: JSON {"version": 1}
    ERROR = 2  # node -> login, channel 0: UTF-8 message; the stream ends after it
    OPEN = 3  # login -> node: payload is one byte, the socket index (0..4)
    DATA = 4  # either way: bytes for the channel's socket
    CLOSE = 5  # either way: the channel's connection is gone; payload: optional reason
    CREDIT = 6  # either way: payload is 4 bytes BE, bytes the sender may send again
    NUDGE = 7  # either way, channel 0, no payload: "part of a frame arrived"; never answered


@dataclass(frozen=True)
class Frame:
    type: FrameType
    channel: int
    payload: bytes = b""


class ProtocolError(Exception):
    """The byte stream does not follow the relay protocol."""


def encode(type: FrameType, channel: int = 0, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(type, channel, len(payload)) + payload


def encode_hello(info: dict[str, Any] | None = None) -> bytes:
    return MAGIC + encode(FrameType.HELLO, 0, json.dumps({"version": VERSION, **(info or {})}).encode())


def encode_error(message: str) -> bytes:
    return MAGIC + encode(FrameType.ERROR, 0, message.encode()[:MAX_PAYLOAD])


NUDGE_FRAME = HEADER.pack(FrameType.NUDGE, 0, 0)


def encode_credit(channel: int, amount: int) -> bytes:
    return encode(FrameType.CREDIT, channel, struct.pack("!I", amount))


def decode_credit(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"CREDIT payload must be 4 bytes, got {len(payload)}")
    return int(struct.unpack("!I", payload)[0])


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back the complete frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            type_, channel, length = HEADER.unpack_from(self._buffer)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            try:
                kind = FrameType(type_)
            except ValueError:
                raise ProtocolError(f"unknown frame type {type_}") from None
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(Frame(kind, channel, bytes(self._buffer[HEADER.size:end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)

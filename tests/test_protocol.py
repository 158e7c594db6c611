"""The relay's wire format (pure encoding and decoding)."""

from __future__ import annotations

import os

import pytest

from hpc_kernels import protocol as p


def test_round_trip_byte_by_byte() -> None:
    payload = bytes(range(256)) * 3
    stream = (p.encode(p.FrameType.OPEN, 7, b"\x02") + p.encode(p.FrameType.DATA, 7, payload)
              + p.encode_credit(7, 12345) + p.encode(p.FrameType.CLOSE, 7))
    decoder = p.FrameDecoder()
    frames = []
    for i in range(len(stream)):
        frames += decoder.feed(stream[i:i + 1])
    assert [f.type for f in frames] == [p.FrameType.OPEN, p.FrameType.DATA, p.FrameType.CREDIT, p.FrameType.CLOSE]
    assert frames[1].payload == payload and frames[1].channel == 7
    assert p.decode_credit(frames[2].payload) == 12345
    assert decoder.pending == 0


def test_many_frames_in_one_chunk() -> None:
    chunks = [os.urandom(n) for n in (0, 1, 100, p.MAX_PAYLOAD)]
    stream = b"".join(p.encode(p.FrameType.DATA, i, c) for i, c in enumerate(chunks))
    frames = p.FrameDecoder().feed(stream)
    assert [f.payload for f in frames] == chunks


def test_oversized_payload_refused_both_ways() -> None:
    with pytest.raises(ValueError):
        p.encode(p.FrameType.DATA, 1, b"x" * (p.MAX_PAYLOAD + 1))
    header = p.HEADER.pack(p.FrameType.DATA, 1, p.MAX_PAYLOAD + 1)
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.FrameDecoder().feed(header)


def test_unknown_frame_type() -> None:
    with pytest.raises(p.ProtocolError, match="unknown frame type 99"):
        p.FrameDecoder().feed(p.HEADER.pack(99, 0, 0))


def test_hello_and_error_start_with_magic() -> None:
    assert p.encode_hello().startswith(p.MAGIC)
    frame = p.FrameDecoder().feed(p.encode_error("boom")[len(p.MAGIC):])[0]
    assert frame.type is p.FrameType.ERROR and frame.payload == b"boom"

"""The relay's wire format (pure encoding and decoding)."""

from __future__ import annotations

import itertools
import os
import random

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


# -- edge cases: frames split anywhere, empty payloads -------------------------------------------

# Deterministic payloads: a full-size one and one over srun's 1 KiB chunks.
LARGE = random.Random(1).randbytes(p.MAX_PAYLOAD)
MEDIUM = random.Random(2).randbytes(3000)


def every_frame_type() -> list[p.Frame]:
    """One of every frame type (after the opening), DATA empty, small and of the maximum size."""
    return [
        p.Frame(p.FrameType.HELLO, 0, b'{"version": 1, "node": "c1"}'),
        p.Frame(p.FrameType.OPEN, 1, b"\x00"),
        p.Frame(p.FrameType.DATA, 1, b"first"),
        p.Frame(p.FrameType.DATA, 1, b""),
        p.Frame(p.FrameType.DATA, 1, LARGE),
        p.Frame(p.FrameType.NUDGE, 0),
        p.Frame(p.FrameType.DATA, 0xFFFFFFFF, MEDIUM),
        p.Frame(p.FrameType.CREDIT, 1, b"\x00\x04\x00\x00"),
        p.Frame(p.FrameType.CLOSE, 1),
        p.Frame(p.FrameType.CLOSE, 2, b"cannot connect"),
        p.Frame(p.FrameType.ERROR, 0, "gone \N{SNOWMAN}".encode()),
    ]


def encode_all(frames: list[p.Frame]) -> bytes:
    return b"".join(p.encode(f.type, f.channel, f.payload) for f in frames)


def test_every_frame_type_survives_a_cut_at_every_byte_boundary() -> None:
    frames = every_frame_type()
    assert {f.type for f in frames} == set(p.FrameType), "a frame type is missing from the sample"
    stream = encode_all(frames)
    ends = list(itertools.accumulate(p.HEADER.size + len(f.payload) for f in frames))
    assert p.FrameDecoder().feed(stream) == frames
    for cut in range(len(stream) + 1):
        decoder = p.FrameDecoder()
        first = decoder.feed(stream[:cut])
        complete = sum(1 for end in ends if end <= cut)
        assert first == frames[:complete], cut
        assert decoder.pending == cut - (ends[complete - 1] if complete else 0), cut
        assert first + decoder.feed(stream[cut:]) == frames, cut
        assert decoder.pending == 0


def test_every_frame_type_fed_byte_by_byte_decodes_like_the_whole() -> None:
    frames = every_frame_type()
    stream = encode_all(frames)
    decoder = p.FrameDecoder()
    decoded = []
    for i in range(len(stream)):
        decoded += decoder.feed(stream[i:i + 1])
    assert decoded == frames and decoder.pending == 0


def test_a_bad_header_is_refused_as_soon_as_it_is_complete_not_before() -> None:
    for header in (p.HEADER.pack(99, 1, 0), p.HEADER.pack(p.FrameType.DATA, 1, p.MAX_PAYLOAD + 1)):
        decoder = p.FrameDecoder()
        for i in range(p.HEADER.size - 1):
            assert decoder.feed(header[i:i + 1]) == []
        with pytest.raises(p.ProtocolError):
            decoder.feed(header[-1:])


def test_a_zero_byte_frame_of_any_type_is_a_whole_frame() -> None:
    """The decoder judges no payload: length 0 is a complete 9-byte frame, whatever follows."""
    for kind in p.FrameType:
        decoder = p.FrameDecoder()
        assert decoder.feed(p.encode(kind, 5) + p.encode(kind, 6)[:4]) == [p.Frame(kind, 5, b"")]
        assert decoder.pending == 4


def test_an_empty_or_short_credit_is_a_protocol_error() -> None:
    for payload in (b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"):
        with pytest.raises(p.ProtocolError, match="CREDIT payload must be 4 bytes"):
            p.decode_credit(payload)
    assert p.decode_credit(b"\x00\x00\x00\x00") == 0


def test_kernel_output_cannot_act_on_the_terminal() -> None:
    """exec, logs and status show a kernel's bytes; in a terminal only colours survive (an OSC 52
    would write the user's clipboard, a CSI could hide or rewrite what was printed)."""
    from hpc_kernels.terminal import for_terminal

    red = "\x1b[31mred\x1b[0m"
    assert for_terminal(red) == red, "IPython's colours stay"
    assert for_terminal("a\tb\r\nc") == "a\tb\r\nc"
    assert for_terminal("x\x1b]52;c;ZXZpbA==\x07y") == "xy", "OSC 52: the clipboard"
    assert for_terminal("x\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\y") == "xlinky", "OSC 8: a hidden link"
    assert for_terminal("x\x1b[2J\x1b[Hy\x1b[?1049h") == "xy", "screen and cursor control"
    assert for_terminal("x\x1bPq#0;2;0;0;0\x1b\\y") == "xy", "DCS (sixel)"
    assert for_terminal("x\x9b31my\x07\x08\x00z\x1b") == "xyz", "C1 CSI, bell, backspace, NUL, a lone ESC"
    assert for_terminal("é ✓ 😀") == "é ✓ 😀"

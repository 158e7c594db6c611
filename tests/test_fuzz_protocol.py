"""The relay's decoding of its stream, fuzzed with hypothesis: whatever bytes arrive, cut however,
the decoder yields frames or a ProtocolError and nothing else, buffers no more than one frame,
and a multiplexer fed garbage ends its own stream (every channel closed, the reason kept)
without raising, while another stream in the same event loop (another kernel's relay in the
same daemon) goes on carrying data."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from test_multiplexer import Relay, run

from hpc_kernels import protocol as p
from hpc_kernels.multiplexer import Multiplexer

FRAME_TYPES = [t.value for t in p.FrameType]


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A frame that may be valid, or wrong in one way: unknown type, huge length, short payload."""
    kind = draw(st.sampled_from(FRAME_TYPES + [0, 8, 255]))
    channel = draw(st.integers(0, 2**32 - 1))
    payload = draw(st.binary(max_size=300))
    length = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32 - 1)))
    return p.HEADER.pack(kind, channel, length) + payload


streams = st.one_of(st.binary(max_size=2000), st.lists(frames(), max_size=12).map(b"".join))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(min(x, len(data)) for x in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=600, deadline=None, database=None)  # the tests run from a read-only copy
@given(data=streams, points=st.lists(st.integers(0, 2000), max_size=6))
def test_the_decoder_yields_frames_or_a_protocol_error_and_buffers_at_most_one_frame(
        data: bytes, points: list[int]) -> None:
    decoder = p.FrameDecoder()
    whole = p.FrameDecoder()
    got: list[p.Frame] = []
    try:
        for chunk in cut(data, points):
            got += decoder.feed(chunk)
            assert decoder.pending <= p.HEADER.size + p.MAX_PAYLOAD
    except p.ProtocolError:
        try:
            whole.feed(data)
        except p.ProtocolError:
            return  # refused, whatever the cut
        raise AssertionError("a cut stream was refused, the whole one was not")
    assert got == whole.feed(data), "the cut does not change what is decoded"
    for frame in got:
        assert len(frame.payload) <= p.MAX_PAYLOAD


def _login_side(sent: list[bytes]) -> Multiplexer:
    mux = Multiplexer(sent.append, expect_hello=True)
    assert mux.feed(p.encode_hello())
    return mux


@settings(max_examples=300, deadline=None, database=None)
@given(garbage=streams, points=st.lists(st.integers(0, 2000), max_size=4))
def test_garbage_ends_the_stream_with_its_reason_and_never_raises(garbage: bytes, points: list[int]) -> None:
    async def scenario() -> None:
        victim = _login_side([])
        alive = True
        for chunk in cut(garbage, points):
            alive = victim.feed(chunk)
            if not alive:
                break
        if not alive:
            assert victim.ended.done() and victim.error is not None, "a refused stream ends and says why"
        victim.stream_ended()  # the transport goes away in any case
        assert victim.ended.done()

    asyncio.run(scenario())


def test_a_stream_fed_garbage_leaves_another_stream_of_the_same_loop_working(tmp_path: Path) -> None:
    async def test(other: Relay) -> None:
        victim = _login_side([])
        assert not victim.feed(p.HEADER.pack(200, 1, 5) + b"xxxxx")
        assert victim.ended.done() and "unknown frame type 200" in str(victim.error)
        reader, writer = await other.client(0)
        writer.write(b"still here")
        assert await reader.readexactly(10) == b"still here"
        writer.close()

    run(test, tmp_path)

"""What a broadcast node writes to viewers' sockets reads back with independent parsers: WebSocket frames
with the `websockets` library's frame reader, HTTP chunks with the standard library's HTTP client."""

from __future__ import annotations

import http.client
import io
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.frames import apply_mask as ws_apply_mask
from websockets.streams import StreamReader

from pipeline.core import frames
from pipeline.core.frames import (
    BINARY,
    CLOSE,
    CONT,
    LAST_CHUNK,
    PING,
    PONG,
    TEXT,
    apply_mask,
    close_frame,
    frame,
    http_chunk,
    sse_comment,
    sse_event,
    text_frame,
)

EDGES = [0, 1, 125, 126, 127, 65535, 65536, 70_000]


def parse_all(data: bytes, *, mask: bool) -> list[Frame]:
    """Every frame in `data`, read by websockets (mask=True: as a server reads a client's frames)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=mask, max_size=None)
        try:
            next(parser)
        except StopIteration as done:
            out.append(done.value)
        else:
            raise AssertionError("incomplete frame")
    return out


def parse_one(data: bytes, *, mask: bool = False) -> Frame:
    (got,) = parse_all(data, mask=mask)
    return got


def header_size(n: int) -> int:
    return 2 if n < 126 else 4 if n < 65536 else 10


@pytest.mark.parametrize("n", EDGES)
def test_text_frames_of_every_length_class_parse_back(n: int) -> None:
    payload = (b"x" * n)[:n]
    data = text_frame(payload)
    assert len(data) == header_size(n) + n
    got = parse_one(data)
    assert (got.opcode, got.fin, got.data) == (Opcode.TEXT, True, payload)
    # byte for byte what the library itself writes for a server
    assert data == Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert data == frame(TEXT, payload)


@pytest.mark.parametrize("n", EDGES)
def test_masked_frames_parse_back_as_a_server_reads_them(n: int) -> None:
    payload = os.urandom(n)
    key = os.urandom(4)
    data = frame(BINARY, payload, mask=key)
    assert len(data) == header_size(n) + 4 + n
    assert data[1] & 0x80  # MASK bit
    assert data[header_size(n) : header_size(n) + 4] == key
    got = parse_one(data, mask=True)
    assert (got.opcode, got.data) == (Opcode.BINARY, payload)


def test_length_fields_at_the_edges() -> None:
    assert text_frame(b"a" * 125)[:2] == bytes((0x81, 125))
    assert text_frame(b"a" * 126)[:4] == bytes((0x81, 126)) + struct.pack("!H", 126)
    assert text_frame(b"a" * 65535)[:4] == bytes((0x81, 126, 0xFF, 0xFF))
    assert text_frame(b"a" * 65536)[:10] == bytes((0x81, 127)) + struct.pack("!Q", 65536)


def test_fragments_and_continuations() -> None:
    data = frame(TEXT, b"hel", fin=False) + frame(CONT, b"lo", fin=False) + frame(CONT, b"!")
    got = parse_all(data, mask=False)
    assert [(f.opcode, f.fin, f.data) for f in got] == [
        (Opcode.TEXT, False, b"hel"),
        (Opcode.CONT, False, b"lo"),
        (Opcode.CONT, True, b"!"),
    ]


@pytest.mark.parametrize("reason", ["", "bye", "going away: node stopping", "é" * 61 + "x"])
@pytest.mark.parametrize("masked", [False, True])
def test_close_frames_carry_code_and_reason(reason: str, masked: bool) -> None:
    data = close_frame(1001, reason, mask=os.urandom(4) if masked else None)
    got = parse_one(data, mask=masked)
    assert got.opcode is Opcode.CLOSE and got.fin
    close = Close.parse(got.data)
    assert (close.code, close.reason) == (1001, reason)


def test_close_reason_fits_a_control_frame() -> None:
    assert len(close_frame(1000, "r" * 123)) == 2 + 125
    with pytest.raises(ValueError):
        close_frame(1000, "r" * 124)
    with pytest.raises(ValueError):
        close_frame(999)
    with pytest.raises(ValueError):
        close_frame(5000)


def test_control_frames_are_short_and_final() -> None:
    for opcode in (CLOSE, PING, PONG):
        assert parse_one(frame(opcode, b"p" * 125)).data == b"p" * 125
        with pytest.raises(ValueError):
            frame(opcode, b"p" * 126)
        with pytest.raises(ValueError):
            frame(opcode, b"p", fin=False)
    with pytest.raises(ValueError):
        frame(TEXT, b"x", mask=b"abc")


def test_a_pong_masked_as_a_client_must() -> None:
    got = parse_one(frame(PONG, b"ping-data", mask=b"\0\0\0\0"), mask=True)
    assert (got.opcode, got.data) == (Opcode.PONG, b"ping-data")


@settings(max_examples=200)
@given(payload=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
def test_masking_is_the_librarys_and_undoes_itself(payload: bytes, key: bytes) -> None:
    masked = apply_mask(payload, key)
    assert masked == ws_apply_mask(payload, key)
    assert apply_mask(masked, key) == payload


@settings(max_examples=100)
@given(payload=st.binary(max_size=70_000), masked=st.booleans())
def test_any_payload_round_trips(payload: bytes, masked: bool) -> None:
    key = b"\x01\x02\x03\x04" if masked else None
    got = parse_one(frame(BINARY, payload, mask=key), mask=masked)
    assert got.data == payload


# --------------------------------------------------------------------------- HTTP chunks and SSE


class _Socket:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def dechunk(body: bytes) -> bytes:
    """A chunked response body as the standard library's HTTP client reads it."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    response = http.client.HTTPResponse(_Socket(head + body))  # type: ignore[arg-type]
    response.begin()
    return response.read()


@settings(max_examples=100)
@given(chunks=st.lists(st.binary(min_size=1, max_size=5000), max_size=8))
def test_http_chunks_read_back(chunks: list[bytes]) -> None:
    assert dechunk(b"".join(http_chunk(c) for c in chunks) + LAST_CHUNK) == b"".join(chunks)


def test_chunk_sizes_are_hex() -> None:
    assert http_chunk(b"x" * 15).startswith(b"f\r\n")
    assert http_chunk(b"x" * 16).startswith(b"10\r\n")
    assert http_chunk(b"x" * 4096).startswith(b"1000\r\n")
    with pytest.raises(ValueError):
        http_chunk(b"")  # that would end the body


def sse_fields(stream: bytes) -> list[dict[str, str]]:
    """Events as EventSource dispatches them (field: value lines, a blank line ends one; comments skipped)."""
    events, current = [], {}
    for line in stream.decode().split("\n"):
        if not line:
            if current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.removeprefix(" ")
    return events


def test_sse_events_and_comments() -> None:
    stream = (
        sse_event("update", b'{"type":"update","seq":3}', "video-1:3")
        + sse_comment("keepalive")
        + sse_event("comments", b'{"type":"comments"}')
    )
    assert sse_fields(dechunk(http_chunk(stream) + LAST_CHUNK)) == [
        {"event": "update", "id": "video-1:3", "data": '{"type":"update","seq":3}'},
        {"event": "comments", "data": '{"type":"comments"}'},
    ]
    assert sse_comment("keepalive") == b": keepalive\n\n"


def test_the_module_is_sans_io() -> None:
    source = Path(frames.__file__).read_text()
    for name in ("asyncio", "socket", "aiohttp", "websockets"):
        assert f"import {name}" not in source

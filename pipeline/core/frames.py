"""The bytes a broadcast node writes straight to a viewer's socket: WebSocket frames,
HTTP/1.1 chunks and Server-Sent Events.

A push goes to many viewers, so it is encoded once and the same bytes are
written to every transport that needs them, bypassing aiohttp's per-connection
writer (which would encode, and for WebSocket mask or compress, once per
viewer). Sans-I/O: bytes in, bytes out; tests/unit/test_frames.py reads every
frame back with the `websockets` library's own frame parser.

WebSocket (RFC 6455 §5.2): a frame is FIN|opcode, MASK|length (7 bits; 126:
16 bits follow; 127: 64 bits follow), a 4-byte masking key if masked, then
the payload. A server sends unmasked frames; a client must mask (`mask=`).
Control frames (close, ping, pong) carry at most 125 bytes and are never
fragmented.
"""

from __future__ import annotations

import struct

CONT = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

MAX_CONTROL_PAYLOAD = 125

_TEXT_SHORT = 0x81  # FIN + text
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


def text_frame(data: bytes) -> bytes:
    """A final, unmasked text frame: what a server sends for each push (the hot path)."""
    n = len(data)
    if n < 126:
        return bytes((_TEXT_SHORT, n)) + data
    if n < 65536:
        return _HEAD_16.pack(_TEXT_SHORT, 126, n) + data
    return _HEAD_64.pack(_TEXT_SHORT, 127, n) + data


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """Any frame. `mask` is the 4-byte masking key a client must use (None: unmasked, as a server)."""
    if opcode >= CLOSE and (len(payload) > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("a control frame carries at most 125 bytes and is never fragmented")
    first = (0x80 if fin else 0) | opcode
    masked = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, masked | n))
    elif n < 65536:
        head = _HEAD_16.pack(first, masked | 126, n)
    else:
        head = _HEAD_64.pack(first, masked | 127, n)
    if mask is None:
        return head + payload
    if len(mask) != 4:
        raise ValueError("a masking key is 4 bytes")
    return head + mask + apply_mask(payload, mask)


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the key repeated (masking and unmasking are the same operation)."""
    if not payload:
        return b""
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def close_frame(code: int = 1000, reason: str = "", *, mask: bytes | None = None) -> bytes:
    """A close frame: a 2-byte status code, then a UTF-8 reason (at most 123 bytes)."""
    if not 1000 <= code < 5000:
        raise ValueError(f"close code {code} is outside 1000-4999")
    return frame(CLOSE, struct.pack("!H", code) + reason.encode(), mask=mask)


def http_chunk(data: bytes) -> bytes:
    """One chunk of an HTTP/1.1 chunked body (an SSE response is chunked). Never empty: an empty
    chunk is the body's end (`LAST_CHUNK`)."""
    if not data:
        raise ValueError("an empty chunk ends the body: write LAST_CHUNK for that")
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def sse_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One Server-Sent Event. `data` holds no newline (it is one JSON document); `event_id` is what
    EventSource sends back as Last-Event-ID when it reconnects."""
    head = b"event: " + event.encode() + b"\n"
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def sse_comment(text: str) -> bytes:
    """An SSE comment line (ignored by EventSource): a keep-alive."""
    return b": " + text.encode() + b"\n\n"

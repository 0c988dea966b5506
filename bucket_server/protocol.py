"""Wire format between client and bucket server: length-prefixed JSON frames over a Unix socket.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON (one object).
Requests: {"id", "op", "args", "bucket"?, "auth"?}. Responses: {"id", "ok": true, "result"} or
{"id", "ok": false, "error": {"code", "message", "retryable"}}. See docs/protocol.md.

Standard library only: both the client (any environment) and the server import this module.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
#: Listings of big buckets are the largest frames; anything larger is garbage or an attack.
MAX_FRAME = 256 * 1024 * 1024
#: An export record (also a digest manifest) is a small JSON file; a larger one is never downloaded (client)
#: nor read (server).
MAX_RECORD_BYTES = 1024 * 1024


class ErrorCode(str, enum.Enum):
    """What went wrong, as a code both ends key on (never the message text)."""
    BAD_REQUEST = "bad_request"  # malformed frame or arguments: a client bug or bad input
    BUCKET_NOT_FOUND = "bucket_not_found"
    UNAUTHORIZED = "unauthorized"  # 401: no or invalid token
    FORBIDDEN = "forbidden"  # 403: the token lacks the permission
    NOT_FOUND = "not_found"  # a file that should exist does not
    UNAVAILABLE = "unavailable"  # network, timeout, 5xx, 429 after bounded retries
    INVALID_DATA = "invalid_data"  # the bucket answered something that cannot be trusted
    PROTOCOL_MISMATCH = "protocol_mismatch"
    INTERNAL = "internal"


class FrameError(Exception):
    """The peer sent something that is not a frame, or hung up in the middle of one."""


def encode(message: dict[str, Any]) -> bytes:
    """A message as one frame: a 4-byte big-endian length, then UTF-8 JSON."""
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME} byte limit")
    return HEADER.pack(len(payload)) + payload


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """Read exactly `size` bytes; None on a clean EOF before the first byte."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            if remaining == size:
                return None
            raise FrameError("peer hung up in the middle of a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the peer closed the connection between frames."""
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME} byte limit")
    payload = _recv_exact(sock, size) if size else b""
    if payload is None:
        raise FrameError("peer hung up in the middle of a frame")
    return decode_payload(payload)


def decode_payload(payload: bytes) -> dict[str, Any]:
    """A frame's payload as its message; FrameError for anything that is not one JSON object this process
    can read (a hostile peer's nesting deeper than the decoder's recursion bound, an integer over Python's
    digit limit), never another exception."""
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame is not UTF-8 JSON: {exc}") from None
    except ValueError:  # int("1" * 5000): over sys.get_int_max_str_digits()
        raise FrameError("frame holds an integer with more digits than Python reads (4,300 by default)") from None
    except RecursionError:
        raise FrameError("frame nests JSON arrays or objects too deeply") from None
    if not isinstance(message, dict):
        raise FrameError("frame is not a JSON object")
    return message


def write_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one message."""
    sock.sendall(encode(message))

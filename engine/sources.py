"""Where a clip's bytes come from: a path, bytes, a binary file-like object or an http(s) URL, checked against the
decode limits before anything is decoded (`as_input`), and the URL fetch that keeps one wall-clock deadline over
connect, redirects and body (`fetch_url`, `read_body`; the server's media fetch uses `read_body` too).
`pllava.video` re-exports `DecodeLimits`, `DEFAULT_LIMITS`, `describe` and `is_source`, their public spelling.
"""
from __future__ import annotations

import http.client
import io
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass

from .errors import VideoError


@dataclass(frozen=True)
class DecodeLimits:
    """Refusals made before decoding (each error names the limit)."""
    max_pixels: int = 7680 * 4320  # 8K; a 16k x 16k stream is refused from its header
    max_duration_s: float = 6 * 3600.0
    max_bytes: int = 2 << 30  # bytes / URL bodies held in memory
    max_frames: int = 1024  # frames one request may sample
    timeout_s: float = 15.0  # network connect/read and live-source silence


DEFAULT_LIMITS = DecodeLimits()


def describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def is_source(x) -> bool:
    """Whether `x` is something the decoder opens (a path, URL, bytes or a binary file-like object)."""
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(x, "read")



class BodyTooLarge(ValueError):
    pass


class FetchCancelled(Exception):
    pass


def read_body(resp, sock, deadline: float, max_bytes: int, cancel=None) -> bytes:
    """An HTTP response body against an overall wall-clock deadline and a size cap. Each receive gets the time
    left, not a fresh timeout, and takes what has arrived (read1), so a server trickling a byte at a time cannot
    stretch the fetch past the deadline. `cancel` (a threading.Event, e.g. set when the client went away) is
    checked at least every 0.25 s. Raises TimeoutError, BodyTooLarge or FetchCancelled."""
    chunks, total = [], 0
    while True:
        if cancel is not None and cancel.is_set():
            raise FetchCancelled("cancelled")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        if sock is not None:
            sock.settimeout(min(left, 0.25) if cancel is not None else left)
        try:
            b = resp.read1(1 << 16)
        except (socket.timeout, TimeoutError):
            if cancel is not None and time.monotonic() < deadline:
                continue  # only the short poll expired: look at `cancel` and the deadline again
            raise TimeoutError("deadline passed") from None
        if not b:
            return b"".join(chunks)
        total += len(b)
        if total > max_bytes:
            raise BodyTooLarge(f"body exceeds {max_bytes} bytes")
        chunks.append(b)


def fetch_url(url: str, limits: DecodeLimits = DEFAULT_LIMITS, max_redirects: int = 5) -> bytes:
    """GET an http(s) URL into memory within limits.timeout_s overall (connect, redirects and body together: a
    trickling server is cut at the deadline) and limits.max_bytes."""
    deadline = time.monotonic() + limits.timeout_s
    for _ in range(max_redirects + 1):
        u = urllib.parse.urlsplit(url)
        left = deadline - time.monotonic()
        if left <= 0:
            raise VideoError(f"{url}: timed out after {limits.timeout_s:g} s")
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        try:
            conn = cls(u.hostname, u.port, timeout=left)
        except (ValueError, http.client.InvalidURL) as e:
            raise VideoError(f"{url}: bad URL: {e}") from None
        try:
            conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""),
                         headers={"Host": u.netloc, "User-Agent": "pllava-engine"})
            r = conn.getresponse()
            if r.status in (301, 302, 303, 307, 308) and r.getheader("Location"):
                url = urllib.parse.urljoin(url, r.getheader("Location"))
                continue
            if r.status != 200:
                raise VideoError(f"{url}: HTTP {r.status}")
            n = r.getheader("Content-Length")
            if n is not None and n.isdigit() and int(n) > limits.max_bytes:
                raise VideoError(f"{url}: {int(n)} bytes exceeds max_bytes={limits.max_bytes}")
            return read_body(r, conn.sock, deadline, limits.max_bytes)
        except TimeoutError:
            raise VideoError(f"{url}: timed out after {limits.timeout_s:g} s (the whole fetch)") from None
        except BodyTooLarge:
            raise VideoError(f"{url}: body exceeds max_bytes={limits.max_bytes}") from None
        except (OSError, http.client.HTTPException) as e:
            raise VideoError(f"{url}: unreachable: {e}") from None
        finally:
            conn.close()
    raise VideoError(f"{url}: more than {max_redirects} redirects")



def read_all(f, what: str, limits: DecodeLimits) -> bytes:
    """A non-seekable reader (a pipe, a socket file, a stream wrapper) read once, to its end or past max_bytes."""
    parts, n = [], 0
    while True:
        try:
            b = f.read(min(1 << 20, limits.max_bytes + 1 - n))
        except OSError as e:
            raise VideoError(f"{what}: read failed: {e.strerror or e}") from None
        if b is None:  # a non-blocking reader with nothing ready: treat as the end of what it has
            break
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise VideoError(f"{what}: read() returned {type(b).__name__}, not bytes (open the file in binary mode)")
        if not b:
            break
        parts.append(bytes(b))
        n += len(b)
        if n > limits.max_bytes:
            raise VideoError(f"{what}: exceeds max_bytes={limits.max_bytes}")
    if n == 0:
        raise VideoError(f"{what}: zero bytes, not a video")
    return b"".join(parts)


def as_input(source, limits: DecodeLimits):
    """-> (what to hand av.open, a description). URLs are fetched; bytes wrapped; paths checked."""
    what = describe(source)
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if s.startswith(("http://", "https://")):
            data = fetch_url(s, limits)
            if not data:
                raise VideoError(f"{what}: zero bytes, not a video")
            return io.BytesIO(data), what
        if not os.path.isfile(s):
            raise VideoError(f"{what}: no such file")
        size = os.path.getsize(s)
        if size == 0:
            raise VideoError(f"{what}: zero bytes, not a video")
        return s, what
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoError(f"{what}: zero bytes, not a video")
        if len(source) > limits.max_bytes:
            raise VideoError(f"{what}: exceeds max_bytes={limits.max_bytes}")
        return io.BytesIO(bytes(source)), what
    if hasattr(source, "read"):
        if isinstance(source, io.TextIOBase):
            raise VideoError(f"{what}: a text-mode file object; open the video in binary mode ('rb')")
        try:
            seekable = bool(source.seekable()) if hasattr(source, "seekable") else False
        except (OSError, ValueError):
            seekable = False
        if seekable:
            return source, what
        return io.BytesIO(read_all(source, what, limits)), what  # probe and decode both read: buffer it once
    raise VideoError(f"{what}: unsupported source type {type(source).__name__} (path, URL, bytes or file-like)")


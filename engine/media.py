"""Media references from API requests -> bytes or a local path, safely.

- data: URLs (base64), with the size checked before decoding.
- file:// URLs and plain paths: only under the allowed directory, after resolving symlinks and '..'.
- http(s): the host is resolved once and every address checked (no loopback, private, link-local, multicast,
  reserved or unspecified addresses), the connection goes to the vetted address (no second DNS answer can
  differ), redirects are followed by hand and each hop is checked the same way; size and time are capped.
Every refusal is a MediaError naming the field; nothing here connects before the address is vetted.
"""
from __future__ import annotations

import base64
import io
import hashlib
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import time
import urllib.parse

from .errors import PllavaError, VideoError
from .sources import BodyTooLarge, DecodeLimits, FetchCancelled, read_body
from .video import read_frames


class MediaError(PllavaError):
    """A media reference that is refused or cannot be fetched; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, param: str = "messages", status: int = 400, code: str = "invalid_media"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # 6to4: bits 16-47 are an IPv4 address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are an IPv4 address


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, 6to4, Teredo client, NAT64, IPv4-compatible), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d (deprecated IPv4-compatible form); ::1 and :: stay IPv6
        return ipaddress.IPv4Address(int(ip))
    return None


def check_ip(addr: str, what: str, param: str):
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            check_ip(str(inner), f"{what} (via {ip})", param)  # refused like the address it embeds
            if ip in _SIX_TO_FOUR:
                # 6to4 goes to the IPv4 address it embeds, vetted just above. Python 3.13's ipaddress calls all of
                # 2002::/16 private (IANA: not globally reachable), 3.11 none of it: judged by the prefix, a 6to4
                # form of a public address was allowed or refused by the Python version
                return
    bad = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
           or ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10")))
    if bad:
        raise MediaError(f"{what}: refusing to fetch from {ip} (loopback, private, link-local or reserved address)",
                         param)


def resolve_public(host: str, port: int, what: str, param: str, allowed: frozenset = frozenset()) -> list[str]:
    """Addresses for host:port, every one vetted (unless host:port is explicitly allowed by the operator)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"{what}: cannot resolve host {host!r}: {e}", param) from e
    addrs = list(dict.fromkeys(i[4][0] for i in infos))
    if f"{host}:{port}" not in allowed:
        for a in addrs:
            check_ip(a, what, param)
    return addrs


def fetch_http(url: str, *, max_bytes: int, timeout_s: float, param: str = "messages",
               allowed_hosts: frozenset = frozenset(), max_redirects: int = 5, cancel=None) -> bytes:
    """GET url with the checks above. `allowed_hosts` ("host:port") lets an operator permit internal servers."""
    deadline = time.monotonic() + timeout_s
    for _ in range(max_redirects + 1):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise MediaError(f"{url[:100]}: only http(s) URLs can be fetched", param)
        port = u.port or (443 if u.scheme == "https" else 80)
        addrs = resolve_public(u.hostname, port, url[:100], param, allowed_hosts)
        left = deadline - time.monotonic()
        if left <= 0:
            raise MediaError(f"{url[:100]}: fetch timed out after {timeout_s:g} s", param)
        conn = _connect(u, addrs[0], port, left)
        try:
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            conn.request("GET", path, headers={"Host": u.netloc, "User-Agent": "pllava-engine"})
            r = conn.getresponse()
            if r.status in (301, 302, 303, 307, 308):
                loc = r.getheader("Location")
                if not loc:
                    raise MediaError(f"{url[:100]}: redirect without a Location", param)
                url = urllib.parse.urljoin(url, loc)
                continue
            if r.status != 200:
                raise MediaError(f"{url[:100]}: HTTP {r.status}", param)
            n = r.getheader("Content-Length")
            if n is not None and n.isdigit() and int(n) > max_bytes:
                raise MediaError(f"{url[:100]}: {n} bytes exceeds the {max_bytes}-byte limit", param, 413, "too_large")
            return read_body(r, conn.sock, deadline, max_bytes, cancel)  # the deadline is the whole fetch's
        except FetchCancelled:
            raise MediaError(f"{url[:100]}: fetch cancelled (the client went away)", param, 400, "cancelled") \
                from None
        except TimeoutError:
            raise MediaError(f"{url[:100]}: fetch timed out after {timeout_s:g} s", param, 400, "fetch_timeout") \
                from None
        except BodyTooLarge:
            raise MediaError(f"{url[:100]}: body exceeds the {max_bytes}-byte limit", param, 413, "too_large") from None
        except (OSError, http.client.HTTPException) as e:
            raise MediaError(f"{url[:100]}: fetch failed: {e}", param) from e
        finally:
            conn.close()
    raise MediaError(f"{url[:100]}: more than {max_redirects} redirects", param)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to a vetted address, with the certificate checked against the URL's host name."""

    def __init__(self, hostname: str, addr: str, port: int, timeout: float):
        super().__init__(hostname, port, timeout=timeout, context=ssl.create_default_context())
        self._addr = addr

    def connect(self):
        sock = socket.create_connection((self._addr, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connect(u, addr: str, port: int, timeout: float):
    if u.scheme == "https":
        return _PinnedHTTPS(u.hostname, addr, port, timeout)
    return http.client.HTTPConnection(addr, port, timeout=timeout)  # the Host header carries the name


def decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    head, _, payload = url.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise MediaError("only base64 data: URLs are supported (data:video/mp4;base64,...)", param)
    mime = head[5:].split(";")[0]
    if mime and not mime.startswith(("video/", "image/", "application/octet-stream")):
        raise MediaError(f"unsupported media type {mime!r} (video/* or image/*)", param, 400, "unsupported_media_type")
    if len(payload) * 3 // 4 > max_bytes:  # refuse before decoding
        raise MediaError(f"data URL of ~{len(payload) * 3 // 4} bytes exceeds the {max_bytes}-byte limit", param, 413,
                         "too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"invalid base64 in the data URL: {e}", param) from e
    if not data:
        raise MediaError("empty data URL", param)
    return data


def local_path(url: str, allowed_dir: str | None, param: str) -> str:
    """A file:// URL or a plain path -> a real path under allowed_dir (symlinks and '..' resolved first)."""
    if allowed_dir is None:
        raise MediaError("local files are disabled (start the server with --allowed-local-media-path)", param)
    raw = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file://") else url
    real = os.path.realpath(raw)
    root = os.path.realpath(allowed_dir)
    if os.path.commonpath([real, root]) != root:
        raise MediaError(f"{url[:200]}: outside the allowed media directory", param)
    if not os.path.isfile(real):
        raise MediaError(f"{url[:200]}: no such file", param)
    return real


# ---------------------------------------------------------------------------------------------- a request's media
def load_media(job, cfg, engine, cancel=None):
    """Fetch / read and decode a request's media (pllava.protocol.Job) -> uint8 frames (N, H, W, 3), in a worker
    thread, before the request takes a model slot (a slow download never holds one)."""
    n = job.num_frames or engine.config.num_frames
    if n > cfg.max_frames:
        raise MediaError(f"num_frames={n} exceeds the server's limit of {cfg.max_frames}", "num_frames", 400,
                         "too_many_frames")
    limits = DecodeLimits(max_bytes=cfg.max_video_bytes, max_frames=cfg.max_frames)
    param = "messages"
    if job.media_bytes is not None:
        src = job.media_bytes
    else:
        _kind, url = job.media
        if url.startswith("data:"):
            src = decode_data_url(url, cfg.max_video_bytes, param)
        elif url.startswith(("http://", "https://")):
            src = fetch_http(url, max_bytes=cfg.max_video_bytes, timeout_s=cfg.fetch_timeout_s, param=param,
                             allowed_hosts=cfg.allowed_fetch_hosts, cancel=cancel)
        elif url.startswith("file://") or "://" not in url:
            src = local_path(url, cfg.allowed_local_media_path, param)
        else:
            raise MediaError(f"unsupported URL scheme in {url[:40]!r} (data:, http(s):, file://)", param)
    try:  # every bytes source was size-checked (413) as it arrived: what fails here is the video itself
        frames = read_frames(src, n, limits=limits)
    except VideoError as e:
        raise MediaError(f"undecodable video: {e}", param, 400, "invalid_video") from e
    job.video_key = f"{_content_id(src)}/{n}"  # a follow-up question on the same clip reuses its KV prefix
    return frames


def _content_id(src) -> str:
    if isinstance(src, (bytes, bytearray)):
        return hashlib.blake2b(bytes(src), digest_size=16).hexdigest()
    st = os.stat(src)
    return f"{os.path.realpath(src)}:{st.st_size}:{st.st_mtime_ns}"


def load_media_timed(job, cfg, engine, cancel=None):
    if job.media is None and job.media_bytes is None:
        return None, 0.0  # a text-only chat: the LLM alone answers
    t = time.perf_counter()
    frames = load_media(job, cfg, engine, cancel)
    return frames, time.perf_counter() - t


def thumbnails(frames, height: int = 72) -> list[str]:
    """uint8 frames (N, H, W, 3) -> JPEG data URLs for the page."""
    from PIL import Image

    out = []
    for f in frames:
        im = Image.fromarray(f.numpy())
        im.thumbnail((height * 4, height))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out

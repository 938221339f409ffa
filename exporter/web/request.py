"""The one HTTP/1.1 request parser (RFC 9112): request line, header fields, what the server needs of them.

Limits apply to what was read, complete or not: a request line over MAX_REQUEST_LINE_BYTES is 414, a head
over max_header_bytes or with more than MAX_HEADER_COUNT fields is 431. Lines may end in LF alone (RFC
9112 section 2.2); obsolete line folding, whitespace before a colon and versions other than HTTP/1.0 and
HTTP/1.1 are refused. Request bodies are never read: a request that announces one is answered and the
connection closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.web.settings import MAX_HEADER_COUNT, MAX_REQUEST_LINE_BYTES

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_QVALUE = re.compile(r"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")


class HttpError(Exception):
    """A request answered with `status` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without query or fragment
    http10: bool
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    keep_alive: bool
    has_body: bool
    gzip: bool  # the Accept-Encoding's choice (wants_gzip), decided once per distinct head


def find_head_end(buf: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """(end of the head's last line, end of the blank line) or (-1, where to resume the search)."""
    pos = start
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return -1, pos
        if nl == pos or (nl == pos + 1 and buf[pos] == 0x0D):
            return pos, nl + 1
        pos = nl + 1


def check_incomplete(buf: bytes | bytearray, max_header_bytes: int) -> None:
    """Limits on a head whose blank line has not arrived yet."""
    line_end = buf.find(b"\n")
    if (line_end < 0 and len(buf) > MAX_REQUEST_LINE_BYTES) or line_end > MAX_REQUEST_LINE_BYTES:
        raise HttpError(414, "request line too long")
    if len(buf) > max_header_bytes:
        raise HttpError(431, "request head too large")


def parse_head(head: bytes | bytearray, max_header_bytes: int) -> Request:
    """Parse one complete head: up to the blank line, without it (find_head_end's first index)."""
    first_end = head.find(b"\n")
    if (first_end if first_end >= 0 else len(head)) > MAX_REQUEST_LINE_BYTES:
        raise HttpError(414, "request line too long")
    if len(head) > max_header_bytes:
        raise HttpError(431, "request head too large")
    lines = bytes(head).removesuffix(b"\n").split(b"\n")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise HttpError(431, "too many header fields")
    first = lines[0].removesuffix(b"\r")
    parts = first.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    m = _VERSION.fullmatch(version)
    if m is None:
        raise HttpError(400, "malformed HTTP version")
    if m.group(1) != b"1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1")
    http10 = m.group(2) == b"0"  # a higher minor version is served as HTTP/1.1 (RFC 9110 section 2.5)
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if b"\r" in value or b"\0" in value:
            raise HttpError(400, "malformed header field value")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path = _path(target.decode("latin-1"))
    options = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in options and (not http10 or "keep-alive" in options)
    has_body = "transfer-encoding" in headers
    if "content-length" in headers:
        lengths = {v.strip() for v in headers["content-length"].split(",")}
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise HttpError(400, "malformed Content-Length")
        has_body = has_body or int(next(iter(lengths))) > 0
    return Request(
        method=method.decode("ascii"),
        path=path,
        http10=http10,
        headers=headers,
        keep_alive=keep_alive and not has_body,
        has_body=has_body,
        gzip=wants_gzip(headers.get("accept-encoding")),
    )


def _path(target: str) -> str:
    """The path of an origin-form or absolute-form target (RFC 9112 section 3.2)."""
    if not target.startswith("/"):
        low = target[:8].lower()
        if not (low.startswith("http://") or low.startswith("https://")):
            raise HttpError(400, "malformed request target")
        rest = target.split("//", 1)[1]
        # The authority ends at the first "/", "?" or "#"; what follows a "/" is the path.
        cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        target = rest[cut:] if rest[cut : cut + 1] == "/" else "/"
    for sep in ("?", "#"):
        target = target.split(sep, 1)[0]
    return target


def wants_gzip(accept_encoding: str | None) -> bool:
    """Whether gzip is the coding to send for this Accept-Encoding (RFC 9110 section 12.5.3): gzip (or
    x-gzip, or *) with q > 0 and not below an identity listed explicitly. Unknown codings and malformed elements are
    skipped."""
    if not accept_encoding:
        return False
    q: dict[str, float] = {}
    for element in accept_encoding.split(","):
        coding, *params = (p.strip() for p in element.split(";"))
        coding = coding.lower()
        if not coding:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                weight = float(value) if _QVALUE.fullmatch(value) else -1.0
        if weight < 0:
            continue  # a malformed q: ignore the element
        if coding == "x-gzip":
            coding = "gzip"
        q[coding] = max(q.get(coding, -1.0), weight)
    gzip_q = q.get("gzip", q.get("*", 0.0))
    # identity is always acceptable, but it is preferred only when listed with a higher q.
    return gzip_q > 0.0 and gzip_q >= q.get("identity", 0.0)

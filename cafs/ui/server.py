"""The HTTP side of `cafs ui`: GET and HEAD only, safe headers, pages and downloads.

Owns: the server (a thread per request), which methods are answered (GET and HEAD; anything
else is 405: the view changes nothing), the headers every answer carries (a
Content-Security-Policy that allows no script at all and nothing from elsewhere, no framing, no
sniffing, no caching), refusing a loopback connection from another local user (cafs.ui.peers),
the Host check that keeps other web sites out through DNS rebinding when
bound to a loopback address, error pages, and streaming one version's bytes with a
Content-Disposition a browser cannot misread. Must not decide what a page shows
(cafs.ui.pages) or write to the store.

A download is checked as it streams: blob reads check each block or frame, the SHA-256 of what
was sent is compared with the version's at the end, and the last chunk is held back until it
matches, so a client never gets a whole file of wrong bytes: on a mismatch the connection is
closed short of Content-Length, which every client reports as a failed download.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import importlib.resources
import ipaddress
import logging
import re
import socket
import sys
import time
import traceback
from base64 import b64encode
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from cafs.blobstore import read_chunks
from cafs.errors import CafsError
from cafs.ui.pages import PAGES, BadRequest, NotFoundPage, Page, environment, number
from cafs.ui.peers import refusal
from cafs.ui.source import Source

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
COMMON_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
STYLE = importlib.resources.files("cafs.ui").joinpath("static/style.css").read_bytes()


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def content_disposition(name: str) -> str:
    """attachment with an ASCII fallback name and the exact name in RFC 5987 form: quotes,
    backslashes, control characters and bytes that are not UTF-8 cannot break the header."""
    raw = name.encode("utf-8", "surrogateescape")
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "._- ") else "_" for c in name)
    return f"attachment; filename=\"{fallback or 'download'}\"; filename*=UTF-8''{quote(raw)}"


class UiServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], source: Source) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        self.source = source
        self.env = environment()
        self.check_host = is_loopback(address[0])

    @property
    def url(self) -> str:
        address, port = self.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


class Handler(http.server.BaseHTTPRequestHandler):
    server: UiServer
    protocol_version = "HTTP/1.1"
    server_version = "cafs-ui"
    sys_version = ""
    _refused: str | None = None  # why this connection may not read the view ("" if it may)

    # -- methods: only reading ------------------------------------------------------------

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _refuse(self) -> None:
        # The body is never read, so the connection must end here: read as the next request
        # on it, a body would be answered (a form posted from elsewhere could smuggle a GET).
        self.close_connection = True
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, "this view is read-only: GET only",
                         extra={"Allow": "GET, HEAD", "Connection": "close"}, head=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

    def log_message(self, format: str, *args: Any) -> None:
        # The request line is the client's: its control characters (a terminal's escape
        # sequences) are written as \xNN, never to the operator's terminal as they came.
        line = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", format % args)
        sys.stderr.write(f"cafs ui: {self.address_string()} {line}\n")

    # -- answering ------------------------------------------------------------------------

    def _host_allowed(self) -> bool:
        """Bound to loopback, only names of loopback are accepted as Host: a page elsewhere
        that points its own name at 127.0.0.1 (DNS rebinding) gets nothing."""
        if not self.server.check_host:
            return True
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        return name == "localhost" or is_loopback(name)

    def _answer(self, head: bool) -> None:
        started = time.perf_counter()
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body is never read: see _refuse
        if self._refused is None:  # once per connection: its owner does not change
            self._refused = refusal(self.client_address[:2],
                                    self.connection.getsockname()[:2]) or ""
        if self._refused:
            self._send_error(HTTPStatus.FORBIDDEN, self._refused, head=head)
            return
        if not self._host_allowed():
            self._send_error(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host", head=head)
            return
        url = urlsplit(self.path)
        params = {key: values[-1] for key, values in parse_qs(
            url.query, encoding="utf-8", errors="surrogateescape").items()}
        try:
            if url.path == "/style.css":
                self._send(HTTPStatus.OK, STYLE, "text/css; charset=utf-8", head=head)
            elif url.path == "/download":
                self._download(params, head)
            elif url.path in PAGES:
                page = PAGES[url.path](self.server.source, params)
                self._render(page, head, started)
            else:
                raise NotFoundPage(f"no page {url.path}")
        except NotFoundPage as exc:
            self._send_error(HTTPStatus.NOT_FOUND, str(exc), head=head)
        except BadRequest as exc:
            self._send_error(HTTPStatus.BAD_REQUEST, str(exc), head=head)
        except (CafsError, OSError) as exc:  # the store or its daemon: say why, keep serving
            self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, f"the store cannot answer: {exc}",
                             head=head)
        except Exception:  # a bug: the traceback on stderr, a plain page to the browser
            traceback.print_exc()
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR,
                             "unexpected error; see the cafs ui output", head=head)

    def _render(self, page: Page, head: bool, started: float) -> None:
        html = self.server.env.get_template(page.template).render(**page.context)
        elapsed = (time.perf_counter() - started) * 1000
        self._send(page.status, html.encode("utf-8", "backslashreplace"),
                   "text/html; charset=utf-8", head=head,
                   extra={"Server-Timing": f"page;dur={elapsed:.1f}"})

    def _send_error(self, status: HTTPStatus, message: str, *, head: bool,
                    extra: dict[str, str] | None = None) -> None:
        html = self.server.env.get_template("error.html").render(
            status=status.value, reason=status.phrase, message=message)
        self._send(status, html.encode("utf-8", "backslashreplace"), "text/html; charset=utf-8",
                   head=head, extra=extra)

    def _headers(self, status: int, content_type: str, length: int,
                 extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**COMMON_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, *, head: bool,
              extra: dict[str, str] | None = None) -> None:
        self._headers(status, content_type, len(body), extra)
        if not head:
            self.wfile.write(body)

    # -- downloads ------------------------------------------------------------------------

    def _download(self, params: dict[str, str], head: bool) -> None:
        path = params.get("path", "")
        if not path.startswith("runs/"):
            raise BadRequest("a download needs path=runs/... and version=N")
        wanted = number(params.get("version", ""), "version")
        opened = self.server.source.open_version(path, wanted)
        if opened is None:
            raise NotFoundPage(f"{path} has no version {wanted}")
        found, reader = opened
        if reader is None:
            self._send_error(HTTPStatus.CONFLICT, f"{path}@{wanted}: its content is damaged "
                             "(see cafs fsck)", head=head)
            return
        try:
            name = path.rpartition("/")[2]
            digest = bytes.fromhex(found["sha256"])
            self._headers(HTTPStatus.OK, "application/octet-stream", found["size"], {
                "Content-Disposition": content_disposition(name),
                "ETag": f'"{found["sha256"]}"',
                "Repr-Digest": f"sha-256=:{b64encode(digest).decode()}:",
            })
            if not head:
                try:
                    self._stream(_held_back(read_chunks(reader)), found)
                except CafsError as exc:  # a block failed its checksum: stop short
                    log.error("download of %s@%s failed: %s", path, wanted, exc)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
        finally:
            reader.close()

    def _stream(self, chunks: Iterator[tuple[bytes, bool]], found: dict[str, Any]) -> None:
        hasher, sent = hashlib.sha256(), 0
        for chunk, last in chunks:
            hasher.update(chunk)
            if last and (hasher.hexdigest() != found["sha256"]
                         or sent + len(chunk) != found["size"]):
                log.error("download of %s@%s: the bytes do not match their sha256; "
                          "connection closed short", found["path"], found["version"])
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(chunk)
            sent += len(chunk)
        if sent != found["size"]:  # an empty content, or a blob shorter than its row
            self.close_connection = True


def _held_back(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """(chunk, is the last one): the caller can check the whole before the last goes out."""
    previous = None
    for chunk in chunks:
        if previous is not None:
            yield previous, False
        previous = chunk
    if previous is not None:
        yield previous, True


def serve(source: Source, bind: str, port: int, ready: Any = None) -> None:
    """Serve until interrupted; `ready(url)` is called once the socket listens. Raises
    CafsError (one line naming the address) if it cannot listen."""
    try:
        server = UiServer((bind, port), source)
    except OSError as exc:
        hint = " (--port 0 takes any free port)" if exc.errno == errno.EADDRINUSE else ""
        raise CafsError(f"cannot listen on {bind}:{port}: {exc.strerror or exc}{hint}",
                        exc.errno or errno.EIO) from None
    try:
        if ready is not None:
            ready(server.url)
        server.serve_forever()
    finally:
        server.server_close()

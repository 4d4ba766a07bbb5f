"""The two S3 calls on the hot paths, a PUT (every create) and a GET (every read of a blob
the cache lacks), without boto3's per-request cost.

Measured on loopback (SeaweedFS, median, interleaved): a 4 KiB PUT through boto3 3.4-6.9 ms,
through this client 1.2-3.2 ms; a GET of a 4 MB object 8.5-10 ms against 4.7-6.7 ms, of a tiny
one 2.8 against 1.4 ms: botocore builds, hooks and signs each request through many layers, and
streams a body through urllib3 in small reads. Every close of a new file waits for one PUT,
every first read of an uncached blob for one GET.

Owns: a kept-alive HTTP connection per thread to a path-style endpoint, AWS Signature V4 with
UNSIGNED-PAYLOAD (a PUT's body is streamed from the file, never hashed twice: cafs hashed it
and every block or frame carries its checksum), the same timeouts and bounded retries as the
boto3 client (cafs.blobstore.s3_objects), and the statuses a PUT may answer (200, 412 for
Exists) and a GET (200, 404). Must not know blobs or the cache.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import os
import socket
import threading
from collections.abc import Callable
from urllib.parse import quote, urlsplit

PIECE = 1 << 20
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class PutRefused(Exception):
    """The service answered with this status (not 200, 412 or a 5xx)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


class BodyCut(Exception):
    """A GET's body broke off after some of it was delivered: start over from offset 0."""


class _Progress:
    """A GET's piece callback that remembers whether any piece was delivered."""

    def __init__(self, piece: Callable[[int, memoryview], None]) -> None:
        self.piece = piece
        self.started = False

    def __call__(self, offset: int, data: memoryview) -> None:
        self.started = True
        self.piece(offset, data)


class LeanClient:
    """PUT of a file to, and GET of an object from, `bucket/key` on a path-style endpoint
    (http or https)."""

    def __init__(self, endpoint: str, bucket: str, region: str, key_id: str, secret: str, *,
                 connect_timeout: float, read_timeout: float, attempts: int) -> None:
        parts = urlsplit(endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.netloc
        self._base = parts.path.rstrip("/")
        self._bucket = bucket
        self._region = region
        self._key_id = key_id
        self._secret = secret
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._attempts = attempts
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = kind(self._host, timeout=self._connect_timeout)
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self._read_timeout)  # each later send and receive
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def put(self, key: str, fd: int, size: int, metadata: dict[str, str], *,
            if_absent: bool) -> int:
        """Upload the first `size` bytes of the file at `fd`; the HTTP status (200, 412).
        A connection that fails, times out or answers 5xx is retried on a new one, `attempts`
        times in all; then the last error (OSError, http.client.HTTPException) or
        PutRefused."""
        last: Exception | None = None
        for _ in range(self._attempts):
            try:
                status, body = self._put_once(key, fd, size, metadata, if_absent)
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                last = exc
                continue
            if status in (200, 412):
                return status
            last = PutRefused(status, body)
            if status < 500:
                break
            self._drop()
        assert last is not None
        raise last

    def _put_once(self, key: str, fd: int, size: int, metadata: dict[str, str],
                  if_absent: bool) -> tuple[int, bytes]:
        headers = {"x-amz-content-sha256": "UNSIGNED-PAYLOAD", "content-length": str(size)}
        if if_absent:
            headers["if-none-match"] = "*"
        for name, value in metadata.items():
            headers[f"x-amz-meta-{name.lower()}"] = value
        conn = self._request("PUT", key, headers)
        offset = 0
        while offset < size:
            piece = os.pread(fd, min(PIECE, size - offset), offset)
            if not piece:
                raise OSError("the blob file is shorter than its size")
            conn.send(piece)
            offset += len(piece)
        response = conn.getresponse()
        body = response.read()
        if response.will_close:
            self._drop()
        return response.status, body

    def _request(self, method: str, key: str, headers: dict[str, str]
                 ) -> http.client.HTTPConnection:
        """Send a signed request's line and headers (`headers` plus host, date and
        authorization) on this thread's connection, and return it for the body and answer."""
        path = quote(f"{self._base}/{self._bucket}/{key}", safe="/-_.~")
        headers = {"host": self._host, **headers, "x-amz-date": datetime.datetime.now(
            datetime.UTC).strftime("%Y%m%dT%H%M%SZ")}
        headers["authorization"] = self._authorization(method, path, headers)
        conn = self._connection()
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        return conn

    def get(self, key: str, piece: Callable[[int, memoryview], None]) -> tuple[int, int]:
        """Download the object: `piece(offset, bytes)` for each piece of its body, in order
        (the view is valid only during the call). Returns the HTTP status (200, or 404 with
        no piece given) and the bytes received. A connection that fails before the body
        starts, or answers 5xx, is retried on a new one, `attempts` times in all (then the
        last OSError, http.client.HTTPException or PutRefused); a body that breaks off
        raises BodyCut (the caller starts over, its pieces from offset 0 again). What
        `piece` raises goes through unchanged."""
        last: Exception | None = None
        for _ in range(self._attempts):
            progress = _Progress(piece)
            try:
                status, received, body = self._get_once(key, progress)
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if progress.started:
                    raise BodyCut(f"{type(exc).__name__}: {exc}") from exc
                last = exc
                continue
            except BaseException:  # from `piece`: the rest of the body is never read
                self._drop()
                raise
            if status in (200, 404):
                return status, received
            last = PutRefused(status, body)
            if status < 500:
                break
            self._drop()
        assert last is not None
        raise last

    def _get_once(self, key: str, piece: Callable[[int, memoryview], None]
                  ) -> tuple[int, int, bytes]:
        conn = self._request("GET", key, {"x-amz-content-sha256": _EMPTY_SHA256})
        response = conn.getresponse()
        if response.status != 200:
            body = response.read()
            if response.will_close:
                self._drop()
            return response.status, 0, body
        length = response.getheader("content-length")
        # This thread's buffer, reused: a new 1 MiB buffer per GET costs its pages' faults
        # and zeroing (up to 1 ms of CPU measured here), and pieces live only during the call.
        view: memoryview | None = getattr(self._local, "buffer", None)
        if view is None:
            view = self._local.buffer = memoryview(bytearray(PIECE))
        offset = 0
        while count := response.readinto(view):
            piece(offset, view[:count])
            offset += count
        if length is not None and offset != int(length):
            raise http.client.IncompleteRead(b"", int(length) - offset)
        if response.will_close:
            self._drop()
        return 200, offset, b""

    def _authorization(self, method: str, path: str, headers: dict[str, str]) -> str:
        amz_date = headers["x-amz-date"]
        day = amz_date[:8]
        names = sorted(headers)
        canonical = "\n".join([method, path, "",
                               *(f"{name}:{headers[name].strip()}" for name in names), "",
                               ";".join(names), headers["x-amz-content-sha256"]])
        scope = f"{day}/{self._region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = f"AWS4{self._secret}".encode()
        for part in (day, self._region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return (f"AWS4-HMAC-SHA256 Credential={self._key_id}/{scope}, "
                f"SignedHeaders={';'.join(names)}, Signature={signature}")

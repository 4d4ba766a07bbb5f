"""The S3 calls the remote blob store makes, with short timeouts and bounded retries.

Owns: parsing and checking the `s3://bucket/prefix?endpoint=...` location, finding the
credentials (the environment, or a credentials file only its owner may read: never the URL,
argv or a log line), the boto3 client and its timeouts, and turning every failure into either
FileNotFoundError (no such object), `Exists` (a conditional PUT lost: someone stored it) or
`Unavailable` (EIO: the service is unreachable, hung or failing). Must not know blobs,
encodings or the cache (cafs.blobstore.s3).

Timeouts: connecting 1 s, each socket read or write 2 s, 2 attempts (botocore's standard mode
backs off between them): a writer whose close needs a PUT gets EIO within seconds when the
service is down or hung (measured ~5 s), never minutes. A HEAD asked on the daemon's event loop
uses a stricter client (one attempt, 0.5 s / 1 s).
"""

from __future__ import annotations

import configparser
import errno
import http.client
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cafs.blobstore.s3_put import BodyCut, LeanClient, PutRefused
from cafs.errors import CafsError, InvalidArgument

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 2.0
ATTEMPTS = 2
DOWNLOAD_ATTEMPTS = 3  # a body cut off mid-stream is fetched again from the start
PIECE = 1 << 20
# Query parameters a URL may carry; anything else (a key, a secret, a token) is refused.
ALLOWED_PARAMETERS = {"endpoint", "region", "credentials"}


class Unavailable(CafsError):
    """The object store did not answer, or failed: EIO to the caller, retried later."""


class Exists(Exception):
    """A PUT with If-None-Match: * found the key taken (412)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"
    endpoint: str | None
    region: str
    credentials: Path | None  # a credentials file (INI, [default]) instead of the environment

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse `s3://bucket/prefix?endpoint=http://host:port&region=R&credentials=FILE`.
        A URL that carries a secret (user:password@, a key in the query) is refused: the
        location appears in argv, the config file and logs."""
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise InvalidArgument(f"blobs: expected s3://bucket/prefix, got {_redacted(url)}")
        if "@" in parts.netloc:
            raise InvalidArgument(
                "blobs: the URL must not carry credentials (user:secret@); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or name a "
                "credentials file with ?credentials=PATH")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - ALLOWED_PARAMETERS)
        if unknown:
            raise InvalidArgument(
                f"blobs: unknown URL parameter {unknown[0]!r} (allowed: endpoint, region, "
                "credentials); credentials never go in the URL")
        twice = sorted(name for name, values in query.items() if len(values) > 1)
        if twice:
            raise InvalidArgument(f"blobs: URL parameter {twice[0]!r} may be given only once")
        empty = sorted(name for name, values in query.items() if not values[0])
        if empty:
            raise InvalidArgument(f"blobs: URL parameter {empty[0]!r} is empty")
        bucket = parts.netloc
        if not bucket:
            raise InvalidArgument("blobs: the s3:// URL names no bucket")
        prefix = parts.path.strip("/")
        endpoint = query.get("endpoint", [None])[0]
        if endpoint is not None:
            _check_endpoint(endpoint)
        credentials = query.get("credentials", [None])[0]
        return cls(bucket, f"{prefix}/" if prefix else "", endpoint,
                   query.get("region", ["us-east-1"])[0],
                   Path(credentials) if credentials else None)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def __str__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def _check_endpoint(endpoint: str) -> None:
    """A typo here would surface only at the first request, as boto3's ValueError or a
    resolution error: refused now, in one line, before anything runs."""
    parts = urlsplit(endpoint)
    if parts.username is not None:
        raise InvalidArgument("blobs: the endpoint must not carry credentials")
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"blobs: the endpoint {endpoint!r} must be an http:// or "
                              "https://HOST[:PORT] URL")
    if not parts.hostname:
        raise InvalidArgument(f"blobs: the endpoint {endpoint!r} names no host")
    try:
        parts.port  # noqa: B018 (raises on a port that is no number or out of range)
    except ValueError:
        raise InvalidArgument(f"blobs: the endpoint {endpoint!r} has no valid port "
                              "(1-65535)") from None


def _redacted(url: str) -> str:
    return url.split("?", 1)[0].split("@")[-1]


def read_credentials(location: S3Location) -> tuple[str, str]:
    """The access key and secret: from a credentials file only its owner may read (refused
    otherwise), else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    if location.credentials is not None:
        path = location.credentials
        try:
            # One descriptor: the file checked is the file read (a link is judged by its
            # target, as secret mounts make them).
            with open(path, encoding="utf-8", errors="replace") as file:
                info = os.fstat(file.fileno())
                if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.geteuid() \
                        or not stat.S_ISREG(info.st_mode):
                    raise InvalidArgument(
                        f"blobs: credentials file {path} must belong to this user and be "
                        "readable by no one else (chmod 600)")
                text = file.read()
        except OSError as exc:
            raise InvalidArgument(f"blobs: credentials file {path}: {exc.strerror}") from None
        # Raw: a '%' in a secret is a character; configparser's errors quote the offending
        # line, which may be the secret, so only the line number goes out.
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            line = getattr(exc, "lineno", None) or getattr(exc, "errors", [(0,)])[0][0]
            raise InvalidArgument(f"blobs: credentials file {path} is not an INI file with a "
                                  f"[default] section (line {line})") from None
        section = parser["default"] if parser.has_section("default") else None
        if section is None or "aws_access_key_id" not in section \
                or "aws_secret_access_key" not in section:
            raise InvalidArgument(f"blobs: credentials file {path} has no [default] "
                                  "aws_access_key_id and aws_secret_access_key")
        return section["aws_access_key_id"], section["aws_secret_access_key"]
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise InvalidArgument("blobs: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or name a file with ?credentials=PATH")
    return key, secret


class S3Objects:
    """Objects under one location's prefix, through boto3 (thread-safe clients)."""

    def __init__(self, location: S3Location) -> None:
        import boto3  # only a store on S3 pays for importing it
        from botocore.config import Config

        self.location = location
        key, secret = read_credentials(location)
        session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                        region_name=location.region)

        def client(connect: float, read: float, attempts: int) -> Any:
            config = Config(
                connect_timeout=connect, read_timeout=read,
                retries={"max_attempts": attempts, "mode": "standard"},
                s3={"addressing_style": "path"}, max_pool_connections=32,
                # Our encodings check every block and frame, and fetches are re-hashed:
                # the extra checksums only cost CPU per request.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required")
            return session.client("s3", endpoint_url=location.endpoint, config=config)

        self._client = client(CONNECT_TIMEOUT, READ_TIMEOUT, ATTEMPTS)
        # Every create waits for one PUT, every read of an uncached blob for one GET: on an
        # endpoint we name, the lean client (see cafs.blobstore.s3_put for what it saves);
        # AWS itself (no endpoint) through boto3.
        self._lean = None if location.endpoint is None else LeanClient(
            location.endpoint, location.bucket, location.region, key, secret,
            connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT, attempts=ATTEMPTS)
        self._quick = client(0.5, 1.0, 1)
        from botocore.exceptions import BotoCoreError, ClientError

        self._client_error = ClientError
        self._boto_error = BotoCoreError

    # -- failures -------------------------------------------------------------------------

    def _status(self, exc: BaseException) -> int | None:
        if isinstance(exc, self._client_error):
            response: dict[str, Any] = exc.response  # type: ignore[attr-defined]
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return int(code) if code else None
        return None

    def _failed(self, what: str, exc: BaseException) -> Unavailable:
        return Unavailable(f"object store {self.location}: {what} failed: "
                           f"{type(exc).__name__}: {exc}")

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except self._client_error as exc:
            status = self._status(exc)
            if status == 404:
                raise FileNotFoundError(what) from None
            if status == 412:
                raise Exists(what) from None
            raise self._failed(what, exc) from None
        except (self._boto_error, OSError) as exc:
            raise self._failed(what, exc) from None

    # -- calls ----------------------------------------------------------------------------

    def put_new(self, name: str, fd: int, size: int, metadata: dict[str, str], *,
                replace: bool = False, lean: bool = True) -> None:
        """Upload the file at `fd` (its first `size` bytes) unless the key exists (Exists);
        `replace`: whatever is there. `lean=False`: through boto3 (the benchmark compares)."""
        if self._lean is not None and lean:
            try:
                status = self._lean.put(self.location.key(name), fd, size, metadata,
                                        if_absent=not replace)
            except (OSError, http.client.HTTPException, PutRefused) as exc:
                raise self._failed(f"PUT {name}", exc) from None
            if status == 412:
                raise Exists(name)
            return
        # Its own open file description: reading it never moves the offset of `fd`.
        with open(f"/proc/self/fd/{fd}", "rb") as body:
            conditions = {} if replace else {"IfNoneMatch": "*"}
            self._call(f"PUT {name}", self._client.put_object, Bucket=self.location.bucket,
                       Key=self.location.key(name), Body=body, ContentLength=size,
                       Metadata=metadata, **conditions)

    def head(self, name: str, *, quick: bool = False) -> dict[str, Any]:
        """The object's size (ContentLength), ETag, Metadata; FileNotFoundError if none."""
        client = self._quick if quick else self._client
        answer: dict[str, Any] = self._call(f"HEAD {name}", client.head_object,
                                            Bucket=self.location.bucket,
                                            Key=self.location.key(name))
        return answer

    def get_into(self, name: str, fd: int,
                 piece: Callable[[int, memoryview], None] | None = None) -> int:
        """Download the object into the file at `fd` (truncated first); its size. `piece`
        sees each piece written, with its offset (a check that runs while the bytes arrive;
        offset 0 starts it over). A body cut off mid-stream is fetched again from the start,
        DOWNLOAD_ATTEMPTS times in all."""
        last: BaseException | None = None
        for _ in range(DOWNLOAD_ATTEMPTS):
            os.ftruncate(fd, 0)
            try:
                if self._lean is not None:
                    return self._lean_get_into(name, fd, piece)
                return self._boto_get_into(name, fd, piece)
            except _Cut as exc:
                last = exc.__cause__
        raise self._failed(f"GET {name}", last or EOFError("body cut off"))

    def _lean_get_into(self, name: str, fd: int,
                       piece: Callable[[int, memoryview], None] | None) -> int:
        def write(offset: int, data: memoryview) -> None:
            try:
                _write_all(fd, data, offset)
            except OSError as exc:  # the local disk: not the network's fault
                raise _LocalWrite() from exc
            if piece is not None:
                piece(offset, data)

        assert self._lean is not None
        try:
            status, size = self._lean.get(self.location.key(name), write)
        except _LocalWrite as exc:
            assert exc.__cause__ is not None
            raise exc.__cause__ from None
        except BodyCut as exc:
            raise _Cut() from exc
        except (OSError, http.client.HTTPException, PutRefused) as exc:
            raise self._failed(f"GET {name}", exc) from None
        if status == 404:
            raise FileNotFoundError(name)
        return size

    def _boto_get_into(self, name: str, fd: int,
                       piece: Callable[[int, memoryview], None] | None) -> int:
        answer = self._call(f"GET {name}", self._client.get_object,
                            Bucket=self.location.bucket, Key=self.location.key(name))
        body = answer["Body"]
        try:
            offset = 0
            while True:
                try:
                    data = body.read(PIECE)
                except (self._boto_error, ConnectionError, TimeoutError, OSError) as exc:
                    raise _Cut() from exc
                if not data:
                    break
                view = memoryview(data)
                _write_all(fd, view, offset)
                if piece is not None:
                    piece(offset, view)
                offset += len(data)
            if offset != answer.get("ContentLength", offset):
                raise _Cut() from EOFError("body shorter than its length")
            return offset
        finally:
            body.close()

    def put_small_new(self, name: str, data: bytes) -> None:
        """Store a small object unless the key exists (Exists)."""
        self._call(f"PUT {name}", self._client.put_object, Bucket=self.location.bucket,
                   Key=self.location.key(name), Body=data, IfNoneMatch="*")

    def get_small(self, name: str, limit: int = 4096) -> bytes:
        """A small object's bytes (at most `limit`); FileNotFoundError if there is none."""
        answer = self._call(f"GET {name}", self._client.get_object,
                            Bucket=self.location.bucket, Key=self.location.key(name))
        try:
            return bytes(answer["Body"].read(limit))
        except (self._boto_error, OSError) as exc:
            raise self._failed(f"GET {name}", exc) from None
        finally:
            answer["Body"].close()

    def delete(self, name: str) -> None:
        self._call(f"DELETE {name}", self._client.delete_object,
                   Bucket=self.location.bucket, Key=self.location.key(name))

    def copy(self, name: str, to: str) -> None:
        self._call(f"COPY {name}", self._client.copy_object, Bucket=self.location.bucket,
                   Key=self.location.key(to),
                   CopySource={"Bucket": self.location.bucket, "Key": self.location.key(name)})

    def list(self, under: str, *, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The objects whose names start with `under`: Key (without our prefix), Size,
        LastModified; page by page."""
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket,
                                  "Prefix": self.location.key(under)}
        if limit is not None:
            kwargs["MaxKeys"] = limit
        while True:
            page = self._call(f"LIST {under}", self._client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                yield dict(item, Key=item["Key"][len(self.location.prefix):])
            if limit is not None or not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]


class _Cut(Exception):
    """A download's body broke off (its cause says how): fetched again from the start."""


class _LocalWrite(Exception):
    """Writing a downloaded piece into the local file failed (its cause): no retry."""


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(errno.EIO, "short write into the cache")

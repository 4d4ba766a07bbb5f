"""The tar a bundle is: POSIX ustar members of regular files, written and read front to back.

Owns: writing members (headers from tarfile's TarInfo, pax where a size or name needs it) and
reading the one tar layout that writes and nothing else — no compression, links, devices or GNU
extensions, extended headers only up to a bound — with every allocation bounded whatever a
header claims: one block, one bounded extended header, one chunk of data, or one line of a
member read as JSON lines. Must not know what the members mean (cafs.bundle does).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol

from cafs.errors import InvalidArgument

CHUNK = 1 << 20
MAX_PAX_BYTES = 64 << 10  # a pax extended header (export writes one only for blobs >= 8 GiB)
BLOCK = 512
# What other tools put first in a file: decompress such a bundle before importing it.
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4"}


class BadBundle(InvalidArgument):
    """The file is not a cafs bundle, or an inconsistent one."""


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class TarWriter:
    """Members streamed to `out`, holding nothing per member (tarfile.TarFile keeps every
    member's TarInfo until it is closed: a run's worth of them)."""

    RECORD = 20 * 512  # what tar pads an archive to

    def __init__(self, out: IO[bytes], mtime: int) -> None:
        self._out = out
        self._mtime = mtime
        self._written = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def add(self, name: str, size: int, data: Readable) -> None:
        """A regular file (0444) of `size` bytes read from `data`."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, self._mtime
        self._write(info.tobuf(tarfile.PAX_FORMAT))
        left = size
        while left:
            chunk = data.read(min(left, CHUNK))
            if not chunk:
                raise OSError(f"{name}: {left} bytes short of its size")
            self._write(chunk)
            left -= len(chunk)
        self._write(bytes(-size % BLOCK))

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record."""
        end = 2 * BLOCK
        self._write(bytes(end + (-(self._written + end) % self.RECORD)))


_MEMBER_KINDS = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
                 b"4": "a block device", b"5": "a directory", b"6": "a FIFO",
                 b"7": "a contiguous file", b"g": "a pax global header",
                 b"L": "a GNU long name", b"K": "a GNU long link", b"S": "a sparse file"}


@dataclass(frozen=True)
class Member:
    name: str
    size: int


class TarReader:
    """The tar that export writes, and nothing else: POSIX ustar headers (with a bounded pax
    extended header where a size needs one) of regular files. Reads a pipe front to back;
    never allocates more than one block, one bounded extended header or one chunk of data,
    whatever a header claims. tarfile is not used: it would decompress gzip/bzip2/xz
    transparently, accept links and devices, and read extended headers of any size."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._left = 0  # data bytes of the current member not read yet
        self._padding = 0

    def _read_exact(self, size: int) -> bytes:
        parts, got = [], 0
        while got < size:
            part = self._source.read(size - got)
            if not part:
                raise BadBundle("bundle is truncated: it ends in the middle of a member")
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def first_bytes(self) -> bytes:
        block = self._source.read(BLOCK)
        while 0 < len(block) < BLOCK and (more := self._source.read(BLOCK - len(block))):
            block += more
        return block

    def next_member(self, block: bytes | None = None) -> Member | None:
        """The next regular file, or None at the end-of-archive block."""
        self.skip_data()
        pax: dict[str, str] | None = None
        while True:
            block = block if block is not None else self._read_exact(BLOCK)
            if len(block) < BLOCK:
                raise BadBundle("bundle is truncated: it ends in the middle of a member")
            if block == bytes(BLOCK):
                if pax is not None:
                    raise BadBundle("bundle is damaged: an extended header describes nothing")
                return None
            name, size, kind = _parse_header_block(block)
            block = None
            if kind == b"x":
                if pax is not None:
                    raise BadBundle("bundle is damaged: two extended headers in a row")
                if size > MAX_PAX_BYTES:
                    raise BadBundle(f"bundle has a {size}-byte extended header; at most "
                                    f"{MAX_PAX_BYTES}")
                pax = _parse_pax(self._read_exact(size))
                self._read_exact(-size % BLOCK)
                continue
            if kind not in (b"0", b"\0"):
                what = _MEMBER_KINDS.get(kind, f"of tar type {kind!r}")
                raise BadBundle(f"bundle member {name!r} is {what}: a bundle holds only "
                                "regular files")
            if pax is not None:
                name = pax.get("path", name)
                if "size" in pax:
                    size = _decimal(pax["size"], "size")
            self._left, self._padding = size, -size % BLOCK
            return Member(name, size)

    def chunks(self) -> Iterator[bytes]:
        """The current member's data, CHUNK bytes at a time."""
        while self._left:
            chunk = self._read_exact(min(self._left, CHUNK))
            self._left -= len(chunk)
            yield chunk

    def read_all(self, size: int) -> bytearray:
        """The current member's data (`size` bytes, bounded by the caller) in one buffer:
        filled in place, never held twice."""
        data = bytearray(size)
        view, offset = memoryview(data), 0
        for chunk in self.chunks():
            view[offset:offset + len(chunk)] = chunk
            offset += len(chunk)
        return data

    def lines(self, limit: int, what: str) -> Iterator[bytes]:
        """The current member's data as lines (each without its newline), none longer than
        `limit` bytes: what is held is at most one chunk and one unfinished line, whatever the
        member's size. A line over the limit, or data after the last newline, is refused."""
        rest = b""
        for chunk in self.chunks():
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            for line in parts:
                if len(line) > limit:
                    raise BadBundle(f"bundle member {what} has a line of {len(line)} "
                                    f"bytes; at most {limit}")
                yield line
            if len(rest) > limit:
                raise BadBundle(f"bundle member {what} has a line of over {limit} "
                                f"bytes; at most {limit}")
        if rest:
            raise BadBundle(f"bundle member {what} is damaged: its last line does not "
                            "end with a newline")

    def skip_data(self) -> None:
        for _ in self.chunks():
            pass
        if self._padding:
            self._read_exact(self._padding)
            self._padding = 0

    def drain(self) -> None:
        """Read what follows the end-of-archive block (tar pads to 10 KiB), a bounded amount,
        so that a writer at the other end of a pipe is not cut off mid-write."""
        for _ in range(64):
            if not self._source.read(CHUNK // 4):
                return


def _parse_header_block(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar header block whose checksum is right."""
    if block[257:265] not in (b"ustar\x0000", b"ustar  \x00"):
        raise BadBundle("not a cafs bundle (not an uncompressed POSIX tar file)")
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(byte for byte in block[:148] + block[156:] if byte > 127)
    if stored not in (unsigned, signed):
        raise BadBundle("bundle is damaged: a tar header's checksum is wrong")
    name = _text(block[0:100])
    prefix = _text(block[345:500]) if block[257:263] == b"ustar\x00" else ""
    return (f"{prefix}/{name}" if prefix else name), _number(block[124:136], "size"), \
        block[156:157]


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _number(field: bytes, what: str) -> int:
    digits = field.replace(b"\0", b" ").strip()
    if not digits:
        return 0
    if len(digits) > 24 or not all(48 <= byte <= 55 for byte in digits):
        raise BadBundle(f"bundle is damaged: a tar header's {what} is not an octal number")
    return int(digits, 8)


def _decimal(text: str, what: str) -> int:
    """A number in a pax record: decimal, unlike the header's octal fields."""
    if not text or len(text) > 24 or not all("0" <= char <= "9" for char in text):
        raise BadBundle(f"bundle is damaged: a pax record's {what} is not a decimal number")
    return int(text)


def _parse_pax(data: bytes) -> dict[str, str]:
    """Records "<length> <key>=<value>\n"; only path and size matter here."""
    found: dict[str, str] = {}
    offset = 0
    while offset < len(data):
        length_text, space, _ = data[offset:offset + 24].partition(b" ")
        if not space or not length_text.isdigit() or int(length_text) <= len(length_text) + 1:
            raise BadBundle("bundle is damaged: a malformed pax extended header")
        record = data[offset:offset + int(length_text)]
        offset += int(length_text)
        key, equals, value = record[len(length_text) + 1:].partition(b"=")
        if not equals or not record.endswith(b"\n"):
            raise BadBundle("bundle is damaged: a malformed pax extended header")
        if key in (b"path", b"size"):
            found[key.decode()] = value[:-1].decode("utf-8", "backslashreplace")
    return found

"""Export bundles: one execution as a tar file that ordinary tar can list and unpack.

Owns: the bundle format. A bundle is an uncompressed tar (pipe it through zstd if you like):

    cafs-bundle.json        first member: the execution, its directories and artifacts with
                            their versions and tags, and the list of blobs
    blobs/<sha256>          every content any version uses, uncompressed, named by its hash

Reading accepts that and nothing else (no compression, no links or devices, no other
members) and validates everything before anything is stored: the header against the rules the
mount applies to the same input (cafs.rules), that every version's content is in the bundle,
each blob's size and bytes against its name; what it allocates is bounded whatever the bundle
claims. Must not know SQL or FUSE: which stored blobs a failed import may remove is the
caller's to decide.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

from cafs.blobstore import BlobReader, BlobStore, TempBlob
from cafs.digest import Digest, digest_of_chunks, is_digest
from cafs.errors import CafsError, InvalidArgument
from cafs.model import (
    MAX_SYMLINK_TARGET,
    RECORD_NAME,
    SYMLINK_MODE,
    BlobRef,
    Kind,
    StoredBlob,
    TreeEntry,
    Version,
)
from cafs.rules import (
    DEFAULT_MAX_ARTIFACT_SIZE,
    ID_MAX,
    TIME_MAX,
    TIME_MIN,
    check_tags,
    file_mode,
    new_name,
)

HEADER_NAME = "cafs-bundle.json"
FORMAT = "cafs-bundle"
FORMAT_VERSION = 1
CHUNK = 1 << 20

Progress = Callable[[int, int], None]


class BadBundle(InvalidArgument):
    """The file is not a cafs bundle, or an inconsistent one."""


@dataclass(frozen=True)
class Header:
    name: str  # the execution's name where it was exported
    top: TreeEntry  # the execution directory itself (rel "")
    sealed: tuple[int, str] | None  # (sealed_ns, root_sha256) if the run was sealed
    entries: list[TreeEntry]  # layers, directories and artifacts, parents first
    blobs: dict[str, int]  # digest -> size of every content the versions use


# -- writing ------------------------------------------------------------------------------


def _version_json(version: Version, rel: str) -> dict[str, Any]:
    return {
        "sha256": version.digest, "size": version.size, "mode": version.mode,
        "uid": version.uid, "gid": version.gid, "mtime_ns": version.mtime_ns,
        "ctime_ns": version.ctime_ns, "content_type": version.content_type,
        "created_ns": version.created_ns, "replaced_ns": version.replaced_ns,
        # Where it was published, below the execution ("" if outside it).
        "published_at": rel,
    }


def _entry_json(entry: TreeEntry, versions: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": entry.rel, "kind": entry.kind.value, "mode": entry.mode, "uid": entry.uid,
        "gid": entry.gid, "mtime_ns": entry.mtime_ns, "ctime_ns": entry.ctime_ns,
        "tags": {name: base64.b64encode(value).decode() for name, value in entry.tags.items()},
    }
    if entry.kind.has_versions:
        out["versions"] = versions
    return out


def encode_header(name: str, top: TreeEntry, sealed: tuple[int, str] | None,
                  entries: list[TreeEntry], blobs: list[BlobRef], exported_ns: int) -> bytes:
    """The header of a bundle; BadBundle if the run is too large for the bounds an import
    holds a header to. Each artifact's versions are oldest first, its current one last."""
    prefix = f"runs/{name}/"
    entry_list = []
    for entry in entries:
        versions = [_version_json(v, v.path[len(prefix):] if v.path.startswith(prefix) else "")
                    for v in entry.versions]
        entry_list.append(_entry_json(entry, versions))
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_ns": exported_ns,
        "execution": {**_entry_json(top, []), "name": name,
                      "sealed_ns": sealed[0] if sealed else None,
                      "root_sha256": sealed[1] if sealed else None},
        "entries": entry_list,
        "blobs": [{"sha256": blob.digest, "size": blob.size} for blob in blobs],
    }
    # Compact and ASCII (non-ASCII names as \u escapes): the most artifacts within the
    # header's bounds, and a decoded header costs one byte per character.
    text = (json.dumps(header, separators=(",", ":")) + "\n").encode()
    check_header_size(len(text), _values(text))
    return text


class _BlobStream:
    """A file-like view of a blob's uncompressed bytes, for tarfile.addfile."""

    def __init__(self, reader: BlobReader) -> None:
        self._reader = reader
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._reader.size - self._offset
        data = self._reader.read(self._offset, min(size, CHUNK))
        self._offset += len(data)
        return data


def write_bundle(out: IO[bytes], header: bytes, blobs: list[BlobRef], store: BlobStore,
                 exported_ns: int, progress: Progress) -> int:
    """Stream the bundle to `out`; returns the bytes of content written."""
    written = 0
    total = sum(blob.size for blob in blobs)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(HEADER_NAME)
        info.size, info.mode, info.mtime = len(header), 0o444, exported_ns // 10**9
        tar.addfile(info, io.BytesIO(header))
        for blob in blobs:
            reader = store.open(blob.digest, blob.encoding)
            try:
                info = tarfile.TarInfo(f"blobs/{blob.digest}")
                info.size, info.mode, info.mtime = blob.size, 0o444, exported_ns // 10**9
                tar.addfile(info, _BlobStream(reader))
            finally:
                reader.close()
            written += blob.size
            progress(written, total)
    return written


# -- reading ------------------------------------------------------------------------------
#
# A bundle comes from a stranger: nothing in it may make the reader allocate more than these
# bounds, whatever its size fields say. The header is parsed whole (its entries become one
# manifest transaction), so it is what bounds the memory of an import: 32 MiB of JSON with at
# most 2 million values (about 60,000 artifacts of one version each) grew a daemon's peak RSS
# by at most ~250 MB in our measurements, however the JSON was shaped (a 1 GiB header in a
# 1 MB gzip file took the reader before these bounds to 2.1 GB).
MAX_HEADER_BYTES = 32 << 20
MAX_HEADER_VALUES = 2_000_000
MAX_PAX_BYTES = 64 << 10  # a pax extended header (export writes one only for blobs >= 8 GiB)
BLOCK = 512
# What other tools put first in a file: decompress such a bundle before importing it.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
               b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4"}
_MEMBER_KINDS = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
                 b"4": "a block device", b"5": "a directory", b"6": "a FIFO",
                 b"7": "a contiguous file", b"g": "a pax global header",
                 b"L": "a GNU long name", b"K": "a GNU long link", b"S": "a sparse file"}


@dataclass(frozen=True)
class _Member:
    name: str
    size: int


class _TarReader:
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

    def next_member(self, block: bytes | None = None) -> _Member | None:
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
                    size = _number(pax["size"].encode(), "size")
            self._left, self._padding = size, -size % BLOCK
            return _Member(name, size)

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


class BundleReader:
    """Reads a bundle front to back (it may be a pipe): the header, then the blobs."""

    def __init__(self, source: IO[bytes],
                 max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE) -> None:
        self._tar = _TarReader(source)
        start = self._tar.first_bytes()
        for magic, name in _COMPRESSED.items():
            if start.startswith(magic):
                raise BadBundle(f"bundle is {name}-compressed: decompress it first (cafs "
                                "import reads the plain tar that cafs export writes)")
        if len(start) < BLOCK:
            raise BadBundle(f"not a cafs bundle ({len(start)} bytes: too short for a tar file)")
        first = self._tar.next_member(start)
        if first is None or first.name != HEADER_NAME:
            raise BadBundle(f"not a cafs bundle (its first member is not {HEADER_NAME})")
        check_header_size(first.size)
        self.header = parse_header(self._tar.read_all(first.size), max_artifact_size)

    def store_blobs(self, wanted: set[str], store: BlobStore, progress: Progress,
                    stored: dict[str, StoredBlob]) -> None:
        """Store the wanted blobs as they stream past, into `stored`; check every other blob's
        bytes too, so a damaged bundle is refused even where the store already has the content.
        On failure `stored` holds what was stored: the caller decides what may go (only the
        caller knows which of them the store's artifacts or writes in flight use meanwhile)."""
        seen: set[str] = set()
        total = sum(self.header.blobs.values())
        done = 0
        while len(seen) < len(self.header.blobs):
            member = self._tar.next_member()
            if member is None:
                missing = sorted(self.header.blobs.keys() - seen)[0]
                raise BadBundle(f"bundle is incomplete: blob {missing} is missing")
            digest = member.name.removeprefix("blobs/")
            if member.name == digest or digest not in self.header.blobs:
                raise BadBundle(f"bundle member {member.name!r} is not one of the blobs its "
                                "header lists")
            if digest in seen:
                raise BadBundle(f"bundle holds blob {digest} twice")
            seen.add(digest)
            if member.size != self.header.blobs[digest]:
                raise BadBundle(f"blob {digest}: {member.size} bytes, the header says "
                                f"{self.header.blobs[digest]}")
            if digest in wanted:
                stored[digest] = self._store_one(Digest(digest), store)
            else:
                self._check_one(Digest(digest))
            done += member.size
            progress(done, total)
        extra = self._tar.next_member()
        if extra is not None:
            raise BadBundle(f"bundle member {extra.name!r} follows the last blob")
        self._tar.drain()

    def _check_one(self, digest: Digest) -> None:
        found, _ = digest_of_chunks(self._tar.chunks())
        if found != digest:
            raise BadBundle(f"blob {digest}: its bytes hash to {found}")

    def _store_one(self, digest: Digest, store: BlobStore) -> StoredBlob:
        temp: TempBlob = store.new_temp()
        try:
            offset = 0
            for chunk in self._tar.chunks():
                temp.write(offset, chunk)
                offset += len(chunk)
            if temp.digest() != digest:
                raise BadBundle(f"blob {digest}: its bytes hash to {temp.digest()}")
            return store.publish(temp, digest)
        finally:
            temp.discard()


# -- the header: validated as the mount validates the same input --------------------------


def parse_header(data: bytes | bytearray,
                 max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE) -> Header:
    """The header, or BadBundle saying what is wrong. Every name, mode, tag, size and time is
    held to the rules the mount applies to the same input (cafs.rules); fields the manifest's
    garbage collection trusts are derived here, never taken from the bundle."""
    check_header_size(len(data), _values(data))
    try:
        raw = json.loads(data, object_pairs_hook=_no_duplicate_keys,
                         parse_constant=_no_constant)
    except RecursionError:
        raise BadBundle("bundle header is malformed: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadBundle(f"bundle header is malformed: {exc}") from None
    try:
        return _header(raw, max_artifact_size)
    except BadBundle:
        raise
    except CafsError as exc:  # a rule of cafs.rules: say where
        raise BadBundle(f"bundle refused: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadBundle(f"bundle header is malformed: {type(exc).__name__}: {exc}") from None


def _values(data: bytes | bytearray) -> int:
    """An upper bound of the JSON values in `data`: commas and brackets inside strings count
    too, which only errs on the safe side. Each value costs at most ~100 bytes once parsed."""
    return data.count(b",") + data.count(b"[") + data.count(b"{") + 1


def check_header_size(size: int, values: int = 0) -> None:
    """The bounds an import holds a header to (export checks them too: it never writes a
    bundle that import would refuse)."""
    if size > MAX_HEADER_BYTES:
        raise BadBundle(f"bundle header is {size} bytes; an import reads at most "
                        f"{MAX_HEADER_BYTES}")
    if values > MAX_HEADER_VALUES:
        raise BadBundle(f"bundle header holds up to {values} JSON values; an import reads at "
                        f"most {MAX_HEADER_VALUES}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise BadBundle("bundle header is malformed: a key appears twice in one object")
    return found


def _no_constant(name: str) -> None:
    raise BadBundle(f"bundle header is malformed: {name} is not a number")


def _header(raw: Any, max_size: int) -> Header:
    if not isinstance(raw, dict):
        raise BadBundle("bundle header is malformed: not a JSON object")
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise BadBundle("unknown bundle format "
                        f"{raw.get('format')!r} version {raw.get('format_version')!r}")
    execution = _object(raw["execution"], "execution")
    name = _name(execution["name"], "execution")
    top = _entry(execution, Kind.EXECUTION, "")
    sealed = None
    if execution.get("sealed_ns") is not None:
        sealed = (_int(execution["sealed_ns"], "execution: sealed_ns", TIME_MIN, TIME_MAX),
                  _digest(execution["root_sha256"]))
    blobs: dict[str, int] = {}
    for raw_blob in _list(raw["blobs"], "blobs"):
        raw_blob = _object(raw_blob, "blobs")
        digest = _digest(raw_blob["sha256"])
        if digest in blobs:
            raise BadBundle(f"bundle lists blob {digest} twice")
        blobs[digest] = _size(raw_blob["size"], f"blob {digest}", max_size)
    entries = _entries(_list(raw["entries"], "entries"), blobs, max_size)
    used = {version.digest for entry in entries for version in entry.versions}
    if blobs.keys() - used:
        raise BadBundle(f"bundle lists blob {sorted(blobs.keys() - used)[0]}, which no "
                        "version uses")
    return Header(name, top, sealed, entries, blobs)


def _entries(raw_entries: list[Any], blobs: dict[str, int], max_size: int) -> list[TreeEntry]:
    seen: dict[str, Kind] = {"": Kind.EXECUTION}
    entries = []
    objects = [_object(raw, "entries") for raw in raw_entries]
    for raw in sorted(objects, key=lambda e: str(e.get("path")).count("/")):
        rel = _path(raw["path"], "entry")
        parent, _, leaf = rel.rpartition("/")
        parent_kind = seen.get(parent)
        if parent_kind is None:
            raise BadBundle(f"{rel}: its directory is not in the bundle")
        if rel in seen:
            raise BadBundle(f"{rel}: listed twice")
        kind = Kind(raw["kind"])
        if kind not in (Kind.LAYER, Kind.DIR, Kind.FILE, Kind.SYMLINK) or \
                not parent_kind.accepts(kind):
            raise BadBundle(f"{rel}: a {kind.value} cannot be in a {parent_kind.value}")
        if leaf == RECORD_NAME and parent_kind.has_record:
            raise BadBundle(f"{rel}: the name {RECORD_NAME} is reserved")
        seen[rel] = kind
        entry = _entry(raw, kind, rel)
        if kind.has_versions:
            versions = _list(raw.get("versions"), f"{rel}: versions")
            if not versions:
                raise BadBundle(f"{rel}: an artifact without any version")
            history = tuple(_version(_object(v, rel), rel, index == len(versions) - 1,
                                     max_size, kind)
                            for index, v in enumerate(versions))
            for version in history:
                if blobs.get(version.digest) != version.size:
                    raise BadBundle(f"{rel}: content {version.digest} is not in the bundle")
            history = tuple(
                replace(v, replaced_ns=history[i + 1].created_ns)
                if v.replaced_ns is None and i < len(history) - 1 else v
                for i, v in enumerate(history))
            entry = replace(entry, versions=history)
        elif "versions" in raw:
            raise BadBundle(f"{rel}: a {kind.value} has no versions")
        entries.append(entry)
    return entries


def _entry(raw: dict[str, Any], kind: Kind, rel: str) -> TreeEntry:
    where = rel or "execution"
    tags = {}
    for name, value in _object(raw.get("tags", {}), f"{where}: tags").items():
        if not isinstance(value, str):
            raise BadBundle(f"{where}: tag {name!r} is not base64 text")
        tags[name] = base64.b64decode(value, validate=True)
    try:
        check_tags(tags)
    except CafsError as exc:
        raise BadBundle(f"{where}: {exc}") from None
    mode = _int(raw["mode"], f"{where}: mode", 0, 0o7777)
    if kind is Kind.SYMLINK:
        mode = SYMLINK_MODE
    return TreeEntry(rel, kind, file_mode(mode) if kind is Kind.FILE else mode,
                     _int(raw["uid"], f"{where}: uid", 0, ID_MAX),
                     _int(raw["gid"], f"{where}: gid", 0, ID_MAX),
                     _int(raw["mtime_ns"], f"{where}: mtime_ns", TIME_MIN, TIME_MAX),
                     _int(raw["ctime_ns"], f"{where}: ctime_ns", TIME_MIN, TIME_MAX), tags)


def _version(raw: dict[str, Any], rel: str, current: bool, max_size: int,
             kind: Kind = Kind.FILE) -> Version:
    """One version. Garbage collection takes a version whose replaced_ns is set for history
    it may drop, and keeps the newest superseded versions by their order: so the order is the
    bundle's (oldest first, the current one last), a last version that says it was replaced is
    refused, and every earlier one is recorded as replaced (when the bundle gives no time, at
    the next version's creation: a version published here by an artifact since moved away is
    current there, not here). The content type is derived from the name, as a publish through
    the mount derives it."""
    replaced = raw.get("replaced_ns")
    if current and replaced is not None:
        raise BadBundle(f"{rel}: its current (last) version says it was replaced")
    published_at = raw.get("published_at") or ""
    if published_at:
        published_at = _path(published_at, f"{rel}: published_at")
        if "/" not in published_at:  # artifacts live in layers
            raise BadBundle(f"{rel}: published_at {published_at!r} is not in a layer")
    where = f"{rel}: version"
    size = _size(raw["size"], where, max_size)
    mode = file_mode(_int(raw["mode"], f"{where} mode", 0, 0o7777))
    if kind is Kind.SYMLINK:  # a target as symlink(2) takes it (its bytes: see check_targets)
        if not 1 <= size <= MAX_SYMLINK_TARGET:
            raise BadBundle(f"{where}: a symlink's target is {size} bytes, not 1 to "
                            f"{MAX_SYMLINK_TARGET}")
        mode = SYMLINK_MODE
    return Version(0, 0, published_at, _digest(raw["sha256"]), size, mode,
                   _int(raw["uid"], f"{where} uid", 0, ID_MAX),
                   _int(raw["gid"], f"{where} gid", 0, ID_MAX),
                   _int(raw["mtime_ns"], f"{where} mtime_ns", TIME_MIN, TIME_MAX),
                   _int(raw["ctime_ns"], f"{where} ctime_ns", TIME_MIN, TIME_MAX),
                   None if kind is Kind.SYMLINK else
                   mimetypes.guess_type((published_at or rel).rpartition("/")[2])[0],
                   _int(raw["created_ns"], f"{where} created_ns", TIME_MIN, TIME_MAX),
                   None if current or replaced is None else
                   _int(replaced, f"{where} replaced_ns", TIME_MIN, TIME_MAX))


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadBundle(f"{what} is {str(value)[:40]!r}, not a whole number from {low} to "
                        f"{high}")
    return value


def _size(value: object, what: str, max_size: int) -> int:
    size = _int(value, f"{what}: size", 0, 1 << 63)
    if size > max_size:
        raise BadBundle(f"{what}: {size} bytes is over this store's maximum artifact size "
                        f"({max_size})")
    return size


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadBundle(f"bundle header is malformed: {what} is not an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadBundle(f"bundle header is malformed: {what} is not a list")
    return value


def _digest(value: object) -> Digest:
    if not isinstance(value, str) or not is_digest(value):
        raise BadBundle(f"not a sha256: {str(value)[:80]!r}")
    return Digest(value)


def _name(value: object, what: str) -> str:
    """A name as mkdir or create through the mount would take it."""
    if not isinstance(value, str):
        raise BadBundle(f"bad name in bundle ({what}): {str(value)[:80]!r}")
    try:
        return new_name(value.encode("utf-8"))
    except (UnicodeEncodeError, CafsError) as exc:
        reason = "not UTF-8" if isinstance(exc, UnicodeEncodeError) else str(exc)
        raise BadBundle(f"bad name in bundle ({what}): {value[:80]!r}: {reason}") from None


def _path(value: object, what: str) -> str:
    """A path below the execution: names joined by '/', no '..', not absolute."""
    if not isinstance(value, str) or not value:
        raise BadBundle(f"bad name in bundle ({what}): {str(value)[:80]!r}")
    for part in value.split("/"):
        _name(part, what)
    return value


__all__ = ["BadBundle", "BundleReader", "Header", "encode_header", "parse_header", "write_bundle"]

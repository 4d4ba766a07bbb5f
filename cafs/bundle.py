"""Export bundles: one execution as a tar file that ordinary tar can list and unpack.

Owns: the bundle format. A bundle is an uncompressed tar (pipe it through zstd if you like).
Version 2, which export writes, keeps every piece bounded whatever the run's size:

    cafs-bundle.json        the header: the format and its version, the execution (its own
                            attributes and tags, its name, whether it is sealed) and how many
                            entries, versions and blobs the members below hold
    cafs-entries.jsonl      one JSON object a line, what it is said by its "kind": the
                            layers, directories and artifacts (parents first; an artifact
                            is a file or a symlink, whose versions are its targets), each
                            artifact followed by its versions ("kind": "version"), oldest
                            first, the current one last. A new kind of node is a new kind
                            of line, not a new format: a reader that does not know a kind
                            refuses the bundle saying so
    cafs-blobs.jsonl        one JSON object a line: every content the versions use, once
    blobs/<sha256>          each of those contents, uncompressed, named by its hash

Version 1 (read, never written) has a single header holding the entries and the blob list.

Reading accepts that and nothing else (no compression, no links or devices, no other
members) and validates everything before anything is stored: every record against the rules
the mount applies to the same input (cafs.rules), the records against each other and against
the counts the header declares, that every version's content is in the bundle, each blob's size
and bytes against its name, a symlink's targets as symlink(2) takes them. What it allocates is
bounded whatever the bundle claims: one line (or a version 1 header, at most 32 MiB) at a time;
what spans records lives in a scratch index on disk (cafs.bundle_index), and the disk it takes
there is taken from the store's free space as blobs are (never from the reserve that keeps the
manifest writable). Must not know SQL or FUSE: which stored blobs a failed import may remove is
the caller's to decide.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from cafs.blobstore import BlobReader, Blobs, SpaceGuard, TempBlob
from cafs.bundle_index import BundleIndex
from cafs.bundle_tar import BLOCK, CHUNK, COMPRESSED, BadBundle, TarReader, TarWriter
from cafs.digest import Digest, digest_of_chunks, is_digest
from cafs.errors import CafsError
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
    check_target,
    file_mode,
    new_name,
)

HEADER_NAME = "cafs-bundle.json"
ENTRIES_NAME = "cafs-entries.jsonl"
BLOB_LIST_NAME = "cafs-blobs.jsonl"
FORMAT = "cafs-bundle"
FORMAT_VERSION = 2  # what export writes; import reads 1 and 2
READ_VERSIONS = (1, 2)
# A bundle comes from a stranger: nothing in it may make the reader allocate more than these
# bounds, whatever its size fields say. Version 1's header is parsed whole: 32 MiB of JSON with
# at most 2 million values (about 60,000 artifacts of one version each) grew a daemon's peak
# RSS by at most ~250 MB in our measurements, however the JSON was shaped (a 1 GiB header in a
# 1 MB gzip file took the reader before these bounds to 2.1 GB).
MAX_HEADER_BYTES = 32 << 20
MAX_HEADER_VALUES = 2_000_000
# Version 2 parses one line (or its header) at a time. A line holds one entry or one version:
# the largest an export writes is an entry with every tag the mount allows (1 MiB of values,
# 60 KiB of names: ~1.8 MB as escaped base64 JSON, ~10,000 values) and its path.
MAX_RECORD_BYTES = 4 << 20
MAX_RECORD_VALUES = 50_000
_COUNTS = ("entries", "versions", "blobs")
# The kind of a line of cafs-entries.jsonl that holds a version (the others are Kind values).
VERSION_KIND = "version"
# The node kinds a bundle may hold below its execution, and so the other kinds of lines.
ENTRY_KINDS = (Kind.LAYER, Kind.DIR, Kind.FILE, Kind.SYMLINK)
# Disk a line costs in the spool or the scratch index (its row, the primary key's copy of the
# path, page slack), taken from the store's free space before it is written.
SCRATCH_BYTES_PER_BYTE = 2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Header:
    """A version 1 header, whole."""

    name: str  # the execution's name where it was exported
    top: TreeEntry  # the execution directory itself (rel "")
    sealed: tuple[int, str] | None  # (sealed_ns, root_sha256) if the run was sealed
    entries: list[TreeEntry]  # layers, directories and artifacts, parents first
    blobs: dict[str, int]  # digest -> size of every content the versions use


@dataclass(frozen=True)
class Run:
    """What an import learns of a bundle before its blobs: the rest is in its index."""

    name: str  # the execution's name where it was exported
    top: TreeEntry  # the execution directory itself (rel "")
    sealed: tuple[int, str] | None  # (sealed_ns, root_sha256) if the run was sealed
    format_version: int


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


def _entry_json(entry: TreeEntry) -> dict[str, Any]:
    return {
        "path": entry.rel, "kind": entry.kind.value, "mode": entry.mode, "uid": entry.uid,
        "gid": entry.gid, "mtime_ns": entry.mtime_ns, "ctime_ns": entry.ctime_ns,
        "tags": {name: base64.b64encode(value).decode() for name, value in entry.tags.items()},
    }


def _line(record: dict[str, Any], what: str) -> bytes:
    """One record as a line: compact ASCII JSON (non-ASCII as \\u escapes, so a decoded line
    costs one byte per character), held to the bounds an import reads it with."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    if len(line) > MAX_RECORD_BYTES or _values(line) > MAX_RECORD_VALUES:
        raise BadBundle(f"cannot export {what}: its record would be {len(line)} bytes with up "
                        f"to {_values(line)} JSON values; a bundle's lines hold at most "
                        f"{MAX_RECORD_BYTES} bytes and {MAX_RECORD_VALUES} values")
    return line


def _spool(directory: Path, what: str) -> IO[bytes]:
    path = directory / f"bundle-{os.getpid()}-{os.urandom(6).hex()}.{what}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.unlink(path)  # only this descriptor holds it: gone however the export ends
    return os.fdopen(fd, "w+b")


class BundleWriter:
    """An export: `add` each entry while reading the manifest (one pass, so the run is read
    as of one moment), then `write` streams the bundle. The records go to unlinked spool files
    in the store's tmp/ and the blob list to a scratch index, so memory stays the same whatever
    the run's size."""

    def __init__(self, tmp_dir: Path, space: SpaceGuard, name: str, top: TreeEntry,
                 sealed: tuple[int, str] | None, exported_ns: int) -> None:
        self._tmp_dir = tmp_dir
        self._space = space
        self._prefix = f"runs/{name}/"
        self._exported_ns = exported_ns
        self._execution = {**_entry_json(top), "name": name,
                           "sealed_ns": sealed[0] if sealed else None,
                           "root_sha256": sealed[1] if sealed else None}
        self._index = BundleIndex.create(tmp_dir)
        self._entries = _spool(tmp_dir, "entries")
        self.entries = self.versions = self.artifacts = 0

    def close(self) -> None:
        self._entries.close()
        self._index.close()

    def _write(self, line: bytes) -> None:
        self._space.take(SCRATCH_BYTES_PER_BYTE * len(line))
        self._entries.write(line)

    def add(self, entry: TreeEntry, blob_of: Callable[[Digest], BlobRef | None]) -> None:
        """One layer, directory or artifact (its versions oldest first, the current one last);
        `blob_of` tells how a content is stored (asked once per content)."""
        self._write(_line(_entry_json(entry), entry.rel))
        self.entries += 1
        if entry.kind.has_versions:
            self.artifacts += 1
        for version in entry.versions:
            where = version.path[len(self._prefix):] \
                if version.path.startswith(self._prefix) else ""
            self._write(_line({"kind": VERSION_KIND, "artifact": entry.rel,
                               **_version_json(version, where)}, entry.rel))
            self.versions += 1
            if not self._index.has_blob(version.digest):
                blob = blob_of(version.digest)
                if blob is not None:
                    self._index.add_export_blob(blob)

    @property
    def blobs(self) -> int:
        return self._index.counts()[2]

    def header(self) -> bytes:
        return _line({"format": FORMAT, "format_version": FORMAT_VERSION,
                      "exported_ns": self._exported_ns, "execution": self._execution,
                      "entries": self.entries, "versions": self.versions, "blobs": self.blobs},
                     "the execution")

    def write(self, out: IO[bytes], store: Blobs, progress: Progress) -> int:
        """Stream the bundle to `out` (in a worker thread); returns the bytes of content."""
        header = self.header()
        tar = TarWriter(out, self._exported_ns // 10**9)
        with _spool(self._tmp_dir, "blobs") as blob_list:
            for blob in self._index.export_blobs():
                blob_list.write(_line({"sha256": blob.digest, "size": blob.size}, blob.digest))
            tar.add(HEADER_NAME, len(header), io.BytesIO(header))
            for name, spool in ((ENTRIES_NAME, self._entries), (BLOB_LIST_NAME, blob_list)):
                size = spool.tell()
                spool.seek(0)
                tar.add(name, size, spool)
        written, total = 0, self._index.total_bytes()
        for blob in self._index.export_blobs():
            reader = store.open(blob.digest, blob.encoding)
            try:
                tar.add(f"blobs/{blob.digest}", blob.size, _BlobStream(reader))
            finally:
                reader.close()
            written += blob.size
            progress(written, total)
        tar.close()
        return written


class _BlobStream:
    """A file-like view of a blob's uncompressed bytes, for TarWriter.add."""

    def __init__(self, reader: BlobReader) -> None:
        self._reader = reader
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._reader.size - self._offset
        data = self._reader.read(self._offset, min(size, CHUNK))
        self._offset += len(data)
        return data


# -- reading ------------------------------------------------------------------------------


class BundleReader:
    """Reads a bundle front to back (it may be a pipe): everything up to the blobs when made
    (validated, staged in `index`), then the blobs with `store_blobs`."""

    def __init__(self, source: IO[bytes], index: BundleIndex, space: SpaceGuard,
                 max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE) -> None:
        self._tar = TarReader(source)
        self._index = index
        self._space = space
        self._max_size = max_artifact_size
        start = self._tar.first_bytes()
        for magic, name in COMPRESSED.items():
            if start.startswith(magic):
                raise BadBundle(f"bundle is {name}-compressed: decompress it first (cafs "
                                "import reads the plain tar that cafs export writes)")
        if len(start) < BLOCK:
            raise BadBundle(f"not a cafs bundle ({len(start)} bytes: too short for a tar file)")
        first = self._tar.next_member(start)
        if first is None or first.name != HEADER_NAME:
            raise BadBundle(f"not a cafs bundle (its first member is not {HEADER_NAME})")
        check_header_size(first.size)
        data = self._tar.read_all(first.size)
        check_header_size(len(data), _values(data))
        raw = _load(data, "bundle header")
        if isinstance(raw, dict) and raw.get("format") == FORMAT and \
                raw.get("format_version") == 2:
            if len(data) > MAX_RECORD_BYTES or _values(data) > MAX_RECORD_VALUES:
                raise BadBundle(f"bundle header is {len(data)} bytes with up to "
                                f"{_values(data)} JSON values; a version 2 header holds at "
                                f"most {MAX_RECORD_BYTES} bytes and {MAX_RECORD_VALUES} values")
            self.run = self._read_records(raw)
        else:
            header = _checked(_header, "bundle header", raw, max_artifact_size)
            space.take(SCRATCH_BYTES_PER_BYTE * len(data))
            _stage(header, index)
            self.run = Run(header.name, header.top, header.sealed, 1)
        index.mark_targets()

    def _read_records(self, raw: dict[str, Any]) -> Run:
        """Version 2: the entries and the blob list, line by line into the index."""
        run, declared = _checked(_run_header, "bundle header", raw)
        stager = _Stager(self._index, self._max_size)
        for name, handle in ((ENTRIES_NAME, stager.record), (BLOB_LIST_NAME, stager.blob)):
            member = self._tar.next_member()
            if member is None or member.name != name:
                raise BadBundle(f"not a cafs bundle (version 2: {name} must come next, not "
                                f"{member.name if member else 'the end'!r})")
            for number, line in enumerate(self._tar.lines(MAX_RECORD_BYTES, name), 1):
                where = f"line {number} of {name}"
                if _values(line) > MAX_RECORD_VALUES:
                    raise BadBundle(f"bundle refused: {where} holds up to {_values(line)} "
                                    f"JSON values; at most {MAX_RECORD_VALUES}")
                record = _load(line, where)
                self._space.take(SCRATCH_BYTES_PER_BYTE * len(line))
                _checked(handle, where, record)
                stager.check_counts(declared, final=False)
            _checked(stager.end_file, name)
        stager.check_counts(declared, final=True)
        stager.cross_check()
        return run

    def store_blobs(self, store: Blobs, progress: Progress) -> None:
        """Store the blobs the index wants as they stream past (marking each stored before its
        file is written); check every other blob's bytes too, so a damaged bundle is refused
        even where the store already has the content. On failure the index says what was
        stored: the caller decides what may go (only the caller knows which of them the
        store's artifacts or writes in flight use meanwhile)."""
        index = self._index
        listed, total = index.counts()[2], index.total_bytes()
        seen = done = 0
        while seen < listed:
            member = self._tar.next_member()
            if member is None:
                raise BadBundle(f"bundle is incomplete: blob {index.first_unseen()} is missing")
            digest = member.name.removeprefix("blobs/")
            size = index.blob_size(digest) if member.name != digest else None
            if size is None:
                raise BadBundle(f"bundle member {member.name!r} is not one of the blobs its "
                                "header lists")
            if not index.mark_seen(digest):
                raise BadBundle(f"bundle holds blob {digest} twice")
            seen += 1
            if member.size != size:
                raise BadBundle(f"blob {digest}: {member.size} bytes, the header says {size}")
            chunks: Iterable[bytes] = self._tar.chunks()
            if index.is_target(digest):  # at most 4095 bytes: its versions' sizes say so
                chunks = [self._target(digest, bytes(b"".join(chunks)))]
            if index.wanted(digest):
                index.storing(digest)
                index.stored(self._store_one(Digest(digest), store, chunks))
            else:
                self._check_one(Digest(digest), chunks)
            done += member.size
            progress(done, total)
        extra = self._tar.next_member()
        if extra is not None:
            raise BadBundle(f"bundle member {extra.name!r} follows the last blob")
        self._tar.drain()

    def _target(self, digest: str, data: bytes) -> bytes:
        """A symlink's target as symlink(2) would take it (its size was checked with its
        version; a NUL only shows in the bytes), before anything of it is stored."""
        try:
            check_target(data)
        except CafsError as exc:
            raise BadBundle(f"{self._index.symlink_using(digest)}: {exc}") from None
        return data

    def _check_one(self, digest: Digest, chunks: Iterable[bytes]) -> None:
        found, _ = digest_of_chunks(chunks)
        if found != digest:
            raise BadBundle(f"blob {digest}: its bytes hash to {found}")

    def _store_one(self, digest: Digest, store: Blobs, chunks: Iterable[bytes]
                   ) -> StoredBlob:
        temp: TempBlob = store.new_temp()
        try:
            offset = 0
            for chunk in chunks:
                temp.write(offset, chunk)
                offset += len(chunk)
            if temp.digest() != digest:
                raise BadBundle(f"blob {digest}: its bytes hash to {temp.digest()}")
            return store.publish(temp, digest)
        finally:
            temp.discard()


def _stage(header: Header, index: BundleIndex) -> None:
    """A version 1 header (validated whole) into the index."""
    for digest, size in header.blobs.items():
        index.add_blob(digest, size)
    for entry in header.entries:
        index.add_entry(entry)
        for seq, version in enumerate(entry.versions):
            index.add_version(entry.rel, seq, version)


class _Stager:
    """Version 2 records, validated one at a time as the mount validates the same input, into
    the index. A version is written once the next record shows whether it is the current one:
    only then is its replaced_ns known (derived, as version 1 derives it). Every line is one
    record whose "kind" says what it is; an entry's kind is its node's."""

    def __init__(self, index: BundleIndex, max_size: int) -> None:
        self._index = index
        self._max_size = max_size
        self._file: str | None = None  # the artifact whose versions may follow
        self._kind = Kind.FILE  # its kind (a symlink's versions are targets)
        self._pending: Version | None = None  # its latest version, not yet written
        self._seq = 0
        self.counts = dict.fromkeys(_COUNTS, 0)

    def record(self, raw: Any) -> None:
        raw = _object(raw, "a line")
        if "kind" not in raw:
            raise BadBundle("a line without its kind")
        if raw["kind"] == VERSION_KIND:
            self._add_version(raw)
        else:
            self._add_entry(raw)

    def _add_entry(self, raw: dict[str, Any]) -> None:
        self.end_file()
        rel = _path(raw["path"], "entry")
        parent = rel.rpartition("/")[0]
        parent_kind = Kind.EXECUTION if not parent else self._index.kind_of(parent)
        if parent_kind is None:
            raise BadBundle(f"{rel}: its directory is not in the bundle (or not before it)")
        kind = _placed(raw, rel, parent_kind)
        if "versions" in raw:
            raise BadBundle(f"{rel}: versions belong on lines of their own")
        if not self._index.add_entry(_entry(raw, kind, rel)):
            raise BadBundle(f"{rel}: listed twice")
        self.counts["entries"] += 1
        if kind.has_versions:
            self._file, self._kind, self._seq = rel, kind, 0

    def _add_version(self, raw: dict[str, Any]) -> None:
        rel = raw["artifact"]
        if rel != self._file:
            raise BadBundle(f"a version of {str(rel)[:80]!r} that does not follow that "
                            "artifact's entry or its other versions")
        version = _version(raw, rel, False, self._max_size, self._kind)
        if self._pending is not None:
            self._write(self._pending, replaced=version.created_ns)
        self._pending = version
        self.counts["versions"] += 1

    def _write(self, version: Version, replaced: int | None) -> None:
        assert self._file is not None
        if replaced is not None and version.replaced_ns is None:
            version = replace(version, replaced_ns=replaced)
        self._index.add_version(self._file, self._seq, version)
        self._seq += 1

    def end_file(self) -> None:
        """The current artifact's versions are complete: its last one is current."""
        if self._file is None:
            return
        rel, last = self._file, self._pending
        if last is None:
            raise BadBundle(f"{rel}: an artifact without any version")
        if last.replaced_ns is not None:
            raise BadBundle(f"{rel}: its current (last) version says it was replaced")
        self._write(last, replaced=None)
        self._file, self._pending = None, None

    def blob(self, raw: Any) -> None:
        raw = _object(raw, "a line")
        digest = _digest(raw["sha256"])
        if not self._index.add_blob(digest, _size(raw["size"], f"blob {digest}",
                                                  self._max_size)):
            raise BadBundle(f"bundle lists blob {digest} twice")
        self.counts["blobs"] += 1

    def check_counts(self, declared: dict[str, int], *, final: bool) -> None:
        for what in _COUNTS:
            found, said = self.counts[what], declared[what]
            if found > said or (final and found != said):
                raise BadBundle(f"bundle is inconsistent: its header declares {said} {what}, "
                                f"its members hold {'more' if found > said else found}")

    def cross_check(self) -> None:
        unlisted = self._index.version_not_listed()
        if unlisted is not None:
            raise BadBundle(f"{unlisted[0]}: content {unlisted[1]} is not in the bundle")
        unused = self._index.blob_unused()
        if unused is not None:
            raise BadBundle(f"bundle lists blob {unused}, which no version uses")


# -- validated as the mount validates the same input --------------------------------------


def parse_header(data: bytes | bytearray,
                 max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE) -> Header:
    """A version 1 header, or BadBundle saying what is wrong. Every name, mode, tag, size and
    time is held to the rules the mount applies to the same input (cafs.rules); fields the
    manifest's garbage collection trusts are derived here, never taken from the bundle."""
    check_header_size(len(data), _values(data))
    return _checked(_header, "bundle header", _load(data, "bundle header"), max_artifact_size)


def _load(data: bytes | bytearray, what: str) -> Any:
    """JSON, with no duplicate keys and no NaN/Infinity (its size is the caller's bound)."""
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except RecursionError:
        raise BadBundle(f"{what} is malformed: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadBundle(f"{what} is malformed: {exc}") from None


def _checked(check: Callable[..., Any], where: str, *args: Any) -> Any:
    """check(*args), with what it raises said as one BadBundle line."""
    try:
        return check(*args)
    except BadBundle as exc:
        if where == "bundle header":
            raise
        raise BadBundle(f"{exc} ({where})") from None
    except CafsError as exc:  # a rule of cafs.rules: say where
        raise BadBundle(f"bundle refused: {exc} ({where})") from None
    except KeyError as exc:
        raise BadBundle(f"{where} is malformed: missing {exc}") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadBundle(f"{where} is malformed: {type(exc).__name__}: {exc}") from None


def _values(data: bytes | bytearray) -> int:
    """An upper bound of the JSON values in `data`: commas and brackets inside strings count
    too, which only errs on the safe side. Each value costs at most ~100 bytes once parsed."""
    return data.count(b",") + data.count(b"[") + data.count(b"{") + 1


def check_header_size(size: int, values: int = 0) -> None:
    """The bounds an import holds a version 1 header to (the first member, before it knows
    the version: a version 2 header is held to MAX_RECORD_BYTES once parsed)."""
    if size > MAX_HEADER_BYTES:
        raise BadBundle(f"bundle header is {size} bytes; an import reads at most "
                        f"{MAX_HEADER_BYTES}")
    if values > MAX_HEADER_VALUES:
        raise BadBundle(f"bundle header holds up to {values} JSON values; an import reads at "
                        f"most {MAX_HEADER_VALUES}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return found


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


# One decoder for every line (json.loads with hooks makes a new one each call).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)


def _format(raw: Any, version: int) -> None:
    if not isinstance(raw, dict):
        raise BadBundle("bundle header is malformed: not a JSON object")
    if raw.get("format") != FORMAT or raw.get("format_version") != version:
        raise BadBundle(f"unknown bundle format {raw.get('format')!r} version "
                        f"{raw.get('format_version')!r} (this cafs reads {FORMAT} versions "
                        f"{' and '.join(map(str, READ_VERSIONS))})")


def _execution(raw: dict[str, Any]) -> tuple[str, TreeEntry, tuple[int, str] | None]:
    execution = _object(raw["execution"], "execution")
    name = _name(execution["name"], "execution")
    top = _entry(execution, Kind.EXECUTION, "")
    sealed = None
    if execution.get("sealed_ns") is not None:
        sealed = (_int(execution["sealed_ns"], "execution: sealed_ns", TIME_MIN, TIME_MAX),
                  _digest(execution["root_sha256"]))
    return name, top, sealed


def _run_header(raw: Any) -> tuple[Run, dict[str, int]]:
    _format(raw, 2)
    name, top, sealed = _execution(raw)
    declared = {what: _int(raw[what], f"header: {what}", 0, 1 << 62) for what in _COUNTS}
    return Run(name, top, sealed, 2), declared


def _header(raw: Any, max_size: int) -> Header:
    _format(raw, 1)
    name, top, sealed = _execution(raw)
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
        parent_kind = seen.get(rel.rpartition("/")[0])
        if parent_kind is None:
            raise BadBundle(f"{rel}: its directory is not in the bundle")
        if rel in seen:
            raise BadBundle(f"{rel}: listed twice")
        kind = _placed(raw, rel, parent_kind)
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


def _placed(raw: dict[str, Any], rel: str, parent_kind: Kind) -> Kind:
    """The entry's kind, if the mount would let one of that kind be made where it is."""
    kinds = [kind.value for kind in ENTRY_KINDS]
    if raw["kind"] not in kinds:
        raise BadBundle(f"{rel}: unknown kind {str(raw['kind'])[:40]!r} (this cafs reads "
                        f"entries of kind {', '.join(kinds)})")
    kind = Kind(raw["kind"])
    if not parent_kind.accepts(kind):
        raise BadBundle(f"{rel}: a {kind.value} cannot be in a {parent_kind.value}")
    if rel.rpartition("/")[2] == RECORD_NAME and parent_kind.has_record:
        raise BadBundle(f"{rel}: the name {RECORD_NAME} is reserved")
    return kind


def _entry(raw: dict[str, Any], kind: Kind, rel: str) -> TreeEntry:
    where = rel or "execution"
    tags = {}
    for name, value in _object(raw.get("tags", {}), f"{where}: tags").items():
        if not isinstance(value, str):
            raise BadBundle(f"{where}: tag {name!r} is not base64 text")
        try:
            tags[name] = base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error
            raise BadBundle(f"{where}: tag {name!r} is not base64 text") from None
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
    if kind is Kind.SYMLINK:  # a target as symlink(2) takes it (its bytes: _target)
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
        raise BadBundle(f"bundle is malformed: {what} is not an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadBundle(f"bundle is malformed: {what} is not a list")
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


__all__ = ["BadBundle", "BundleReader", "BundleWriter", "Header", "Run", "parse_header"]

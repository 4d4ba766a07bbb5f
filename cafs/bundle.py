"""Export bundles: one execution as a tar file that ordinary tar can list and unpack.

Owns: the bundle format. A bundle is an uncompressed tar (pipe it through zstd if you like):

    cafs-bundle.json        first member: the execution, its directories and artifacts with
                            their versions and tags, and the list of blobs
    blobs/<sha256>          every content any version uses, uncompressed, named by its hash

Reading validates everything before anything is stored: names, kinds, that every version's
content is in the bundle, and each blob's bytes against its name. Must not know SQL or FUSE.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from cafs.blobstore import BlobReader, BlobStore, TempBlob
from cafs.digest import Digest, is_digest
from cafs.errors import InvalidArgument
from cafs.model import MAX_NAME_BYTES, RECORD_NAME, BlobRef, Kind, StoredBlob, TreeEntry, Version

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
    if entry.kind is Kind.FILE:
        out["versions"] = versions
    return out


def encode_header(name: str, top: TreeEntry, sealed: tuple[int, str] | None,
                  entries: list[TreeEntry], blobs: list[BlobRef], exported_ns: int) -> bytes:
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
    return (json.dumps(header, indent=1, ensure_ascii=False) + "\n").encode()


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


class BundleReader:
    """Reads a bundle front to back (it may be a pipe): the header, then the blobs."""

    def __init__(self, source: IO[bytes]) -> None:
        try:
            # Kept open across calls; close() closes it.
            self._tar = tarfile.open(fileobj=source, mode="r|*")  # noqa: SIM115
            first = self._tar.next()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BadBundle(f"not a cafs bundle (not a readable tar file: {exc})") from None
        if first is None or first.name != HEADER_NAME or not first.isfile():
            raise BadBundle(f"not a cafs bundle (its first member is not {HEADER_NAME})")
        data = self._tar.extractfile(first)
        assert data is not None
        self.header = parse_header(data.read())

    def store_blobs(self, wanted: set[str], store: BlobStore,
                    progress: Progress) -> dict[str, StoredBlob]:
        """Store the wanted blobs as they stream past; check every other blob's bytes too, so
        a damaged bundle is refused even where the store already has the content."""
        stored: dict[str, StoredBlob] = {}
        seen: set[str] = set()
        total = sum(self.header.blobs.values())
        done = 0
        try:
            for member in self._members():
                digest = member.name.removeprefix("blobs/")
                if digest not in self.header.blobs or digest in seen:
                    continue
                seen.add(digest)
                if digest in wanted:
                    stored[digest] = self._store_one(member, Digest(digest), store)
                else:
                    self._check_one(member, Digest(digest))
                done += member.size
                progress(done, total)
            missing = self.header.blobs.keys() - seen
            if missing:
                raise BadBundle(f"bundle is incomplete: blob {sorted(missing)[0]} is missing")
        except BaseException:
            for digest in stored:  # nothing records them: do not leave orphans behind
                store.delete(Digest(digest))
            raise
        return stored

    def _check_one(self, member: tarfile.TarInfo, digest: Digest) -> None:
        self._check_size(member, digest)
        data = self._tar.extractfile(member)
        assert data is not None
        hasher = hashlib.sha256()
        while chunk := data.read(CHUNK):
            hasher.update(chunk)
        if hasher.hexdigest() != digest:
            raise BadBundle(f"blob {digest}: its bytes hash to {hasher.hexdigest()}")

    def _check_size(self, member: tarfile.TarInfo, digest: Digest) -> None:
        if member.size != self.header.blobs[digest]:
            raise BadBundle(f"blob {digest}: {member.size} bytes, the header says "
                            f"{self.header.blobs[digest]}")

    def _members(self) -> Iterator[tarfile.TarInfo]:
        try:
            while (member := self._tar.next()) is not None:
                if member.isfile() and member.name.startswith("blobs/"):
                    yield member
        except (tarfile.TarError, EOFError) as exc:
            raise BadBundle(f"bundle is truncated or damaged: {exc}") from None

    def _store_one(self, member: tarfile.TarInfo, digest: Digest,
                   store: BlobStore) -> StoredBlob:
        self._check_size(member, digest)
        data = self._tar.extractfile(member)
        assert data is not None
        temp: TempBlob = store.new_temp()
        try:
            offset = 0
            while chunk := data.read(CHUNK):
                temp.write(offset, chunk)
                offset += len(chunk)
            if temp.digest() != digest:
                raise BadBundle(f"blob {digest}: its bytes hash to {temp.digest()}")
            return store.publish(temp, digest)
        finally:
            temp.discard()

    def close(self) -> None:
        self._tar.close()


def parse_header(data: bytes) -> Header:
    try:
        raw = json.loads(data)
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise BadBundle("unknown bundle format "
                            f"{raw.get('format')!r} version {raw.get('format_version')!r}")
        execution = raw["execution"]
        name = _check_name(execution["name"])
        top = _entry(execution, Kind.EXECUTION, "")
        sealed = None
        if execution.get("sealed_ns") is not None:
            sealed = (int(execution["sealed_ns"]), _digest(execution["root_sha256"]))
        blobs: dict[str, int] = {_digest(b["sha256"]): int(b["size"]) for b in raw["blobs"]}
        entries = _entries(raw["entries"], blobs)
    except BadBundle:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadBundle(f"bundle header is malformed: {type(exc).__name__}: {exc}") from None
    return Header(name, top, sealed, entries, blobs)


def _entries(raw_entries: list[dict[str, Any]], blobs: dict[str, int]) -> list[TreeEntry]:
    seen: dict[str, Kind] = {"": Kind.EXECUTION}
    entries = []
    for raw in sorted(raw_entries, key=lambda e: str(e["path"]).count("/")):
        rel = str(raw["path"])
        for part in rel.split("/"):  # no "..", no absolute paths, no empty components
            _check_name(part)
        parent, _, leaf = rel.rpartition("/")
        parent_kind = seen.get(parent)
        if parent_kind is None:
            raise BadBundle(f"{rel}: its directory is not in the bundle")
        if rel in seen:
            raise BadBundle(f"{rel}: listed twice")
        kind = Kind(raw["kind"])
        if kind not in (Kind.LAYER, Kind.DIR, Kind.FILE) or \
                parent_kind.child_kind(kind.is_dir) is not kind:
            raise BadBundle(f"{rel}: a {kind.value} cannot be in a {parent_kind.value}")
        if leaf == RECORD_NAME and parent_kind.has_record:
            raise BadBundle(f"{rel}: the name {RECORD_NAME} is reserved")
        seen[rel] = kind
        entry = _entry(raw, kind, rel)
        if kind is Kind.FILE:
            if not entry.versions:
                raise BadBundle(f"{rel}: an artifact without any version")
            for version in entry.versions:
                if blobs.get(version.digest) != version.size:
                    raise BadBundle(f"{rel}: content {version.digest} is not in the bundle")
        entries.append(entry)
    return entries


def _entry(raw: dict[str, Any], kind: Kind, rel: str) -> TreeEntry:
    tags = {str(name): base64.b64decode(value, validate=True)
            for name, value in raw.get("tags", {}).items()}
    for name in tags:
        if not name.startswith("user.") or name.startswith("user.cafs."):
            raise BadBundle(f"{rel or 'execution'}: tag {name!r} is not a user tag")
    versions = tuple(_version(v, rel) for v in raw.get("versions", ()))
    return TreeEntry(rel, kind, int(raw["mode"]) & 0o1777,
                     int(raw["uid"]), int(raw["gid"]), int(raw["mtime_ns"]),
                     int(raw["ctime_ns"]), tags, versions)


def _version(raw: dict[str, Any], rel: str) -> Version:
    replaced = raw.get("replaced_ns")
    published_at = str(raw.get("published_at") or "")
    for part in published_at.split("/") if published_at else ():
        _check_name(part)
    return Version(0, 0, published_at, _digest(raw["sha256"]), int(raw["size"]),
                   int(raw["mode"]) & 0o777, int(raw["uid"]), int(raw["gid"]),
                   int(raw["mtime_ns"]), int(raw["ctime_ns"]), raw.get("content_type"),
                   int(raw["created_ns"]), None if replaced is None else int(replaced))


def _digest(value: object) -> Digest:
    if not isinstance(value, str) or not is_digest(value):
        raise BadBundle(f"not a sha256: {value!r}")
    return Digest(value)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise BadBundle(f"bad name in bundle: {name!r}")
    return name


__all__ = ["BadBundle", "BundleReader", "Header", "encode_header", "parse_header", "write_bundle"]

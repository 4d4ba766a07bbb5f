"""Life-cycle commands: an artifact's history, reading one version, queries, sealing.

Owns: what `cafs log`, `cafs cat` (where to read a version), `cafs find`, `cafs seal` and
`cafs unseal` do to a store, their typed results, and a run's root hash. Runs inside the daemon
when the store is mounted, else in the `cafs` command holding the store's lock (cafs.admin).
Must not import trio, pyfuse3 or the daemon, nor read blob files (cat streams them itself).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from cafs.admin_context import AdminContext, JsonResult
from cafs.digest import digest_of_chunks, is_digest
from cafs.errors import Busy, Damaged, InvalidArgument, NotFound
from cafs.model import RUNS_INODE, Kind, Node, Version
from cafs.records import iso_time

# What follows the NUL in a symlink's line of the root hash, before its target's sha256: a file
# and a symlink whose target is the file's bytes must not give the same root. A file's line is
# unchanged (its sha256 right after the NUL), so roots of runs without symlinks stay as they were.
SYMLINK_MARK = b"symlink "


def root_hash(artifacts: Iterable[tuple[str, str] | tuple[str, str, Kind]], *,
              presorted: bool = False) -> str:
    """The root of a run: SHA-256 over its sorted '<path>\\0<sha256>\\n' lines (paths below
    the execution, sorted as UTF-8 bytes; a symlink's line is '<path>\\0symlink <sha256 of
    its target>\\n'). Equal outputs give equal roots, whatever the run's name or when it ran.
    `presorted`: they come in that order already (streamed, not held)."""
    encoded = ((item[0].encode(), (SYMLINK_MARK if item[2:] == (Kind.SYMLINK,) else b"")
                + item[1].encode()) for item in artifacts)
    lines = encoded if presorted else sorted(encoded)
    return digest_of_chunks(rel + b"\0" + content + b"\n" for rel, content in lines)[0]


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo(JsonResult):
    """One version in an artifact's history, as `cafs log` shows it."""

    version: int  # its number in the path's history: 1..n, what `cafs cat PATH@N` takes
    id: int  # the store-wide version id (versions.id)
    sha256: str
    size: int
    uid: int
    gid: int
    mode: str  # octal
    published: str | None  # ISO 8601, UTC
    published_ns: int
    replaced: str | None  # None while current
    path: str  # where it was published
    current: bool
    damaged: bool

    @classmethod
    def of(cls, version: Version, current_id: int | None) -> VersionInfo:
        return cls(version.number, version.version_id, version.digest, version.size,
                   version.uid, version.gid,
                   f"{version.mode:o}", iso_time(version.created_ns), version.created_ns,
                   iso_time(version.replaced_ns), version.path,
                   version.version_id == current_id, version.damaged)


@dataclass(frozen=True)
class History(JsonResult):
    path: str
    versions: tuple[VersionInfo, ...]  # oldest first


@dataclass(frozen=True)
class VersionLocation(JsonResult):
    """Where to read one version's bytes: its blob and how that is encoded."""

    path: str
    version: int
    sha256: str
    size: int
    encoding: str


@dataclass(frozen=True)
class Found(JsonResult):
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Sealed(JsonResult):
    path: str
    root_sha256: str | None
    artifacts: int | None  # None if it was already sealed (nothing was counted)
    already: bool


@dataclass(frozen=True)
class Unsealed(JsonResult):
    path: str


# -- the commands ---------------------------------------------------------------------------


class Lifecycle(AdminContext):
    async def log(self, path: str) -> History:
        node = self.manifest.resolve(path)
        if node is not None and not node.kind.has_versions:
            raise InvalidArgument(f"{path} is a directory, not an artifact")
        versions = self.manifest.history(node.ino if node else None, path)
        if not versions:
            raise NotFound(f"{path}: no such artifact, and none was ever published there")
        current = node.version_id if node else None
        return History(path, tuple(VersionInfo.of(v, current) for v in versions))

    async def version(self, path: str, version: int | None = None) -> VersionLocation:
        """Where to read one version of an artifact (the current one if `version` is None)."""
        node = self.manifest.resolve(path)
        history = self.manifest.history(node.ino if node else None, path)
        if version is None:
            current = node.version_id if node else None
            found = next((v for v in history if v.version_id == current), None)
        else:
            found = next((v for v in history if v.number == version), None)
        if found is None:
            what = f"version {version}" if version is not None else "a current version"
            why = ""
            if version is not None and history and 0 < version < history[-1].number:
                why = ": cafs gc removed it"
            raise NotFound(f"{path} has no {what}{why} (see cafs log {path})")
        if found.damaged:
            raise Damaged(f"{path}@{found.number}: its content {found.digest} is damaged")
        blob = self.manifest.blob(found.digest)
        assert blob is not None
        return VersionLocation(path, found.number, found.digest, found.size, blob.encoding)

    async def find(self, run: str | None = None, layer: str | None = None,
                   tags: list[list[str | None]] | None = None,
                   sha256: str | None = None) -> Found:
        manifest = self.manifest
        if layer is not None and run is None:
            raise InvalidArgument("--layer needs --run")
        scope = "runs/" + "/".join(part for part in (run, layer) if part is not None)
        # A clear "no such run" rather than an empty answer.
        top = self._node(scope).ino if run is not None else RUNS_INODE
        if sha256 is not None and not is_digest(sha256):
            raise InvalidArgument(f"not a sha256: {sha256!r} (64 lowercase hex digits)")
        chosen: set[int] | None = None
        for name, value in tags or []:
            assert name is not None
            found = manifest.nodes_tagged(name, None if value is None else value.encode())
            chosen = found if chosen is None else chosen & found
        if sha256 is not None:
            found = manifest.nodes_holding(sha256)
            chosen = found if chosen is None else chosen & found
        if chosen is None:  # only a scope: every artifact in it
            prefix = scope.rstrip("/") + "/"
            paths = [prefix + rel for rel, node in manifest.subtree(top)
                     if node.kind.has_versions and node.version_id is not None]
        else:
            paths = sorted(p for p in map(manifest.path_of, chosen)
                           if run is None or p.startswith(scope + "/"))
        return Found(tuple(paths))

    def _artifacts_of(self, execution: Node) -> list[tuple[str, str, Kind]]:
        return [(rel, node.blob.digest, node.kind)
                for rel, node in self.manifest.subtree(execution.ino)
                if node.kind.has_versions and node.blob is not None]

    async def seal(self, path: str) -> Sealed:
        execution = self._execution(path)
        if execution.sealed_ns is not None:
            return Sealed(path, self.manifest.root_of(execution.ino), None, already=True)
        writers = self.live.writers_in(execution.ino)
        if writers:
            raise Busy(f"{path} has {writers} files open for writing; close them first")
        counted: list[int] = []

        def root() -> str:
            # Inside the seal's transaction: on a manifest hosts share, after it found no
            # writer on any host, so no publish lands between this hash and the seal.
            artifacts = self._artifacts_of(execution)
            counted[:] = [len(artifacts)]
            return root_hash(artifacts)

        hashed = self.manifest.seal(execution.ino, root, time.time_ns())
        self.live.nodes_changed([execution.ino])
        return Sealed(path, hashed, counted[0], already=False)

    async def unseal(self, path: str) -> Unsealed:
        execution = self._execution(path)
        self.manifest.unseal(execution.ino, time.time_ns())
        self.live.nodes_changed([execution.ino])
        return Unsealed(path)

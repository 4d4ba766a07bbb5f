"""The life-cycle commands of `cafs`: log, cat, seal, unseal, find, gc, fsck, export, import.

Owns: their arguments and output. Each command is one request to cafs.admin, run by the daemon
over the control socket when the store is mounted (so the mount stays right; its JSON answer is
decoded back into the command's typed result), or here, holding the store's lock, when it is
not (under asyncio). Paths are given either inside a mount (/mnt/cafs/runs/e1) or relative to
the store's namespace (runs/e1, with --store). Must not import trio, pyfuse3 or the daemon.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from cafs.admin import (
    DEFAULT_ORPHAN_GRACE,
    Admin,
    LocalRuntime,
    NotMounted,
    decode_result,
    run_locally,
)
from cafs.admin_context import JsonResult
from cafs.blobstore import BlobStore, open_blob_store, read_chunks
from cafs.cli_common import (
    EXIT_FAILED,
    blobs_spec,
    config_option,
    current_settings,
    errors_as_exit_codes,
    fail,
    human_size,
    mounts_of_type,
    open_store,
    resolve_store,
    settings_from,
    stdout_bytes,
    store_option,
)
from cafs.config import Settings
from cafs.control import call
from cafs.digest import Digest, digest_of_chunks, is_digest
from cafs.errors import CafsError, StoreBusy, StoreError
from cafs.lifecycle import Found, History, Sealed, Unsealed, VersionLocation
from cafs.maintenance import CheckReport, GcReport, RepairReport
from cafs.maintenance import check as check_store
from cafs.rules import DEFAULT_MAX_ARTIFACT_SIZE
from cafs.store import (
    QUARANTINE_DIR,
    Store,
    check_manifest_files,
    command_owner,
    has_manifest,
    list_backups,
    prepare_store_dir,
    real_store_path,
    restore_manifest,
    store_holder,
)
from cafs.transfer import Exported, Imported

R = TypeVar("R", bound=JsonResult)

# -- where a PATH argument lives ----------------------------------------------------------


def locate(path_arg: str, store: Path | None, config: Path | None) -> tuple[Path, str]:
    """(store, path in the namespace) for PATH: a path inside a cafs mount, or runs/... of the
    store given by --store (or the default one)."""
    absolute = Path(os.path.abspath(path_arg))
    for mountpoint, source in sorted(mounts_of_type("fuse.cafs"), key=lambda m: -len(m[0].parts)):
        if absolute == mountpoint or mountpoint in absolute.parents:
            found = Path(source)
            if store is not None and real_store_path(store) != found:
                raise click.UsageError(f"{path_arg} is in the mount of {found}, not of {store}")
            return found, absolute.relative_to(mountpoint).as_posix()
    rel = "/".join(part for part in path_arg.split("/") if part not in ("", "."))
    if rel.split("/")[0] != "runs":
        raise click.UsageError(f"{path_arg}: give a path inside a cafs mount, or runs/... "
                               "of the store (with --store)")
    return store_root(store, config), rel


def store_root(store: Path | None, config: Path | None) -> Path:
    return resolve_store(store, settings_from(config))


# -- running a command --------------------------------------------------------------------


class TerminalProgress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._shown = 0.0
        self._dirty = False

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._shown < 0.2 and done < total):
            return
        self._shown = now
        share = done / total if total else 1.0
        bar = "#" * int(share * 30)
        sys.stderr.write(f"\r{what} [{bar:<30}] {share:4.0%} ({done}/{total})")
        sys.stderr.flush()
        self._dirty = True

    def finish(self) -> None:
        if self._dirty:
            sys.stderr.write("\n")


def run_admin(root: Path, command: str, args: dict[str, Any], expect: type[R],
              files: list[IO[bytes]] | None = None, settings: Settings | None = None,
              create: bool = False) -> R:
    """Run an admin command where it must run: in the daemon if one serves the store (with
    the daemon's settings), else here under the store's lock (with `settings`). Answers the
    command's typed result, `expect`. Failures exit with a message (1; 3 for the store).
    `create`: a store that does not exist yet is made (import), as a first mount makes it."""
    files = files or []
    progress = TerminalProgress()
    try:
        with errors_as_exit_codes(command_failure=EXIT_FAILED):
            # missing (unless made now), not ours, not a directory
            prepare_store_dir(root, create=create)
            if not has_manifest(root):
                # A store whose manifest went missing beside its blobs needs repair, not gc.
                check_manifest_files(root, BlobStore(root), wal=False)
                if not create:
                    raise StoreError(f"no store at {root}")
            for _ in range(3):
                holder = store_holder(root)
                if holder is not None:
                    if not holder.serves_mount:
                        raise StoreBusy(f"store {root} is in use ({holder.description})")
                    answer = call(root, command, args, [f.fileno() for f in files], progress)
                    return _expected(command, decode_result(command, answer), expect)
                try:
                    return _expected(command, _run_here(root, command, args, files, progress,
                                                        settings), expect)
                except StoreBusy:  # a daemon started meanwhile: ask it instead
                    continue
                except OSError as exc:
                    fail(f"{command} failed: {exc}", EXIT_FAILED)
            raise StoreBusy(f"store {root} is in use")
    finally:
        progress.finish()


def _run_here(root: Path, command: str, args: dict[str, Any], files: list[IO[bytes]],
              progress: TerminalProgress, settings: Settings | None) -> JsonResult:
    if settings is None:
        settings = current_settings()  # the configuration and flags this command was given
    opened = Store.open(root, lock=True, owner=command_owner(command),
                        blobs=blobs_spec(settings))
    try:
        admin = Admin(opened, LocalRuntime(), NotMounted(), mounted=False, progress=progress,
                      max_artifact_size=settings.max_artifact_size or DEFAULT_MAX_ARTIFACT_SIZE)
        return run_locally(admin, command, args, files)
    finally:
        opened.close()


def _expected(command: str, result: JsonResult, expect: type[R]) -> R:
    if not isinstance(result, expect):  # a bug: the command and the type asked do not match
        raise TypeError(f"{command} answered {type(result).__name__}, not {expect.__name__}")
    return result


def emit_json(result: JsonResult, **shown: Any) -> None:
    """The result as one JSON document; `shown` replaces fields with what the user gave (a
    path as typed), the store's own form staying under `store_<field>`."""
    data = result.to_json()
    for key, value in shown.items():
        if key in data and data[key] != value:
            data[f"store_{key}"] = data[key]
        data[key] = value
    click.echo(json.dumps(data, indent=2))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
orphan_grace_option = click.option(
    "--orphan-grace", type=click.IntRange(min=0), default=None, metavar="SECONDS",
    help="Remove orphan blob files only once older than this (default: the configuration "
         f"file's orphan_grace, else {DEFAULT_ORPHAN_GRACE} = 7 days).")


def grace_seconds(asked: int | None, config: Path | None) -> int:
    if asked is not None:
        return asked
    configured = settings_from(config).orphan_grace
    return DEFAULT_ORPHAN_GRACE if configured is None else configured


# -- history ------------------------------------------------------------------------------


@click.command()
@store_option
@config_option
@json_option
@click.argument("path")
def log(store: Path | None, config: Path | None, as_json: bool, path: str) -> None:
    """List every version the path PATH has held, numbered 1..n, oldest first.

    Each publish (a close after writing) is a version. A path's history follows it through
    renames (rsync's temp file, mv or an editor's save over it) and rm + re-create; the
    numbers never change (gc removes, never renumbers). Read an old one with
    `cafs cat PATH@N`, or through the mount as blobs/<sha256>. --json adds each version's
    store-wide id.

    Example: cafs log /mnt/cafs/runs/e1/train/model.bin
    """
    root, rel = locate(path, store, config)
    result = run_admin(root, "log", {"path": rel}, History)
    if as_json:
        emit_json(result)
        return
    click.echo(f"{'VERSION':>8}  {'PUBLISHED':<24}  {'SIZE':>10}  {'UID':>6}  SHA256")
    for version in result.versions:
        marks = " (current)" if version.current else ""
        marks += " DAMAGED" if version.damaged else ""
        click.echo(f"{version.version:>8}  {version.published or '':<24}  "
                   f"{human_size(version.size):>10}  {version.uid:>6}  "
                   f"{version.sha256}{marks}")


@click.command()
@store_option
@config_option
@click.argument("path")
def cat(store: Path | None, config: Path | None, path: str) -> None:
    """Write an artifact's content to stdout: PATH for the current version, PATH@VERSION for
    an older one (see cafs log). The bytes are checked against their SHA-256.

    Example: cafs cat /mnt/cafs/runs/e1/train/model.bin@3 > model-v3.bin
    """
    base, _, suffix = path.rpartition("@")
    version = None
    if base and suffix.isdigit():
        path, version = base, int(suffix)
    root, rel = locate(path, store, config)
    found = run_admin(root, "version", {"path": rel, "version": version}, VersionLocation)
    with errors_as_exit_codes(command_failure=EXIT_FAILED):
        _copy_blob(root, found, stdout_bytes())


def _copy_blob(root: Path, found: VersionLocation, out: IO[bytes]) -> None:
    """Stream one blob straight from the store (blob files never change once written)."""
    blobs = open_blob_store(root, blobs_spec(current_settings()))
    reader = blobs.open(Digest(found.sha256), found.encoding)
    try:
        digest, size = digest_of_chunks(_copied(read_chunks(reader), out))
    finally:
        reader.close()
    out.flush()
    if digest != found.sha256 or size != found.size:
        raise CafsError(f"{found.path}@{found.version}: the stored bytes do not match "
                        "their SHA-256; run cafs fsck --repair")


def _copied(chunks: Iterator[bytes], out: IO[bytes]) -> Iterator[bytes]:
    """The chunks, each written to `out` on its way to be hashed."""
    for chunk in chunks:
        out.write(chunk)
        yield chunk


# -- sealing ------------------------------------------------------------------------------


@click.command()
@store_option
@config_option
@json_option
@click.argument("path")
def seal(store: Path | None, config: Path | None, as_json: bool, path: str) -> None:
    """Make the run at PATH (runs/<execution>) immutable and record its root hash.

    Afterwards every change inside it fails with EROFS (read-only file system), for root too.
    The root hash (xattr user.cafs.root, and in .record.json) covers the sorted
    (path, sha256) list of its artifacts: equal outputs give equal roots.

    Example: cafs seal /mnt/cafs/runs/e1
    """
    root, rel = locate(path, store, config)
    result = run_admin(root, "seal", {"path": rel}, Sealed)
    if as_json:
        emit_json(result, path=path)
        return
    state = "was already sealed" if result.already else "sealed"
    click.echo(f"{path} {state}: root {result.root_sha256}")


@click.command()
@store_option
@config_option
@json_option
@click.argument("path")
def unseal(store: Path | None, config: Path | None, as_json: bool, path: str) -> None:
    """Open a sealed run for changes again (it loses its root hash).

    Example: cafs unseal /mnt/cafs/runs/e1
    """
    root, rel = locate(path, store, config)
    result = run_admin(root, "unseal", {"path": rel}, Unsealed)
    if as_json:
        emit_json(result, path=path)
        return
    click.echo(f"{path} is open for changes")


# -- queries ------------------------------------------------------------------------------


@click.command()
@store_option
@config_option
@click.option("--run", "run", metavar="EXEC", help="Only artifacts of this execution.")
@click.option("--layer", metavar="LAYER", help="Only this layer (needs --run).")
@click.option("--tag", "tags", multiple=True, metavar="KEY[=VALUE]",
              help="Has this user tag (user. may be left out); repeat to require several.")
@click.option("--sha256", metavar="HEX", help="Holds exactly this content.")
@click.option("-0", "--print0", is_flag=True, help="End each path with NUL (for xargs -0).")
@json_option
@click.argument("path", required=False)
def find(store: Path | None, config: Path | None, run: str | None, layer: str | None,
         tags: tuple[str, ...], sha256: str | None, print0: bool, as_json: bool,
         path: str | None) -> None:
    """List the artifacts and directories that match every condition: below PATH (a
    directory in a mount, printed as given, like find(1)), else in the whole store as
    runs/... paths.

    Tags are the user.* xattrs set with setfattr.

    Example: cafs find /mnt/cafs/runs/e1 --tag stage=prod
    Example: cafs find --store /srv/cafs --sha256 9f2c...
    """
    tag_pairs = []
    for tag in tags:
        key, has_value, value = tag.partition("=")
        if not key:
            raise click.UsageError(f"--tag {tag!r}: the key is missing")
        tag_pairs.append([key if key.startswith("user.") else f"user.{key}",
                          value if has_value else None])
    # Wrong arguments are usage errors (exit 2), found before anything runs.
    if sha256 is not None and not is_digest(sha256.lower()):
        raise click.BadParameter(f"{sha256!r} is not a sha256 (64 hex digits)",
                                 param_hint="--sha256")
    if layer is not None and run is None:
        raise click.UsageError("--layer needs --run")
    root, below = store_root(store, config), ""
    if path is not None:
        if run is not None or layer is not None:
            raise click.UsageError("give PATH or --run/--layer, not both")
        root, below = locate(path, store, config)
        below = "" if below == "." else below  # the mountpoint itself
        parts = below.split("/") if below else []
        if parts[:1] not in ([], ["runs"]):
            raise click.UsageError(f"{path}: not in runs/ of the mount")
        run = parts[1] if len(parts) > 1 else None
        layer = parts[2] if len(parts) > 2 else None
    args = {"run": run, "layer": layer, "tags": tag_pairs,
            "sha256": sha256.lower() if sha256 else None}
    result = run_admin(root, "find", args, Found)
    paths = list(result.paths)
    if path is not None:  # below PATH, and printed the way PATH was given
        prefix = below + "/" if below else ""
        paths = [path.rstrip("/") + "/" + found[len(prefix):] for found in paths
                 if found.startswith(prefix)]
    if as_json:
        emit_json(result, paths=paths)
        return
    for found in paths:
        click.echo(found, nl=not print0)
        if print0:
            click.echo("\0", nl=False)


# -- collecting and repairing -------------------------------------------------------------


@click.command()
@store_option
@config_option
@click.option("--dry-run", "-n", is_flag=True, help="Report what would go; remove nothing.")
@click.option("--keep-versions", type=click.IntRange(min=0), default=None, metavar="N",
              help="Keep at most N superseded versions per path (default: all).")
@orphan_grace_option
@json_option
def gc(store: Path | None, config: Path | None, dry_run: bool, keep_versions: int | None,
       orphan_grace: int | None, as_json: bool) -> None:
    """Remove superseded versions beyond the retention, the history of deleted artifacts,
    and every blob nothing references any more. Safe while mounted.

    Blob files no manifest row names (orphans) are removed only once older than the grace
    period: a young orphan may be an artifact whose manifest row was lost (restore a backup).

    On a manifest several hosts share (PostgreSQL), one gc runs at a time over the whole
    store: another one exits 1 saying so; with blobs on S3, a blob goes only gc_grace seconds
    (configuration key) after its last reference went, and orphans only once that old too.

    Example: cafs gc --keep-versions 3 --dry-run
    """
    result = run_admin(store_root(store, config), "gc",
                       {"keep_versions": keep_versions, "dry_run": dry_run,
                        "orphan_grace": grace_seconds(orphan_grace, config),
                        "gc_grace": settings_from(config).gc_grace}, GcReport)
    if as_json:
        emit_json(result)
        return
    verb = "would remove" if dry_run else "removed"
    kept = result.orphan_files_kept
    if kept:
        click.echo(f"kept {kept} orphan blob files younger than the grace period "
                   "(cafs fsck lists them)")
    click.echo(f"{verb} {result.versions_removed} versions, {result.blobs_removed} blobs "
               f"and {result.orphan_files_removed} orphan blob files; "
               f"{'would reclaim' if dry_run else 'reclaimed'} "
               f"{human_size(result.bytes_reclaimed)} ({result.bytes_reclaimed} bytes)")


@click.command()
@store_option
@config_option
@click.option("--full", is_flag=True, help="Also re-hash every blob (reads everything).")
@click.option("--repair", is_flag=True,
              help="Fix what can be fixed (re-hashes every blob; safe while mounted).")
@orphan_grace_option
@json_option
def fsck(store: Path | None, config: Path | None, full: bool, repair: bool,
         orphan_grace: int | None, as_json: bool) -> None:
    """Check the manifest against the blobs; exit 1 if anything is damaged.

    Orphan blobs and temp files (what a crash can leave) are listed but are not damage.
    With --repair: fix refcounts and the directory aggregates records read, remove orphan
    blobs and stray temp files, mark artifacts whose content is missing or wrong as damaged
    (reading them gives EIO, never wrong bytes) and move wrong blob files to quarantine/.

    Example: cafs fsck --store /srv/cafs --full
    """
    if repair:
        _repair(store_root(store, config), as_json, grace_seconds(orphan_grace, config),
                settings_from(config).gc_grace)
        return
    progress = TerminalProgress()
    with open_store(store, config) as opened:
        # Someone holding the lock (a daemon, an import) may be writing: temp files and
        # unpublished rows are then work in progress, not garbage.
        try:
            report: CheckReport = check_store(opened, full=full,
                                              mounted=store_holder(opened.root) is not None,
                                              progress=progress)
        finally:
            progress.finish()
    if as_json:
        emit_json(report)
    else:
        for line in report.damage:
            click.echo(f"DAMAGE  {line}")
        for line in report.lost:
            click.echo(f"lost    {line}")
        for line in report.lost_metadata:
            click.echo(f"LOST?   {line}")
        for line in report.garbage:
            click.echo(f"garbage {line}")
        rehashed = f", {report.blobs_rehashed} re-hashed" if full else ""
        verdict = "clean" if report.clean else (
            f"{len(report.damage) + len(report.lost_metadata)} problems")
        click.echo(f"{report.blobs_checked} blobs checked{rehashed}: {verdict}")
    if not report.clean:
        sys.exit(EXIT_FAILED)


def _repair(root: Path, as_json: bool, orphan_grace: int, gc_grace: int) -> None:
    result = run_admin(root, "repair", {"orphan_grace": orphan_grace, "gc_grace": gc_grace},
                       RepairReport)
    if as_json:
        emit_json(result)
        return
    for line in result.damaged:
        click.echo(f"marked damaged  {line}")
    for name in result.quarantined:
        click.echo(f"quarantined     {QUARANTINE_DIR}/{name}")
    for path in result.damaged_artifacts:
        click.echo(f"DAMAGED         {path} (reads give EIO until it is written again)")
    if result.orphan_files_kept:
        click.echo(f"kept            {result.orphan_files_kept} orphan blob files younger "
                   "than the grace period")
    click.echo(f"{result.blobs_checked} blobs re-hashed; fixed {result.refcounts_fixed} "
               f"refcounts and the aggregates of {result.aggregates_fixed} nodes; removed "
               f"{result.orphan_files_removed} orphan blobs, "
               f"{result.temp_files_removed} temp files and "
               f"{result.unfinished_files_removed} unfinished files; "
               f"{result.healed} blobs healed")


# -- bundles ------------------------------------------------------------------------------


@click.command()
@store_option
@config_option
@click.option("-o", "--output", required=True, metavar="FILE",
              help="The bundle to write (a tar file), or - for stdout.")
@json_option
@click.argument("path")
def export(store: Path | None, config: Path | None, output: str, as_json: bool,
           path: str) -> None:
    """Write the run at PATH, with its versions and tags, as a bundle that tar can unpack.

    Example: cafs export /mnt/cafs/runs/e1 -o e1.cafs.tar
    """
    root, rel = locate(path, store, config)
    if as_json and output == "-":
        raise click.UsageError("--json needs -o FILE: with -o - the bundle is standard output")
    if output == "-":
        out = stdout_bytes()
        if out.isatty():
            raise click.UsageError("refusing to write a bundle to a terminal; use -o FILE")
        result = run_admin(root, "export", {"path": rel}, Exported, [out])
    elif _exists_but_not_regular(output):
        # A device, a FIFO, a /dev/fd/N pipe: written to as it is (renaming a temp over it
        # would replace a device node with a regular file); its errors are the command's.
        try:
            with open(output, "wb") as out:
                result = run_admin(root, "export", {"path": rel}, Exported, [out])
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror}", EXIT_FAILED)
    else:
        # Written under a temporary name, renamed when complete: never a partial bundle.
        partial = Path(f"{output}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                result = run_admin(root, "export", {"path": rel}, Exported, [out])
            partial.rename(output)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror}", EXIT_FAILED)
        finally:
            partial.unlink(missing_ok=True)
    if as_json:
        emit_json(result, path=path, output=output)
        return
    click.echo(f"exported {path}: {result.artifacts} artifacts, {result.blobs} blobs, "
               f"{human_size(result.content_bytes)}", err=output == "-")


def _exists_but_not_regular(path: str) -> bool:
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


@click.command(name="import")
@store_option
@config_option
@click.option("--as", "name", metavar="NAME", help="Import as runs/NAME (default: its name).")
@json_option
@click.argument("bundle")
def import_(store: Path | None, config: Path | None, name: str | None, as_json: bool,
            bundle: str) -> None:
    """Add the run in BUNDLE (from cafs export; - for stdin) to the store, storing only the
    content the store does not have yet.

    Example: cafs import e1.cafs.tar --as e1-copy
    """
    settings = settings_from(config)
    root = resolve_store(store, settings)
    if name is not None and ("/" in name or name in ("", ".", "..")):
        raise click.UsageError(f"--as {name!r}: not a valid execution name")
    try:
        source = sys.stdin.buffer if bundle == "-" else open(bundle, "rb")  # noqa: SIM115
    except OSError as exc:
        fail(f"cannot read {bundle}: {exc.strerror}", EXIT_FAILED)
    with source:
        result = run_admin(root, "import", {"name": name}, Imported, [source], settings,
                           create=True)
    if as_json:
        emit_json(result, mounted_path=mounted_path(root, result.path))
        return
    click.echo(f"imported {result.path}: {result.artifacts} artifacts; "
               f"{result.blobs_added} new blobs, {result.blobs_present} already stored")


def mounted_path(root: Path, rel: str) -> str | None:
    """rel (runs/...) where a user sees it: under the store's mountpoint, if it is mounted."""
    for mountpoint, source in mounts_of_type("fuse.cafs"):
        if source == str(root):
            return str(mountpoint / rel)
    return None


@click.command()
@store_option
@config_option
@click.option("--list", "list_only", is_flag=True, help="List the backups, oldest first.")
@json_option
@click.argument("backup", required=False, type=click.Path(path_type=Path))
def restore(store: Path | None, config: Path | None, list_only: bool, as_json: bool,
            backup: Path | None) -> None:
    """Put a manifest backup back in place of the store's manifest (the store must be
    unmounted). BACKUP is a file in <store>/backups/ (default: the newest). The manifest files
    it replaces are moved to backups/replaced-<time>/, never deleted.

    Afterwards `cafs fsck` lists blob files stored after the backup as possible lost metadata;
    gc keeps them for its grace period.

    Example: cafs restore --store /srv/cafs manifest-20250101T000000Z.sqlite
    """
    root = store_root(store, config)
    with errors_as_exit_codes():
        if list_only:
            backups = list_backups(root)
            if as_json:
                click.echo(json.dumps({"backups": [path.name for path in backups]}, indent=2))
                return
            for path in backups:
                click.echo(path.name)
            return
        used, aside = restore_manifest(root, backup)
        opened = Store.open(root, create=False)
        try:
            report = check_store(opened, full=False, mounted=False)
        finally:
            opened.close()
    if as_json:
        click.echo(json.dumps({"restored_from": str(used), "replaced_files": str(aside),
                               "lost_metadata": list(report.lost_metadata)}, indent=2))
        return
    click.echo(f"restored the manifest from {used}; the replaced files are in {aside}")
    if report.lost_metadata:
        click.echo(f"{len(report.lost_metadata)} blob files are newer than this backup: content "
                   "stored after it, whose artifacts it does not know (cafs fsck lists them)")


COMMANDS = [log, cat, seal, unseal, find, gc, fsck, export, import_, restore]

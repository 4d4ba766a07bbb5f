"""The `cafs` command line: thin click commands over the store and the daemon.

Owns: mounting, unmounting and stats. The life-cycle commands (log, cat, seal, find, gc, fsck,
export, import) are in cafs.cli_admin; exit codes and shared options in cafs.cli_common.
Every failure is one line on stderr and a documented exit code, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cafs import cli_admin, crashpoints
from cafs.cli_admin import json_option
from cafs.cli_common import (
    EXIT_FAILED,
    EXIT_MOUNT,
    EXIT_USAGE,
    blobs_spec,
    config_option,
    errors_as_exit_codes,
    fail,
    find_mount,
    human_size,
    mounts_of_type,
    open_store,
    resolve_mountpoint,
    resolve_store,
    settings_from,
    store_option,
    store_source,
)
from cafs.config import config_path, config_source
from cafs.errors import CafsError, MountError, StoreError
from cafs.model import SessionInfo
from cafs.mountpoint import check_mountpoint
from cafs.options import MountConfig, mount_option_args, mount_options_help, parse_mount_options
from cafs.store import (
    LOCK_NAME,
    LOG_NAME,
    MANIFEST_NAME,
    MANIFEST_URL_NAME,
    Store,
    check_placement,
    manifest_location,
    open_log,
    prepare_store_dir,
    serving_daemon,
)

if TYPE_CHECKING:  # only `cafs mount` loads the daemon (pyfuse3, trio): see mount()
    from cafs.daemon import MountConfig

READY = b"READY\n"
START_TIMEOUT = 60.0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cafs")
def cli() -> None:
    """cafs: a mountable, content-addressed store for pipeline artifacts."""
    with errors_as_exit_codes(EXIT_USAGE):
        crashpoints.check_setting()


@cli.command()
@store_option
@config_option
@click.option("-o", "options", multiple=True, metavar="OPTS", help=mount_options_help())
@click.option("--foreground", "-f", is_flag=True, help="Stay attached; log to stderr.")
@click.option("--debug", is_flag=True, help="Log every request (very verbose).")
@click.option("--nonempty", is_flag=True,
              help="Mount even on a directory that holds files or is already mounted "
                   "(also -o nonempty).")
@click.option("--verbose", "-v", is_flag=True,
              help="Say which configuration file and store are used (stderr).")
@json_option
@click.option("--ready-fd", type=int, default=None, hidden=True)
@click.option("--config-used", type=click.Path(path_type=Path), default=None, hidden=True)
@click.argument("mountpoint", type=click.Path(path_type=Path), required=False)
def mount(store: Path | None, config: Path | None, options: tuple[str, ...], foreground: bool,
          debug: bool, nonempty: bool, verbose: bool, as_json: bool, ready_fd: int | None,
          config_used: Path | None, mountpoint: Path | None) -> None:
    """Mount the store at MOUNTPOINT; return once the mount serves requests.

    Also runs as a mount(8) helper: `cafs STORE MOUNTPOINT -o OPTS`, which is what
    `mount -t fuse.cafs STORE MOUNTPOINT` and an fstab line call.

    Example: cafs mount --store /srv/cafs /mnt/artifacts
    """
    settings = settings_from(config)  # the defaults, then the configuration file
    root = resolve_store(store, settings)
    # The child daemon gets every setting on its command line and no configuration file;
    # --config-used only tells it which file they came from, for its start-up line.
    used = config_used if config_used is not None else config_path(config)
    where = resolve_mountpoint(mountpoint, settings)
    try:  # then -o
        settings = parse_mount_options(list(options), settings)
    except CafsError as exc:
        raise click.UsageError(str(exc)) from None
    if nonempty:
        settings = replace(settings, nonempty=True)
    cfg = MountConfig(store=root, mountpoint=where, settings=settings, config=used)
    with errors_as_exit_codes():
        if foreground:
            run_foreground(cfg, debug, ready_fd)
            return
        pid = spawn_daemon(cfg, debug)
    if verbose:
        click.echo(f"cafs: mounted store {root} at {where} (daemon pid {pid}; configuration "
                   f"{used or 'none'}; log {root / LOG_NAME})", err=True)
    if as_json:
        click.echo(json.dumps({"store": str(root), "mountpoint": str(where), "pid": pid,
                               "config": str(used) if used else None,
                               "log": str(root / LOG_NAME)}, indent=2))


def run_foreground(cfg: MountConfig, debug: bool, ready_fd: int | None) -> None:
    # The only command that loads the daemon, and with it pyfuse3 and trio.
    from cafs.daemon import configure_logging, serve

    configure_logging(debug)

    def on_ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)

    try:
        serve(cfg, on_ready)
    except CafsError as exc:
        if ready_fd is not None:  # tell the waiting parent why, in one line
            os.write(ready_fd, f"{type(exc).__name__}:{exc}\n".encode())
        raise


def spawn_daemon(cfg: MountConfig, debug: bool) -> int:
    """Start the daemon in its own session and wait until it serves (or says why not); its
    pid."""
    check_mountpoint(cfg.mountpoint, nonempty=cfg.settings.nonempty)
    check_placement(cfg.store, cfg.mountpoint)
    prepare_store_dir(cfg.store, create=True)
    log_fd = open_log(cfg.store)  # never through a symlink planted in the store
    read_end, write_end = os.pipe()
    # The child gets every setting explicitly, so it needs no configuration file.
    command = [sys.executable, "-m", "cafs", "mount", "--foreground", "--ready-fd",
               str(write_end), "--store", str(cfg.store), str(cfg.mountpoint),
               *mount_option_args(cfg.settings)]
    if cfg.config is not None:
        command += ["--config-used", str(cfg.config)]
    for flag, value in (("--blobs", cfg.settings.blobs), ("--cache-dir", cfg.settings.cache_dir),
                        ("--cache-size", cfg.settings.cache_size)):
        if value is not None:  # a blobs URL never holds a secret (S3Location refuses one)
            command += [flag, str(value)]
    if debug:
        command.append("--debug")
    child_env = dict(os.environ, CAFS_CONFIG="")
    try:
        process = subprocess.Popen(command, pass_fds=(write_end,), stdin=subprocess.DEVNULL,
                                   stdout=log_fd, stderr=log_fd, start_new_session=True,
                                   env=child_env)
    finally:
        os.close(log_fd)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.readline()
    if message == READY:
        return process.pid
    try:
        code = process.wait(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    kind, _, text = message.decode(errors="replace").strip().partition(":")
    if text:
        raise (MountError if kind == "MountError" else StoreError)(text)
    raise MountError(f"the daemon exited (status {code}) before serving; "
                     f"see {cfg.store / LOG_NAME}")


@cli.command()
@config_option
@click.option("--lazy", "-z", is_flag=True, help="Detach even if busy (or dead).")
@click.option("--if-mounted", is_flag=True,
              help="Succeed quietly when nothing is mounted there (for ExecStopPost).")
@json_option
@click.argument("mountpoint", type=click.Path(path_type=Path), required=False)
def umount(config: Path | None, lazy: bool, if_mounted: bool, as_json: bool,
           mountpoint: Path | None) -> None:
    """Unmount a cafs mount and wait until its daemon has exited.

    A dead mount (its daemon died) unmounts the same way; one still in use needs --lazy.

    Example: cafs umount /mnt/artifacts
    """
    mountpoint = resolve_mountpoint(mountpoint, settings_from(config))
    found = find_mount(mountpoint)
    if found is None or found[0] != "fuse.cafs":
        if if_mounted:
            if as_json:
                click.echo(json.dumps({"mountpoint": str(mountpoint), "unmounted": False},
                                      indent=2))
            return
        fail(f"{mountpoint} is not a cafs mount", EXIT_MOUNT)
    store = Path(found[1])
    holder = serving_daemon(store) if store.is_dir() else None
    daemon = holder.pid if holder is not None else None
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint.absolute())]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        fail(f"cannot unmount {mountpoint}: {reason}", EXIT_MOUNT)
    # Return only once the daemon is gone: until then it still holds files in the store.
    deadline = time.monotonic() + START_TIMEOUT
    while daemon is not None and process_alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.02)
    if as_json:
        click.echo(json.dumps({"mountpoint": str(mountpoint), "unmounted": True,
                               "store": str(store), "daemon_pid": daemon}, indent=2))


@cli.command()
@store_option
@config_option
@json_option
def status(store: Path | None, config: Path | None, as_json: bool) -> None:
    """Say which configuration file and store the commands use, and where that store is
    mounted (touches nothing).

    Example: cafs status --json
    """
    settings = settings_from(config)
    used, config_why = config_source(config)
    with errors_as_exit_codes():
        root, store_why = store_source(store, settings)
    try:  # a store this user may not enter is reported, not an error
        holder = serving_daemon(root) if (root / LOCK_NAME).exists() else None
        exists: bool | None = ((root / MANIFEST_NAME).exists()
                               or (root / MANIFEST_URL_NAME).exists())
    except OSError:
        holder, exists = None, None
    mounted = [str(point) for point, source in mounts_of_type("fuse.cafs")
               if source == str(root)]
    result: dict[str, object] = {
        "config": str(used) if used else None, "config_source": config_why,
        "store": str(root), "store_source": store_why,
        "store_exists": exists,
        "mountpoint": str(settings.mountpoint) if settings.mountpoint else None,
        "mounted_at": mounted, "daemon_pid": holder.pid if holder else None,
    }
    sessions: list[SessionInfo] | None = None
    if exists and (root / MANIFEST_URL_NAME).exists():  # several hosts may mount it
        sessions = _live_sessions(root, config, settings.session_timeout)
        result["sessions"] = _sessions_json(sessions)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"config      {used or 'none'} ({config_why})")
    state = {True: "", False: "; not created yet", None: "; not readable by this user"}
    click.echo(f"store       {root} ({store_why}{state[exists]})")
    if settings.mountpoint:
        click.echo(f"mountpoint  {settings.mountpoint} (the configuration file)")
    if mounted:
        click.echo(f"mounted     at {', '.join(mounted)}"
                   + (f" by pid {holder.pid}" if holder and holder.pid else ""))
    else:
        click.echo("mounted     no")
    if sessions is not None:
        _echo_sessions(sessions)


def _live_sessions(root: Path, config: Path | None,
                   timeout: float) -> list[SessionInfo] | None:
    """The live mounts of a manifest on PostgreSQL, on any host; None if it cannot be read
    (status reports, it does not fail)."""
    try:
        opened = Store.open(root, create=False, blobs=blobs_spec(settings_from(config)))
        try:
            return opened.manifest.live_sessions(timeout)
        finally:
            opened.close()
    except CafsError as exc:
        click.echo(f"sessions    cannot be read: {exc}", err=True)
        return None


def _sessions_json(sessions: list[SessionInfo] | None) -> list[dict[str, object]] | None:
    if sessions is None:
        return None
    return [{"session": s.session_id, "host": s.host, "mountpoint": s.mountpoint, "pid": s.pid,
             "since": s.started_at, "last_beat": s.beat_at,
             "last_beat_age": round(s.beat_age, 3)} for s in sessions]


def _echo_sessions(sessions: list[SessionInfo]) -> None:
    """One line per live mount of a shared manifest (host, mountpoint, since, last beat)."""
    click.echo(f"sessions    {len(sessions)} live mounts of this manifest, on any host")
    for s in sessions:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s.started_at))
        click.echo(f"  {s.host}:{s.mountpoint}  pid {s.pid}, since {since}, "
                   f"last beat {s.beat_age:.1f} s ago")


def process_alive(pid: int) -> bool:
    """True while pid runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@cli.command()
@store_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.argument("path", required=False)
def stats(store: Path | None, config: Path | None, as_json: bool, path: str | None) -> None:
    """Show what the store holds: live artifacts (logical, after dedup, stored), what only
    history holds, and what `cafs gc` would reclaim now.

    Ratios are over live artifacts only: dedup = logical / unique, compression = unique /
    stored; logical per stored byte = both together. History (versions that are not
    current) is counted apart, and so is what gc would remove (the history of deleted
    artifacts and contents nothing uses).

    With PATH (an execution, layer or directory): its artifacts, and the bytes only it holds
    (what deleting it and running gc would reclaim). That reads every artifact below PATH, so it
    runs here, on a read-only view of the manifest, never in the daemon.

    Example: cafs stats --store /srv/cafs --json
    Example: cafs stats /mnt/cafs/runs/exec42/train
    """
    if path is not None:
        _dir_stats(path, store, config, as_json)
        return
    with open_store(store, config) as opened:
        totals = opened.manifest.totals()
        space = opened.manifest.space()
        shared = opened.manifest.shared
        sessions = opened.manifest.live_sessions(settings_from(config).session_timeout)
    result = {
        "artifacts": totals.artifacts,
        "executions": totals.executions,
        "layers": totals.layers,
        "versions": totals.versions,
        "blobs": totals.blobs,
        "logical_bytes": totals.logical_bytes,
        "stored_bytes": totals.stored_bytes,
        "live": {"blobs": space.live_blobs, "logical_bytes": totals.logical_bytes,
                 "unique_bytes": space.live_unique_bytes,
                 "stored_bytes": space.live_stored_bytes},
        "history": {"versions": space.history_versions, "blobs": space.history_blobs,
                    "bytes": space.history_bytes, "stored_bytes": space.history_stored_bytes},
        "reclaimable": {"versions": space.reclaimable_versions,
                        "blobs": space.reclaimable_blobs, "bytes": space.reclaimable_bytes,
                        "stored_bytes": space.reclaimable_stored_bytes},
        "dedup_ratio": _ratio(totals.logical_bytes, space.live_unique_bytes),
        "compression_ratio": _ratio(space.live_unique_bytes, space.live_stored_bytes),
        "space_ratio": _ratio(totals.logical_bytes, space.live_stored_bytes),
    }
    if shared:  # a manifest on PostgreSQL: the mounts serving it
        result["sessions"] = _sessions_json(sessions)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"artifacts     {totals.artifacts} in {totals.executions} executions, "
               f"{totals.layers} layers; {totals.versions} versions in all")
    click.echo(f"live          {human_size(totals.logical_bytes)} logical, "
               f"{human_size(space.live_unique_bytes)} unique, "
               f"{human_size(space.live_stored_bytes)} stored in {space.live_blobs} blobs")
    click.echo(f"ratios        dedup {result['dedup_ratio']:.2f} (logical/unique), compression "
               f"{result['compression_ratio']:.2f} (unique/stored), "
               f"{result['space_ratio']:.2f} logical bytes per stored byte")
    click.echo(f"history       {space.history_versions} old versions; "
               f"{human_size(space.history_bytes)} in {space.history_blobs} blobs only they "
               f"hold, {human_size(space.history_stored_bytes)} stored")
    click.echo(f"gc reclaims   {human_size(space.reclaimable_stored_bytes)} stored: "
               f"{space.reclaimable_blobs} blobs, {space.reclaimable_versions} versions of "
               "deleted artifacts (orphan blob files aside: cafs fsck lists them)")
    click.echo(f"on disk       {human_size(totals.stored_bytes)} in {totals.blobs} blobs")
    if shared:
        _echo_sessions(sessions)


def _dir_stats(path: str, store: Path | None, config: Path | None, as_json: bool) -> None:
    root, rel = cli_admin.locate(path, store, config)
    with open_store(root, config) as opened:
        node = opened.manifest.resolve(rel)
        if node is None or not node.kind.is_dir:
            fail(f"{path}: no such execution, layer or directory", EXIT_FAILED)
        found = opened.manifest.sharing_stats(node.ino)
    result = {"path": rel, "artifacts": found.artifacts, "logical_bytes": found.logical_bytes,
              "unique_bytes": found.unique_bytes,
              "unique_stored_bytes": found.unique_stored_bytes}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{rel}: {found.artifacts} artifacts, {human_size(found.logical_bytes)}")
    click.echo(f"held only here   {human_size(found.unique_bytes)}  "
               f"({human_size(found.unique_stored_bytes)} stored: what deleting it and gc "
               "would reclaim)")


@cli.command()
@store_option
@config_option
@click.option("--port", type=click.IntRange(0, 65535), default=8457, show_default=True,
              help="TCP port (0: any free one; the URL is printed).")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback lets others read the store.")
@json_option
def ui(store: Path | None, config: Path | None, port: int, bind: str, as_json: bool) -> None:
    """Serve a read-only web view of the store: executions, layers, artifacts and their
    history (with downloads), contents, sharing between runs, what gc would reclaim.

    Reads through the daemon when the store is mounted, else the manifest read-only; never
    changes anything. Runs until interrupted (^C).

    Example: cafs ui --store /srv/cafs --port 8457
    """
    from cafs.ui.server import is_loopback, serve  # jinja2 only for this command
    from cafs.ui.source import Source

    settings = settings_from(config)
    root = resolve_store(store, settings)
    with errors_as_exit_codes():
        prepare_store_dir(root, create=False)
        if manifest_location(root) is not None:
            raise StoreError(f"store {root} keeps its manifest on PostgreSQL; cafs ui reads "
                             "manifest.sqlite stores only")
        source = Source(root, blobs_spec(settings))
        source.query("fingerprint")  # a store that cannot be read fails here, in one line
    if not is_loopback(bind):
        click.echo(f"cafs ui: warning: listening on {bind}: anyone who can reach it reads "
                   "every path, hash, tag and content of the store", err=True)

    def ready(url: str) -> None:
        if as_json:  # a script learns the URL (the port, with --port 0) from one document
            click.echo(json.dumps({"store": str(root), "url": url}))
            sys.stdout.flush()
            return
        click.echo(f"cafs ui: serving {root} at {url} (read-only; ^C to stop)")

    with errors_as_exit_codes(EXIT_FAILED):
        try:
            serve(source, bind, port, ready)
        except KeyboardInterrupt:
            return


def _ratio(numerator: int, denominator: int) -> float:
    return round(numerator / denominator, 3) if denominator else 1.0


for _command in cli_admin.COMMANDS:
    cli.add_command(_command)


def helper_form(argv: list[str]) -> list[str]:
    """mount(8) runs `cafs STORE MOUNTPOINT -o OPTS` (via mount.fuse3): make it `cafs mount`.

    Only when the first word names a store (a path, or with mount options): a mistyped command
    (`cafs unmount /mnt`) gets click's "No such command" and its suggestion, not a mount of a
    store called "unmount"."""
    commands = cli.commands  # type: ignore[attr-defined]
    first = argv[0] if argv else ""
    if (len(argv) >= 2 and first not in commands and not first.startswith("-")
            and ("/" in first or os.path.exists(first) or "-o" in argv[2:])):
        return ["mount", "--store", first, *argv[1:]]
    return argv


def main() -> None:
    # The one place where any failure, of a command or of click's own output (--help into a
    # full disk), becomes one line and an exit code.
    with errors_as_exit_codes(EXIT_FAILED):
        cli(args=helper_form(sys.argv[1:]), prog_name="cafs")

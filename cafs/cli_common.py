"""What every `cafs` command shares: exit codes, error messages, store and config options.

Exit codes (documented in the README):

    0  success
    1  the command failed (fsck: damage found); the message says why
    2  usage error (bad arguments or options)
    3  store error: missing, in use by another daemon, unreadable, or placed inside the mountpoint
    4  mount error: mountpoint missing or busy, FUSE unavailable, daemon failed to start
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import click

from cafs.blobstore import BlobsSpec
from cafs.config import Settings, load_settings
from cafs.errors import CafsError, ManifestError, MountError, StoreError

# The mount table is read in cafs.mountpoint; the commands import it from here.
from cafs.mountpoint import find_mount as find_mount
from cafs.mountpoint import mounts_of_type as mounts_of_type
from cafs.options import check_manifest_location
from cafs.store import Store, default_store_path, real_store_path

EXIT_FAILED = 1
EXIT_USAGE = 2  # as click answers a bad option
EXIT_STORE = 3
EXIT_MOUNT = 4


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"cafs: {message}", err=True)
    sys.exit(code)


@contextmanager
def errors_as_exit_codes(command_failure: int = EXIT_STORE) -> Iterator[None]:
    """One line on stderr and an exit code for every failure: never a traceback. The whole
    command line runs inside this (cafs.cli.main); a command wraps a part of itself to give
    that part's failures another code."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise  # usage errors, --help and ^C: click reports them
    except MountError as exc:
        fail(str(exc), EXIT_MOUNT)
    except StoreError as exc:
        fail(str(exc), EXIT_STORE)
    except ManifestError as exc:  # the manifest could not be read or written
        fail(f"the store's manifest failed: {exc}", EXIT_STORE)
    except CafsError as exc:
        fail(str(exc), command_failure)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # stdout closed early (| head): click ends quietly
            raise
        fail(describe_os_error(exc), command_failure)
    except Exception as exc:  # a bug: one line here, the whole traceback in a daemon's log
        if logging.getLogger().handlers:
            logging.getLogger(__name__).exception("unexpected error")
        fail(f"unexpected error ({type(exc).__name__}: {exc}); please report it",
             EXIT_FAILED)


def describe_os_error(exc: OSError) -> str:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        reason = "too many open files (raise the descriptor limit, ulimit -n)"
    else:
        reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def stdout_bytes() -> BinaryIO:
    """Standard output for bytes (cat, export -o -); a clear error if it is closed."""
    if sys.stdout is None:
        raise CafsError("standard output is closed", errno.EBADF)
    return sys.stdout.buffer


_store_option = click.option(
    "--store", "store", type=click.Path(path_type=Path, readable=False), default=None,
    help="Store directory (default: $CAFS_STORE, else the configuration file's store, "
         "else $XDG_DATA_HOME/cafs).",
)


def _take_manifest(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--manifest URL: checked (no password in it), then handed on as $CAFS_MANIFEST, which
    every opener of the store reads (cafs.store.manifest_location) and a daemon inherits."""
    if value:
        try:
            os.environ["CAFS_MANIFEST"] = check_manifest_location(value)
        except CafsError as exc:
            raise click.UsageError(str(exc)) from None


_manifest_option = click.option(
    "--manifest", type=str, default=None, expose_value=False, is_eager=True,
    callback=_take_manifest, metavar="URL",
    help="The manifest on PostgreSQL: postgresql://USER@HOST:PORT/DB, the password from "
         "PGPASSWORD or a password file (default: $CAFS_MANIFEST, else the configuration "
         "file's manifest, else the one the store recorded, else <store>/manifest.sqlite).")


def store_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--store and --manifest: where the store is, and where its manifest is."""
    return _store_option(_manifest_option(command))


_config_flag = click.option(
    "--config", "config", type=click.Path(path_type=Path), default=None,
    help="Configuration file (default: $CAFS_CONFIG, else for root /etc/cafs/cafs.toml, for "
         "other users ~/.config/cafs/cafs.toml, if present; cafs status shows which).",
)
# Where the blobs live: every command that opens a store takes these beside --config, and
# they override its keys (kept in the click context: settings_from applies them).
BLOB_FLAGS = ("blobs", "cache_dir", "cache_size")


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> None:
    if value is not None and param.name is not None:
        ctx.meta[f"cafs.{param.name}"] = value


_blob_flags = (
    click.option("--blobs", type=str, default=None, expose_value=False, callback=_remember,
                 metavar="URL", help="Blobs on S3: s3://BUCKET/PREFIX?endpoint=URL "
                 "(default: the configuration file's blobs, else the store's blobs/)."),
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                 expose_value=False, callback=_remember,
                 help="The local cache of blobs on S3 (default: <store>/cache)."),
    click.option("--cache-size", type=click.IntRange(min=0), default=None, expose_value=False,
                 callback=_remember, metavar="BYTES",
                 help="Bytes the cache of blobs on S3 may hold (default 10 GiB)."),
)


def config_option(command: Any) -> Any:
    """--config, and the flags saying where the blobs live (--blobs, --cache-dir,
    --cache-size)."""
    for flag in reversed(_blob_flags):
        command = flag(command)
    return _config_flag(command)


def settings_from(config: Path | None) -> Settings:
    """The defaults, then the configuration file, then the blob flags given."""
    try:
        settings = load_settings(config)
    except CafsError as exc:
        raise click.UsageError(str(exc)) from None
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        given = {name: ctx.meta[f"cafs.{name}"] for name in BLOB_FLAGS
                 if f"cafs.{name}" in ctx.meta}
        settings = replace(settings, **given)
    if settings.manifest and not os.environ.get("CAFS_MANIFEST"):  # --manifest goes first
        os.environ["CAFS_MANIFEST"] = settings.manifest
    if os.environ.get("CAFS_MANIFEST"):  # set by hand, it has not met --manifest's check
        try:
            check_manifest_location(os.environ["CAFS_MANIFEST"])
        except CafsError as exc:
            raise click.UsageError(str(exc)) from None
    if settings.blobs:  # refused here, before the URL goes anywhere (a child's argv, a log)
        from cafs.blobstore.s3_objects import S3Location

        try:
            S3Location.parse(settings.blobs)
        except CafsError as exc:
            raise click.UsageError(str(exc)) from None
    return settings


def current_settings() -> Settings:
    """settings_from the --config of the command being run (if any)."""
    ctx = click.get_current_context(silent=True)
    config = ctx.params.get("config") if ctx is not None else None
    return settings_from(config if isinstance(config, Path) else None)


def blobs_spec(settings: Settings) -> BlobsSpec:
    return BlobsSpec(settings.blobs, settings.cache_dir, settings.cache_size)


def resolve_store(store: Path | None, settings: Settings) -> Path:
    """--store, else $CAFS_STORE, else the configuration file, else the per-user default; its
    real path, the only one used from here on (see real_store_path)."""
    return store_source(store, settings)[0]


def store_source(store: Path | None, settings: Settings) -> tuple[Path, str]:
    """The store resolve_store gives, and where it comes from (for `cafs status`)."""
    if store is not None:
        return real_store_path(store), "--store"
    if os.environ.get("CAFS_STORE"):
        return real_store_path(default_store_path()), "$CAFS_STORE"
    if settings.store is not None:
        return real_store_path(settings.store), "the configuration file"
    return real_store_path(default_store_path()), "the default for this user"


def resolve_mountpoint(mountpoint: Path | None, settings: Settings) -> Path:
    mountpoint = mountpoint or settings.mountpoint
    if mountpoint is None:
        raise click.UsageError("no MOUNTPOINT given and none in the configuration file")
    return mountpoint.absolute()


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


@contextmanager
def open_store(store: Path | None, config: Path | None) -> Iterator[Store]:
    settings = settings_from(config)
    with errors_as_exit_codes():
        opened = Store.open(resolve_store(store, settings), create=False,
                            blobs=blobs_spec(settings))
        try:
            yield opened
        finally:
            opened.close()

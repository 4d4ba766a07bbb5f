"""The table of cafs's settings: every option once, with where it may be set and its default.

Owns: `Settings` — each field is one option, and its `option(...)` says whether the
configuration file may set it (the key is the field's name), whether `-o NAME[=VALUE]` may set
it at mount time, the command-line flag that overrides it, its unit and its help. The
configuration loader (cafs.config), the mount command's help and the daemon's child command line
(cafs.cli) and the `-o` parser below are all driven by this table, so a new option is one field
here plus the code that uses it. Also owns `MountConfig`, what the daemon is started with.
Stdlib only (and the defaults of cafs.rules); must not read files or know click, pyfuse3 or trio.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import parse_qsl, unquote, urlsplit

from cafs.errors import InvalidArgument
from cafs.rules import DEFAULT_MAX_ARTIFACT_SIZE


@dataclass(frozen=True)
class Option:
    """One row of the table, as read from a `Settings` field."""

    name: str  # the field of Settings; also the configuration key and the -o name
    kind: type  # bool, int or Path (a TOML string)
    default: Any
    help: str
    unit: str  # what a value counts, shown as `-o name=UNIT`; "" for a switch
    in_file: bool  # the configuration file may set it
    mount: bool  # `-o` may set it (a bool as `-o name`, an int as `-o name=N`)
    flag: str | None  # the command-line flag or argument that overrides the file

    @property
    def config_key(self) -> str | None:
        return self.name if self.in_file else None

    @property
    def mount_name(self) -> str | None:
        return self.name if self.mount else None

    @property
    def file_type(self) -> type:
        """What the TOML value must be (a path is a string there)."""
        return str if self.kind is Path else self.kind


def option(default: Any, help: str, *, unit: str = "", in_file: bool = True,
           mount: bool = False, flag: str | None = None) -> Any:
    """A Settings field that is a row of the table (see Option for the columns)."""
    return field(default=default, metadata={"cafs.option": (help, unit, in_file, mount, flag)})


@dataclass(frozen=True)
class Settings:
    """Every option's value: its default, over which the configuration file, over which the
    command line. None where the default is decided elsewhere (noted in its help)."""

    # (ruff's RUF009 takes option() for a shared mutable default: it is dataclasses.field.)
    store: Path | None = option(  # noqa: RUF009
        None, "the store directory (default: $CAFS_STORE, else $XDG_DATA_HOME/cafs)",
        flag="--store")
    mountpoint: Path | None = option(  # noqa: RUF009
        None, "where `cafs mount` mounts without an argument", flag="MOUNTPOINT")
    allow_other: bool = option(
        False, "let other users use the mount; file permissions still apply", mount=True)
    compression: int = option(  # cafs.blobstore.DEFAULT_LEVEL (options load without zstd)
        1, "zstd level for compressible content, default 1 (negative: faster, less "
        "compressed; 0: every blob stored raw)", unit="N", mount=True)
    max_artifact_size: int = option(
        DEFAULT_MAX_ARTIFACT_SIZE, "larger writes get EFBIG, default 256 GiB", unit="BYTES",
        mount=True)
    max_open_files: int | None = option(
        None, "descriptors: 2 per file open for writing; default: the descriptor limit less "
        "256", unit="N", mount=True)
    backup_interval: int = option(
        3600, "manifest backups, default 3600; 0: only at unmount", unit="SECONDS",
        in_file=False, mount=True)
    sync_interval: int = option(
        5, "group sync: every SECONDS, blobs and manifest written since are made durable "
        "(power loss takes at most that much of what was closed but not fsynced), default 5; "
        "0: fsync every file at close", unit="SECONDS", mount=True)
    nonempty: bool = option(
        False, "mount even on a directory that holds files or is already mounted",
        in_file=False, mount=True, flag="--nonempty")
    blobs: str | None = option(
        None, "where blob contents live: s3://BUCKET/PREFIX?endpoint=URL (credentials from "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ?credentials=FILE, never in the URL); "
        "default: the store's blobs/ directory", flag="--blobs")
    cache_dir: Path | None = option(  # noqa: RUF009
        None, "the local cache of blobs stored on S3 (default: <store>/cache)",
        flag="--cache-dir")
    cache_size: int | None = option(
        None, "bytes the cache of blobs stored on S3 may hold (default 10 GiB)", unit="BYTES",
        flag="--cache-size")
    manifest: str | None = option(
        None, "the manifest on PostgreSQL, postgresql://USER@HOST:PORT/DB (no password: from "
        "PGPASSWORD, a service or password file); default: manifest.sqlite in the store",
        flag="--manifest")
    orphan_grace: int | None = option(
        None, "gc and fsck --repair keep orphan blob files this long (default 7 days)",
        unit="SECONDS", flag="--orphan-grace")
    session_timeout: int = option(
        60, "a manifest on PostgreSQL: a mount whose heartbeats stop this long is dead, and "
        "any other host removes the files it left unfinished; default 60", unit="SECONDS",
        mount=True)
    gc_grace: int = option(
        3600, "a manifest on PostgreSQL: gc deletes a blob only this long after its last "
        "reference went (and orphan objects only once this old); default 3600",
        unit="SECONDS")


def check_manifest_location(value: str) -> str:
    """A manifest location as given (flag, environment, file): a postgresql:// URL without a
    password in it (a password in argv or a file others read is a password for everyone, and
    URLs end up in logs): the password comes from PGPASSWORD, a service or a password file."""
    parts = urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidArgument(f"manifest: {value!r} is not a postgresql://USER@HOST:PORT/DB URL")
    # Keys as libpq reads them: percent-decoded (passw%6Frd= is password=); sslpassword too.
    keys = {unquote(key).lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    secret = any(key.endswith("password") for key in keys) \
        or ":" in unquote(parts.netloc.rpartition("@")[0])
    if secret:
        raise InvalidArgument(
            "manifest: the URL holds a password; give it through PGPASSWORD, a libpq service "
            "(PGSERVICEFILE) or password file (PGPASSFILE, ~/.pgpass) instead")
    return value


def _value_type(annotation: Any) -> type:
    """int for `int | None`, Path for `Path | None`."""
    if isinstance(annotation, types.UnionType):
        (kind,) = [arg for arg in annotation.__args__ if arg is not type(None)]
        return kind  # type: ignore[no-any-return]
    return annotation  # type: ignore[no-any-return]


def _rows() -> tuple[Option, ...]:
    hints = get_type_hints(Settings)
    rows = []
    for item in fields(Settings):
        help, unit, in_file, mount, flag = item.metadata["cafs.option"]
        row = Option(item.name, _value_type(hints[item.name]), item.default, help, unit,
                     in_file, mount, flag)
        # The -o parser knows switches and whole numbers only.
        assert not row.mount or row.kind in (bool, int), row
        rows.append(row)
    return tuple(rows)


OPTIONS: tuple[Option, ...] = _rows()
FILE_KEYS = {row.config_key: row for row in OPTIONS if row.config_key is not None}
MOUNT_OPTIONS = {row.mount_name: row for row in OPTIONS if row.mount_name is not None}

# Generic mount(8)/fstab options that say nothing to cafs: accepted and ignored.
IGNORED_OPTIONS = {"defaults", "rw", "auto", "noauto", "user", "nouser", "users", "nofail",
                   "_netdev", "dev", "suid", "exec", "noexec", "async", "atime", "noatime",
                   "relatime", "nodev", "nosuid", "default_permissions"}


@dataclass(frozen=True)
class MountConfig:
    """What the daemon is started with: where, and the settings in force."""

    store: Path
    mountpoint: Path
    settings: Settings = Settings()
    config: Path | None = None  # the configuration file the settings came from, if any


def _mount_form(row: Option) -> str:
    return row.name if row.kind is bool else f"{row.name}={row.unit}"


def mount_options_help() -> str:
    """The help of `cafs mount -o`."""
    listed = ", ".join(f"{_mount_form(row)} ({row.help})" for row in MOUNT_OPTIONS.values())
    return f"Mount options, comma-separated: {listed}; generic fstab options are ignored."


# Mount options whose number may be negative: zstd's fast levels.
SIGNED_OPTIONS = frozenset({"compression"})


def parse_mount_options(option_lists: list[str], settings: Settings) -> Settings:
    """`settings` with `-o a,b,c` lists applied; unknown options are an error."""
    changes: dict[str, Any] = {}
    for option in ",".join(option_lists).split(","):
        option = option.strip()
        if not option or option in IGNORED_OPTIONS or option.startswith("x-systemd."):
            continue
        name, equals, value = option.partition("=")
        row = MOUNT_OPTIONS.get(name)
        # A switch takes no value and a number needs one: `allow_other=1` is unknown.
        if row is None or (row.kind is bool) == bool(equals):
            raise InvalidArgument(f"unknown mount option: {option}")
        if row.kind is bool:
            changes[name] = True
        elif not (value.removeprefix("-") if name in SIGNED_OPTIONS else value).isdigit():
            raise InvalidArgument(f"mount option {name} needs a whole number: {option}")
        else:
            changes[name] = int(value)
    return replace(settings, **changes)


def mount_option_args(settings: Settings) -> list[str]:
    """`-o` arguments that give a child `cafs mount` every mount option of `settings`: it then
    needs no configuration file. The inverse of parse_mount_options."""
    args = []
    for row in MOUNT_OPTIONS.values():
        value = getattr(settings, row.name)
        if value is None or value is False:
            continue
        args += ["-o", row.name if value is True else f"{row.name}={value}"]
    return args

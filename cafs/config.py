"""The configuration file: `--config FILE`, else `$CAFS_CONFIG`, else for root the system's
`/etc/cafs/cafs.toml`, for any other user their own `$XDG_CONFIG_HOME/cafs/cafs.toml`.

The system file configures the service (its units name it with --config) and the operator's
commands as root; it never becomes the defaults of another user's `cafs mount`: its store is
root's, which cafs refuses to open for anyone else anyway, and a developer must not find their
mount placed, shared (allow_other) or sized by a file they never named.

Owns: finding, reading and validating the file. Which keys it may hold, their types and
defaults are the table in cafs.options (systemd/cafs.toml is a commented example). Command-line
flags override the file; an empty CAFS_CONFIG means "no configuration file". Must not know the
command line or the daemon. Stdlib only (tomllib).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from cafs.errors import InvalidArgument
from cafs.options import FILE_KEYS, Settings, check_manifest_location

DEFAULT_CONFIG = Path("/etc/cafs/cafs.toml")

__all__ = ["DEFAULT_CONFIG", "Settings", "config_path", "config_source", "load_settings",
           "system_config", "user_config"]


def system_config() -> Path:
    """/etc/cafs/cafs.toml; $CAFS_SYSTEM_CONFIG moves it (a staged install, the tests)."""
    return Path(os.environ.get("CAFS_SYSTEM_CONFIG") or DEFAULT_CONFIG)


def user_config() -> Path:
    home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(home) / "cafs" / "cafs.toml"


def config_source(explicit: Path | None) -> tuple[Path | None, str]:
    """The configuration file in force, and why it is that one (for `cafs status`)."""
    if explicit is not None:
        return explicit, "--config"
    if "CAFS_CONFIG" in os.environ:
        value = os.environ["CAFS_CONFIG"]
        return (Path(value), "$CAFS_CONFIG") if value else (None, "$CAFS_CONFIG is empty")
    if os.geteuid() == 0:
        found, why = system_config(), "the system configuration (running as root)"
    else:
        found, why = user_config(), "this user's configuration"
    return (found, why) if found.exists() else (None, f"no {found}")


def config_path(explicit: Path | None) -> Path | None:
    return config_source(explicit)[0]


def load_settings(explicit: Path | None = None) -> Settings:
    path = config_path(explicit)
    if path is None:
        return Settings()
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise InvalidArgument(f"configuration file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"configuration file {path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        row = FILE_KEYS.get(key)
        if row is None:
            raise InvalidArgument(f"configuration file {path}: unknown setting {key!r}")
        expected = row.file_type
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise InvalidArgument(
                f"configuration file {path}: {key} must be a {expected.__name__}")
        if key == "manifest":
            try:
                check_manifest_location(str(value))
            except InvalidArgument as exc:
                raise InvalidArgument(f"configuration file {path}: {exc}") from None
        values[key] = row.kind(value)  # a string to a Path; the rest as they are
    return Settings(**values)

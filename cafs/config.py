"""The configuration file: `/etc/cafs/cafs.toml`, `$CAFS_CONFIG`, or `--config FILE`.

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
from cafs.options import FILE_KEYS, Settings

DEFAULT_CONFIG = Path("/etc/cafs/cafs.toml")

__all__ = ["DEFAULT_CONFIG", "Settings", "config_path", "load_settings"]


def config_path(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    if "CAFS_CONFIG" in os.environ:
        value = os.environ["CAFS_CONFIG"]
        return Path(value) if value else None
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


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
        values[key] = row.kind(value)  # a string to a Path; the rest as they are
    return Settings(**values)

"""The configuration file: `/etc/cafs/cafs.toml`, `$CAFS_CONFIG`, or `--config FILE`.

Owns: reading and validating settings. Command-line flags override the file; an empty
CAFS_CONFIG means "no configuration file". Stdlib only (tomllib).

    store = "/var/lib/cafs"          # the store directory
    mountpoint = "/mnt/cafs"         # where `cafs mount` mounts without an argument
    allow_other = true               # let other users see the mount (permissions still apply)
    compression = 3                  # zstd level for compressible content
    max_artifact_size = 274877906944  # 256 GiB
    max_open_files = 10000           # descriptors of open files (default: the fd limit less 256)
    orphan_grace = 604800            # gc and fsck --repair keep orphan blob files this many seconds
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cafs.errors import InvalidArgument

DEFAULT_CONFIG = Path("/etc/cafs/cafs.toml")
_KEYS = {"store": str, "mountpoint": str, "allow_other": bool, "compression": int,
         "max_artifact_size": int, "max_open_files": int, "orphan_grace": int}


@dataclass(frozen=True)
class Settings:
    store: Path | None = None
    mountpoint: Path | None = None
    allow_other: bool = False
    compression: int | None = None
    max_artifact_size: int | None = None
    max_open_files: int | None = None
    orphan_grace: int | None = None


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
    for key, value in data.items():
        expected = _KEYS.get(key)
        if expected is None:
            raise InvalidArgument(f"configuration file {path}: unknown setting {key!r}")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise InvalidArgument(
                f"configuration file {path}: {key} must be a {expected.__name__}")
    return Settings(
        store=Path(data["store"]) if "store" in data else None,
        mountpoint=Path(data["mountpoint"]) if "mountpoint" in data else None,
        allow_other=data.get("allow_other", False),
        compression=data.get("compression"),
        max_artifact_size=data.get("max_artifact_size"),
        max_open_files=data.get("max_open_files"),
        orphan_grace=data.get("orphan_grace"),
    )

"""The table of settings (cafs.options) agrees with what drives and documents it: the sample
configuration file loads, every key and mount option is documented, the flags it names exist,
and a daemon's child command line carries every mount option across."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from cafs.cli import cli
from cafs.config import load_settings
from cafs.errors import InvalidArgument
from cafs.options import (
    FILE_KEYS,
    MOUNT_OPTIONS,
    OPTIONS,
    Settings,
    mount_option_args,
    mount_options_help,
    parse_mount_options,
)

ROOT = Path(__file__).resolve().parent.parent


def test_the_sample_configuration_file_loads() -> None:
    sample = load_settings(ROOT / "systemd" / "cafs.toml")
    assert sample.store == Path("/var/lib/cafs") and sample.allow_other


def test_every_key_and_mount_option_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in FILE_KEYS:
        assert f"`{name}`" in readme, f"configuration key {name} is not in README.md"
    for row in MOUNT_OPTIONS.values():
        form = row.name if row.kind is bool else f"{row.name}={row.unit}"
        assert f"`{form}`" in readme, f"mount option {form} is not in README.md"
        assert form in mount_options_help()


def test_the_flags_the_table_names_exist() -> None:
    params = {param.opts[0] if isinstance(param, click.Option) else param.name.upper()
              for command in cli.commands.values()  # type: ignore[attr-defined]
              for param in command.params if param.name}
    for row in OPTIONS:
        assert row.flag is None or row.flag in params, f"{row.name}: no {row.flag} in the CLI"


@pytest.mark.parametrize("settings", [
    Settings(),
    Settings(allow_other=True, compression=19, max_artifact_size=1 << 40, max_open_files=7,
             backup_interval=0),
    Settings(compression=-5),  # zstd's fast levels: a configuration file's reaches the child
    Settings(compression=0),  # every blob raw
])
def test_a_child_mount_gets_every_mount_option(settings: Settings) -> None:
    args = mount_option_args(settings)
    assert args[::2] == ["-o"] * (len(args) // 2)
    assert parse_mount_options(args[1::2], Settings()) == settings


def test_only_the_compression_level_may_be_negative() -> None:
    assert parse_mount_options(["compression=-7"], Settings()).compression == -7
    for option in ("max_open_files=-5", "sync_interval=-1", "compression=-", "compression=1.5"):
        with pytest.raises(InvalidArgument, match="needs a whole number"):
            parse_mount_options([option], Settings())


def test_the_default_compression_is_the_blob_stores_default_level() -> None:
    """Written twice (options load without zstd): the two must agree."""
    from cafs.blobstore import DEFAULT_LEVEL

    assert Settings().compression == DEFAULT_LEVEL

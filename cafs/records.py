"""The `.record.json` of layers and executions: what the manifest knows about a directory.

Owns: the record's fields and their JSON form. Computed from aggregate queries (no per-artifact
rows reach Python), so a layer of 100,000 artifacts costs one query. Must not know FUSE.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from cafs.manifest import DirStats, Manifest
from cafs.model import Kind, Node

RECORD_FORMAT = 1


def iso_time(ns: int | None) -> str | None:
    if ns is None:
        return None
    moment = datetime.fromtimestamp(ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stats_fields(stats: DirStats, sharing: bool) -> dict[str, Any]:
    return {
        "artifacts": stats.artifacts,
        "logical_bytes": stats.logical_bytes,
        "unique_bytes": stats.unique_bytes if sharing else None,
        "unique_stored_bytes": stats.unique_stored_bytes if sharing else None,
        "first_write": iso_time(stats.first_write_ns),
        "last_write": iso_time(stats.last_write_ns),
    }


def _tags(manifest: Manifest, node: Node) -> dict[str, str]:
    return {name: value.decode("utf-8", "replace")
            for name, value in manifest.tags_of(node.ino).items()}


def build_record(manifest: Manifest, directory: Node, execution: Node, *, sharing: bool = True,
                 root: bool = True) -> bytes:
    """The record of a layer or an execution directory, as UTF-8 JSON ending in a newline.

    Who reads it decides two parts (see Vfs.sees_sharing): without `sharing`, the unique bytes
    (which tell whether content is held elsewhere) are null; without `root`, so is the root
    hash of a sealed run."""
    record: dict[str, Any] = {"format": RECORD_FORMAT, "kind": directory.kind.value,
                              "execution": execution.name}
    if directory.kind is Kind.LAYER:
        record["layer"] = directory.name
    record["path"] = manifest.path_of(directory.ino)
    record.update(_stats_fields(manifest.dir_stats(directory.ino), sharing))
    record["sealed"] = execution.sealed_ns is not None
    record["sealed_at"] = iso_time(execution.sealed_ns)
    record["root_sha256"] = manifest.root_of(execution.ino) if root else None
    if directory.kind is Kind.EXECUTION:
        layers, after = [], 0
        while page := manifest.children(directory.ino, after, 512):
            layers += [{"name": layer.name,
                        **_stats_fields(manifest.dir_stats(layer.ino), sharing)}
                       for layer in page]
            after = page[-1].ino
        record["layers"] = sorted(layers, key=lambda layer: layer["name"])
    record["tags"] = _tags(manifest, directory)
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode()

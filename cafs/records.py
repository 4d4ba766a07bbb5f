"""The `.record.json` of layers and executions: what the manifest knows about a directory.

Owns: the record's fields and their JSON form. Built from the aggregate columns the manifest
keeps on every directory (schema m004): a layer's record is a few indexed reads whatever it holds,
an execution's one more per layer. Its size is bounded apart from the list of layers: tags beyond
RECORD_TAG_BYTES are left out (getfattr reads them), never multiplied in memory. Must not know
FUSE.

Who reads a record decides what it sums: directories below it that the reader may not list
(cafs.visibility) are left out, their names and their totals, as `ls` and `du` cannot see into
them either; `unlisted_directories` says how many (each is in plain sight in `ls -l` of its
parent, so the count tells no more).

What a record must not carry: anything that needs every artifact below the directory, like the
bytes only this directory holds ("unique bytes"): they depend on every other directory holding
the same contents, so no aggregate keeps them exactly, and they tell the reader whether content
elsewhere, perhaps unreadable to them, equals theirs. `cafs stats PATH` computes them for the
store's owner, outside the daemon.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from cafs.manifest_api import DirStats, Manifest
from cafs.model import Kind, Node

# 2: unique_bytes and unique_stored_bytes left records for `cafs stats PATH`; tags_omitted.
# 3: totals of what the reader may list only; unlisted_directories.
RECORD_FORMAT = 3
# JSON bytes of tags a record carries at most; a tag that does not fit is counted in
# "tags_omitted". Bounds the record whatever the tags (a binary value escapes to up to 6 bytes
# per byte in JSON).
RECORD_TAG_BYTES = 64 * 1024


def iso_time(ns: int | None) -> str | None:
    if ns is None:
        return None
    moment = datetime.fromtimestamp(ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stats_fields(stats: DirStats) -> dict[str, Any]:
    return {
        "artifacts": stats.artifacts,
        "logical_bytes": stats.logical_bytes,
        "first_write": iso_time(stats.first_write_ns),
        "last_write": iso_time(stats.last_write_ns),
    }


def _tags(manifest: Manifest, node: Node, budget: int) -> tuple[dict[str, str], int]:
    """The node's tags as text, in name order, while their JSON fits `budget` bytes; and how
    many were left out. Values larger than what is left are not even fetched."""
    tags: dict[str, str] = {}
    omitted = 0
    for name, value in manifest.tags_up_to(node.ino, budget):
        if value is None:
            omitted += 1
            continue
        text = value.decode("utf-8", "replace")
        cost = len(json.dumps({name: text}, ensure_ascii=False).encode())
        if cost > budget:
            omitted += 1
            continue
        tags[name] = text
        budget -= cost
    return tags, omitted


def build_record(manifest: Manifest, directory: Node, execution: Node, *,
                 root: bool = True, unlisted: tuple[int, ...] = ()) -> bytes:
    """The record of a layer or an execution directory, as UTF-8 JSON ending in a newline.

    Who reads it decides two parts (see Visibility.shows_root and Visibility.unlisted_below):
    without `root`, the root hash of a sealed run is null (with the hashes of the files a reader
    can read, it would test guesses of those they cannot); the directories in `unlisted` (below
    this one, none inside another) are left out of every total and of the list of layers."""
    record: dict[str, Any] = {"format": RECORD_FORMAT, "kind": directory.kind.value,
                              "execution": execution.name}
    if directory.kind is Kind.LAYER:
        record["layer"] = directory.name
    record["path"] = manifest.path_of(directory.ino)
    seen = manifest.visible_stats(directory.ino, unlisted) if unlisted else {}

    def stats(ino: int) -> DirStats:
        return seen.get(ino) or manifest.dir_stats(ino)

    record.update(_stats_fields(stats(directory.ino)))
    record["unlisted_directories"] = len(unlisted)
    record["sealed"] = execution.sealed_ns is not None
    record["sealed_at"] = iso_time(execution.sealed_ns)
    record["root_sha256"] = manifest.root_of(execution.ino) if root else None
    if directory.kind is Kind.EXECUTION:
        layers, after = [], 0
        while page := manifest.children(directory.ino, after, 512):
            layers += [{"name": layer.name, **_stats_fields(stats(layer.ino))}
                       for layer in page if layer.ino not in unlisted]
            after = page[-1].ino
        record["layers"] = sorted(layers, key=lambda layer: layer["name"])
    record["tags"], record["tags_omitted"] = _tags(manifest, directory, RECORD_TAG_BYTES)
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode()

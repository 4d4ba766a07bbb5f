"""Column tuples of the SQLite manifest: the one place a record's columns are listed.

Owns: for each record read from rows (Node, BlobRef, Version, DirStats) one tuple of
(record field, SQL expression) from which both the SELECT list and the decoding of its rows are
built, so a column added or moved cannot leave a decoder reading by a stale position; the
INSERT statements, each built from one tuple of column names and written once; the SQL
fragments several parts share. Must not run a statement or hold a connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from cafs.manifest_api import DirStats
from cafs.model import BlobRef, Kind, Node, Version
from cafs.schema import LEAF_KINDS

R = TypeVar("R")
T = TypeVar("T")


class Shape(Generic[R]):
    """A record read from a row: its fields, each with the SQL expression that yields it.

    `decode(row, *takes)` is compiled once from the same tuple (a keyword per field, converters
    inline, the row read from `offset` on; `takes` are fields the caller supplies, such as a
    node's blob): a node is decoded on every lookup and every entry of a listing, and a generic
    loop over the fields costs about half as much again."""

    def __init__(self, make: Callable[..., R], fields: tuple[tuple[str, str], ...],
                 convert: Mapping[str, Callable[[Any], Any]] | None = None, *,
                 offset: int = 0, takes: tuple[str, ...] = ()) -> None:
        self.fields = fields
        self.make = make
        self.names = tuple(name for name, _ in fields)
        self.select = ", ".join(sql for _, sql in fields)
        self.width = len(fields)
        self.convert = dict(convert or {})
        unknown = set(self.convert) - set(self.names)
        if unknown:
            raise ValueError(f"converters for fields not in the tuple: {sorted(unknown)}")
        arguments = [f"{name}=convert_{name}(row[{offset + index}])" if name in self.convert
                     else f"{name}=row[{offset + index}]" for index, name in enumerate(self.names)]
        arguments += [f"{name}={name}" for name in takes]
        scope: dict[str, Any] = {"make": make,
                                 **{f"convert_{name}": fn for name, fn in self.convert.items()}}
        parameters = "".join(f", {name}" for name in takes)
        exec(f"def decode(row{parameters}):\n    return make({', '.join(arguments)})\n", scope)
        self.decode: Callable[..., R] = scope["decode"]

    def at(self, offset: int) -> Shape[R]:
        """The same record, read from a row where its columns start at `offset`."""
        return Shape(self.make, self.fields, self.convert, offset=offset)


def _is_set(value: object) -> bool:
    return value is not None


# A node's kind from its column: a dict lookup is ~1 us cheaper than calling the Enum, once
# per node of every listing and lookup.
_KINDS = {kind.value: kind for kind in Kind}


NODE = Shape(Node, (
    ("ino", "n.id"), ("parent", "n.parent_id"), ("name", "n.name"), ("kind", "n.kind"),
    ("mode", "n.mode"), ("uid", "n.uid"), ("gid", "n.gid"), ("mtime_ns", "n.mtime_ns"),
    ("ctime_ns", "n.ctime_ns"), ("nlink", "n.nlink"), ("version_id", "n.version_id"),
    ("sealed_ns", "n.sealed_ns"), ("atime_ns", "n.atime_ns"),
), {"kind": _KINDS.__getitem__}, takes=("blob",))

BLOB = Shape(BlobRef, (
    ("blob_id", "b.id"), ("digest", "b.sha256"), ("size", "b.size"),
    ("stored_size", "b.stored_size"), ("encoding", "b.encoding"), ("damaged", "b.damaged_ns"),
), {"damaged": _is_set})

VERSION = Shape(Version, (
    ("version_id", "v.id"), ("node_id", "v.node_id"), ("path", "v.path"),
    ("digest", "b.sha256"), ("size", "v.size"), ("mode", "v.mode"), ("uid", "v.uid"),
    ("gid", "v.gid"), ("mtime_ns", "v.mtime_ns"), ("ctime_ns", "v.ctime_ns"),
    ("content_type", "v.content_type"), ("created_ns", "v.created_ns"),
    ("replaced_ns", "v.replaced_ns"), ("damaged", "b.damaged_ns"), ("number", "v.number"),
), {"damaged": _is_set})

# The aggregate columns of every node (schema m004), in DirStats' order.
AGGREGATES = ("artifacts", "logical_bytes", "first_write_ns", "last_write_ns")
DIR_STATS = Shape(DirStats, tuple((name, name) for name in AGGREGATES))

# A node with its current content (None for directories and unpublished files).
NODE_SELECT = f"{NODE.select}, {BLOB.select}"
NODE_JOINS = ("LEFT JOIN versions v ON v.id = n.version_id "
              "LEFT JOIN blobs b ON b.id = v.blob_id")
NODE_FROM = f"FROM nodes n {NODE_JOINS}"
_NODE_BLOB = BLOB.at(NODE.width)


def decode_node(row: Sequence[Any]) -> Node:
    """A row selected with NODE_SELECT."""
    return NODE.decode(row, _NODE_BLOB.decode(row) if row[NODE.width] is not None else None)


def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """INSERT of named values (`:column`), in the tuple's order."""
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(':' + column for column in columns)})")


# What a new node, version or tag is made of: every insert of one goes through these, with
# its values from node_values / version_values (named after the same columns).
NEW_NODE = ("parent_id", "name", "kind", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "nlink")
INSERT_NODE = insert_sql("nodes", NEW_NODE)
NEW_VERSION = ("node_id", "path", "blob_id", "size", "mode", "uid", "gid", "mtime_ns",
               "ctime_ns", "content_type", "created_ns", "replaced_ns", "history_id", "number")
INSERT_VERSION = insert_sql("versions", NEW_VERSION)
INSERT_TAG = insert_sql("tags", ("node_id", "name", "value"))
# An imported tree's rows (cafs.sqlite_manifest.load): ids assigned by the import, a node with
# its current version and path history, a version's blob named by its sha256 (no blob id held
# per row), a new path history with the number its newest version got.
INSERT_IMPORTED_NODE = insert_sql("nodes", ("id", *NEW_NODE, "version_id", "history_id"))
INSERT_IMPORTED_VERSION = insert_sql("versions", ("id", *NEW_VERSION)).replace(
    ":blob_id", "(SELECT id FROM blobs WHERE sha256 = :sha256)")
INSERT_IMPORTED_HISTORY = insert_sql("histories", ("id", "last_number"))


def node_values(parent_id: int, name: str, kind: Kind, *, mode: int, uid: int, gid: int,
                mtime_ns: int, ctime_ns: int) -> dict[str, object]:
    """The values of INSERT_NODE: a directory starts with two links, a file with one."""
    return {"parent_id": parent_id, "name": name, "kind": kind.value, "mode": mode, "uid": uid,
            "gid": gid, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns,
            "nlink": 2 if kind.is_dir else 1}


def version_values(*, node_id: int, path: str, blob_id: int, size: int, mode: int, uid: int,
                   gid: int, mtime_ns: int, ctime_ns: int, content_type: str | None,
                   created_ns: int, replaced_ns: int | None = None, history_id: int | None = None,
                   number: int | None = None) -> dict[str, object]:
    """The values of INSERT_VERSION (a bulk insert may set history and number after)."""
    return {"node_id": node_id, "path": path, "blob_id": blob_id, "size": size, "mode": mode,
            "uid": uid, "gid": gid, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns,
            "content_type": content_type, "created_ns": created_ns, "replaced_ns": replaced_ns,
            "history_id": history_id, "number": number}


NEW_BLOB = ("sha256", "size", "stored_size", "encoding", "refcount", "created_ns")
# A blob's row, made if new; if it exists it gains the references. If its file had to be written
# again (it was missing), the new file's size and encoding are what is on disk now, and a
# damaged blob whose file was just written again is sound again.
UPSERT_BLOB = (
    insert_sql("blobs", NEW_BLOB)
    + " ON CONFLICT (sha256) DO UPDATE SET refcount = blobs.refcount + excluded.refcount, "
    "stored_size = excluded.stored_size, encoding = excluded.encoding, "
    "damaged_ns = CASE WHEN :fresh THEN NULL ELSE blobs.damaged_ns END"
)

# What a blob's refcount must be: the live artifacts (files and symlinks) whose current version
# holds it.
LIVE_REFS = f"""
    live(blob_id, n) AS (
        SELECT v.blob_id, count(*) FROM nodes n
        JOIN versions v ON v.id = n.version_id WHERE n.kind IN {LEAF_KINDS} GROUP BY v.blob_id
    )
"""
# Files whose first write never completed (the daemon died before their first publish).
# Rows gc (and start-up's clean-up) delete per transaction: each transaction's WAL frames must
# fit in the half of the reserve kept for deletes (1 MiB at least), with room to spare for rows
# scattered over the file. Measured, per batch: 84 KiB for versions of deleted empty files
# (deleting 56,000 at once wrote 6.6 MiB); 559 KiB for versions of live files spread over 200
# layers (gc --keep-versions 0: each re-times its file), 325 KiB for their blob rows (the
# sha256 index is in random order). Smaller batches rewrite the same inner pages more often.
GC_BATCH = 64
DELETE_UNPUBLISHED = ("DELETE FROM nodes WHERE id IN (SELECT id FROM nodes "
                      "WHERE kind = 'file' AND version_id IS NULL LIMIT ?)")
# Whether a live artifact holds the history `h` (schema m007); else it is parked.
HELD = "EXISTS (SELECT 1 FROM nodes held WHERE held.history_id = h.id)"
# Every node below a directory (not the directory itself), with its path below it.
SUBTREE = """
    WITH RECURSIVE sub(id, rel) AS (
        SELECT id, name FROM nodes WHERE parent_id = :top
        UNION ALL
        SELECT n.id, sub.rel || '/' || n.name FROM nodes n JOIN sub ON n.parent_id = sub.id
    )
"""


def marks(chunk: Sequence[object]) -> str:
    """The placeholders of an IN (...) list."""
    return ",".join("?" * len(chunk))


def chunks(items: list[T], size: int = 500) -> Iterator[list[T]]:
    """Slices small enough for one IN (...) list (SQLite bounds the variables of a statement)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]

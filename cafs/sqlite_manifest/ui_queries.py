"""Every SQL statement of `cafs ui`: read-only questions about a manifest, answered as JSON.

Owns: what each page of the web view asks the manifest (executions, a directory's entries, an
artifact's history, who holds a content, tag and hash search, one version to download) and the
store-wide summary (stored bytes per execution, sharing between runs, what gc would reclaim).
Each answer is plain JSON (dicts, lists, str, int, None) because the page queries also cross the
daemon's control socket. Must not write (every statement is a SELECT), render anything, or
import anything above the manifest layer.

Where they run: `run` (the bounded page queries) in the daemon when the store is mounted (through
the manifest's `browse`, between filesystem requests: each is a few index seeks and at most
PAGE rows) or on a read-only connection when it is not. `summary` reads every artifact once
(seconds at a million) and so never runs in the daemon: the UI runs it on its own read-only
connection in a background thread, as `cafs stats PATH` does; so does `timeline` (a scan as long
as the run), in the request that shows it.

Names and paths are selected as bytes (CAST AS BLOB) and decoded with surrogateescape, so a
name that is not UTF-8 (which only a hand-edited manifest can hold) is shown, not a crash; names
given as parameters go back as bytes for the same reason (`_text`).
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Callable
from typing import Any

RUNS = 2  # nodes.parent_id of executions (cafs.model.RUNS_INODE)
PAGE = 100  # rows per page: every page query reads at most PAGE + 1 rows
SEARCH_LIMIT = 100
TIMELINE_BUCKETS = 60
# Sharing pairs are summed per distinct set of executions holding a content; past this many
# additions the rest is left out (and the answer says so).
PAIR_BUDGET = 2_000_000

Json = dict[str, Any]


def decoded(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("utf-8", "surrogateescape")


def _text(value: str) -> bytes:
    """A name or path as the bytes stored (compare with CAST(? AS TEXT))."""
    return value.encode("utf-8", "surrogateescape")


# -- resolving paths ------------------------------------------------------------------------


def _resolve(db: sqlite3.Connection, path: str) -> tuple[int, str] | None:
    """(node id, kind) of runs/... , or None. One index seek per component."""
    parts = path.split("/")
    if parts[0] != "runs" or len(parts) < 2 or "" in parts:
        return None
    node, kind = RUNS, "runs"
    for part in parts[1:]:
        row = db.execute("SELECT id, kind FROM nodes WHERE parent_id = ? "
                         "AND name = CAST(? AS TEXT)", (node, _text(part))).fetchone()
        if row is None:
            return None
        node, kind = row
    return node, kind


def _path_of(db: sqlite3.Connection, node_id: int) -> str | None:
    rows = db.execute(
        """
        WITH RECURSIVE up(id, parent_id, name, depth) AS (
            SELECT id, parent_id, CAST(name AS BLOB), 0 FROM nodes WHERE id = ?
            UNION ALL
            SELECT n.id, n.parent_id, CAST(n.name AS BLOB), up.depth + 1
            FROM nodes n JOIN up ON n.id = up.parent_id
        )
        SELECT name, parent_id FROM up ORDER BY depth DESC
        """, (node_id,)).fetchall()
    if not rows or rows[0][1] != RUNS:
        return None
    return "/".join(["runs", *(decoded(row[0]) or "" for row in rows)])


def _tags(db: sqlite3.Connection, node_ids: list[int]) -> dict[int, list[list[str]]]:
    found: dict[int, list[list[str]]] = defaultdict(list)
    for start in range(0, len(node_ids), 500):
        chunk = node_ids[start:start + 500]
        for node_id, name, value in db.execute(
                f"SELECT node_id, CAST(name AS BLOB), value FROM tags "
                f"WHERE node_id IN ({','.join('?' * len(chunk))}) ORDER BY node_id, name",
                chunk):
            found[node_id].append([decoded(name) or "", decoded(bytes(value)) or ""])
    return found


_DIR_COLUMNS = ("n.id, CAST(n.name AS BLOB), n.kind, n.uid, n.gid, n.mode, n.mtime_ns, "
                "n.artifacts, n.logical_bytes, n.first_write_ns, n.last_write_ns, n.sealed_ns, "
                "n.root_sha256")


def _dir_row(row: tuple[Any, ...]) -> Json:
    return {"id": row[0], "name": decoded(row[1]), "kind": row[2], "uid": row[3],
            "gid": row[4], "mode": row[5], "mtime_ns": row[6], "artifacts": row[7],
            "logical_bytes": row[8], "first_write_ns": row[9], "last_write_ns": row[10],
            "sealed_ns": row[11], "root_sha256": row[12]}


def _page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    return rows[:limit], len(rows) > limit


# -- the page queries -----------------------------------------------------------------------


def fingerprint(db: sqlite3.Connection) -> Json:
    """Cheap: changes whenever anything the summary counts changes (executions' aggregates,
    a new version or blob, a blob removed, a node created)."""
    executions = db.execute(
        "SELECT count(*), total(artifacts), total(logical_bytes), max(last_write_ns), "
        "min(first_write_ns), total(id) FROM nodes WHERE parent_id = ?", (RUNS,)).fetchone()
    versions = db.execute("SELECT max(id) FROM versions").fetchone()
    blobs = db.execute("SELECT count(*), max(id) FROM blobs").fetchone()
    nodes = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'nodes'").fetchone()
    return {"key": [*executions, *versions, *blobs, nodes[0] if nodes else 0]}


def executions(db: sqlite3.Connection, after: str | None = None, limit: int = PAGE) -> Json:
    """Executions by name, a page at a time (keyset: names after `after`)."""
    rows = db.execute(
        f"SELECT {_DIR_COLUMNS} FROM nodes n WHERE n.parent_id = ? "
        "AND n.name > CAST(? AS TEXT) ORDER BY n.name LIMIT ?",
        (RUNS, _text(after or ""), limit + 1)).fetchall()
    rows, more = _page(rows, limit)
    totals = db.execute(
        "SELECT count(*), total(artifacts), total(logical_bytes) FROM nodes WHERE parent_id = ?",
        (RUNS,)).fetchone()
    return {"executions": [_dir_row(row) for row in rows], "more": more,
            "count": totals[0], "artifacts": int(totals[1]), "logical_bytes": int(totals[2])}


def directory(db: sqlite3.Connection, path: str, after: str | None = None,
              limit: int = PAGE) -> Json:
    """An execution, layer or sub-directory: itself, its tags, and a page of its entries by
    name with each artifact's current content (size, stored size, encoding, sha256, tags)."""
    found = _resolve(db, path)
    if found is None or found[1] in ("file", "symlink"):
        return {"missing": True, "path": path}
    node_id = found[0]
    me = db.execute(f"SELECT {_DIR_COLUMNS} FROM nodes n WHERE n.id = ?", (node_id,)).fetchone()
    rows = db.execute(
        f"""
        SELECT {_DIR_COLUMNS}, v.id, v.size, v.uid, v.created_ns, b.stored_size, b.encoding,
               b.sha256, b.damaged_ns
        FROM nodes n LEFT JOIN versions v ON v.id = n.version_id
        LEFT JOIN blobs b ON b.id = v.blob_id
        WHERE n.parent_id = ? AND n.name > CAST(? AS TEXT) ORDER BY n.name LIMIT ?
        """, (node_id, _text(after or ""), limit + 1)).fetchall()
    rows, more = _page(rows, limit)
    tags = _tags(db, [node_id, *(row[0] for row in rows)])
    entries = []
    for row in rows:
        entry = _dir_row(row[:13])
        entry.update({"version": row[13], "size": row[14], "writer": row[15],
                      "published_ns": row[16], "stored_size": row[17], "encoding": row[18],
                      "sha256": row[19], "damaged": row[20] is not None,
                      "tags": tags.get(row[0], [])})
        entries.append(entry)
    return {"path": path, "node": _dir_row(me), "tags": tags.get(node_id, []),
            "entries": entries, "more": more}


def timeline(db: sqlite3.Connection, path: str, first_ns: int, last_ns: int,
             buckets: int = TIMELINE_BUCKETS) -> Json:
    """Publishes under `path` (by the path they were published at) in `buckets` equal slices
    of [first_ns, last_ns]: one range scan of the index versions_path_time (m009)."""
    width = max(1, (last_ns - first_ns) // buckets + 1)
    prefix = _text(path + "/")
    rows = db.execute(
        "SELECT (created_ns - ?) / ?, count(*) FROM versions "
        "WHERE path >= CAST(? AS TEXT) AND path < CAST(? AS TEXT) AND created_ns >= ? "
        "GROUP BY 1 ORDER BY 1",
        (first_ns, width, prefix, prefix[:-1] + b"0", first_ns)).fetchall()
    return {"first_ns": first_ns, "width_ns": width, "buckets": [list(row) for row in rows]}


def artifact(db: sqlite3.Connection, path: str, before: int | None = None,
             limit: int = PAGE) -> Json:
    """An artifact (or a path that held one): its current state, tags and a page of its
    versions, newest first, older than version `before` (those of the node there now and those
    published at the path by nodes since replaced). A checkpoint rewritten at every step has
    as many versions as steps: each of the two sources is read newest first by its index
    (versions_node, versions_path: both end in the id), at most limit + 1 rows each."""
    found = _resolve(db, path)
    if found is not None and found[1] not in ("file", "symlink"):
        return {"missing": True, "path": path, "directory": True}
    node_id = found[0] if found else None
    node = None
    if node_id is not None:
        row = db.execute("SELECT version_id, mode, uid, gid, mtime_ns FROM nodes WHERE id = ?",
                         (node_id,)).fetchone()
        node = {"id": node_id, "version": row[0], "mode": row[1], "uid": row[2],
                "gid": row[3], "mtime_ns": row[4]}
    columns = ("SELECT v.id, v.created_ns, v.size, v.uid, v.gid, b.sha256, "
               "CAST(v.path AS BLOB), v.replaced_ns, b.encoding, b.stored_size, b.damaged_ns, "
               "v.content_type FROM versions v JOIN blobs b ON b.id = v.blob_id ")
    below = before if before is not None else 2**63 - 1
    rows = {row[0]: row for row in db.execute(
        columns + "WHERE v.node_id = ? AND v.id < ? ORDER BY v.id DESC LIMIT ?",
        (node_id if node_id is not None else -1, below, limit + 1))}
    rows.update((row[0], row) for row in db.execute(
        columns + "WHERE v.path = CAST(? AS TEXT) AND v.id < ? ORDER BY v.id DESC LIMIT ?",
        (_text(path), below, limit + 1)))
    if node is None and not rows and before is None:
        return {"missing": True, "path": path}
    page, more = _page([rows[key] for key in sorted(rows, reverse=True)], limit)
    current = node["version"] if node else None
    versions = [{"version": row[0], "created_ns": row[1], "size": row[2], "writer": row[3],
                 "gid": row[4], "sha256": row[5], "path": decoded(row[6]),
                 "replaced_ns": row[7], "encoding": row[8], "stored_size": row[9],
                 "damaged": row[10] is not None, "content_type": row[11],
                 "current": row[0] == current} for row in page]
    tags = _tags(db, [node_id]).get(node_id, []) if node_id is not None else []
    return {"path": path, "node": node, "versions": versions, "tags": tags, "more": more}


def version(db: sqlite3.Connection, path: str, version: int) -> Json:
    """Where to read one version of the artifact at `path`: only a version in its history."""
    found = _resolve(db, path)
    node_id = found[0] if found and found[1] in ("file", "symlink") else -1
    row = db.execute(
        "SELECT v.id, b.sha256, v.size, b.encoding, b.damaged_ns FROM versions v "
        "JOIN blobs b ON b.id = v.blob_id "
        "WHERE v.id = ? AND (v.node_id = ? OR v.path = CAST(? AS TEXT))",
        (version, node_id, _text(path))).fetchone()
    if row is None:
        return {"missing": True, "path": path}
    return {"path": path, "version": row[0], "sha256": row[1], "size": row[2],
            "encoding": row[3], "damaged": row[4] is not None}


def content(db: sqlite3.Connection, sha256: str, after: int = 0, limit: int = PAGE) -> Json:
    """A content and every path holding it: live artifacts whose current version it is, and
    versions in history (a page of each, by version id through versions_blob)."""
    blob = db.execute(
        "SELECT id, size, stored_size, encoding, refcount, created_ns, damaged_ns FROM blobs "
        "WHERE sha256 = ?", (sha256,)).fetchone()
    if blob is None:
        return {"missing": True, "sha256": sha256}
    rows = db.execute(
        """
        SELECT v.id, v.node_id, CAST(v.path AS BLOB), v.created_ns, v.uid,
               n.version_id = v.id AS live
        FROM versions v LEFT JOIN nodes n ON n.id = v.node_id
        WHERE v.blob_id = ? AND v.id > ? ORDER BY v.id LIMIT ?
        """, (blob[0], after, limit + 1)).fetchall()
    rows, more = _page(rows, limit)
    holders = []
    for version_id, node_id, path, created_ns, uid, live in rows:
        now = _path_of(db, node_id) if live else None
        holders.append({"version": version_id, "published_path": decoded(path),
                        "path": now, "live": bool(live), "created_ns": created_ns,
                        "writer": uid})
    return {"sha256": sha256, "size": blob[1], "stored_size": blob[2], "encoding": blob[3],
            "refcount": blob[4], "created_ns": blob[5], "damaged": blob[6] is not None,
            "holders": holders, "more": more}


def search_tag(db: sqlite3.Connection, name: str, value: str | None = None,
               after_value: str | None = None, after_node: int = 0,
               limit: int = SEARCH_LIMIT) -> Json:
    """Nodes carrying tag `name` (with `value`, if given), keyset by (value, node id) on the
    index tags_value."""
    start = _text(after_value) if after_value is not None else b""
    if value is None:
        rows = db.execute(
            "SELECT node_id, value FROM tags WHERE name = CAST(? AS TEXT) "
            "AND (value, node_id) > (?, ?) ORDER BY value, node_id LIMIT ?",
            (_text(name), start, after_node, limit + 1)).fetchall()
    else:
        rows = db.execute(
            "SELECT node_id, value FROM tags WHERE name = CAST(? AS TEXT) AND value = ? "
            "AND node_id > ? ORDER BY node_id LIMIT ?",
            (_text(name), _text(value), after_node, limit + 1)).fetchall()
    rows, more = _page(rows, limit)
    found = []
    for node_id, tag_value in rows:
        kind = db.execute("SELECT kind FROM nodes WHERE id = ?", (node_id,)).fetchone()
        found.append({"node": node_id, "path": _path_of(db, node_id),
                      "kind": kind[0] if kind else None, "value": decoded(bytes(tag_value))})
    return {"name": name, "value": value, "found": found, "more": more}


def search_sha(db: sqlite3.Connection, prefix: str, limit: int = SEARCH_LIMIT) -> Json:
    """Contents whose sha256 starts with `prefix` (lowercase hex), by the sha256 index."""
    rows = db.execute(
        "SELECT sha256, size, stored_size, refcount FROM blobs WHERE sha256 >= ? "
        "AND sha256 < ? ORDER BY sha256 LIMIT ?",
        (prefix, prefix + "g", limit + 1)).fetchall()
    rows, more = _page(rows, limit)
    return {"prefix": prefix, "found": [{"sha256": r[0], "size": r[1], "stored_size": r[2],
                                         "refcount": r[3]} for r in rows], "more": more}


# The page queries by name: what the daemon's `browse` runs (and nothing else). `timeline`
# is not one: it counts every publish in a run (a range scan as long as the run), which in the
# daemon stalls every filesystem request behind it; the UI runs it on its own connection.
QUERIES: dict[str, Callable[..., Json]] = {
    "fingerprint": fingerprint, "executions": executions, "directory": directory,
    "artifact": artifact, "version": version, "content": content,
    "search_tag": search_tag, "search_sha": search_sha,
}


def run(db: sqlite3.Connection, query: str, params: dict[str, Any]) -> Json:
    """One page query by name; KeyError for an unknown one, TypeError for wrong params."""
    return QUERIES[query](db, **params)


# -- the summary: every artifact once, outside the daemon -----------------------------------


def summary(db: sqlite3.Connection) -> Json:
    """Store-wide figures no index answers: per execution its stored bytes (each artifact's
    content as stored, as du counts) and the bytes only it holds (what deleting it and gc would
    reclaim), which executions share how many bytes, dedup savings as runs were added, and what
    gc would reclaim. One pass over the live artifacts, grouped in SQL by (execution, content):
    O(artifacts), seconds at a million."""
    execs = {row[0]: {"id": row[0], "name": decoded(row[1]), "artifacts": row[2],
                      "logical_bytes": row[3], "first_write_ns": row[4],
                      "last_write_ns": row[5], "stored_bytes": 0, "unique_bytes": 0,
                      "unique_stored_bytes": 0}
             for row in db.execute(
                 "SELECT id, CAST(name AS BLOB), artifacts, logical_bytes, first_write_ns, "
                 "last_write_ns FROM nodes WHERE parent_id = ?", (RUNS,))}
    held: dict[int, dict[int, int]] = defaultdict(dict)  # blob -> {execution: artifacts}
    for execution, blob_id, uses in db.execute(
        """
        WITH RECURSIVE d(id, exec) AS (
            SELECT id, id FROM nodes WHERE parent_id = :runs
            UNION ALL
            SELECT n.id, d.exec FROM nodes n JOIN d ON n.parent_id = d.id
            WHERE n.kind NOT IN ('file', 'symlink')
        )
        SELECT d.exec, v.blob_id, count(*) FROM d
        JOIN nodes f ON f.parent_id = d.id AND f.kind IN ('file', 'symlink')
        JOIN versions v ON v.id = f.version_id
        GROUP BY d.exec, v.blob_id
        """, {"runs": RUNS}):
        held[blob_id][execution] = uses
    blobs = {row[0]: row[1:] for row in db.execute(
        "SELECT id, size, stored_size, refcount, created_ns FROM blobs")}
    groups: dict[tuple[int, ...], int] = defaultdict(int)  # executions holding -> bytes
    for blob_id, holders in held.items():
        size, stored, refcount, _ = blobs[blob_id]
        for execution, uses in holders.items():
            record = execs[execution]
            record["stored_bytes"] += stored * uses
            if len(holders) == 1 and refcount <= uses:
                record["unique_bytes"] += size
                record["unique_stored_bytes"] += stored
        if len(holders) > 1:
            groups[tuple(sorted(holders))] += size
    pairs: dict[tuple[int, int], int] = defaultdict(int)
    additions, complete = 0, True
    for members, size in sorted(groups.items(), key=lambda item: -item[1]):
        work = len(members) * (len(members) - 1) // 2
        if additions + work > PAIR_BUDGET:
            complete = False
            continue
        additions += work
        for i, first in enumerate(members):
            for second in members[i + 1:]:
                pairs[(first, second)] += size
    top_pairs = sorted(pairs.items(), key=lambda item: -item[1])[:50]
    # Dedup savings as runs were added (by first write): logical bytes so far against the
    # bytes of the distinct contents so far, as stored.
    seen: set[int] = set()
    by_exec: dict[int, list[int]] = defaultdict(list)
    for blob_id, holders in held.items():
        for execution in holders:
            by_exec[execution].append(blob_id)
    growth, logical, unique, stored = [], 0, 0, 0
    for record in sorted(execs.values(), key=lambda r: (r["first_write_ns"] or 0, r["id"])):
        logical += record["logical_bytes"]
        for blob_id in by_exec.get(record["id"], []):
            if blob_id not in seen:
                seen.add(blob_id)
                unique += blobs[blob_id][0]
                stored += blobs[blob_id][1]
        growth.append([record["first_write_ns"] or 0, logical, unique, stored])
    return {
        "executions": sorted(execs.values(), key=lambda r: r["name"] or ""),
        "pairs": [[execs[a]["name"], execs[b]["name"], size] for (a, b), size in top_pairs],
        "pairs_complete": complete,
        "growth": growth,
        "totals": {"blobs": len(blobs), "unique_bytes": sum(b[0] for b in blobs.values()),
                   "stored_bytes": sum(b[1] for b in blobs.values()),
                   "logical_bytes": logical},
        "gc": _gc_estimate(db),
    }


def _gc_estimate(db: sqlite3.Connection) -> Json:
    """What `cafs gc` would reclaim from the manifest's rows (orphan blob files aside): by
    default, contents that only the history of deleted artifacts holds; with
    --keep-versions 0, every content no live artifact holds. Reads only blobs with refcount 0
    (partial index blobs_unreferenced, m009) and their versions."""
    default = {"blobs": 0, "bytes": 0, "stored_bytes": 0}
    no_history = {"blobs": 0, "bytes": 0, "stored_bytes": 0}
    live_paths: dict[str, bool] = {}
    biggest = []
    for blob_id, sha256, size, stored in db.execute(
            "SELECT id, sha256, size, stored_size FROM blobs WHERE refcount = 0").fetchall():
        for bucket in (no_history,):
            bucket["blobs"] += 1
            bucket["bytes"] += size
            bucket["stored_bytes"] += stored
        kept = False
        for node_alive, path in db.execute(
                "SELECT n.id IS NOT NULL, CAST(v.path AS BLOB) FROM versions v "
                "LEFT JOIN nodes n ON n.id = v.node_id WHERE v.blob_id = ?", (blob_id,)):
            if node_alive:
                kept = True
                break
            text = decoded(path) or ""
            if text not in live_paths:
                found = _resolve(db, text)
                live_paths[text] = found is not None and found[1] in ("file", "symlink")
            if live_paths[text]:
                kept = True
                break
        if not kept:
            default["blobs"] += 1
            default["bytes"] += size
            default["stored_bytes"] += stored
            biggest.append([stored, sha256, size])
    biggest.sort(reverse=True)
    return {"default": default, "keep_versions_0": no_history,
            "biggest": [[sha, size, stored] for stored, sha, size in biggest[:20]]}

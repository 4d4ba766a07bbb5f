"""Writers on several hosts: the files each mount holds open for writing, in the manifest.

Owns: recording and ending this mount's writers (table cafs_writers, schema m005_writers),
the checks made with them in the same transaction — a sealed run refuses a new file or an
open for writing, a seal refuses a run someone writes in, a create that loses the race for a
name is told so (AlreadyExists, never retried into another outcome) — the removal of a file
row nobody ended up publishing, and start-up's removal of unfinished files that no live
mount writes. Must not decide what a refusal means to the caller (cafs.openfiles does).

Why rows and not one daemon's memory: `cafs seal` on host A must see a file open for writing
on host B, and a file row without a version may be B's create in progress. A row belongs to
its mount's session (ON DELETE CASCADE), so a dead host's writers go with its session, and to
its node (ON DELETE CASCADE): a file removed on another host has no writers left.

Locks (the one order every change uses: nodes by id, then blobs): registering a writer or a
new node takes FOR KEY SHARE on the node's chain of directories up to its execution, in id
order, in one statement. KEY SHARE lets publishes, creates and the aggregates' updates of those
rows go on (they change no key), and conflicts with FOR UPDATE: a seal (which locks its
execution FOR UPDATE), a rename or a removal of any of them waits for the registration to
commit, or the registration waits for them and reads the rows as they left them. So a seal
either sees the writer and refuses (Busy), or commits first and the writer is refused
(ReadOnly); and a chain read before a concurrent rename is noticed and read again.

Cost: registering and ending a writer are small transactions committed without waiting for
the server's WAL flush (synchronous_commit off, for those transactions only): a row lost in
a server crash is a writer whose connection the crash broke anyway. A create records its
writer in the transaction that inserts its row, and the publish at the writer's last close
ends it in the publish's transaction: a file created, written and closed costs no
transaction more than on one host; an existing file opened for writing costs one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import psycopg.errors

from cafs.errors import AlreadyExists, Busy, NotFound, ReadOnly
from cafs.manifest_api import NewVersion
from cafs.model import RUNS_INODE, Kind, Node
from cafs.pg_manifest.core import PgCore
from cafs.sqlite_manifest.namespace import SqliteNamespace

# The node and every directory above it up to its execution, locked in id order (rows as
# the locks left them: a concurrent rename shows as a chain that no longer links up).
_CHAIN = f"""
WITH RECURSIVE up(id) AS (
    SELECT CAST(? AS BIGINT)
    UNION ALL
    SELECT n.parent_id FROM nodes n JOIN up ON n.id = up.id WHERE n.parent_id <> {RUNS_INODE}
)
SELECT n.id, n.parent_id, n.kind, n.sealed_ns, n.version_id
FROM nodes n WHERE n.id IN (SELECT id FROM up) ORDER BY n.id FOR KEY SHARE OF n
"""
# Files below a run open for writing on any host: each writer's chain walked up.
_WRITERS_IN = f"""
WITH RECURSIVE up(node_id, id) AS (
    SELECT node_id, node_id FROM cafs_writers
    UNION ALL
    SELECT up.node_id, n.parent_id FROM nodes n JOIN up ON n.id = up.id
    WHERE n.parent_id <> {RUNS_INODE}
)
SELECT count(DISTINCT node_id) FROM up WHERE id = ?
"""
# A new file's row, with its writer and its unfinished mark (both this mount's session), and
# its directory's times: one statement (the SQLite parts' queries make four).
_NEW_FILE = """
WITH n AS (
    INSERT INTO nodes (parent_id, name, kind, mode, uid, gid, mtime_ns, ctime_ns, nlink)
    VALUES (:parent_id, :name, 'file', :mode, :uid, :gid, :now, :now, 1) RETURNING id
), w AS (
    INSERT INTO cafs_writers (session_id, node_id) SELECT :session, id FROM n
), u AS (
    INSERT INTO cafs_unfinished (node_id, session_id) SELECT id, :session FROM n
), t AS (
    UPDATE nodes SET mtime_ns = :now, ctime_ns = :now WHERE id = :parent_id
)
SELECT id FROM n
"""
_NAME_TAKEN = "nodes_parent_id_name_key"  # UNIQUE (parent_id, name)
_CHAIN_ATTEMPTS = 5


class _ChainMoved(Exception):
    """A directory of the chain moved between reading and locking it: read it again."""


class PgWriters(PgCore, SqliteNamespace):
    """The namespace's changes where several hosts write: see the module docstring."""

    # Start-up removes files whose first write never completed and that no mount writes: a
    # row another host writes is its create in progress (a dead mount's writers go with its
    # session).
    _delete_unpublished = (
        "DELETE FROM nodes WHERE id IN (SELECT n.id FROM nodes n WHERE n.kind = 'file' AND "
        "n.version_id IS NULL AND NOT EXISTS (SELECT 1 FROM cafs_writers w WHERE "
        "w.node_id = n.id) LIMIT ?)")

    def _lock_chain(self, node_id: int) -> tuple[int, int | None]:
        """Inside a transaction: lock `node_id` and its directories up to its execution (FOR
        KEY SHARE). Returns (the execution's id, the node's version id). NotFound if the node
        is gone; ReadOnly if the run is sealed; _ChainMoved if a rename raced."""
        return self._check_chain(node_id,
                                 {row[0]: row for row in self._pg.execute(_CHAIN, (node_id,))})

    def _check_chain(self, node_id: int, rows: dict[int, tuple[Any, ...]]
                     ) -> tuple[int, int | None]:
        """_lock_chain's verdict on the rows its statement locked."""
        if node_id not in rows:
            raise NotFound(f"node {node_id} was removed")
        current = node_id
        while True:
            row = rows.get(current)
            if row is None:
                raise _ChainMoved()
            _, parent, kind, sealed_ns, _ = row
            if kind == Kind.EXECUTION.value:
                if sealed_ns is not None:
                    raise ReadOnly(f"runs/{self._name_of(current)} is sealed")
                return current, rows[node_id][4]
            current = parent

    def _name_of(self, node_id: int) -> str:
        row = self._pg.execute("SELECT name FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return str(row[0]) if row else "?"

    def add_node(self, parent_id: int, name: str, kind: Kind, mode: int, uid: int, gid: int,
                 now_ns: int) -> Node:
        for _ in range(_CHAIN_ATTEMPTS):
            try:
                with self._transaction() as db:
                    if kind is Kind.FILE and self.session_id is not None \
                            and parent_id != RUNS_INODE:
                        node_id = self._add_file(parent_id, name, mode, uid, gid, now_ns)
                    else:
                        if parent_id != RUNS_INODE:
                            self._lock_chain(parent_id)
                        node_id = self._insert_node(parent_id, name, kind, mode=mode,
                                                    uid=uid, gid=gid, mtime_ns=now_ns,
                                                    ctime_ns=now_ns)
                        self._touch(parent_id, now_ns)
                        if kind is Kind.FILE and self.session_id is not None:
                            db.execute("INSERT INTO cafs_writers (session_id, node_id) "
                                       "VALUES (?, ?)", (self.session_id, node_id))
            except _ChainMoved:
                continue
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name != _NAME_TAKEN:
                    raise
                # Another host took the name (its row may be a create still in progress,
                # invisible here): the caller decides (O_EXCL: EEXIST; else write it too).
                raise AlreadyExists(f"{name}: made meanwhile on another host") from None
            return Node(ino=node_id, parent=parent_id, name=name, kind=kind, mode=mode,
                        uid=uid, gid=gid, mtime_ns=now_ns, ctime_ns=now_ns,
                        nlink=2 if kind.is_dir else 1)
        raise NotFound(f"{name}: its directory kept moving")

    def _add_file(self, parent_id: int, name: str, mode: int, uid: int, gid: int,
                  now_ns: int) -> int:
        """add_node's rows for a new file in this mount's session, the chain locked first:
        both statements in one round trip. (The chain's answer is read first: a sealed run or
        a moved directory is refused as before, and the insert goes with the roll-back.)"""
        chain = self._pg.execute(_CHAIN, (parent_id,), wait=False)
        made = self._pg.execute(_NEW_FILE, {
            "parent_id": parent_id, "name": name, "mode": mode, "uid": uid, "gid": gid,
            "now": now_ns, "session": self.session_id}, wait=False)
        self._check_chain(parent_id, {row[0]: row for row in chain})
        row = made.fetchone()
        assert row is not None
        return int(row[0])

    def rename(self, node: Node, new_parent: int, new_name: str, replaced: Node | None,
               now_ns: int) -> None:
        """As on one host; a target name another host made, unseen here (or made again since
        this host saw it), is replaced as rename(2) replaces one when both are files, and is
        EEXIST otherwise (never EIO after retries that cannot succeed)."""
        for _ in range(_CHAIN_ATTEMPTS):
            try:
                SqliteNamespace.rename(self, node, new_parent, new_name, replaced, now_ns)
                return
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name != _NAME_TAKEN:
                    raise
            target = self.child(new_parent, new_name)
            if target is not None and target.ino == node.ino:
                return
            if target is not None and (target.kind.is_dir or node.kind.is_dir):
                raise AlreadyExists(f"{new_name}: made meanwhile on another host")
            replaced = target
        raise AlreadyExists(f"{new_name}: made meanwhile on another host")

    def open_writer(self, node: Node) -> Node | None:
        if self.session_id is None:
            return None
        for _ in range(_CHAIN_ATTEMPTS):
            try:
                with self._transaction() as db:
                    db.execute("SET LOCAL synchronous_commit TO OFF")
                    _, version_id = self._lock_chain(node.ino)
                    db.execute("INSERT INTO cafs_writers (session_id, node_id) VALUES (?, ?) "
                               "ON CONFLICT DO NOTHING", (self.session_id, node.ino))
            except _ChainMoved:
                continue
            if version_id == node.version_id:
                return node
            # Another host published since this one read the node: its content now.
            current = self.node(node.ino)
            if current is None:
                raise NotFound(f"node {node.ino} was removed")
            return current
        raise NotFound(f"{node.name}: its directory kept moving")

    def close_writer(self, node_id: int) -> None:
        if self.session_id is None:
            return
        with self._transaction() as db:
            db.execute("SET LOCAL synchronous_commit TO OFF")
            db.execute("DELETE FROM cafs_writers WHERE session_id = ? AND node_id = ?",
                       (self.session_id, node_id))

    def _version_recorded(self, new: NewVersion) -> None:
        self._check_pin(new.pin)  # before the COMMIT: the blob must still be there
        # The writer's last close publishes: its writer row goes in the same transaction
        # (a close_writer of its own would cost a transaction per file written).
        if new.ends_writer and self.session_id is not None:
            self._pg.execute("DELETE FROM cafs_writers WHERE session_id = ? AND node_id = ?",
                             (self.session_id, new.node_id))

    def drop_abandoned(self, node: Node, now_ns: int) -> bool:
        with self._transaction() as db:
            self._lock_rows([node.ino, node.parent])
            if self.session_id is not None:
                db.execute("DELETE FROM cafs_writers WHERE session_id = ? AND node_id = ?",
                           (self.session_id, node.ino))
            row = db.execute(
                "SELECT version_id, EXISTS (SELECT 1 FROM cafs_writers WHERE node_id = ?) "
                "FROM nodes WHERE id = ?", (node.ino, node.ino)).fetchone()
            if row is None:
                return True
            if row[0] is not None or row[1]:  # published, or another host writes it still
                return False
            self._drop_node(node, now_ns)
            self._touch(node.parent, now_ns)
        return True

    def writers_in(self, execution_id: int) -> int:
        row = self._pg.execute(_WRITERS_IN, (execution_id,)).fetchone()
        return int(row[0]) if row else 0

    def seal(self, execution_id: int, root: Callable[[], str], now_ns: int) -> str:
        with self._transaction() as db:
            # FOR UPDATE on the run: a registration (FOR KEY SHARE) that came first is
            # counted below; one that comes after waits for the seal and is refused.
            db.execute("SELECT id FROM nodes WHERE id = ? FOR UPDATE", (execution_id,))
            writers = self.writers_in(execution_id)
            if writers:
                raise Busy(f"{self.path_of(execution_id)} has {writers} files open for "
                           "writing on the hosts serving this store; close them first")
            hashed = root()
            db.execute("UPDATE nodes SET sealed_ns = ?, root_sha256 = ?, ctime_ns = ? "
                       "WHERE id = ? AND kind = 'execution'",
                       (now_ns, hashed, now_ns, execution_id))
        return hashed

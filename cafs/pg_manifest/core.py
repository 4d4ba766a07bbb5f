"""The PostgreSQL manifest's core: what differs from SQLite's connection, and the retry rule.

Owns: opening a manifest on PostgreSQL (connecting, applying cafs.pg_manifest.schema's
migrations under an advisory lock), transactions (READ COMMITTED; the COMMIT resolved after a
dropped connection), the rows a change locks first (nodes, then blobs, each by id, FOR UPDATE),
sync and the durable point, the checks SQLite answers with PRAGMAs, backups (PostgreSQL's job:
pg_dump), and the rule that every public method of the manifest is one call that is retried
whole (bounded in attempts and in time) on a deadlock, a serialization failure, a unique
violation or a dropped connection as long as none of its transactions committed, and that no
psycopg error leaves it: each becomes a ManifestError with an errno (EIO; ENOSPC when the
server's disk is full). Must not know the namespace's rules, touch blob files, FUSE or trio.

Why retry a whole call: a transaction is the body of a method (`with self._transaction():`
around Python code), so the unit that can run again from the start is the method. A call whose
transaction committed is never run again; its later reads (the node it returns) are repeated
statement by statement instead (cafs.pg_manifest.connection).
"""

from __future__ import annotations

import errno
import functools
import inspect
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import psycopg
import psycopg.errors

from cafs.errors import ManifestError, NeedsRepair, StoreError
from cafs.model import BlobRef, SessionInfo
from cafs.pg_manifest import schema
from cafs.pg_manifest.connection import (
    ADMIN,
    DAEMON,
    CommitLost,
    CommitUnknown,
    PgConnection,
)
from cafs.sqlite_manifest.columns import BLOB, GC_BATCH
from cafs.sqlite_manifest.core import SqliteCore

ATTEMPTS = 5  # of one call: the first and four retries, all inside CALL_BUDGET
_RETRYABLE = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
              psycopg.errors.UniqueViolation, psycopg.OperationalError, CommitLost)
_MIGRATION_LOCK = 0x63616673  # 'cafs': one opener at a time migrates
# Advisory lock keys (two int4 keys): a class, then the digest's first 31 bits. Two digests
# sharing a key only make gc skip a blob one more time.
_PIN_CLASS = 0x63616670  # 'cafp': writes in flight (shared) and gc deleting a blob (exclusive)
_GC_CLASS = 0x63616667  # 'cafg': one gc at a time
_PIN_KEY = "(('x' || substr(?, 1, 8))::bit(32)::int & 2147483647)"


def pg_error(exc: BaseException) -> ManifestError:
    """A failed PostgreSQL call as an error with an errno: ENOSPC when the server's disk is
    full, EIO otherwise. The message never holds the connection string."""
    full = isinstance(exc, psycopg.errors.DiskFull)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ManifestError(f"manifest (PostgreSQL): {text}", errno.ENOSPC if full else errno.EIO)


def redact(url: str) -> str:
    """A connection URL fit for a message or a log: no password in it."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unparsable URL)"
    host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
    user = info.get("user")
    return (f"postgresql://{str(user) + '@' if user else ''}{host}"
            f"{':' + str(port) if port else ''}/{db}")


def has_password(url: str) -> bool:
    try:
        return bool(psycopg.conninfo.conninfo_to_dict(url).get("password"))
    except psycopg.Error:
        return False


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def generator(self: PgCore, *args: Any, **kwargs: Any) -> Any:
            steps = method(self, *args, **kwargs)
            while True:
                try:
                    with self._lock:  # (the rows are read at once: nothing open across yields)
                        item = next(steps)
                except StopIteration:
                    return
                except (psycopg.Error, CommitLost, CommitUnknown) as exc:
                    raise pg_error(exc) from exc
                yield item
        return generator

    @functools.wraps(method)
    def call(self: PgCore, *args: Any, **kwargs: Any) -> Any:
        failures = self._failures
        with self._lock:
            if self._failures != failures and self._pg.down and self._pg.deadline is None:
                # The server failed another call while this one waited for it (calls come
                # from worker threads too): fail at once, as that call did, rather than
                # queue one more attempt behind it. The next call tries again.
                raise pg_error(psycopg.OperationalError(
                    "the server did not answer the call before this one"))
            return _call(self, method, *args, **kwargs)
    return call


def _call(self: PgCore, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One call with its retries, under the manifest's lock."""
    db = self._pg
    if db.deadline is not None:  # inside another call: that one retries
        return method(self, *args, **kwargs)
    budget = db.bounds.connect + 0.5 if db.down else db.bounds.call
    db.deadline = time.monotonic() + budget
    try:
        for attempt in range(ATTEMPTS):
            committed = self._changes
            try:
                result = method(self, *args, **kwargs)
                db.down = False
                return result
            except (psycopg.Error, CommitLost, CommitUnknown) as exc:
                last = attempt == ATTEMPTS - 1 or time.monotonic() > db.deadline - 0.2
                if (not isinstance(exc, _RETRYABLE) or self._changes != committed
                        or last):
                    if isinstance(exc, psycopg.OperationalError | CommitUnknown):
                        db.down = True
                        self._failures += 1
                    raise pg_error(exc) from exc
                if db.in_transaction:
                    db.rollback()
                time.sleep(min(0.02 * 2 ** attempt, 0.5) * (0.5 + random.random()))
        raise AssertionError("unreachable")
    finally:
        db.deadline = None


def _guard(cls: type) -> None:
    """Every public method of the manifest, wherever in the parts it is defined."""
    for name in dir(cls):
        value = getattr(cls, name)
        if name.startswith("_") or not inspect.isfunction(value) \
                or getattr(value, "touches_no_connection", False):
            continue
        setattr(cls, name, _retrying(value))


class PgCore(SqliteCore):
    """The connection and transactions of a manifest on PostgreSQL; the SQLite parts' queries
    run on it unchanged (see cafs.pg_manifest.dialect)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard(cls)

    def __init__(self, url: str, *, readonly: bool = False,
                 low_on_space: Callable[[], bool] | None = None,
                 new_schema_ok: bool = True, serving: bool = False,
                 adopting: bool = False, blobs_where: str | None = None) -> None:
        """`serving`: a daemon's manifest, whose every wait is bounded in seconds (see
        cafs.pg_manifest.connection.DAEMON); else an admin command's, patient with long
        queries. `adopting`: the store has not recorded this database yet, so one that holds
        artifacts already is another store's (refused), unless it is the same store mounted
        from another host: its blobs are where `blobs_where` says, in shared storage.
        `blobs_where` (the opener's blob store, Blobs.where) must be where the database
        records its blobs to be; the first opener records it."""
        # Calls may come from worker threads (the daemon's publishes, see
        # cafs.openfiles.Publisher) as well as from the event loop: one at a time on the one
        # connection. Re-entrant: a call may make others (they join its deadline).
        self._lock = threading.RLock()
        self._failures = 0  # calls failed for want of the server (see _retrying)
        self.url = url
        self.path = Path("/")  # no file: see copy_to
        self.readonly = readonly
        self._low_on_space = None
        self._changes = 0
        self._free_bytes = None
        self._page_size = 0
        self.session_id: int | None = None  # see start_session
        # The store's id, the same on every host (cafs_store); its shared blobs carry it.
        self.store_id: str | None = None
        self._session_where = ("", "")  # host, mountpoint: see set_session_where
        self._session_timeout = 60.0
        self._gc_grace = 0.0  # gc sets it (Maintenance.gc): a policy, not the manifest's
        try:
            self._pg = PgConnection(url, readonly=readonly, bounds=DAEMON if serving else ADMIN)
            self._db = cast(Any, self._pg)
            self._migrate(new_schema_ok)
            self._pg.execute("SELECT count(*) FROM nodes WHERE id = 0")
            # An empty manifest is taken: a first mount may stop between making the schema
            # and recording manifest.url.
            row = self._pg.execute(
                "SELECT EXISTS (SELECT 1 FROM versions) OR EXISTS (SELECT 1 FROM blobs)"
            ).fetchone() if adopting else None
            taken = bool(row and row[0])
            if blobs_where is not None:
                taken = self._check_blobs_where(blobs_where, taken) and taken
        except psycopg.Error as exc:
            raise StoreError(f"{redact(url)}: cannot open the manifest: "
                             f"{pg_error(exc)}") from exc
        if taken:
            self._pg.close()
            raise StoreError(
                f"{redact(url)} already holds the manifest of another store (artifacts this "
                "store never recorded); refusing to share it. If this store directory was "
                "made anew for that manifest, write the URL into its manifest.url")

    def _check_blobs_where(self, where: str, taken: bool) -> bool:
        """Refuse an opener whose blobs are elsewhere than the ones this manifest names (its
        every blob would look missing, and gc would delete what the other one stored).
        Returns whether a database holding artifacts is still another store's: False when
        this opener joins it from another host (same shared blobs)."""
        recorded = self._recorded("blobs")
        if recorded is None and not self.readonly and not taken:
            with self._transaction() as db:  # racing first openers: one set of facts wins
                db.execute("INSERT INTO cafs_store (key, value) VALUES ('blobs', ?), ('id', ?) "
                           "ON CONFLICT (key) DO NOTHING", (where, str(uuid.uuid4())))
            recorded = self._recorded("blobs")
        self.store_id = self._recorded("id")
        if recorded is not None and recorded != where:
            self._pg.close()
            raise StoreError(f"{redact(self.url)} is the manifest of a store whose blobs are "
                             f"at {recorded}, not {where}: set blobs in cafs.toml or pass "
                             "--blobs to match")
        return recorded is None or not recorded.startswith("s3://")

    def _recorded(self, key: str) -> str | None:
        row = self._pg.execute("SELECT value FROM cafs_store WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- sessions: the mounts serving this manifest, on any host ----------------------------
    # Every comparison of times is the server's (now()): host clocks never matter.

    shared = True

    def set_session_timeout(self, seconds: float) -> None:
        """A session whose last beat is older than this is dead (default 60 s)."""
        self._session_timeout = float(seconds)

    def start_session(self, host: str, mountpoint: str, pid: int) -> int:
        """Register a mount serving this manifest; returns its session id."""
        with self._transaction() as db:
            row = db.execute("INSERT INTO cafs_sessions (host, mountpoint, pid) VALUES (?, ?, ?) "
                             "RETURNING id", (host, mountpoint, pid)).fetchone()
        self.session_id = int(row[0])
        self._session_where = (host, mountpoint)
        # Changes made from now on carry the session (cafs_changes.origin): this mount's own
        # feed skips them. Set on this connection now and on every reconnect.
        self._pg.session = self.session_id
        self._pg.execute_raw(f"SET cafs.session = '{self.session_id}'")
        return self.session_id

    def adopt_session(self, session_id: int) -> None:
        """This connection's changes are the mount's of `session_id` (registered on another
        connection, see cafs.sessions): creates record it, and the change feed's rows carry
        it (cafs_changes.origin), so the mount's own feed skips them. Only from the thread
        that uses this manifest."""
        self.session_id = session_id
        self._pg.session = session_id
        self._pg.execute_raw(f"SET cafs.session = '{int(session_id)}'")

    def beat(self) -> bool:
        """The session's heartbeat: it is alive as of now (server clock). False if its row is
        gone: another host found it dead (its beats stopped longer than the timeout) and
        removed it with its unfinished files."""
        with self._transaction() as db:
            row = db.execute("UPDATE cafs_sessions SET beat_at = now() WHERE id = ? "
                             "RETURNING id", (self.session_id,)).fetchone()
        return row is not None

    def end_session(self) -> None:
        """A clean unmount: the session is gone, nothing of it needs cleaning by others."""
        with self._transaction() as db:
            db.execute("DELETE FROM cafs_sessions WHERE id = ?", (self.session_id,))

    def live_sessions(self, timeout: float | None = None) -> list[SessionInfo]:
        """The mounts serving this manifest that beat within `timeout` seconds (default: the
        session timeout), oldest first."""
        rows = self._db.execute(
            "SELECT id, host, mountpoint, pid, extract(epoch FROM started_at), "
            "extract(epoch FROM beat_at), extract(epoch FROM now() - beat_at) "
            "FROM cafs_sessions WHERE beat_at >= now() - make_interval(secs => ?) ORDER BY id",
            (self._session_timeout if timeout is None else timeout,)).fetchall()
        return [SessionInfo(int(r[0]), str(r[1]), str(r[2]), int(r[3]), float(r[4]),
                            float(r[5]), float(r[6])) for r in rows]

    def reap_dead_sessions(self) -> tuple[int, int]:
        """Remove the sessions whose beats stopped longer than the timeout ago, with the
        files they left unfinished (their tags too); their pins (advisory locks) went with
        their connections. Any live host runs this. Returns (sessions, files) removed.

        The dead rows are locked first (FOR UPDATE): a session that beats again meanwhile
        waits, then finds its row gone (beat() says so) instead of living on without the
        files removed here."""
        with self._transaction() as db:
            dead = [int(row[0]) for row in db.execute(
                "SELECT id FROM cafs_sessions WHERE beat_at < now() - make_interval(secs => ?) "
                "AND id IS DISTINCT FROM ? ORDER BY id FOR UPDATE SKIP LOCKED",
                (self._session_timeout, self.session_id)).fetchall()]
            files = self._remove_unfinished_of(dead) if dead else 0
            if dead:
                db.execute("DELETE FROM cafs_sessions WHERE id = ANY(?)", (dead,))
        return len(dead), files

    def _remove_unfinished_of(self, sessions: list[int]) -> int:
        nodes = [int(row[0]) for row in self._pg.execute(
            "SELECT u.node_id FROM cafs_unfinished u JOIN nodes n ON n.id = u.node_id "
            "WHERE u.session_id = ANY(?) AND n.kind = 'file' AND n.version_id IS NULL "
            # A live host that joined the create (a plain create of the same name) writes it:
            "AND NOT EXISTS (SELECT 1 FROM cafs_writers w WHERE w.node_id = n.id "
            "AND w.session_id <> ALL(?)) "
            "ORDER BY u.node_id FOR UPDATE OF n", (sessions, sessions)).fetchall()]
        if nodes:
            self._pg.execute("DELETE FROM tags WHERE node_id = ANY(?)", (nodes,))
            self._pg.execute("DELETE FROM nodes WHERE id = ANY(?)", (nodes,))
        return len(nodes)

    def remove_unpublished(self) -> int:
        """Start-up after a crash, on a manifest other hosts may serve: drop the unfinished
        files of this mount's own earlier sessions (same host and mountpoint: it crashed),
        of dead sessions, and those no session owns (left before sessions existed, or by a
        roll-back); never a live session's: those are files being written on another host."""
        host, mountpoint = self._session_where
        removed = 0
        with self._transaction() as db:
            earlier = [int(row[0]) for row in db.execute(
                "SELECT id FROM cafs_sessions WHERE host = ? AND mountpoint = ? "
                "AND id IS DISTINCT FROM ? ORDER BY id FOR UPDATE",
                (host, mountpoint, self.session_id)).fetchall()] if host else []
            if earlier:
                removed += self._remove_unfinished_of(earlier)
                db.execute("DELETE FROM cafs_sessions WHERE id = ANY(?)", (earlier,))
        removed += self.reap_dead_sessions()[1]
        while True:
            with self._transaction() as db:
                cursor = db.execute(
                    "DELETE FROM nodes WHERE id IN (SELECT n.id FROM nodes n WHERE "
                    "n.kind = 'file' AND n.version_id IS NULL AND NOT EXISTS (SELECT 1 FROM "
                    "cafs_unfinished u WHERE u.node_id = n.id) AND NOT EXISTS (SELECT 1 FROM "
                    "cafs_writers w WHERE w.node_id = n.id) LIMIT ?)", (GC_BATCH,))
            removed += cursor.rowcount
            if cursor.rowcount < GC_BATCH:
                return removed

    def set_session_where(self, host: str, mountpoint: str) -> None:
        """Who this mount is, before its session starts: start-up recovery removes the
        unfinished files of this host's earlier sessions at this mountpoint."""
        self._session_where = (host, mountpoint)

    def unpublished_is_mine(self, node_id: int) -> bool:
        """Whether this mount may drop the unfinished file `node_id`: only one its own
        session created. Another live session's is a file being written on another host (it
        may be published the next moment: a row read a moment ago proves nothing); a dead
        session's, or one no session owns, is left to the clean-up of dead sessions and to
        start-up recovery."""
        row = self._db.execute("SELECT session_id FROM cafs_unfinished WHERE node_id = ?",
                               (node_id,)).fetchone()
        return row is not None and self.session_id is not None \
            and int(row[0]) == self.session_id

    def _new_node_id(self, node_id: int) -> None:
        """A new file's row belongs to this mount's session until its first publish (the
        trigger nodes_published then drops the link), in the same transaction: no other host
        shows or removes it meanwhile. A directory's id is not recorded (kind filter). An
        identity column never gives an id twice, so nothing else needs remembering. Fails
        (foreign key) once the session was found dead and removed: no create lands in it."""
        if self.session_id is not None:
            self._pg.execute("INSERT INTO cafs_unfinished (node_id, session_id) SELECT id, ? "
                             "FROM nodes WHERE id = ? AND kind = 'file' AND version_id IS NULL",
                             (self.session_id, node_id), answer=False)

    # -- pins and gc across hosts: advisory locks, gone with the connection that took them --

    def pin(self, digest: str) -> int:
        """A write in flight is about to look for this content, store it and reference it:
        every host's gc leaves its blob alone until unpin(). A shared advisory lock on the
        digest's key, on this connection: it waits only while a gc deletes that very blob.
        The token is the connection's serial: the lock lives exactly as long as it."""
        self._db.execute(f"SELECT pg_advisory_lock_shared({_PIN_CLASS}, {_PIN_KEY})", (digest,))
        return self._pg.serial

    def unpin(self, digest: str, pin: int) -> None:
        """Sent with the next statement on this connection (the next create's, or any other),
        not in a round trip of its own; on an idle connection the daemon sends it within a
        second (send_pending). Until then gc on any host leaves this one blob alone a little
        longer, which is all a pin does. Takes no lock (only queues): the event loop never
        waits here for a publish in a worker thread. A pin taken on an earlier connection went
        with it: its unlock, sent on this one, would release another publish's pin."""
        if pin == self._pg.serial:
            self._pg.later(f"SELECT pg_advisory_unlock_shared({_PIN_CLASS}, {_PIN_KEY})",
                           (digest,))

    def _check_pin(self, pin: int | None) -> None:
        """Inside a publish's transaction: the content's pin must still be held. If the
        connection dropped since pin() (this call reconnected, or another did), gc on another
        host may have deleted the blob meanwhile, and the version would name nothing: fail
        (EIO at the writer's close, nothing published) rather than guess."""
        if pin is not None and pin != self._pg.serial:
            raise ManifestError("the connection to PostgreSQL dropped during a publish: the "
                                "pin on its content went with it; nothing published", errno.EIO)

    unpin.touches_no_connection = True  # type: ignore[attr-defined]

    def has_pending(self) -> bool:
        return self._pg.pending

    has_pending.touches_no_connection = True  # type: ignore[attr-defined]

    def send_pending(self) -> None:
        if not self._pg.pending:
            return
        if not self._pg.usable:  # the pins went with the connection: nothing to send
            self._pg.drop_pending()
            return
        self._pg.execute("SELECT 1")  # carries them, in its round trip

    def gc_lock(self) -> bool:
        """One gc at a time over the whole store, on any host: False if another holds it."""
        row = self._db.execute(f"SELECT pg_try_advisory_lock({_GC_CLASS}, 0)").fetchone()
        return bool(row[0])

    def gc_unlock(self) -> None:
        self._db.execute(f"SELECT pg_advisory_unlock({_GC_CLASS}, 0)")

    def lock_for_delete(self, digests: list[str]) -> list[str]:
        """Of `digests`, those no write in flight on any host pins, each locked against pins
        until unlock_deleted(): a publish that comes now waits, then finds the blob gone and
        stores it anew."""
        if not digests:
            return []
        rows = self._db.execute(
            f"SELECT d FROM unnest(?::text[]) d WHERE pg_try_advisory_lock({_PIN_CLASS}, "
            f"{_PIN_KEY.replace('?', 'd')})", (digests,)).fetchall()
        return [str(row[0]) for row in rows]

    def unlock_deleted(self, digests: list[str]) -> None:
        if digests:
            self._db.execute(f"SELECT pg_advisory_unlock({_PIN_CLASS}, "
                             f"{_PIN_KEY.replace('?', 'd')}) FROM unnest(?::text[]) d",
                             (digests,))

    def set_gc_grace(self, seconds: float) -> None:
        """gc deletes a blob only once its last reference went this long ago."""
        self._gc_grace = float(seconds)

    def _unreferenced_blobs(self, keep_blobs: set[str]) -> list[BlobRef]:
        """Blobs nothing references, whose last reference went more than gc_grace ago (a
        reader on another host may still read them meanwhile), that no host pins."""
        rows = self._db.execute(
            f"SELECT {BLOB.select} FROM blobs b WHERE refcount = 0 AND "
            "coalesce(unreferenced_ns, 0) <= (extract(epoch FROM now()) * 1e9)::bigint "
            "- (? * 1e9)::bigint "
            "AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.blob_id = b.id) "
            "AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' "
            f"AND l.classid = {_PIN_CLASS} AND l.objsubid = 2 "
            f"AND l.objid::text::bigint = {_PIN_KEY.replace('?', 'b.sha256')} AND l.database "
            "= (SELECT oid FROM pg_database WHERE datname = current_database())) ORDER BY id",
            (self._gc_grace,)).fetchall()
        return [blob for blob in map(BLOB.decode, rows) if blob.digest not in keep_blobs]

    def _migrate(self, new_schema_ok: bool) -> None:
        done: set[str] = set()
        conn = self._pg
        conn.deadline = time.monotonic() + conn.bounds.call
        try:
            exists = conn.execute("SELECT to_regclass('cafs_migrations') IS NOT NULL").fetchone()
            if exists and exists[0]:
                done = {row[0] for row in conn.execute("SELECT name FROM cafs_migrations")}
            if all(name in done for name in schema.NAMES):
                return
            if not done and not new_schema_ok:
                # A database without cafs's tables, for a store whose blob files exist: a typo
                # in the URL, or a dropped database. A new manifest would call every blob
                # garbage (gc would delete them): refuse, as for a missing manifest.sqlite.
                raise NeedsRepair(
                    f"{redact(self.url)} holds no cafs manifest, yet the store has blob files; "
                    "refusing to start a new manifest over them (check the URL, or restore "
                    "the database with pg_restore)")
            if self.readonly:
                raise StoreError(f"{redact(self.url)}: the manifest has no cafs schema yet (or "
                                 "an older one): mount the store once to create it")
            conn.begin(pipelined=False)  # DDL, several statements a text
            try:
                conn.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                conn.execute("CREATE TABLE IF NOT EXISTS cafs_migrations (name TEXT PRIMARY "
                             "KEY, applied_ns BIGINT NOT NULL)")
                done = {row[0] for row in conn.execute("SELECT name FROM cafs_migrations")}
                for name, migration in schema.MIGRATIONS:
                    if name in done:
                        continue
                    migration(conn.execute_raw)
                    conn.execute("INSERT INTO cafs_migrations (name, applied_ns) VALUES (?, ?)",
                                 (name, time.time_ns()))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        finally:
            conn.deadline = None

    # -- what SQLite's core does with PRAGMAs and files -------------------------------------

    def limit_wal(self, size: int) -> None:
        """No WAL of ours: PostgreSQL's lives on its server."""

    def claim_free_pages(self, size: int) -> bool:
        """The manifest takes no space on the store's filesystem."""
        return True

    def start_wal(self) -> None:
        """No WAL of ours to start."""

    def _has_column(self, table: str, column: str) -> bool:
        return self._db.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ? AND column_name = ?", (table, column)).fetchone() is not None

    def _has_table(self, table: str) -> bool:
        return self._db.execute("SELECT to_regclass(?) IS NOT NULL", (table,)).fetchone()[0]

    def close(self) -> None:
        self._pg.close()

    def admin(self) -> Any:
        raise ManifestError("the manifest is on PostgreSQL: inspect it with psql", errno.ENOTSUP)

    @contextmanager
    def _transaction(self, *, commit: bool = True, defer: bool = False) -> Iterator[Any]:
        """One transaction (READ COMMITTED); `commit=False` rolls it back (a dry run). A COMMIT
        whose connection dropped is resolved before this returns (cafs.pg_manifest.connection).
        `defer` (SQLite's one commit for a new file's row and its first publish) is not taken
        here: a transaction left open across requests would hold its row locks, and other
        hosts' changes would wait for them; every change commits at once."""
        db = self._pg
        db.begin()
        try:
            yield db
            if not commit:
                db.rollback()
                return
            db.commit()
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise
        self._changes += 1

    def _abandon_after(self, exc: ManifestError) -> None:
        """No transaction is ever left open across calls here (see _transaction): a failed
        call has nothing of SQLite's deferred change to end."""

    def _lock_rows(self, nodes: list[int], digest: str | None = None) -> None:
        """Before a change that reads rows and then writes them: lock them in the one order
        every change uses (nodes, then blobs, each by id), so two changes never wait for each
        other in a circle. The blobs: the current content of these nodes and `digest`'s."""
        db = self._pg  # the locks are taken in the pipeline: the server runs them in order
        db.execute("SELECT id FROM nodes WHERE id = ANY(?) ORDER BY id FOR UPDATE",
                   (sorted(set(nodes)),), answer=False)
        db.execute("SELECT b.id FROM blobs b WHERE b.id IN (SELECT v.blob_id FROM nodes n JOIN "
                   "versions v ON v.id = n.version_id WHERE n.id = ANY(?)) OR b.sha256 = ? "
                   "ORDER BY b.id FOR UPDATE", (sorted(set(nodes)), digest), answer=False)

    def sync(self, durable_ns: int | None = None) -> None:
        """Every commit is durable already (synchronous_commit on): this records the durable
        point (every blob stored before it is on disk), one small transaction."""
        with self._transaction() as db:
            db.execute("UPDATE store_state SET synced_ns = coalesce(?, synced_ns)",
                       (durable_ns,))

    def check_integrity(self) -> list[str]:
        """PostgreSQL checks its own pages (and its WAL) on every read; there is no whole-file
        check to run from here. Answers that the server is reachable and the schema there."""
        self._db.execute("SELECT count(*) FROM store_state").fetchone()
        return []

    def copy_to(self, target: Path) -> None:
        """Backups of a manifest on PostgreSQL are PostgreSQL's: pg_dump (or its base backups
        and WAL archiving). cafs makes none."""
        raise ManifestError("the manifest is on PostgreSQL: back it up with pg_dump "
                            "(cafs makes no copy of it)", errno.ENOTSUP)

    def _last_node_id(self) -> int:
        return int(self._db.execute(
            "SELECT GREATEST((SELECT last_value FROM nodes_id_seq), "
            "(SELECT coalesce(max(id), 0) FROM nodes))").fetchone()[0])

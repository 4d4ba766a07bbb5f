"""The change feed of a manifest on PostgreSQL: what other mounts changed, read exactly once.

Owns: one dedicated connection per mount (LISTEN cafs_changes), reading the rows the triggers of
migration m004_changes wrote (cafs.pg_manifest.schema) since the last read, and trimming old
ones. Must not know caches, FUSE or trio: the daemon waits on `socket` and calls `notified` and
`read` (blocking, short), then hands the changes to the filesystem core.

Why snapshots and not a counter: a row gets its number when it is written, but lands when its
transaction commits, and commits land out of order; a reader that remembered "the highest
number seen" would skip a slow transaction's rows for good. So each read takes the rows whose
transaction is visible in this read's snapshot and was not in the previous read's: every
committed change is read exactly once, whatever the order of commits. A read is one
statement for that reason (one snapshot, one round trip).

Gaps: rows are kept TRIM_AFTER seconds. A reader that has not read for longer than KEEP_UP
(disconnected, or stuck) may have lost rows to the trim, and a NOTIFY sent while disconnected
is lost: after either, `read` says `flush` (forget every cache), and starts anew from now.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass

import psycopg

from cafs.model import Change

CHANNEL = "cafs_changes"
TRIM_AFTER = 300.0  # seconds a change row is kept
TRIM_EVERY = 30.0
KEEP_UP = TRIM_AFTER - 2 * TRIM_EVERY  # a reader silent longer than this may have a gap
_CONNECT = 2  # seconds: the feed is a best effort over the poll; a dead server is retried


@dataclass(frozen=True)
class Batch:
    """What one read found: the changes, or `flush` (caches may be stale in any way)."""

    changes: tuple[Change, ...]
    flush: bool = False


class FeedError(Exception):
    """The feed's connection failed: the caller reconnects (and flushes) later."""


class ChangeFeed:
    """Follows a manifest's changes on its own connection. Used from one thread at a time."""

    def __init__(self, url: str, session_id: int | None) -> None:
        self.url = url
        self.session_id = session_id  # changes made by this mount are skipped
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._snapshot: str | None = None  # of the last read
        self._read_at = 0.0
        self._xmins: deque[tuple[float, str]] = deque()  # (when, xmin) samples for the trim
        self._trimmed_at = time.monotonic()
        self._heard = False  # a notification psycopg took in while a read ran

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    @property
    def socket(self) -> int:
        """The descriptor to wait on: readable when a notification (or an EOF) arrived."""
        if self._conn is None:
            raise FeedError("the change feed is not connected")
        return self._conn.pgconn.socket

    def connect(self) -> None:
        """(Re)connect and LISTEN; the next read flushes (notifications were lost)."""
        self.close()
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=_CONNECT,
                                   application_name="cafs-feed", keepalives=1,
                                   keepalives_idle=5, keepalives_interval=2,
                                   keepalives_count=2, tcp_user_timeout=4000,
                                   options="-c statement_timeout=3000")
            conn.add_notify_handler(self._hear)
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            raise FeedError(f"change feed: cannot connect: {exc}") from exc
        self._conn = conn
        self._snapshot = None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None
        self._snapshot = None

    def notified(self) -> bool:
        """Consume what arrived on the socket; True if it held a notification."""
        conn = self._live()
        try:
            conn.pgconn.consume_input()
        except psycopg.Error as exc:
            self.close()
            raise FeedError(f"change feed: connection lost: {exc}") from exc
        got, self._heard = self._heard, False
        while (notify := conn.pgconn.notifies()) is not None:
            got = got or self._theirs(notify.extra)
        return got

    def _hear(self, notify: psycopg.Notify) -> None:
        self._heard = self._heard or self._theirs(notify.payload.encode())

    def _theirs(self, payload: bytes) -> bool:
        """A notification of another mount's changes (the payload: the writer's session)."""
        return self.session_id is None or payload != str(self.session_id).encode()

    def read(self) -> Batch:
        """The changes committed since the last read, by other mounts (see the module
        docstring); `flush` after a (re)connect or a silence that may hide a gap."""
        conn = self._live()
        flush = self._snapshot is None or time.monotonic() - self._read_at > KEEP_UP
        # One statement, so one snapshot: the rows it scans are exactly those of the
        # transactions its pg_current_snapshot() shows committed (a statement's active
        # snapshot in READ COMMITTED), and the next read starts from that one.
        previous = self._snapshot or "1:1:"
        try:
            rows = conn.execute(
                "WITH now AS (SELECT pg_current_snapshot() AS snapshot) "
                "SELECT now.snapshot::text, pg_snapshot_xmin(now.snapshot)::text, c.what, c.id, "
                "c.parent_id, c.name, c.old_parent_id, c.old_name FROM now LEFT JOIN "
                "cafs_changes c ON NOT %s AND c.xid >= pg_snapshot_xmin(%s::pg_snapshot) "
                "AND NOT pg_visible_in_snapshot(c.xid, %s::pg_snapshot) "
                "AND (c.origin IS NULL OR c.origin <> %s)",  # NULL: not a mount (admin)
                (flush, previous, previous, self.session_id or 0)).fetchall()
        except psycopg.Error as exc:
            self.close()
            raise FeedError(f"change feed: read failed: {exc}") from exc
        self._snapshot = str(rows[0][0])
        self._read_at = time.monotonic()
        self._sample(str(rows[0][1]))
        changes = tuple(Change(str(r[2]), int(str(r[3])), _int(r[4]), _str(r[5]), _int(r[6]),
                               _str(r[7])) for r in rows if r[2] is not None)
        return Batch(changes=changes, flush=flush)

    def _sample(self, xmin: str) -> None:
        now = time.monotonic()
        if not self._xmins or now - self._xmins[-1][0] >= TRIM_EVERY:
            self._xmins.append((now, xmin))

    @property
    def trim_due(self) -> bool:
        return time.monotonic() - self._trimmed_at >= TRIM_EVERY

    def trim(self) -> int:
        """Delete the rows of transactions older than TRIM_AFTER (every mount does, now and
        then; they agree, so it does not matter which); returns how many went."""
        now = time.monotonic()
        if not self.trim_due:
            return 0
        self._trimmed_at = now
        cutoff = None
        while self._xmins and now - self._xmins[0][0] >= TRIM_AFTER:
            cutoff = self._xmins.popleft()[1]
        if cutoff is None:
            return 0
        try:
            return self._live().execute("DELETE FROM cafs_changes WHERE xid < %s::xid8",
                                        (cutoff,)).rowcount
        except psycopg.Error as exc:
            self.close()
            raise FeedError(f"change feed: trim failed: {exc}") from exc

    def _live(self) -> psycopg.Connection[tuple[object, ...]]:
        if not self.connected:
            raise FeedError("the change feed is not connected")
        assert self._conn is not None
        return self._conn


def _int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _str(value: object) -> str | None:
    return None if value is None else str(value)

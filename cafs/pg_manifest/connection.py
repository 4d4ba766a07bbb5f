"""One PostgreSQL connection with the face of sqlite3.Connection the manifest's parts use.

Owns: connecting (libpq URL; the password only from the environment, a service or password
file), the session settings (READ COMMITTED, statement_timeout, synchronous_commit on), the
timeouts that bound a hung server (connect, TCP keep-alives, and a watchdog that shuts the
socket down when a statement outlives its deadline: a server that accepts bytes and never
answers defeats every server-side timeout), reconnecting, transactions with their COMMIT
resolved after a dropped connection (pg_xact_status of the transaction's id), and `execute` /
`executemany` / `lastrowid` / `rowcount` / `total_changes` as sqlite3 has them, the SQL
translated by cafs.pg_manifest.dialect. Must not know the manifest's tables beyond the id
sequences, nor turn errors into ManifestError (cafs.pg_manifest.core does).

Concurrency rule: as the SQLite manifest's — one connection, used from one thread; the watchdog
thread only ever shuts the socket down.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any

import psycopg
import psycopg.abc
from psycopg import pq
from psycopg.adapt import Loader, Transformer
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

from cafs.pg_manifest.dialect import Statement, explicit_id_table, insert_table, translate


@dataclass(frozen=True)
class Bounds:
    """How long a manifest call may wait (seconds)."""

    connect: int  # to connect (TCP and the start-up exchange)
    statement: int  # server side: a statement that runs longer is cancelled (statement_timeout)
    deadline: float  # client side: no answer at all (a hung server or network)
    call: float  # one manifest call, its retries and reconnects included


# The daemon: every manifest call runs on its event loop today, and the service watchdog fires
# after 30 s without a ping, so a whole call, retries included, stays well below that.
DAEMON = Bounds(connect=2, statement=3, deadline=4.0, call=8.0)
# An admin command on an unmounted store (fsck --full, gc, stats over millions of rows): its
# whole-manifest queries may run minutes; a dead server still ends it.
ADMIN = Bounds(connect=5, statement=900, deadline=960.0, call=3600.0)


class CommitLost(Exception):
    """The connection dropped during COMMIT and the transaction did not land: safe to retry."""


class CommitUnknown(Exception):
    """The connection dropped during COMMIT and the server could not be asked in time whether
    the transaction landed."""


class _IntegralNumeric(Loader):
    """sum() of BIGINT is NUMERIC in PostgreSQL: integral values come back as int, as
    SQLite's do (a Decimal in a size or a count would leak into records and JSON)."""

    def load(self, data: Any) -> Any:
        text = bytes(data)
        if text.lstrip(b"-").isdigit():
            return int(text)
        return Decimal(text.decode())


class Cursor:
    """The rows of one statement, already fetched (psycopg's client-side cursor); or, for a
    change whose answer nobody waits for (see PgConnection._pipelined), its row count once
    the pipeline has delivered it."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int, lastrowid: int | None,
                 pending: tuple[PgConnection, psycopg.Cursor[Any]] | None = None):
        self._rows = rows
        self._next = 0
        self._rowcount = rowcount
        self._pending = pending
        self.lastrowid = lastrowid

    @property
    def rowcount(self) -> int:
        self._arrive()
        return self._rowcount

    def _arrive(self) -> None:
        """A statement sent in the pipeline without waiting (see PgConnection.execute's
        `wait`): its answer, fetched at the first look at it (with every answer before it, in
        one round trip)."""
        if self._pending is not None:
            owner, cursor = self._pending
            if cursor.pgresult is None:  # not arrived with an earlier answer
                owner.flush()
            self._rowcount, self._pending = cursor.rowcount, None
            result = cursor.pgresult
            if result is not None and result.nfields:  # (cheaper than building description)
                self._rows = cursor.fetchall()

    def fetchone(self) -> tuple[Any, ...] | None:
        self._arrive()
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[tuple[Any, ...]]:
        self._arrive()
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        while (row := self.fetchone()) is not None:
            yield row


class _Watchdog:
    """Shuts a connection's socket down once the statement it runs passes its deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._fd = -1
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cafs-pg-watchdog", daemon=True)
        self._thread.start()

    def arm(self, fd: int, deadline: float) -> None:
        with self._lock:
            self._fd, self._deadline, self.fired = fd, deadline, False

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                if self._deadline is None or time.monotonic() < self._deadline:
                    continue
                self._deadline = None
                self.fired = True
                try:
                    sock = socket.socket(fileno=os.dup(self._fd))
                except OSError:
                    continue
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
                sock.close()


class PgConnection:
    """sqlite3.Connection's face over one psycopg connection (autocommit outside the
    transactions the manifest opens)."""

    def __init__(self, url: str, *, readonly: bool = False, bounds: Bounds = ADMIN) -> None:
        self.url = url
        self.readonly = readonly
        self.bounds = bounds
        self._changed = 0  # rows changed, as sqlite3's total_changes
        self.in_transaction = False
        self.deadline: float | None = None  # of the manifest call in progress
        # The last call failed for want of the server: the next ones make one quick attempt
        # each (a connect), not a whole call's worth of retries, until one succeeds. One
        # filesystem request makes several manifest calls; against a dead server only the
        # first may wait the full bound.
        self.down = False
        self._explicit_ids: set[str] = set()
        self._xid = ""  # of the transaction in progress
        # Inside a transaction, changes whose answer nobody reads (UPDATE, DELETE, INSERT
        # without RETURNING) go out in a pipeline without a round trip each: the server
        # answers them with the next statement whose rows are read, or with COMMIT. An error
        # of one is raised there; the whole call is then retried as any other.
        self._pipeline: Any = None
        self._pipeline_scope: Any = None
        self._queued: list[psycopg.Cursor[Any]] = []
        self._xid_cursor: Cursor | None = None  # the transaction id's answer, not yet read
        # Statements whose answer nobody waits for, sent with the next statement on this
        # connection (in its round trip): see `later`.
        # (A deque: `later` may append from another thread than the one sending.)
        self._outbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._conn: psycopg.Connection[Any] | None = None
        # Reads outside a transaction go straight to libpq (see _read_prepared): per
        # statement text, its prepared statement's name on this connection, or None where
        # that path does not serve it.
        self._prepared: dict[str, bytes | None] = {}
        self._loader: psycopg.abc.Transformer | None = None
        self.closed = False  # by its owner: never connects again
        # The mount's session id, set on every connection as cafs.session: the change feed's
        # triggers record it, so a mount skips its own changes (cafs.pg_manifest.feed).
        self.session: int | None = None
        self._watchdog = _Watchdog()
        self.serial = 0
        self.connect()

    # -- the connection ---------------------------------------------------------------------

    def connect(self) -> None:
        self.close_quietly()
        # What `later` kept was about the old connection's session (its advisory locks went
        # with it): sent on a new one, an unlock could release a pin taken there since.
        self._outbox.clear()
        if self.closed:
            raise psycopg.InterfaceError("the manifest was closed")
        if self.deadline is not None and self.deadline - time.monotonic() < self.bounds.connect:
            # A connect may take its whole timeout: none is started that would end after the
            # call's deadline.
            raise psycopg.OperationalError("manifest: no time left to reconnect in this call")
        bounds = self.bounds
        options = (f"-c statement_timeout={bounds.statement * 1000} "
                   "-c synchronous_commit=on -c default_transaction_isolation=read\\ committed "
                   f"-c idle_in_transaction_session_timeout={int(bounds.call * 1000)}")
        if self.readonly:
            options += " -c default_transaction_read_only=on"
        if self.session is not None:
            options += f" -c cafs.session={int(self.session)}"
        conn = psycopg.connect(
            self.url, autocommit=True, connect_timeout=bounds.connect, options=options,
            application_name="cafs", keepalives=1, keepalives_idle=5, keepalives_interval=2,
            keepalives_count=2, tcp_user_timeout=int(bounds.deadline * 1000),
            prepare_threshold=2)  # hot statements prepared once per connection
        conn.adapters.register_dumper(int, Int8Dumper)
        conn.adapters.register_dumper(int, Int8BinaryDumper)
        conn.adapters.register_loader("numeric", _IntegralNumeric)
        self._conn = conn
        # Which connection this is: a session's advisory locks (pins) live exactly as long.
        self.serial += 1
        self._prepared.clear()
        self._loader = Transformer(conn)  # the connection's loaders (_IntegralNumeric too)
        self.in_transaction = False
        self._explicit_ids.clear()

    def close_quietly(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.closed = True
        self.close_quietly()
        self._watchdog.stop()

    @property
    def total_changes(self) -> int:
        self.flush()
        return self._changed

    @property
    def usable(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    def _live(self) -> psycopg.Connection[Any]:
        if self.closed:
            raise psycopg.InterfaceError("the manifest was closed")
        if not self.usable:
            if self.in_transaction:  # the transaction went with the connection
                raise psycopg.OperationalError("the connection to the manifest was lost")
            self.connect()
        assert self._conn is not None
        return self._conn

    def _remaining(self) -> float:
        if self.deadline is None:
            return self.bounds.deadline
        return max(0.0, min(self.bounds.deadline, self.deadline - time.monotonic()))

    @contextlib.contextmanager
    def _watched(self, conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
        """Talk to the server under the watchdog: past `seconds` it shuts the socket, and the
        connection it broke is closed (a later call reconnects)."""
        self._watchdog.arm(conn.pgconn.socket, time.monotonic() + seconds)
        try:
            yield
        except psycopg.Error:
            if self._watchdog.fired:
                conn.close()
            raise
        finally:
            self._watchdog.disarm()

    def _run(self, sql: str, params: Any, many: bool = False, lazy: bool = False) -> Cursor:
        conn = self._live()
        remaining = self._remaining()
        if remaining <= 0:
            raise psycopg.OperationalError("manifest: out of time for this call")
        if self._outbox and self._pipeline is None:
            return self._run_after_outbox(conn, remaining, sql, params, many)
        with self._watched(conn, remaining):
            if self._pipeline is not None:
                cur = conn.cursor()
                if many:
                    cur.executemany(sql, params)
                    self._queued.append(cur)
                    return Cursor([], 0, None, (self, cur))
                cur.execute(sql, params)
                if lazy:
                    self._queued.append(cur)
                    return Cursor([], 0, None, (self, cur))
                return Cursor(cur.fetchall(), cur.rowcount, None)
            with conn.cursor() as cur:
                if many:
                    cur.executemany(sql, params)
                    return Cursor([], cur.rowcount, None)
                cur.execute(sql, params)
                while cur.description is None and cur.nextset():  # several statements: the
                    pass  # rows are the first that has any
                rows = cur.fetchall() if cur.description is not None else []
                return Cursor(rows, cur.rowcount, None)

    def later(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Send `sql` (a statement whose answer nobody reads, such as an unlock) with the next
        statement on this connection, in its round trip, instead of in one of its own. Lost
        if the connection drops before then (as the session state it would change is)."""
        statement = translate(sql)
        self._outbox.append((statement.sql, _values(statement.order, params)))  # (atomic)

    @property
    def pending(self) -> bool:
        """Statements wait for the next one (see `later`)."""
        return bool(self._outbox)

    def drop_pending(self) -> None:
        self._outbox.clear()

    def _send_queued(self) -> None:
        """Inside the pipeline: what `later` kept, first."""
        for sql, params in self._taken():
            self._run(sql, params, lazy=True)

    def _taken(self) -> list[tuple[str, Any]]:
        taken = []
        while self._outbox:
            taken.append(self._outbox.popleft())
        return taken

    def _run_after_outbox(self, conn: psycopg.Connection[Any], remaining: float, sql: str,
                          params: Any, many: bool) -> Cursor:
        """A statement outside a transaction, after the statements `later` kept: in one
        pipeline, so one round trip. (Several statements in one text cannot go through a
        pipeline: the kept ones then go first, each on its own.)"""
        outbox = self._taken()
        if params is None or many:
            with self._watched(conn, remaining):
                for text, values in outbox:
                    conn.execute(text, values)
            return self._run(sql, params, many)
        with self._watched(conn, remaining), conn.pipeline() as pipeline:
            for text, values in outbox:
                conn.cursor().execute(text, values)
            cur = conn.cursor()
            cur.execute(sql, params)
            pipeline.sync()
            rows = cur.fetchall() if cur.description is not None else []
            return Cursor(rows, cur.rowcount, None)

    def flush(self) -> None:
        """Wait for the answers of every change sent in the pipeline (their row counts)."""
        if self._pipeline is None or not self._queued:
            return
        if all(cur.pgresult is not None for cur in self._queued):  # arrived with others
            self._count_queued()
            return
        conn = self._live()
        with self._watched(conn, max(0.1, self._remaining())):
            self._pipeline.sync()
        self._count_queued()

    def _count_queued(self) -> None:
        for cur in self._queued:
            self._changed += max(cur.rowcount, 0)
        self._queued.clear()

    def _leave_pipeline(self, *, quietly: bool) -> None:
        scope, self._pipeline, self._pipeline_scope = self._pipeline_scope, None, None
        if scope is None:
            return
        try:
            scope.__exit__(None, None, None)
        except psycopg.Error:
            self._queued.clear()
            if not quietly:
                raise
        self._count_queued()

    # -- sqlite3.Connection's face ----------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = (), *,
                answer: bool = True, wait: bool = True) -> Cursor:
        """`answer=False`: the caller reads nothing back (a row lock taken with FOR UPDATE):
        inside a transaction it goes out in the pipeline like a change. `wait=False`, inside
        a transaction: the statement goes out now and its rows are fetched at the first look
        at them, so statements that do not need each other's answers share one round trip
        (no lastrowid: a RETURNING clause of its own gives ids)."""
        plan = _plan(sql)
        statement = plan.statement
        if not wait and self._pipeline is not None:
            return self._run(statement.sql, _values(statement.order, params), lazy=True)
        text, values, table = plan.text, _values(statement.order, params), plan.insert_into
        lazy = (statement.quiet or not answer) and not plan.returns_id
        if plan.explicit_ids is not None:
            self._explicit_ids.add(plan.explicit_ids)
        if plan.reads and not self.in_transaction:
            cursor = self._read(text, values)
        else:
            cursor = self._run(text, values, lazy=lazy)
        if table is not None and cursor._rows:
            cursor.lastrowid = int(cursor._rows[-1][0])
            cursor._rows = []
        if not lazy:  # (a pipelined change counts once its answer arrives)
            self._changed += max(cursor.rowcount, 0)
        return cursor

    def _read(self, text: str, values: Any) -> Cursor:
        """A read outside a transaction is repeated on a new connection if the old one
        dropped: reads change nothing, so running one twice is harmless."""
        while True:
            try:
                cursor = self._read_prepared(text, values)
                return self._run(text, values) if cursor is None else cursor
            except psycopg.OperationalError:
                if self.deadline is None or time.monotonic() >= self.deadline - 0.1:
                    raise
                time.sleep(0.05)
                try:
                    self.connect()
                except psycopg.OperationalError:
                    continue

    def _read_prepared(self, text: str, values: Any) -> Cursor | None:
        """A read outside a transaction as one libpq call on a statement prepared once per
        connection; None if this path does not serve it (then psycopg runs it).

        Why: every open of a file on a shared manifest asks for the file's current version
        (close-to-open), and every lookup the cache lacks asks for a node. Through psycopg's
        cursor such a point read cost 100-150 us of CPU on the event loop; through libpq
        directly, 15-25 us (measured on loopback, interleaved). Same statement, same
        server, same loaders, same watchdog: only the client's layers are skipped."""
        if (self._pipeline is not None or self.in_transaction or self._loader is None
                or self._outbox):  # what `later` kept goes first, in psycopg's pipeline
            return None
        params = _text_params(values)
        if params is None:
            return None
        conn = self._live()
        pgconn = conn.pgconn
        name = self._prepared.get(text, b"")
        if name is None:
            return None
        remaining = self._remaining()
        if remaining <= 0:
            raise psycopg.OperationalError("manifest: out of time for this call")
        with self._watched(conn, remaining):
            for _ in range(2):
                if not name:
                    numbered = _numbered(text)
                    if numbered is None:
                        self._prepared[text] = None
                        return None
                    name = f"cafs_read_{len(self._prepared)}".encode()
                    result = pgconn.prepare(name, numbered.encode(), None)
                    _check(pgconn, result)
                    if result.status != pq.ExecStatus.COMMAND_OK:  # not preparable: psycopg's
                        self._prepared[text] = None
                        return None
                    self._prepared[text] = name
                result = pgconn.exec_prepared(name, params)  # type: ignore[arg-type]  # None: NULL
                _check(pgconn, result)
                if result.error_field(pq.DiagnosticField.SQLSTATE) != _NO_SUCH_STATEMENT:
                    break
                # psycopg deallocates every prepared statement of the session after a ROLLBACK
                # (DEALLOCATE ALL, its own and ours): prepared again, once.
                self._prepared.clear()
                name = b""
            if result.status != pq.ExecStatus.TUPLES_OK:
                raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
            loader = self._loader
            loader.set_pgresult(result)
            rows = loader.load_rows(0, result.ntuples, tuple)
            return Cursor(rows, len(rows), None)

    def execute_raw(self, sql: str) -> None:
        """A statement (or several) as PostgreSQL spells it, without parameters: migrations."""
        self._run(sql, None)

    def executemany(self, sql: str, rows: Iterable[Any]) -> Cursor:
        statement = translate(sql)
        explicit = explicit_id_table(sql)
        if explicit is not None:
            self._explicit_ids.add(explicit)
        values = [_values(statement.order, row) for row in rows]
        if not values:
            return Cursor([], 0, None)
        return self._run(statement.sql, values, many=True)

    # -- transactions -----------------------------------------------------------------------

    def begin(self, *, pipelined: bool = True) -> None:
        """BEGIN, and the transaction's id for resolving its COMMIT if the connection drops
        then. Pipelined: both go out without a round trip of their own; the id arrives with
        the transaction's first answer (commit waits for it if none came)."""
        self._explicit_ids.clear()
        self._queued.clear()
        if not pipelined:  # one simple query of two statements, one round trip
            row = self._run("BEGIN; SELECT pg_current_xact_id()::text", None).fetchone()
            assert row is not None
            self._xid, self._xid_cursor = str(row[0]), None
            self.in_transaction = True
            return
        conn = self._live()
        self._pipeline_scope = conn.pipeline()
        self._pipeline = self._pipeline_scope.__enter__()
        try:
            self._send_queued()
            self._run("BEGIN", None, lazy=True)
            self._xid_cursor = self._run("SELECT pg_current_xact_id()::text", None, lazy=True)
        except BaseException:
            self._leave_pipeline(quietly=True)
            raise
        self.in_transaction = True

    def rollback(self) -> None:
        self.in_transaction = False
        self._leave_pipeline(quietly=True)
        if self.usable:
            try:
                self._run("ROLLBACK", ())
            except psycopg.Error:
                self.close_quietly()

    def commit(self) -> None:
        """COMMIT; if the connection drops on the way, ask the server on a new connection
        whether the transaction landed: the caller gets an answer only once that is known."""
        for table in sorted(self._explicit_ids):
            # Ids an import gave itself: the sequence moves past them (never back: node ids
            # are inode numbers, never reused).
            self._run(f"SELECT setval('{table}_id_seq', GREATEST((SELECT coalesce(max(id), 0) "
                      f"FROM {table}), (SELECT last_value FROM {table}_id_seq)))", ())
        if self._xid_cursor is not None:
            # No answer came in this transaction yet: the id must be known before COMMIT.
            row = self._xid_cursor.fetchone()
            assert row is not None
            self._xid, self._xid_cursor = str(row[0]), None
        try:
            self._run("COMMIT", (), lazy=True)  # its answer, and every pending one, at once
            self._leave_pipeline(quietly=False)
        except psycopg.OperationalError:
            self.in_transaction = False
            self._pipeline = self._pipeline_scope = None
            self._queued.clear()
            self.close_quietly()
            self._resolve(self._xid)
        finally:
            self.in_transaction = False

    def _resolve(self, xid: str) -> None:
        # The answer may take a little longer than the call's own deadline: a caller told
        # "failed" about a change that landed would be told a lie.
        end = max(self.deadline or 0.0, time.monotonic() + self.bounds.connect * 2 + 0.5)
        saved, self.deadline = self.deadline, end
        try:
            self._ask_status(xid, end)
        finally:
            self.deadline = saved

    def _ask_status(self, xid: str, end: float) -> None:
        while time.monotonic() < end:
            try:
                if not self.usable:
                    self.connect()
                row = self._run("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
            except psycopg.OperationalError:
                time.sleep(0.1)
                continue
            status = row[0] if row else None
            if status == "committed":
                return
            if status == "aborted" or status is None:
                raise CommitLost(f"transaction {xid} did not commit")
            time.sleep(0.05)  # still in progress on the server
        raise CommitUnknown(f"transaction {xid}: the connection dropped during COMMIT and "
                            "the server did not answer whether it landed")


_ID_TABLES = ("nodes", "versions", "histories", "blobs")


@dataclass(frozen=True)
class _Plan:
    """How `execute` runs a statement text: worked out once per text, not per call (a point
    read of a node runs at every open of a file on a shared manifest)."""

    statement: Statement
    text: str  # for psycopg: the translation, with RETURNING id where lastrowid needs it
    insert_into: str | None  # the table of a plain INSERT (lastrowid)
    returns_id: bool  # an INSERT into a table whose new id the caller reads (lastrowid)
    explicit_ids: str | None  # the table an INSERT gives ids of its own (see commit)
    reads: bool  # a SELECT (or WITH RECURSIVE): outside a transaction, retried as a read


@lru_cache(maxsize=1024)
def _plan(sql: str) -> _Plan:
    statement = translate(sql)
    table = insert_table(sql)
    returns_id = table in _ID_TABLES
    text = statement.sql + " RETURNING id" if returns_id else statement.sql
    return _Plan(statement, text, table, returns_id, explicit_id_table(sql),
                 text.lstrip()[:6].upper() in ("SELECT", "WITH R"))
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name: a prepared statement is gone


def _text_params(values: Any) -> list[bytes | None] | None:
    """Positional parameters in libpq's text format (the server infers their types from the
    prepared statement); None if one is of a type this path leaves to psycopg."""
    if not isinstance(values, list | tuple):
        return None
    params: list[bytes | None] = []
    for value in values:
        if value is None:
            params.append(None)
        elif isinstance(value, str):
            params.append(value.encode())
        elif isinstance(value, int) and not isinstance(value, bool):
            params.append(str(value).encode())
        else:
            return None
    return params


def _numbered(text: str) -> str | None:
    """psycopg's `%s` placeholders as libpq's `$1, $2...` and `%%` as `%`; None if the text
    holds any other `%` form (named placeholders)."""
    out: list[str] = []
    index = 0
    position = 0
    while True:
        found = text.find("%", position)
        if found < 0:
            out.append(text[position:])
            return "".join(out)
        out.append(text[position:found])
        token = text[found:found + 2]
        if token == "%%":
            out.append("%")
        elif token == "%s":
            index += 1
            out.append(f"${index}")
        else:
            return None
        position = found + 2


def _check(pgconn: pq.abc.PGconn, result: pq.abc.PGresult) -> None:
    """A call that broke the connection (dropped, or shut by the watchdog) is an
    OperationalError, as psycopg raises it: the read is retried on a new connection."""
    if pgconn.status == pq.ConnStatus.BAD or (
            result.status == pq.ExecStatus.FATAL_ERROR
            and not result.error_field(pq.DiagnosticField.SQLSTATE)):
        message = result.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(message or "the connection to the manifest was lost")


def _values(order: tuple[int, ...] | None, params: Any) -> Any:
    if order is None:
        return params
    return [params[index] for index in order]

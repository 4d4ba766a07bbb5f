"""The read-only questions of `cafs ui`, asked of this manifest's connection.

Owns: running one named page query of cafs.sqlite_manifest.ui_queries (the one module
holding the web view's SQL) on the manifest's own connection, so that a daemon answers them for
a mounted store. Must not write. The store-wide summary reads every artifact and a run's
timeline every publish in it: only the UI calls `summary` and `timeline`, on its own read-only
connection, never the daemon (the control socket reaches `browse` alone).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from cafs.errors import InvalidArgument
from cafs.sqlite_manifest import ui_queries as queries
from cafs.sqlite_manifest.core import SqliteCore


class SqliteBrowse(SqliteCore):
    def browse(self, query: str, params: dict[str, Any]) -> dict[str, Any]:
        """The answer of page query `query` (see ui_queries.QUERIES) as JSON."""
        if query not in queries.QUERIES:
            raise InvalidArgument(f"unknown query {query!r}")
        try:
            return queries.run(self._db, query, params)
        except (OverflowError, sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
            # A parameter SQLite cannot bind (an integer past 64 bits, a list): the client's
            # mistake, answered EINVAL, not an unexpected error in the daemon's log.
            raise InvalidArgument(f"bad parameters for {query}: {exc}") from None

    def timeline(self, path: str, first_ns: int, last_ns: int) -> dict[str, Any]:
        """ui_queries.timeline: O(publishes in the run); never on a daemon's connection."""
        return queries.timeline(self._db, path, first_ns, last_ns)

    def summary(self) -> dict[str, Any]:
        """ui_queries.summary: O(artifacts); never on a daemon's connection."""
        return queries.summary(self._db)

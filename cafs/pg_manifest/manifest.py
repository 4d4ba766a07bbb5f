"""The PostgreSQL manifest as one object: the SQLite manifest's parts over PgCore.

Owns: putting the parts together — SqliteManifest's namespace, tags, content, maintenance and
import parts (one set of queries; cafs.pg_manifest.dialect spells them for PostgreSQL) on
PgCore's connection, transactions and retries, with PgWriters' changes for several hosts and
PgContent's first publish in fewer round trips —
and the static proof that it implements cafs.manifest_api.Manifest. It is a SqliteManifest in
Python's eyes, so every caller typed against the manifest cafs opens takes it. Must not hold
SQL of its own. The web view's page queries (cafs ui) are SQLite's: here they refuse, clearly.
"""

from __future__ import annotations

import errno
from typing import Any, NoReturn

from cafs import manifest_api
from cafs.errors import ManifestError
from cafs.pg_manifest.content import PgContent
from cafs.pg_manifest.writers import PgWriters
from cafs.sqlite_manifest.manifest import SqliteManifest


def _no_web_view() -> NoReturn:
    raise ManifestError("cafs ui reads the SQLite manifest only; this store's manifest is on "
                        "PostgreSQL", errno.ENOTSUP)


class PgManifest(PgWriters, PgContent, SqliteManifest):
    """A manifest in a PostgreSQL database (`manifest = "postgresql://..."`): the same rows
    and meaning as manifest.sqlite (see cafs.pg_manifest.schema). Opened by cafs.store."""

    def browse(self, query: str, params: dict[str, Any]) -> dict[str, Any]:
        _no_web_view()

    def timeline(self, path: str, first_ns: int, last_ns: int) -> dict[str, Any]:
        _no_web_view()

    def summary(self) -> dict[str, Any]:
        _no_web_view()


def _implements_the_interface(manifest: PgManifest) -> manifest_api.Manifest:
    return manifest  # mypy checks that every protocol method is here, with its signature

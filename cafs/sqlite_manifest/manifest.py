"""The SQLite manifest as one object: the parts by role over one connection.

Owns: putting the parts together (namespace, tags, content, maintenance, import, and the web
view's read-only queries, all built on SqliteCore's connection and transactions) into the
class a store opens, and the static proof that it implements cafs.manifest_api.Manifest.
Must not hold SQL or behaviour of its own.
"""

from __future__ import annotations

from cafs import manifest_api
from cafs.sqlite_manifest.browse import SqliteBrowse
from cafs.sqlite_manifest.content import SqliteContent
from cafs.sqlite_manifest.load import SqliteImport
from cafs.sqlite_manifest.maintenance import SqliteMaintenance
from cafs.sqlite_manifest.namespace import SqliteNamespace
from cafs.sqlite_manifest.tags import SqliteTags


class SqliteManifest(SqliteNamespace, SqliteTags, SqliteContent, SqliteMaintenance,
                     SqliteImport, SqliteBrowse):
    """`manifest.sqlite`: the namespace under runs/, the versions of every artifact, the
    blobs' records and refcounts, and tags (see cafs/schema.py). Opened by cafs.store."""


def _implements_the_interface(manifest: SqliteManifest) -> manifest_api.Manifest:
    return manifest  # mypy checks that every protocol method is here, with its signature

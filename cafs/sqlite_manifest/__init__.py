"""The manifest on SQLite: the embedded back end behind cafs.manifest_api.

Owns: every SQL statement cafs runs against `manifest.sqlite` (the schema and its migrations
are in cafs/schema.py). Raw sqlite3 on the hot paths; sqlite-utils for schema and migrations.
One module per role, each a part of SqliteManifest over one connection:
  core         connection, pragmas, transactions, sync, backups; sqlite3.Error -> ManifestError
  columns      column tuples that build the SELECT lists and decode the rows; INSERT statements
  aggregates   the m004 aggregate columns, carried up the ancestors inside each change
  rows         node reads and the writes every change is built from
  namespace, tags, content, maintenance, load   the parts behind the protocols of the same role
  manifest     SqliteManifest: the parts together
Must not touch blob files, FUSE or trio; nothing outside this package and cafs/schema.py
imports sqlite3 for the manifest.
"""

from cafs.sqlite_manifest.core import copy_manifest, manifest_error
from cafs.sqlite_manifest.manifest import SqliteManifest

__all__ = ["SqliteManifest", "copy_manifest", "manifest_error"]

"""The manifest on PostgreSQL: the server back end behind cafs.manifest_api (psycopg 3).

Owns: running the SQLite manifest's parts on a PostgreSQL connection. One module per role:
  dialect      SQLite's SQL as PostgreSQL spells it (placeholders, LEAST/GREATEST, ...)
  connection   one psycopg connection with sqlite3's face: timeouts, reconnects, COMMIT resolved
  schema       the tables (today's final shape, BIGINT, commented) and their migrations
  core         PgCore: what differs from SQLite's core; retries; psycopg.Error -> ManifestError
  manifest     PgManifest: the parts together
Must not touch blob files, FUSE or trio; nothing outside this package imports psycopg.
"""

from cafs.pg_manifest.core import has_password, redact
from cafs.pg_manifest.manifest import PgManifest

__all__ = ["PgManifest", "has_password", "redact"]

"""The manifest cafs uses: the SQLite implementation of cafs.manifest_api, under its old names.

Owns: nothing but the names callers import (`from cafs.manifest import Manifest, NewVersion`):
`Manifest` is the class a store opens (SqliteManifest), the records are those of
cafs.manifest_api. Code that only uses a manifest should be typed against
cafs.manifest_api.Manifest, the interface a second back end will implement too. Must not hold
SQL or behaviour.
"""

from cafs.manifest_api import (
    BulkArtifact,
    DirStats,
    GcPlan,
    NewVersion,
    RepairPlan,
    SharingStats,
    Totals,
)
from cafs.sqlite_manifest import SqliteManifest as Manifest
from cafs.sqlite_manifest import copy_manifest, manifest_error

__all__ = ["BulkArtifact", "DirStats", "GcPlan", "Manifest", "NewVersion", "RepairPlan",
           "SharingStats", "Totals", "copy_manifest", "manifest_error"]

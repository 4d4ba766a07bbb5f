"""Where `cafs ui` gets its answers: the daemon when the store is mounted, else the manifest
opened read-only; and the store-wide summary, computed in the background.

Owns: choosing, per request, between the daemon's control socket (a mounted store: the daemon
runs the page query between filesystem requests, so the view is exactly what the mount shows)
and a read-only open of the manifest (SQLite `mode=ro`, through cafs.store's checks: a store
that needs repair is refused, never silently read); the summary cache; opening one blob version
for a download. Must not write to the store: no lock is taken, no admin command but `browse`
is sent, the manifest is never opened read-write.

The summary (stored bytes per execution, sharing, gc) reads every artifact, so it never runs in
the daemon: a background thread computes it on its own read-only connection (safe beside a
running daemon, as `cafs stats PATH` is) whenever the manifest's fingerprint changed, and the
pages show the last one with its age, or say it is being computed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cafs.admin import Browsed, decode_result
from cafs.blobstore import BlobReader, Blobs, BlobsSpec, open_blob_store
from cafs.control import call
from cafs.digest import Digest
from cafs.store import Store, serving_daemon

Json = dict[str, Any]


@dataclass
class Summary:
    data: Json | None = None
    fingerprint: Any = None
    computed_at: float = 0.0
    seconds: float = 0.0
    running: bool = False
    error: str | None = None


class Source:
    """The store `cafs ui` shows. Thread-safe: the HTTP server answers requests in threads."""

    def __init__(self, root: Path, blobs: BlobsSpec | None = None) -> None:
        self.root = root
        self.blobs = blobs  # where the store's blobs live (None: its blobs/)
        self._blob_store: Blobs | None = None
        self._summary = Summary()
        self._lock = threading.Lock()

    def mounted(self) -> bool:
        return serving_daemon(self.root) is not None

    def query(self, name: str, /, **params: Any) -> Json:
        """A page query (ui_queries.QUERIES) answered by the daemon if one serves the store,
        else on a read-only open of the manifest."""
        if self.mounted():
            answer = call(self.root, "browse", {"query": name, "params": params}, [],
                          lambda what, done, total: None)
            result = decode_result("browse", answer)
            assert isinstance(result, Browsed)
            return result.answer
        store = Store.open(self.root, create=False, blobs=self.blobs)
        try:
            return store.manifest.browse(name, params)
        finally:
            store.close()

    def timeline(self, path: str, first_ns: int, last_ns: int) -> Json:
        """Publishes in the run at `path` over time (ui_queries.timeline): a scan as long as
        the run, so always on a read-only open of the manifest here, never in the daemon,
        where it would hold up every filesystem request meanwhile."""
        store = Store.open(self.root, create=False, blobs=self.blobs)
        try:
            return store.manifest.timeline(path, first_ns, last_ns)
        finally:
            store.close()

    # -- the summary ----------------------------------------------------------------------

    def summary(self) -> Summary:
        """The latest summary (maybe stale or None); starts a recomputation if the manifest
        changed since it was computed and none is running."""
        fingerprint = self.query("fingerprint")["key"]
        with self._lock:
            current = self._summary
            if fingerprint != current.fingerprint and not current.running:
                current.running = True
                threading.Thread(target=self._compute, args=(fingerprint,), daemon=True,
                                 name="cafs-ui-summary").start()
            return Summary(current.data, current.fingerprint, current.computed_at,
                           current.seconds, current.running, current.error)

    def wait_for_summary(self, timeout: float) -> Summary:
        """The summary once no computation runs (tests and the benchmark)."""
        deadline = time.monotonic() + timeout
        found = self.summary()
        while found.running and time.monotonic() < deadline:
            time.sleep(0.05)
            found = self.summary()
        return found

    def _compute(self, fingerprint: Any) -> None:
        started = time.monotonic()
        data, error = None, None
        try:
            store = Store.open(self.root, create=False, blobs=self.blobs)
            try:
                data = store.manifest.summary()
            finally:
                store.close()
        except Exception as exc:  # shown on the page; the next request tries again
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            state = self._summary
            state.running = False
            state.error = error
            if data is not None:
                state.data = data
                state.fingerprint = fingerprint
                state.computed_at = time.time()
                state.seconds = time.monotonic() - started

    # -- downloads ------------------------------------------------------------------------

    def open_version(self, path: str, version: int) -> tuple[Json, BlobReader | None] | None:
        """A version of the artifact at `path` and a reader of its bytes (None if fsck
        --repair marked the content damaged), or None if `path` has no such version. Blob
        files never change once written, so they are read directly, mounted or not; a gc
        removing one meanwhile leaves the open file readable."""
        found = self.query("version", path=path, version=version)
        if found.get("missing"):
            return None
        if found["damaged"]:
            return found, None
        if self._blob_store is None:
            self._blob_store = open_blob_store(self.root, self.blobs)
        return found, self._blob_store.open(Digest(found["sha256"]), found["encoding"],
                                            size=found.get("size"))

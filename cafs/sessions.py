"""A mount's session on a manifest several hosts share: its heartbeat, and the clean-up after
dead mounts.

Owns: registering the mount (cafs_sessions), beating every few seconds, noticing that another
host declared this mount dead (its row is gone: it was paused or cut off longer than the
timeout, and its unfinished files were removed) and registering again, and removing what dead
sessions left. All of it over a connection of its own, in a thread of its own: a slow or
unreachable server never holds up the event loop, a busy or stalled event loop (a long
request, a blocking call) never stops the beats (only a dead, stopped or cut-off process
does), and a failed beat is logged once and tried again at the next interval, never fatal.
Must not know FUSE or trio.

Why register again rather than stop: the files this mount had finished are safe (published
rows belong to nobody); only its unfinished ones were removed, and their publishes fail with
EIO (their rows are gone), as do creates until the new session is in place (the foreign key to
the removed session refuses them). A mount that went on would otherwise be invisible to other
hosts' status and its new files removable by them.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from cafs.errors import CafsError

log = logging.getLogger(__name__)


def beat_interval(timeout: float) -> float:
    """A quarter of the timeout (four beats may be missed before a mount is dead), between
    0.25 s and 5 s."""
    return max(0.25, min(5.0, timeout / 4))


class SessionKeeper:
    """The session of one mount: `main` is the manifest serving the mount (its session id is
    the one creates record), `own` a second connection to the same database for beats."""

    def __init__(self, main: Any, own: Any, mountpoint: str, pid: int, timeout: float) -> None:
        self.main = main
        self.own = own
        self.host = socket.gethostname()
        self.mountpoint = mountpoint
        self.pid = pid
        self.timeout = timeout
        self._failing: str | None = None  # the last failure logged, so it is logged once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.session = 0  # the session registered at start-up
        own.set_session_timeout(timeout)
        main.set_session_timeout(timeout)

    def start(self) -> int:
        """Register the mount (at start-up, before the event loop runs): the main connection's
        changes carry this session from now on (see PgCore.adopt_session)."""
        self.session = int(self.own.start_session(self.host, self.mountpoint, self.pid))
        self.main.adopt_session(self.session)
        return self.session

    def _register_again(self) -> int:
        """From the beat thread: the main connection is the event loop's, so only the id its
        creates record changes; its changes keep carrying the first session's id, which is
        the one this mount's change feed skips (see cafs.pg_manifest.feed)."""
        session = int(self.own.start_session(self.host, self.mountpoint, self.pid))
        self.main.session_id = session
        return session

    def run(self) -> None:
        """Beat every beat_interval() in a thread of its own, until end()."""
        self._thread = threading.Thread(target=self._beat_until_stopped, name="cafs-session",
                                        daemon=True)
        self._thread.start()

    def _beat_until_stopped(self) -> None:
        interval = beat_interval(self.timeout)
        while not self._stop.wait(interval):
            self.tick()

    def tick(self) -> None:
        """One beat, then the clean-up of dead sessions."""
        try:
            alive = self.own.beat()
            if not alive:
                old = self.own.session_id
                session = self._register_again()
                log.warning("this mount's session %s was declared dead by another host (no "
                            "heartbeat for %.0f s); its unfinished files were removed: "
                            "registered again as session %d", old, self.timeout, session)
            sessions, files = self.own.reap_dead_sessions()
            if sessions:
                log.info("removed %d dead sessions of other mounts and %d files they left "
                         "unfinished", sessions, files)
        except CafsError as exc:
            if str(exc) != self._failing:
                log.warning("session heartbeat failed (tried again every %.1f s): %s",
                            beat_interval(self.timeout), exc)
                self._failing = str(exc)
            return
        if self._failing is not None:
            log.info("session heartbeat works again")
            self._failing = None

    def end(self) -> None:
        """A clean unmount: stop beating, and remove the session row."""
        self._stop.set()
        if self._thread is not None:  # a beat in progress ends within the call bound
            self._thread.join()
        try:
            self.own.end_session()
        except CafsError as exc:  # it expires: other hosts clean after it
            log.warning("cannot end this mount's session: %s", exc)
        finally:
            self.main.session_id = None
            self.own.close()

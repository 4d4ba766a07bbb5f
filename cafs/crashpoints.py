"""Named crash points: a test setting that makes the process die at a chosen step.

`CAFS_CRASH_AT=<point>` (or `<point>:<n>` for the n-th time the point is passed) makes the
process kill itself with SIGKILL there: no clean-up, no unmount, exactly as a crash would leave
the store. The crash tests use it to prove what survives each step of the write path and of gc.
A `raise-*` point raises an unexpected exception instead (as a bug would), to test what the
code's own error handling does with one.
Unset (always, outside tests), `reached` is one dictionary lookup.

Owns: the names of the points and the setting. Must not know FUSE.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from cafs.errors import InvalidArgument

POINTS = (
    "after-temp-write",        # a write reached the temp file
    "after-temp-fsync",        # the finished blob file is durable, not yet renamed into blobs/
    "after-blob-rename",       # the blob is in blobs/, the manifest does not know it yet
    "before-manifest-commit",  # the version's rows are written, the transaction is still open
    "after-manifest-commit",   # committed; the writer's close() has not returned yet
    "inside-gc",               # gc removed blob rows and has not yet removed their files
    "gc-before-delete",        # gc locked a batch against pins (S3), deletes not yet sent
    "after-dedup-check",       # a publish found its content stored; its version not recorded
    "raise-in-main-loop",      # the daemon's main loop fails, once it serves (raises, no kill)
    "before-page-fill",        # a page cache fill is about to be sent (its sending thread)
)
ENVIRONMENT = "CAFS_CRASH_AT"
# `CAFS_PAUSE_AT=<point>:<seconds>`: the first time the point is passed, the thread stops there
# that long (the daemon's event loop with it), so a test can make a race happen: another host
# acts while this one is held between two steps.
PAUSE_ENVIRONMENT = "CAFS_PAUSE_AT"

log = logging.getLogger(__name__)


def _parse(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in POINTS or (count and (not count.isdigit() or int(count) < 1)):
        raise InvalidArgument(f"{ENVIRONMENT}={value!r}: expected one of {', '.join(POINTS)}, "
                              "optionally followed by :N")
    return name, int(count or 1)


def check_setting() -> None:
    """Refuse a misspelt point at start-up rather than silently never crashing."""
    _parse(os.environ.get(ENVIRONMENT, ""))


try:
    _armed = _parse(os.environ.get(ENVIRONMENT, ""))
except InvalidArgument:
    _armed = None  # check_setting() reports it
_passed: dict[str, int] = {}


class InjectedFailure(RuntimeError):
    """What a raise-* point raises: deliberately no CafsError, as unexpected as a bug."""


def _parse_pause(value: str) -> tuple[str, float] | None:
    name, _, seconds = value.partition(":")
    try:
        return (name, float(seconds)) if name in POINTS else None
    except ValueError:
        return None


_pause = _parse_pause(os.environ.get(PAUSE_ENVIRONMENT, ""))


def reached(point: str) -> None:
    global _pause
    if _pause is not None and _pause[0] == point:
        seconds, _pause = _pause[1], None
        log.warning("pause point %s reached: holding %.1f s", point, seconds)
        time.sleep(seconds)
    if _armed is None or _armed[0] != point:
        return
    _passed[point] = _passed.get(point, 0) + 1
    if _passed[point] == _armed[1]:
        if point.startswith("raise-"):
            raise InjectedFailure(f"crash point {point} reached: raising")
        log.warning("crash point %s reached: killing this process", point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

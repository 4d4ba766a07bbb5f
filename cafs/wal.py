"""A check of SQLite's write-ahead log before SQLite opens it.

Owns: reading the WAL file format (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte
header (magic, version, page size, checkpoint sequence, two salts, a checksum), then frames of a
24-byte header (page number, database size for a commit frame, the two salts, a cumulative
checksum) and one page. SQLite's recovery keeps the frames up to the last valid commit frame
before the first frame that fails its salt or checksum, and silently ignores the rest: right for
a torn tail (a crash while appending), wrong when bytes in the middle were damaged — the commits
after the damage are lost without a word. This module tells the two apart.

Must run before any SQLite connection of this process opens the manifest: it opens and closes
the WAL file, and closing a descriptor drops every POSIX lock the process holds on that file.
Stdlib only.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC_LITTLE = 0x377F0682  # checksums over little-endian words
MAGIC_BIG = 0x377F0683  # checksums over big-endian words
HEADER = 32
FRAME_HEADER = 24
_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class WalDamage:
    frame: int  # the first frame that fails (0-based)
    frames: int  # whole frames in the file
    intact_after: int  # commit frames after it that still carry this log's salts
    reason: str

    def describe(self) -> str:
        return (f"frame {self.frame} of {self.frames} {self.reason}, yet {self.intact_after} "
                "later commits belong to the same log: bytes in the middle were damaged, and "
                "SQLite would silently drop every commit after the damage")


def _checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for index in range(0, len(words), 2):
        s0 = (s0 + words[index] + s1) & _MASK
        s1 = (s1 + words[index + 1] + s0) & _MASK
    return s0, s1


def check_wal(path: Path) -> WalDamage | None:
    """Damage in the WAL at `path` that SQLite's recovery would hide; None if it is intact,
    absent, or only torn at its end."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    if len(data) < HEADER:
        return None  # a header never completely written: nothing was ever committed in it
    header = data[:HEADER]
    magic, version, page_size, _, salt1, salt2, c1, c2 = struct.unpack(">8I", header)
    if not header.strip(b"\0"):
        return None
    frames = (len(data) - HEADER) // (FRAME_HEADER + page_size) if page_size else 0
    big = magic == MAGIC_BIG
    if (magic not in (MAGIC_LITTLE, MAGIC_BIG) or version != 3007000
            or page_size < 512 or page_size > 65536 or page_size & (page_size - 1)
            or _checksum(header[:24], big, 0, 0) != (c1, c2)):
        if len(data) > HEADER:  # frames follow: a damaged header would hide every one
            return WalDamage(0, frames, frames, "follows a damaged WAL header")
        return None
    frame_size = FRAME_HEADER + page_size
    s0, s1 = c1, c2
    for frame in range(frames):
        start = HEADER + frame * frame_size
        head = data[start:start + FRAME_HEADER]
        page_no, _, fsalt1, fsalt2, f1, f2 = struct.unpack(">6I", head)
        if (fsalt1, fsalt2) != (salt1, salt2) or page_no == 0:
            reason = "carries other salts (not part of this log)"
        else:
            s0, s1 = _checksum(head[:8], big, s0, s1)
            s0, s1 = _checksum(data[start + FRAME_HEADER:start + frame_size], big, s0, s1)
            if (s0, s1) == (f1, f2):
                continue
            reason = "fails its checksum"
        # Commit frames of this log after the failing one are commits SQLite would drop.
        # (Frames of a rolled-back transaction left past the log's end carry its salts too, but
        # never a commit mark: they are no damage.)
        later = 0
        for other in range(frame + 1, frames):
            commit, osalt1, osalt2 = struct.unpack_from(">3I", data,
                                                        HEADER + other * frame_size + 4)
            later += commit != 0 and (osalt1, osalt2) == (salt1, salt2)
        if later:
            return WalDamage(frame, frames, later, reason)
        return None  # the end of the log: a tail torn by a crash, or stale frames after it
    return None


def wal_path(manifest: Path) -> Path:
    return Path(f"{os.fspath(manifest)}-wal")

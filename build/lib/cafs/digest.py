"""The Digest type: the SHA-256 of an artifact's uncompressed bytes, as 64 lowercase hex.

Owns: parsing/validating digests and hashing files. Stdlib only.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import NewType

Digest = NewType("Digest", str)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def parse_digest(text: str) -> Digest:
    """Return text as a Digest, or raise ValueError if it is not 64 lowercase hex digits."""
    if not _HEX64.fullmatch(text):
        raise ValueError(f"not a sha256 hex digest: {text!r}")
    return Digest(text)


def is_digest(text: str) -> bool:
    return _HEX64.fullmatch(text) is not None


def digest_of_bytes(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest())


def digest_of_fd(fd: int) -> tuple[Digest, int]:
    """Hash a whole open file from offset 0 with pread; returns (digest, size)."""
    hasher = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            return Digest(hasher.hexdigest()), offset
        hasher.update(chunk)
        offset += len(chunk)

"""The Digest type: the SHA-256 of an artifact's uncompressed bytes, as 64 lowercase hex.

Owns: parsing/validating digests and the one loop that hashes a stream of bytes. Stdlib only;
must not read files itself (callers hand it the chunks).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import NewType, Protocol

Digest = NewType("Digest", str)

_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_digest(text: str) -> Digest:
    """Return text as a Digest, or raise ValueError if it is not 64 lowercase hex digits."""
    if not _HEX64.fullmatch(text):
        raise ValueError(f"not a sha256 hex digest: {text!r}")
    return Digest(text)


def is_digest(text: str) -> bool:
    return _HEX64.fullmatch(text) is not None


def digest_of_bytes(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest())


class Hasher(Protocol):
    """What digest_of_chunks feeds: hashlib's sha256, or something that feeds one."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def digest_of_chunks(chunks: Iterable[bytes], into: Hasher | None = None) -> tuple[Digest, int]:
    """SHA-256 of the chunks' concatenation, and its length: the one read-and-hash loop of
    cafs (blob files, temp files, bundle members, copies out). `into` continues a running hash
    (a temp's hash-while-writing, which must keep its hasher) instead of starting a new one."""
    hasher: Hasher = hashlib.sha256() if into is None else into
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return Digest(hasher.hexdigest()), size

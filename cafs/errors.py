"""Error classes of the core. Each carries the errno a filesystem caller should see.

Owns: the mapping from "what went wrong" to an errno. Must not import anything from cafs.
The FUSE adapter turns a CafsError into FUSEError(err.errno) in one place; the CLI turns a
StoreError into one line and an exit code.
"""

from __future__ import annotations

import errno as _errno
import functools
import inspect
from collections.abc import Callable
from typing import Any


class CafsError(Exception):
    """A failure with a meaning for the caller: it carries the errno to answer with."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", errno: int | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        if errno is not None:
            self.errno = errno


class NotFound(CafsError):
    errno = _errno.ENOENT


class AlreadyExists(CafsError):
    errno = _errno.EEXIST


class NotPermitted(CafsError):
    errno = _errno.EPERM


class AccessDenied(CafsError):
    errno = _errno.EACCES


class ReadOnly(CafsError):
    errno = _errno.EROFS


class NameTooLong(CafsError):
    errno = _errno.ENAMETOOLONG


class BadName(CafsError):
    """A name that is not valid UTF-8: the manifest stores names as text."""

    errno = _errno.EILSEQ


class InvalidArgument(CafsError):
    errno = _errno.EINVAL


class NotEmpty(CafsError):
    errno = _errno.ENOTEMPTY


class IsADirectory(CafsError):
    errno = _errno.EISDIR


class NotADirectory(CafsError):
    errno = _errno.ENOTDIR


class NoAttribute(CafsError):
    errno = _errno.ENODATA


class NotSupported(CafsError):
    errno = _errno.EOPNOTSUPP


class FileTooBig(CafsError):
    errno = _errno.EFBIG


class BadHandle(CafsError):
    errno = _errno.EBADF


class Corrupt(CafsError):
    """Stored bytes do not match what the manifest or the seek table promises."""

    errno = _errno.EIO


class Damaged(Corrupt):
    """The content is known to be lost (fsck --repair marked it): an expected EIO."""


class ManifestError(CafsError):
    """The manifest database failed a read or a commit (disk full, I/O error)."""

    errno = _errno.EIO


class OutOfSpace(CafsError):
    errno = _errno.ENOSPC


class TooManyOpenFiles(CafsError):
    errno = _errno.EMFILE


class Busy(CafsError):
    """The thing is in use (e.g. a run with writes in progress cannot be sealed)."""

    errno = _errno.EBUSY


class StoreError(CafsError):
    """The store as a whole cannot be used (missing, locked, unreadable, misplaced)."""


class StoreBusy(StoreError):
    """Another daemon holds the store's lock."""

    errno = _errno.EBUSY


class NeedsRepair(StoreError):
    """The store holds data its manifest does not account for (a missing or empty manifest
    beside blob files, a damaged WAL): starting would lose it, so nothing starts."""


class MountError(CafsError):
    """The mount itself failed (mountpoint missing, busy, FUSE unavailable). Here rather than
    in cafs.daemon so the command line can report it without loading the daemon."""


def translating(catch: type[BaseException], translate: Callable[[Any], Exception]
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator: every `catch` error the method raises (or its generator raises while being
    iterated: database cursors read rows lazily) leaves it as translate(error), chained."""
    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(method):
            @functools.wraps(method)
            def generator(*args: Any, **kwargs: Any) -> Any:
                try:
                    yield from method(*args, **kwargs)
                except catch as exc:
                    raise translate(exc) from exc
            return generator

        @functools.wraps(method)
        def plain(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except catch as exc:
                raise translate(exc) from exc
        return plain
    return decorate

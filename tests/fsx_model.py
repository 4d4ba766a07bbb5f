"""A model-checking file exerciser in the manner of fsx (xfstests `ltp/fsx.c`), written for cafs.

One file is driven through a seeded random sequence of operations — write, mapped write, read,
mapped read, truncate up and down, the fallocate family (allocate, punch hole, zero, collapse and
insert range), copy_file_range within the file, fsync, close and reopen, open with O_TRUNC, a
read through a second descriptor, and a write through a shared mapping after its descriptor was
closed — while an in-memory model (a bytearray) says what the file must
hold. Every read is checked against the model, the size after every operation, the zero fill
past end-of-file in the last mapped page, and the whole file at the end. On a target that can
restart (a cafs mount), it also unmounts and mounts again (the file must equal the model), kills
the daemon with SIGKILL after an fsync and further unsynced writes (the file must equal the model
as of the last fsync or close: nothing written after it, nothing lost before it), and checks the
`user.cafs.sha256` and `user.cafs.size` of every published version.

Operations the target does not support (EOPNOTSUPP, ENOSYS) are skipped from then on; the model
is left as it was, so a refused operation that changed the file anyway is still caught.

Everything follows from the seed: a failure prints the seed, the operation count and the last
operations, and writes the model and the full log beside the file, so a failure replays exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PAGE = mmap.PAGESIZE
KiB = 1024

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int64]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value

_CYCLE = bytes(range(1, 256))  # the write pattern: 1..255 from a start set by op and offset

# Unsupported by a filesystem: the operation is skipped from then on.
UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY}


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def mapped_read(fd: int, offset: int, length: int, size: int) -> tuple[bytes, bytes]:
    """Read [offset, offset+length) through a shared mapping; also return what the mapping shows
    past end-of-file up to the end of the last page when the range reaches it (must be zeros).
    Python's mmap refuses mappings longer than the file, so this maps with libc directly."""
    start = offset - offset % PAGE
    end = min(offset + length, size)
    tail_end = -(-size // PAGE) * PAGE if end == size else end
    map_len = tail_end - start
    address = _libc.mmap(None, map_len, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address in (None, _MAP_FAILED):
        code = ctypes.get_errno()
        raise OSError(code, f"mmap: {os.strerror(code)}")
    try:
        data = ctypes.string_at(address + offset - start, end - offset)
        tail = ctypes.string_at(address + end - start, tail_end - end) if end == size else b""
    finally:
        _libc.munmap(address, map_len)
    return data, tail


class FsxFailure(AssertionError):
    pass


@dataclass
class Target:
    """Where the exercised file lives and what the filesystem under it can do.

    `restart(crash)` unmounts and mounts again (crash: SIGKILL the daemon instead of a clean
    unmount); None on a plain directory. `cafs` turns on the checks of cafs' own xattrs.
    `meddle(op_number, path)` runs before each operation: the self-test uses it to change the
    file behind the exerciser's back, which must be caught."""

    path: Path
    restart: Callable[[bool], None] | None = None
    cafs: bool = False
    meddle: Callable[[int, Path], None] | None = None


@dataclass(frozen=True)
class Config:
    seed: int
    ops: int = 2000
    max_len: int = 256 * KiB  # the file never grows past this
    max_op_len: int = 64 * KiB  # longest single read, write, copy or fallocate
    remounts: int = 0  # clean unmount + mount, at seeded moments
    crashes: int = 0  # SIGKILL of the daemon after an fsync, at seeded moments
    final_remount: bool = True  # remount after the last operation and check the file again

    def replay(self) -> str:
        return (f"CAFS_FSX_SEED={self.seed} CAFS_FSX_OPS={self.ops} "
                f"CAFS_FSX_MAX_LEN={self.max_len}")


# Relative weights of the operations (fsx picks uniformly among its enabled operations; these
# favour the data path and keep the slow ones — publishing closes, fsyncs — rarer).
WEIGHTS: dict[str, int] = {
    "read": 14, "write": 16, "mapread": 8, "mapwrite": 8, "truncate": 6,
    "falloc": 2, "punch_hole": 3, "zero_range": 3, "collapse_range": 2, "insert_range": 2,
    "copy_range": 4, "read2": 3, "fsync": 2, "reopen": 2, "reopen_trunc": 1,
    "mapwrite_after_close": 1,
}


@dataclass
class Exerciser:
    target: Target
    config: Config
    report_dir: Path | None = None
    log: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.model = bytearray()
        self.durable = b""  # what the last publish (close or fsync) made crash-proof
        self.fd = -1
        self.op_number = 0

    # -- running ---------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Run the whole sequence; raise FsxFailure (with everything needed to replay) on the
        first difference from the model. Returns how often each operation ran."""
        config = self.config
        restart_at: dict[int, bool] = {}
        if self.target.restart is not None:
            moments = self.rng.sample(range(1, config.ops), config.remounts + config.crashes)
            restart_at = {n: i >= config.remounts for i, n in enumerate(moments)}
        try:
            self._start()
            for self.op_number in range(1, config.ops + 1):
                if self.target.meddle is not None:
                    self.target.meddle(self.op_number, self.target.path)
                if self.op_number in restart_at:
                    self._restart(crash=restart_at[self.op_number])
                else:
                    self._one_op()
                self._check_size()
            self._finish()
        except FsxFailure as failure:
            raise self._report(str(failure)) from None
        except OSError as exc:
            raise self._report(f"unexpected error: {exc!r}") from None
        finally:
            if self.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = -1
        return dict(self.counts)

    def _start(self) -> None:
        # The file starts as a published artifact of a few random bytes (fsx starts from an
        # empty or a given file; a published one makes every rewrite a copy-on-write).
        initial = self._data(0, self.rng.randrange(0, self.config.max_len // 4))
        with open(self.target.path, "wb") as out:
            out.write(initial)
        self.model = bytearray(initial)
        self.durable = initial
        self._note(f"start: {len(initial)} bytes")
        self._check_published()
        self.fd = os.open(self.target.path, os.O_RDWR)

    def _finish(self) -> None:
        self._close()
        self._check_whole("at the end")
        if self.target.restart is not None and self.config.final_remount:
            self._note("final remount")
            self.target.restart(False)
            self._check_whole("after the final remount")

    def check_again(self, when: str) -> None:
        """After run(): the file still equals the model (e.g. after the caller remounted)."""
        try:
            self._check_whole(when)
        except (FsxFailure, OSError) as exc:
            raise self._report(str(exc)) from None

    def _one_op(self) -> None:
        names = [n for n in WEIGHTS if n not in self.skipped]
        name = self.rng.choices(names, weights=[WEIGHTS[n] for n in names])[0]
        self.counts[name] = self.counts.get(name, 0) + 1
        getattr(self, f"op_{name}")()

    # -- the model's helpers --------------------------------------------------------------

    def _data(self, offset: int, length: int) -> bytes:
        """What a write puts at `offset`: fsx's pattern (the op number and file offset, so a
        misplaced byte tells where it came from) or random bytes, so that both compressible
        (zstd) and incompressible (raw) blobs are published. Never all zeros, unlike a hole."""
        if self.rng.random() < 0.5:
            start = (self.op_number + offset) % 255
            return (_CYCLE * (length // 255 + 2))[start:start + length]
        return self.rng.randbytes(length)

    def _set(self, offset: int, data: bytes) -> None:
        if offset > len(self.model):
            self.model.extend(bytes(offset - len(self.model)))
        self.model[offset:offset + len(data)] = data

    def _resize(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def _range(self, max_end: int | None = None, align: int = 1) -> tuple[int, int]:
        """A random (offset, length) with offset + length <= max_end (default max_len)."""
        limit = self.config.max_len if max_end is None else max_end
        offset = self.rng.randrange(0, max(1, limit)) // align * align
        length = self.rng.randrange(1, self.config.max_op_len + 1)
        length = min(length, limit - offset) // align * align
        return offset, max(0, length)

    def _note(self, text: str) -> None:
        self.log.append(f"{self.op_number:6d} {text}")

    def _compare(self, what: str, offset: int, got: bytes, expected: bytes | bytearray) -> None:
        if got == expected:
            return
        if len(got) != len(expected):
            problem = f"{len(got)} bytes instead of {len(expected)}"
        else:
            problem = ""
        first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                     min(len(got), len(expected)))
        bad = sum(a != b for a, b in zip(got, expected, strict=False))
        raise FsxFailure(
            f"{what} at {offset:#x}: {problem or f'{bad} bytes differ'}; first difference at file "
            f"offset {offset + first:#x}: got {bytes(got[first:first + 16]).hex(' ')}, expected "
            f"{bytes(expected[first:first + 16]).hex(' ')}")

    def _check_size(self) -> None:
        if self.fd < 0:
            return
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise FsxFailure(f"fstat size is {size}, the model's is {len(self.model)}")

    def _check_whole(self, when: str) -> None:
        with open(self.target.path, "rb") as reader:
            content = reader.read()
        self._compare(f"the whole file {when}", 0, content, self.model)
        self._check_published()

    def _check_published(self) -> None:
        """cafs: the published version's hash and size are the model's (no descriptor of ours
        is open for writing when this is called)."""
        if not self.target.cafs:
            return
        path = self.target.path
        digest = os.getxattr(path, "user.cafs.sha256").decode()
        size = int(os.getxattr(path, "user.cafs.size"))
        want = hashlib.sha256(self.model).hexdigest()
        if (digest, size) != (want, len(self.model)):
            raise FsxFailure(f"published version is {digest} ({size} bytes), the model is {want} "
                             f"({len(self.model)} bytes)")

    def _close(self) -> None:
        os.close(self.fd)
        self.fd = -1
        self.durable = bytes(self.model)

    # -- operations ------------------------------------------------------------------------

    def op_read(self) -> None:
        size = len(self.model)
        if size == 0:
            self._note("read: skipped, empty file")
            return
        offset, length = self._range(size)
        self._note(f"read {offset:#x} +{length:#x}")
        got = os.pread(self.fd, length, offset)
        self._compare("read", offset, got, self.model[offset:offset + length])

    def op_read2(self) -> None:
        """A second, read-only descriptor: cafs promises that others see the bytes written so
        far; its close must publish nothing and disturb nothing."""
        size = len(self.model)
        offset, length = self._range(max(size, 1))
        self._note(f"read2 {offset:#x} +{length:#x} (second descriptor)")
        fd = os.open(self.target.path, os.O_RDONLY)
        try:
            got = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        self._compare("read through a second descriptor", offset, got,
                      self.model[offset:offset + length])

    def op_mapread(self) -> None:
        size = len(self.model)
        if size == 0:
            self._note("mapread: skipped, empty file")
            return
        offset, length = self._range(size)
        if length == 0:
            return
        self._note(f"mapread {offset:#x} +{length:#x}")
        got, tail = mapped_read(self.fd, offset, length, size)
        self._compare("mapped read", offset, got, self.model[offset:offset + length])
        if tail.strip(b"\0"):
            raise FsxFailure(f"the mapped page past end-of-file ({size:#x}) is not zero-filled: "
                             f"{tail[:32].hex(' ')}")

    def op_write(self) -> None:
        offset, length = self._range()
        data = self._data(offset, length)
        self._note(f"write {offset:#x} +{length:#x} (size {len(self.model):#x})")
        written = os.pwrite(self.fd, data, offset)
        if written != length:
            raise FsxFailure(f"short write: {written} of {length} bytes at {offset:#x}")
        self._set(offset, data)

    def op_mapwrite(self) -> None:
        offset, length = self._range()
        if length == 0:
            return
        data = self._data(offset, length)
        self._note(f"mapwrite {offset:#x} +{length:#x} (size {len(self.model):#x})")
        end = offset + length
        if end > len(self.model):  # a mapping cannot grow the file: extend it first, as fsx
            os.ftruncate(self.fd, end)
            self._resize(end)
        start = offset - offset % PAGE
        with mmap.mmap(self.fd, end - start, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=start) as mapping:
            mapping[offset - start:end - start] = data
            mapping.flush()  # msync(MS_SYNC)
        self._set(offset, data)

    def op_mapwrite_after_close(self) -> None:
        """open, mmap, close(fd), write through the mapping, munmap: the kernel sends those
        writes after the last FLUSH (at munmap), then RELEASE; they must not be lost."""
        offset, length = self._range()
        if length == 0:
            return
        data = self._data(offset, length)
        self._note(f"mapwrite_after_close {offset:#x} +{length:#x} (size {len(self.model):#x})")
        self._close()
        fd = os.open(self.target.path, os.O_RDWR)
        end = offset + length
        try:
            if end > len(self.model):
                os.ftruncate(fd, end)
                self._resize(end)
            start = offset - offset % PAGE
            mapping = mmap.mmap(fd, end - start, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        finally:
            os.close(fd)
        mapping[offset - start:end - start] = data
        mapping.close()  # munmap: the dirty pages are written back now
        self._set(offset, data)
        if self.target.cafs:  # cafs publishes them at RELEASE, which the kernel sends async
            self._wait_published("writes through a mapping after close()")
        self.durable = bytes(self.model)
        self.fd = os.open(self.target.path, os.O_RDWR)

    def _wait_published(self, what: str, timeout: float = 10.0) -> None:
        want = hashlib.sha256(self.model).hexdigest()
        deadline = time.monotonic() + timeout
        while os.getxattr(self.target.path, "user.cafs.sha256").decode() != want:
            if time.monotonic() > deadline:
                raise FsxFailure(f"{what} were not published within {timeout:.0f} s")
            time.sleep(0.01)

    def op_truncate(self) -> None:
        size = self.rng.randrange(0, self.config.max_len + 1)
        self._note(f"truncate {len(self.model):#x} -> {size:#x}")
        os.ftruncate(self.fd, size)
        self._resize(size)

    def _fallocate(self, name: str, mode: int, offset: int, length: int) -> bool:
        """Run one fallocate; False (and the operation skipped from now on) if unsupported."""
        self._note(f"{name} {offset:#x} +{length:#x} (size {len(self.model):#x})")
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                self._note(f"{name}: not supported ({exc.strerror}); skipped from now on")
                self.skipped.add(name)
                return False
            raise
        return True

    def op_falloc(self) -> None:
        offset, length = self._range()
        keep = self.rng.random() < 0.5
        if not length or not self._fallocate("falloc" + (" keep_size" * keep),
                                             FALLOC_FL_KEEP_SIZE if keep else 0, offset, length):
            return
        if not keep and offset + length > len(self.model):
            self._resize(offset + length)

    def op_punch_hole(self) -> None:
        offset, length = self._range()
        if length and self._fallocate("punch_hole", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                      offset, length):
            end = min(offset + length, len(self.model))
            if offset < end:
                self.model[offset:end] = bytes(end - offset)

    def op_zero_range(self) -> None:
        offset, length = self._range()
        keep = self.rng.random() < 0.5
        mode = FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0)
        if length and self._fallocate("zero_range", mode, offset, length):
            end = offset + length if not keep else min(offset + length, len(self.model))
            if offset < end:
                self._set(offset, bytes(end - offset))

    def op_collapse_range(self) -> None:
        # Block-aligned, and must end before end-of-file (EINVAL otherwise).
        size = len(self.model)
        if size <= PAGE:
            return
        offset, length = self._range(size - 1, align=PAGE)
        if length and self._fallocate("collapse_range", FALLOC_FL_COLLAPSE_RANGE, offset,
                                      length):
            del self.model[offset:offset + length]

    def op_insert_range(self) -> None:
        size = len(self.model)
        room = self.config.max_len - size
        if size <= PAGE or room < PAGE:
            return
        offset = self.rng.randrange(0, size) // PAGE * PAGE
        length = min(self.rng.randrange(1, self.config.max_op_len + 1), room) // PAGE * PAGE
        if length and self._fallocate("insert_range", FALLOC_FL_INSERT_RANGE, offset, length):
            self.model[offset:offset] = bytes(length)

    def op_copy_range(self) -> None:
        size = len(self.model)
        if size == 0:
            return
        source, length = self._range(size)
        # A destination whose range does not overlap the source (EINVAL for the same file).
        destination = self.rng.randrange(0, self.config.max_len - length + 1)
        if destination < source + length and source < destination + length:
            return
        self._note(f"copy_range {source:#x} +{length:#x} -> {destination:#x} (size {size:#x})")
        try:
            copied = os.copy_file_range(self.fd, self.fd, length, source, destination)
        except OSError as exc:
            if exc.errno in UNSUPPORTED | {errno.EXDEV}:
                self._note(f"copy_range: not supported ({exc.strerror}); skipped from now on")
                self.skipped.add("copy_range")
                return
            raise
        if not 0 <= copied <= length:
            raise FsxFailure(f"copy_file_range returned {copied} for {length} bytes")
        self._set(destination, bytes(self.model[source:source + copied]))

    def op_fsync(self) -> None:
        self._note("fsync")
        os.fsync(self.fd)
        self.durable = bytes(self.model)

    def op_reopen(self) -> None:
        self._note("close + open")
        self._close()
        self._check_published()
        self.fd = os.open(self.target.path, os.O_RDWR)

    def op_reopen_trunc(self) -> None:
        self._note("close + open O_TRUNC")
        self._close()
        self._check_published()
        self.fd = os.open(self.target.path, os.O_RDWR | os.O_TRUNC)
        self.model.clear()

    def _restart(self, crash: bool) -> None:
        if not crash:
            self._note("close + clean unmount + mount")
            self._close()
            self.target.restart(False)  # type: ignore[misc]
            self._check_whole("after a remount")
        else:
            # fsync, then writes that nothing publishes: after the kill, the file must be
            # exactly what the fsync made durable.
            self.op_fsync()
            for _ in range(self.rng.randrange(1, 4)):
                self.op_write()
            self._note("kill -9 the daemon + mount")
            self.target.restart(True)  # type: ignore[misc]
            with contextlib.suppress(OSError):  # the descriptor died with the daemon
                os.close(self.fd)
            self.fd = -1
            self.model = bytearray(self.durable)
            self._check_whole("after kill -9 and a remount")
        self.fd = os.open(self.target.path, os.O_RDWR)

    # -- reporting -------------------------------------------------------------------------

    def _report(self, problem: str) -> FsxFailure:
        config = self.config
        lines = [f"fsx: {problem}",
                 f"  seed {config.seed}, operation {self.op_number} of {config.ops}, file "
                 f"{self.target.path}",
                 f"  replay: {config.replay()} .venv/bin/python -m pytest tests/test_fsx.py",
                 "  last operations:", *("    " + line for line in self.log[-25:])]
        if self.report_dir is not None:
            stem = self.report_dir / f"fsx-{config.seed}"
            stem.with_suffix(".good").write_bytes(bytes(self.model))
            stem.with_suffix(".log").write_text("\n".join(self.log) + "\n")
            lines.append(f"  the model is in {stem}.good, the whole log in {stem}.log")
        return FsxFailure("\n".join(lines))

"""Who still writes a file: what /proc says about the process that opened it.

Owns: mapping the thread id of an OPEN/CREATE request to its process, counting the descriptors
a process holds on one of the mount's inodes (/proc/<pid>/fdinfo: `mnt_id` and `ino`, read
without calling into any filesystem, so never into this daemon), and telling a process that
exits because a signal killed it. FLUSH (close) carries no process: the decision "was this the
writer's last close?" is cafs.openfiles's, made from these answers. Stdlib only; no trio, no
pyfuse3. Every answer is best effort: None means "cannot tell" (another user's process without
the rights to look, a kernel without the files), and callers then publish as they always did.
"""

from __future__ import annotations

import os

# Flags of a task in /proc/<pid>/stat (field 9): exiting, and because a signal killed it.
PF_EXITING = 0x4
PF_SIGNALED = 0x400


def _read(path: str, size: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


class Processes:
    """The daemon's view of the processes that open its files, through /proc.

    `device` is the mount's st_dev: mount ids are per mount namespace (and per bind mount), so
    the ids under which a process sees this filesystem are read from its own mountinfo, once
    per mount namespace.
    """

    def __init__(self, device: int | None = None) -> None:
        self.device = device
        self._mount_ids: dict[str, frozenset[int]] = {}
        # The process descriptors_on just found holding none of the file's descriptors in a
        # table still attached: it is not exiting (an exit detaches the table before it closes
        # the files), so the killed_by_signal that follows at once (cafs.openfiles.flush)
        # needs no read of its stat (~20 us per close). Consumed by that call.
        self._live: int = 0

    def process_of(self, tid: int) -> int:
        """The process (thread group) of a thread id; 0 if it cannot be told. A request's pid
        is the calling thread's: the file belongs to its whole process, whichever thread
        closes it, and survives the thread that opened it."""
        if tid <= 0:
            return 0
        try:
            status = _read(f"/proc/{tid}/status", 1024)
        except OSError:
            return 0
        start = status.find(b"\nTgid:")
        if start < 0:
            return 0
        return int(status[start + 6:status.index(b"\n", start + 1)])

    def descriptors_on(self, pid: int, ino: int, name: str, accmode: int) -> int | None:
        """How many descriptors process `pid` holds on inode `ino` (called `name`) of this
        mount, opened with access mode `accmode` (O_RDONLY, O_WRONLY, O_RDWR). 0 for a process
        that is gone or exiting (its descriptor table is already detached while its exit
        closes the files); None if it cannot be told.

        Cost: one readlink per descriptor (~2 us); fdinfo is read only for the links that end
        in `name`, the kernel's current name of the file (a rename racing with this check can
        only make it answer 0: the close then publishes, as a close always did)."""
        self._live = 0
        if self.device is None or pid <= 0:
            return None
        try:
            mount_ids = self._mount_ids_of(pid)
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            return 0  # gone
        except OSError:
            return None  # another user's process, no rights to look
        tails = ("/" + name, "/" + name + " (deleted)")
        wanted_ino = b"\nino:\t%d\n" % ino
        held = 0
        for fd in fds:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(tails):
                    continue
                info = _read(f"/proc/{pid}/fdinfo/{fd}", 512)
            except OSError:  # closed meanwhile
                continue
            if wanted_ino not in info:
                continue
            fields = dict(line.split(b":", 1) for line in info.splitlines() if b":" in line)
            try:
                mnt_id = int(fields[b"mnt_id"])
                flags = int(fields[b"flags"], 8)
            except (KeyError, ValueError):
                continue
            if mnt_id in mount_ids and flags & os.O_ACCMODE == accmode:
                held += 1
        if not held and fds:
            self._live = pid
        return held

    def killed_by_signal(self, pid: int) -> bool:
        """True while `pid` exits because a signal killed it: its exit closes (FLUSH) every
        file it held, and a write cut short must publish nothing. False once it is gone (then
        nothing can be told) or if it ends otherwise."""
        live, self._live = self._live, 0
        if pid <= 0 or pid == live:
            return False
        try:
            stat = _read(f"/proc/{pid}/stat", 1024)
            flags = int(stat.rsplit(b")", 1)[1].split()[6])
        except (OSError, IndexError, ValueError):
            return False
        return bool(flags & PF_EXITING and flags & PF_SIGNALED)

    def _mount_ids_of(self, pid: int) -> frozenset[int]:
        """The mount ids of this filesystem in `pid`'s mount namespace."""
        namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        known = self._mount_ids.get(namespace)
        if known is None:
            assert self.device is not None
            device = f"{os.major(self.device)}:{os.minor(self.device)}".encode()
            with open(f"/proc/{pid}/mountinfo", "rb") as table:  # a seq_file: read it whole
                text = table.read()
            known = frozenset(int(fields[0]) for fields in map(bytes.split, text.splitlines())
                              if len(fields) > 2 and fields[2] == device)
            if len(self._mount_ids) > 64:  # namespaces come and go (containers)
                self._mount_ids.clear()
            self._mount_ids[namespace] = known
        return known


class NoProcesses:
    """Nothing can be told (core tests, admin commands): every close of a writer publishes."""

    device = None

    def process_of(self, tid: int) -> int:
        return 0

    def descriptors_on(self, pid: int, ino: int, name: str, accmode: int) -> int | None:
        return None

    def killed_by_signal(self, pid: int) -> bool:
        return False

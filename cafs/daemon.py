"""The mount daemon: start-up, recovery, the trio main loop, signals and readiness.

Owns: the life of one mount — lock the store, clean up after any earlier crash, mount, announce
readiness only once the mount answers a request, serve, and on SIGTERM/SIGINT unmount cleanly.
Must not decide filesystem behaviour (that is cafs.vfs).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import queue
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import pyfuse3
import trio

from cafs import crashpoints
from cafs.admin import Admin
from cafs.blobstore import BlobsSpec
from cafs.control_server import serve_control
from cafs.errors import CafsError, MountError, StoreError
from cafs.mountpoint import check_mountpoint
from cafs.ops import CafsOperations
from cafs.options import MountConfig
from cafs.sessions import SessionKeeper
from cafs.store import Store, check_placement, mount_owner, real_store_path
from cafs.vfs import Vfs
from cafs.writers import Processes

if TYPE_CHECKING:
    from cafs.pg_manifest.feed import ChangeFeed

log = logging.getLogger(__name__)
T = TypeVar("T")
FD_RESERVE = 256

def fuse_options(cfg: MountConfig) -> set[str]:
    # nodev and nosuid always: artifacts are data, never devices or setuid programs.
    # The store's path as fsname lets `cafs umount` find the store in /proc/mounts.
    fsname = str(cfg.store.absolute()).replace("\\", "\\\\").replace(",", "\\,")
    options = {"default_permissions", "nodev", "nosuid", "noatime", "subtype=cafs",
               f"fsname={fsname}"}
    if cfg.settings.allow_other:
        options.add("allow_other")
    return options


def open_files_cap(asked: int | None) -> int:
    """How many descriptors the files open in the mount may hold (an open file holds one, two
    while it is written: see OpenFiles.open_inode). Raises the descriptor limit to its hard
    maximum first; the cap leaves FD_RESERVE descriptors for the daemon itself (manifest, /dev/fuse,
    control socket and its connections, blob files read by gc or export, a publish's transient
    files), so a client opening thousands of files gets EMFILE from the cap, not a daemon that
    cannot open its own files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    room = max(1, soft - FD_RESERVE)
    if asked is not None and asked > room:
        log.warning("max_open_files=%d is more than the descriptor limit allows; using %d",
                    asked, room)
    return room if asked is None else max(1, min(asked, room))


class TrioRuntime:
    """The Vfs's view of the event loop."""

    def __init__(self) -> None:
        self._requests: select.poll | None = None  # polls /dev/fuse: is a request waiting?

    def new_lock(self) -> trio.Lock:
        return trio.Lock()

    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    def watch_requests(self, fuse_fd: int | None) -> None:
        if fuse_fd is not None:
            self._requests = select.poll()
            self._requests.register(fuse_fd, select.POLLIN)

    async def run_short(self, fn: Callable[..., T], *args: object) -> T:
        """A short blocking call (one small read of a blob file): on the event loop's thread
        when no request waits in /dev/fuse, since the hop to a worker thread and back costs two
        wake-ups (~160 us per cold 4 KiB read, measured under load); in a worker thread
        otherwise, so it never holds up a request already waiting. (pyfuse3 always has one
        task runnable, its next reader of /dev/fuse: trio's run queue says nothing here.)"""
        if not self.requests_waiting():
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    def requests_waiting(self) -> bool:
        return self._requests is None or bool(self._requests.poll(0))

    async def checkpoint(self) -> None:
        await trio.sleep(0)


def fuse_device_fd() -> int | None:
    """The daemon's /dev/fuse descriptor (pyfuse3 keeps it to itself), found among its open
    descriptors; None if there is not exactly one."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                    found.append(int(name))
    return found[0] if len(found) == 1 else None


# Page cache fills queued or in progress at most; beyond, a random read fills nothing (the
# pages only save later READs: the read itself is answered either way).
MAX_FILLS = 64
# How often a write waiting for the fills of its inode looks again (they take ~50 us each).
FILL_POLL_SECONDS = 0.001
# How long the unmount waits for a fill in progress before closing the session under it.
FILL_DRAIN_SECONDS = 2.0


class InOrderSender:
    """One thread that runs the calls queued to it, one at a time, in queue order.

    Why not a ThreadPoolExecutor(1): a page cache fill is queued per random read, and a
    submit there (a Future, a work item, the idle semaphore taken and given back) cost the
    event loop ~12 us of a ~200 us read (py-spy); a put on a SimpleQueue costs ~1 us."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, fn: Callable[..., object], *args: object) -> bool:
        """Queue fn(*args), nobody waiting for it; False once closing (nothing queued)."""
        if self._closing:
            return False
        self._queue.put((fn, args, None))
        return True

    def submit(self, fn: Callable[..., object], *args: object) -> Future[object]:
        """Queue fn(*args); its Future is cancelled if it is dropped at close."""
        done: Future[object] = Future()
        if self._closing:
            done.cancel()
        else:
            self._queue.put((fn, args, done))
        return done

    def _run(self) -> None:
        while (call := self._queue.get()) is not None:
            fn, args, done = call
            if self._closing:  # dropped: the session is closing (see close)
                if done is not None:
                    done.cancel()
                continue
            try:
                result = fn(*args)
            except Exception as exc:  # a notification is a saving or a courtesy: go on
                if done is None:
                    log.exception("a kernel notification failed")
                else:
                    done.set_exception(exc)
            else:
                if done is not None:
                    done.set_result(result)

    def close(self, timeout: float) -> bool:
        """Drop what is not started, wait up to `timeout` for the call in progress; True if
        the thread ended."""
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


_Call = tuple[Callable[..., object], tuple[object, ...], "Future[object] | None"]


class PyfuseKernel:
    """The Vfs's way to tell the kernel to forget cached entries and inodes, and to fill its
    page cache.

    Notifications are queued, never sent from inside a request handler: the kernel may wait
    for the daemon while it processes one, and the daemon would be waiting for the kernel.
    One thread sends them all, in the order they were queued, so the invalidation that
    follows a change always comes after any fill of the content before it.
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[int](10_000)
        self._queued: collections.Counter[int] = collections.Counter()
        self._in_order = InOrderSender("cafs-kernel")
        self._fills_lock = threading.Lock()  # the loop queues fills, the sending thread ends them
        self._fills: collections.Counter[int] = collections.Counter()
        self._fills_queued = 0
        self._fills_stopped = False  # stopping: no fill is queued any more (drain_fills)
        self.device: int | None = None  # the mount's st_dev, once it serves (_announce_ready)

    def entry_gone(self, parent: int, name: str) -> None:
        try:
            pyfuse3.invalidate_entry_async(parent, name.encode(), ignore_enoent=True)
        except Exception:  # the kernel may never have seen the entry
            log.debug("invalidate_entry(%s, %r) failed", parent, name, exc_info=True)

    def inode_changed(self, ino: int) -> None:
        try:
            self._send.send_nowait(ino)
        except trio.WouldBlock:  # only ever after a huge admin change; attributes time out
            log.warning("too many kernel invalidations queued; inode %d left to time out", ino)
        else:
            self._queued[ino] += 1

    def dropping(self, ino: int) -> bool:
        return ino in self._queued

    def fill(self, ino: int, offset: int, data: memoryview) -> bool:
        with self._fills_lock:
            if self._fills_stopped or self._fills_queued >= MAX_FILLS:
                return False
            self._fills[ino] += 1
            self._fills_queued += 1
        if not self._in_order.put(self._store, ino, offset, data):  # unmounting
            self._filled(ino)
            return False
        return True

    def _store(self, ino: int, offset: int, data: memoryview) -> None:
        try:
            crashpoints.reached("before-page-fill")
            # Any buffer will do (pyfuse3 takes its buffer), though its stub says bytes.
            pyfuse3.notify_store(ino, offset, data)  # type: ignore[arg-type]
        except OSError as exc:  # ENOENT: the kernel forgot the inode; the pages are a saving
            log.debug("page cache fill of inode %d at %d failed: %s", ino, offset, exc)
        finally:
            self._filled(ino)

    def _filled(self, ino: int) -> None:
        with self._fills_lock:
            self._fills_queued -= 1
            self._fills[ino] -= 1
            if self._fills[ino] <= 0:
                del self._fills[ino]

    async def fills_done(self, ino: int) -> None:
        while ino in self._fills:
            await trio.sleep(FILL_POLL_SECONDS)

    async def drain_fills(self) -> None:
        """Before the loop stops serving: queue no more fills, and wait (bounded) for those
        queued. A fill waits for the pages a READ in flight holds locked; once the loop stops,
        that READ is never answered, and the sending thread would wait in the kernel for good
        (uninterruptibly, on a page lock: the daemon could never exit, even on SIGKILL)."""
        with self._fills_lock:
            self._fills_stopped = True
        with trio.move_on_after(FILL_DRAIN_SECONDS):
            while self._fills_queued:
                await trio.sleep(FILL_POLL_SECONDS)

    def close(self) -> None:
        """Before the session closes: drop what is not sent yet, and wait (bounded: it may
        wait on a page whose READ will never be answered now) for what is being sent, which
        writes to the session's descriptor."""
        if not self._in_order.close(FILL_DRAIN_SECONDS):
            # Stuck behind a READ nobody will answer: abort the mount.
            self._abort_connection()

    def _abort_connection(self) -> None:
        """Abort this mount's FUSE connection (fusectl): its unanswered READs fail, their
        pages unlock, and the stuck sender returns, so the daemon can exit (a thread waiting
        on a page lock cannot be killed). The mount is left dead (ENOTCONN), as after any
        failure. Needs root and fusectl mounted; otherwise it says how to do it by hand."""
        if self.device is None:  # failed before it served: no request was ever answered
            log.error("a kernel notification is stuck at exit, before the mount served: the "
                      "daemon cannot exit until its FUSE connection is aborted")
            return
        abort = Path(f"/sys/fs/fuse/connections/{os.minor(self.device)}/abort")
        try:
            abort.write_text("1\n")
            log.warning("a kernel notification was stuck at exit: the mount's FUSE connection "
                        "was aborted")
        except OSError as exc:
            log.error("a kernel notification is stuck at exit and the FUSE connection could not "
                      "be aborted (%s): the daemon cannot exit until it is (as root: echo 1 > "
                      "%s)", exc, abort)

    async def run(self) -> None:
        async for ino in self._receive:
            # Whatever else is queued goes in the same trip to a worker thread: another host's
            # busy writer (the change feed) queues a few inodes per file it makes.
            batch = [ino]
            while len(batch) < 1000:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            # Through the sending thread, after every fill queued before.
            sent = self._in_order.submit(_invalidate_inodes, set(batch))
            with contextlib.suppress(CancelledError):  # dropped: unmounting
                await trio.to_thread.run_sync(sent.result)
            self._queued.subtract(batch)
            for done in batch:
                if self._queued[done] <= 0:
                    del self._queued[done]


def _invalidate_inodes(inodes: set[int]) -> None:
    for ino in inodes:
        with contextlib.suppress(OSError):  # ENOENT: the kernel holds nothing for it
            pyfuse3.invalidate_inode(ino)


class SystemdNotifier:
    """systemd's notify protocol (no dependency needed), over one socket opened at start-up:
    a daemon whose descriptors are all in use still pings the watchdog. Sends never block (a
    notify queue nobody reads must not stall the event loop) and never raise."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._failing: int | None = None  # the errno last reported, so it is logged once

    def open(self) -> None:
        if self._address and self._sock is None:
            try:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:  # tried again at the next message
                self._report(exc)

    def notify(self, message: str) -> None:
        if not self._address:
            return
        self.open()
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            self._report(exc)
        else:
            self._failing = None

    def _report(self, exc: OSError) -> None:
        if exc.errno != self._failing:
            log.warning("cannot notify systemd: %s", exc)
            self._failing = exc.errno


_systemd = SystemdNotifier()


def sd_notify(message: str) -> None:
    """Tell systemd `message` if we run under it (READY=1, WATCHDOG=1, STOPPING=1)."""
    _systemd.notify(message)


def _tune_garbage_collector() -> None:
    """Before serving: what start-up made (modules, the store, the caches' structures) lives
    as long as the daemon, so the cycle collector stops walking it (freeze); and it runs
    after 10,000 new objects instead of 700.

    Why: a listing or a walk makes a few objects per entry that the daemon keeps (a node, its
    blob, its attributes). Measured in the daemon (gc.callbacks) over a cold `ls -l` of
    10,000 entries: ~45 ms of collection with the defaults, one full collection of the whole
    start-up heap (~95,000 objects) 24-34 ms of it; ~10 ms with the freeze; ~5 ms with both.
    Cycles (an exception and its traceback) are still collected, a little later; start-up's
    are collected before the freeze, which would keep them for good."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def serve(cfg: MountConfig, on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled. Raises CafsError if it cannot start."""
    # Never the given path again: a link in it could be swapped while we serve.
    cfg = replace(cfg, store=real_store_path(cfg.store))
    check_mountpoint(cfg.mountpoint, nonempty=cfg.settings.nonempty)
    check_placement(cfg.store, cfg.mountpoint)
    _systemd.open()  # now, while descriptors are plenty
    log.info("mounting store %s at %s (configuration: %s)", cfg.store, cfg.mountpoint,
             cfg.config or "none")
    store = Store.open(cfg.store, lock=True, compression_level=cfg.settings.compression,
                       owner=mount_owner(cfg.mountpoint),
                       blobs=BlobsSpec(cfg.settings.blobs, cfg.settings.cache_dir,
                                       cfg.settings.cache_size),
                       serving=True)
    try:
        same_boot = store.same_boot()
        if store.mark_dirty():
            if not same_boot:
                _roll_back_unsynced(store)
            log.warning("the last daemon did not stop cleanly: checking the newest blobs")
            problems = store.check_recent()
            if problems:  # the dirty marker stays: the store needs attention
                raise StoreError(f"store {cfg.store} needs repair ({problems[0]}; "
                                 f"{len(problems)} problems): run cafs fsck")
        if store.manifest_url is not None:  # other hosts may serve this manifest too
            # Start-up recovery then removes this mount's own earlier unfinished files and
            # dead sessions', never those of a mount alive on another host.
            store.manifest.set_session_timeout(cfg.settings.session_timeout)
            store.manifest.set_session_where(socket.gethostname(), str(cfg.mountpoint))
        recovery = store.recover()
        if recovery.temp_files or recovery.unpublished:
            log.info("recovered after an unclean stop: removed %d temp files and %d unfinished "
                     "files", recovery.temp_files, recovery.unpublished)
        try:  # orphan blob files older than this are crash leftovers, not lost metadata
            store.manifest.mark_checked(time.time_ns())
            # Everything a crashed daemon left in the page cache is on disk from here: the
            # durable point starts at this start.
            store.sync_durable()
        except CafsError as exc:
            log.warning("cannot record the start-up check in the manifest: %s", exc)
        keeper = _start_session(store, cfg)
        feed = None
        if keeper is not None:  # other hosts may serve this manifest too
            from cafs.pg_manifest.feed import ChangeFeed  # psycopg only where it is used
            feed = ChangeFeed(str(store.manifest_url), keeper.session)
        # With a group sync, a close() needs no fsync (see LocalBlobStore.sync_each_publish).
        store.blobs.sync_each_publish = cfg.settings.sync_interval <= 0
        kernel = PyfuseKernel()
        processes = Processes()
        runtime = TrioRuntime()
        vfs = Vfs(store.manifest, store.blobs, runtime,
                  max_artifact_size=cfg.settings.max_artifact_size, kernel=kernel,
                  max_open_files=open_files_cap(cfg.settings.max_open_files),
                  processes=processes, shared=feed is not None)
        try:
            pyfuse3.init(CafsOperations(vfs), str(cfg.mountpoint), fuse_options(cfg))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {cfg.mountpoint}: {exc}") from None
        runtime.watch_requests(fuse_device_fd())
        _tune_garbage_collector()
        try:
            trio.run(_main_loop, cfg, on_ready, store, vfs, kernel, processes, feed)
        except BaseException:
            # Unmount only after a clean stop. After a failure the mount must stay a dead mount
            # (ENOTCONN) until an operator or the unit's ExecStopPost clears it: unmounted,
            # writers would silently write into the directory underneath.
            kernel.close()
            pyfuse3.close(unmount=False)
            raise
        kernel.close()
        pyfuse3.close(unmount=True)
        if feed is not None:
            feed.close()
        # Unmounted, no write is in progress: a temp still here is one whose removal failed.
        with contextlib.suppress(OSError):
            store.blobs.clean_tmp()
        try:  # a clean stop leaves nothing for power loss to take
            store.sync_durable()
        except (OSError, CafsError) as exc:
            log.warning("cannot sync the store at unmount: %s", exc)
        _backup(store)
        if keeper is not None:
            keeper.end()
        store.mark_clean()
        log.info("unmounted %s", cfg.mountpoint)
    finally:
        store.close()


def _start_session(store: Store, cfg: MountConfig) -> SessionKeeper | None:
    """Register this mount with a manifest other hosts may serve (PostgreSQL), over a
    connection of its own for the heartbeats; None on SQLite."""
    if store.manifest_url is None:
        return None
    from cafs.pg_manifest import PgManifest  # psycopg only for stores that use it
    own = PgManifest(store.manifest_url, serving=True)
    keeper = SessionKeeper(store.manifest, own, str(cfg.mountpoint), os.getpid(),
                           cfg.settings.session_timeout)
    try:
        keeper.start()
    except BaseException:
        own.close()
        raise
    keeper.run()  # beats in a thread of its own (see cafs.sessions)
    return keeper


def _roll_back_unsynced(store: Store) -> None:
    """Start-up after the machine went down (not only the daemon): see
    Store.roll_back_unsynced."""
    log.warning("the last daemon did not stop cleanly and the machine restarted since: "
                "checking the blobs stored after the last group sync")
    rolled = store.roll_back_unsynced()
    for problem in rolled.damaged:
        log.warning("lost in the power loss: %s", problem)
    if rolled.damaged:
        log.warning("%d of %d recent blobs did not reach the disk whole: %d artifacts rolled "
                    "back to their previous version or removed", len(rolled.damaged),
                    rolled.checked, rolled.artifacts)


async def _main_loop(cfg: MountConfig, on_ready: Callable[[], None], store: Store, vfs: Vfs,
                     kernel: PyfuseKernel, processes: Processes,
                     feed: ChangeFeed | None = None) -> None:
    async def run_admin(command: str, args: dict[str, Any], files: list[IO[bytes]],
                        progress: Callable[[str, int, int], None]) -> dict[str, Any]:
        admin = Admin(store, TrioRuntime(), vfs, mounted=True, progress=progress,
                      max_artifact_size=vfs.max_artifact_size)
        return await admin.run(command, args, files)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, kernel)
        nursery.start_soon(kernel.run)
        nursery.start_soon(serve_control, store.root, run_admin)
        nursery.start_soon(_announce_ready, cfg.mountpoint, on_ready, processes, kernel)
        if feed is not None:
            nursery.start_soon(follow_changes, feed, vfs)
        interval = watchdog_interval()
        if interval is not None:
            nursery.start_soon(_ping_watchdog, interval)
        if cfg.settings.sync_interval > 0:
            nursery.start_soon(_sync_periodically, store, cfg.settings.sync_interval,
                               vfs.publisher.durable_point)
        if cfg.settings.backup_interval > 0:
            nursery.start_soon(_backup_periodically, store, cfg.settings.backup_interval)
        if store.manifest.shared:
            nursery.start_soon(_send_pending_periodically, store)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


FEED_POLL = 1.0  # seconds: the change feed is read at least this often, notified or not
FEED_GAP = 0.05  # seconds: and at most this often


async def follow_changes(feed: ChangeFeed, vfs: Vfs, poll: float = FEED_POLL) -> None:
    """Keep this mount's caches true to what other hosts' mounts change (close-to-open):
    read the change feed whenever a NOTIFY arrives, and every `poll` seconds anyway (a push
    only speeds up the poll: notifications are lost while disconnected). After a reconnect or
    a silence that may hide a gap, the first read says flush: every cache goes. Reads run in a
    worker thread (a hung server must not stall requests); the caches are changed on the
    event loop, between requests."""
    from cafs.pg_manifest.feed import FeedError

    failing = False
    read_at = 0.0
    while True:
        try:
            if not feed.connected:
                await trio.to_thread.run_sync(feed.connect)
            # Notifications that come closer together are read together: a busy writer on
            # another host costs this mount at most 1 / FEED_GAP reads a second (a lone
            # change is read at once: the last read is long past).
            await trio.sleep_until(read_at + FEED_GAP)
            read_at = trio.current_time()
            batch = await trio.to_thread.run_sync(feed.read)
            if batch.flush:
                vfs.forget_everything()
                if failing:
                    log.info("change feed: reconnected; every cache flushed")
            elif batch.changes:
                vfs.changed_elsewhere(batch.changes)
            failing = False
            if feed.trim_due:
                await trio.to_thread.run_sync(feed.trim)
            with trio.move_on_after(poll):
                while not feed.notified():
                    await trio.lowlevel.wait_readable(feed.socket)
        except FeedError as exc:
            if not failing:
                log.warning("%s; retrying every %.0f s (other hosts' changes show once their "
                            "kernel timeouts pass)", exc, poll)
            failing = True
            feed.close()
            await trio.sleep(poll)


def _backup(store: Store) -> bool:
    """One rotating manifest backup; a failure is logged, never fatal."""
    if not store.keeps_backups:  # the manifest is on PostgreSQL: pg_dump backs it up
        return True
    try:
        made = store.backup()
    except (OSError, CafsError) as exc:
        log.warning("manifest backup failed: %s", exc)
        return False
    if made is None:
        log.warning("manifest backup skipped: the store's filesystem is nearly full")
        return False
    log.debug("manifest backed up to %s", made)
    return True


async def _backup_periodically(store: Store, interval: float) -> None:
    """Back the manifest up every `interval` seconds if it changed. The copy runs in a worker
    thread through its own read connection: the event loop keeps serving meanwhile."""
    backed_up_at = store.manifest.changes
    while True:
        await trio.sleep(interval)
        changes = store.manifest.changes
        if changes != backed_up_at and await trio.to_thread.run_sync(_backup, store):
            backed_up_at = changes


async def _send_pending_periodically(store: Store, interval: float = 0.5) -> None:
    """A manifest on a server sends some statements (a publish's unpin) with the next one
    instead of in a round trip of their own: when the mount goes idle, they go within
    `interval` seconds (other hosts' gc then sees the pin gone). In a worker thread."""
    while True:
        await trio.sleep(interval)
        if not store.manifest.has_pending():
            continue
        try:
            await trio.to_thread.run_sync(store.manifest.send_pending)
        except CafsError as exc:  # the server is away: the pins went with the connection
            log.debug("sending pending statements: %s", exc)


async def _sync_periodically(store: Store, interval: float,
                             durable_point: Callable[[], int]) -> None:
    """The group sync (like ext4's commit interval): every `interval` seconds, if anything was
    committed, one syncfs of the store's filesystem in a worker thread, then one
    synchronous=FULL commit recording the durable point taken before it. Power loss then takes
    at most the last interval of what was closed without fsync, and an unclean start checks
    exactly that much (Store.roll_back_unsynced)."""
    synced_at = store.manifest.changes
    while True:
        await trio.sleep(interval)
        if store.manifest.changes == synced_at:
            continue
        durable_ns = durable_point()  # never after a publish in flight began
        try:
            await trio.to_thread.run_sync(store.blobs.sync_all)
            store.manifest.sync(durable_ns)
        except (OSError, CafsError) as exc:  # tried again at the next interval
            log.warning("group sync failed: %s", exc)
            continue
        synced_at = store.manifest.changes


async def _announce_ready(mountpoint: Path, on_ready: Callable[[], None],
                          processes: Processes, kernel: PyfuseKernel) -> None:
    # A stat through the mount is answered by our own loop: once it returns, we serve.
    info = await trio.to_thread.run_sync(os.stat, mountpoint)
    processes.device = info.st_dev  # now the writers' descriptors can be told apart
    kernel.device = info.st_dev
    raise_read_ahead(info.st_dev)
    log.info("serving %s", mountpoint)
    on_ready()
    sd_notify("READY=1")
    crashpoints.reached("raise-in-main-loop")


READ_AHEAD_KB = 1024


def raise_read_ahead(device: int) -> None:
    """Let the kernel read ahead 1 MiB per request on this mount (default 128 KiB): sequential
    reads then cost a quarter of the round trips. Needs root; without it, the default stays."""
    path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        path.write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.debug("cannot set %s: %s", path, exc)


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (from WATCHDOG_USEC), if the watchdog is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def _ping_watchdog(interval: float) -> None:
    # A task of the event loop: if the loop is stuck, the pings stop and systemd restarts us.
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _stop_on_signal(kernel: PyfuseKernel) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            await kernel.drain_fills()  # while READs are still answered
            pyfuse3.terminate()
            return


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pyfuse3").setLevel(logging.INFO if debug else logging.WARNING)


__all__ = ["MountConfig", "MountError", "StoreError", "TrioRuntime", "configure_logging", "serve"]

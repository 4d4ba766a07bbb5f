"""Writers on several hosts (issue 17): two daemons on one PostgreSQL manifest and one S3
prefix, driven through their mountpoints with ordinary tools and Python file I/O.

What is promised: each open-for-write publishes a whole version; when both hosts write one
path the last commit is current and `cafs log` keeps both; identical content is one object;
O_EXCL has one winner and the loser gets EEXIST; plain creates of one name on both hosts both
succeed (two versions); `cafs seal` on one host refuses a run another host writes in (EBUSY),
and a sealed run refuses the other host's writers (EROFS). The soak (CAFS_SOAK=1 for minutes;
a short one always) has writers on both hosts and readers on the other host checking that
every read is ENOENT or a whole version written.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backends import S3_BUCKET, WeedServer
from conftest import cafs, manifest_sql, sha
from hosts import Host
from hosts import hosts as hosts  # the fixture

from cafs.lifecycle import root_hash

FORK = multiprocessing.get_context("fork")


def log(host: Host, path: Path) -> list[dict]:
    """`cafs log --json` of a path, run on `host`: its versions, oldest first."""
    result = cafs("log", "--json", str(path), env=host.command_env())
    return json.loads(result.stdout)["versions"]


def write(path: Path, data: bytes) -> None:
    """open(O_TRUNC), write, close: one version."""
    with open(path, "wb") as out:
        out.write(data)


def at_once(*actions: Callable[[], object]) -> list[object]:
    """Run the actions in threads released together; their results (or exceptions)."""
    start = threading.Barrier(len(actions))
    results: list[object] = [None] * len(actions)

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = actions[index]()
        except OSError as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def objects(weed: WeedServer, host: Host) -> list[str]:
    """The blob objects in the hosts' S3 prefix."""
    config = (host.mountpoint.parent / "cafs.toml").read_text()
    prefix = config.split(f"s3://{S3_BUCKET}/", 1)[1].split("?", 1)[0]
    listing = weed.client().list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{prefix}/blobs/")
    return [item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", [])]


# -- one path, both hosts ------------------------------------------------------------------


def test_both_hosts_write_one_path_at_once(hosts: list[Host]) -> None:
    """Every open-for-write is a whole version in history; the newest commit is current."""
    a, b = hosts
    path_a = a.layer() / "model.bin"
    path_b = b.runs / "e1" / "train" / "model.bin"
    written = [os.urandom(200_000)]
    write(path_a, written[0])
    for _ in range(8):
        data_a, data_b = os.urandom(150_000), os.urandom(250_000)
        source = b.mountpoint.parent / "src.bin"
        source.write_bytes(data_b)
        results = at_once(lambda d=data_a: write(path_a, d),  # type: ignore[misc]
                          lambda s=source: shutil.copyfile(s, path_b))  # type: ignore[misc]
        assert not [r for r in results if isinstance(r, Exception)], results
        written += [data_a, data_b]
    versions = log(a, path_a)
    assert Counter(v["sha256"] for v in versions) == Counter(map(sha, written))
    assert [v["version"] for v in versions] == list(range(1, len(written) + 1))
    assert [v["current"] for v in versions] == [False] * (len(written) - 1) + [True]
    newest = max(versions, key=lambda v: v["published_ns"])
    assert newest["current"], "the last commit is the current version"
    assert log(b, path_b) == versions
    # Each host reads a whole version (which one it has seen is the change feed's business).
    for path in (path_a, path_b):
        assert sha(path.read_bytes()) in {v["sha256"] for v in versions}
    # Every writer ended with its close (in the publish's transaction).
    assert manifest_sql(a.store, "SELECT count(*) FROM cafs_writers") == [(0,)]


def test_identical_content_on_both_hosts_is_one_object(hosts: list[Host],
                                                       weed: WeedServer) -> None:
    a, b = hosts
    a.layer()
    data = os.urandom(400_000)
    digest = sha(data)
    at_once(lambda: write(a.runs / "e1" / "train" / "one.bin", data),
            lambda: write(b.runs / "e1" / "train" / "two.bin", data))
    assert objects(weed, a).count(digest) == 1
    rows = manifest_sql(a.store, "SELECT refcount FROM blobs WHERE sha256 = ?", (digest,))
    assert rows == [(2,)]
    for host in (a, b):
        assert os.getxattr(host.runs / "e1" / "train" / "one.bin",
                           "user.cafs.refcount") == b"2"
    # Both hosts write it to one path: two versions of one content, referenced once.
    same = a.runs / "e1" / "train" / "same.bin"
    at_once(lambda: write(same, data), lambda: write(b.runs / "e1" / "train" / "same.bin", data))
    assert [v["sha256"] for v in log(b, same)] == [digest, digest]
    assert manifest_sql(a.store, "SELECT refcount FROM blobs WHERE sha256 = ?",
                        (digest,)) == [(3,)]
    assert objects(weed, a).count(digest) == 1


def test_a_rewrite_starts_from_the_newest_version_whichever_host_wrote_it(
        hosts: list[Host]) -> None:
    """B has read version 1; A publishes version 2; B opens without O_TRUNC and changes one
    byte: the result is version 2 with that byte, not version 1 with it."""
    a, b = hosts
    path_b = b.runs / "e1" / "train" / "state.bin"
    write(a.layer() / "state.bin", b"1" * 1000)
    assert path_b.read_bytes() == b"1" * 1000
    write(a.runs / "e1" / "train" / "state.bin", b"2" * 3000)
    fd = os.open(path_b, os.O_WRONLY)
    try:
        os.pwrite(fd, b"B", 0)
    finally:
        os.close(fd)
    versions = log(a, a.runs / "e1" / "train" / "state.bin")
    assert versions[-1]["sha256"] == sha(b"B" + b"2" * 2999)
    assert len(versions) == 3


def test_a_file_removed_on_another_host_while_written_publishes_nothing(
        hosts: list[Host]) -> None:
    """As for a file unlinked while open on one host: the close succeeds, nothing lands."""
    a, b = hosts
    write(a.layer() / "doomed.bin", b"v1")
    path_b = b.runs / "e1" / "train" / "doomed.bin"
    with open(path_b, "r+b") as out:
        out.write(b"v2 from b")
        out.flush()
        os.unlink(a.runs / "e1" / "train" / "doomed.bin")
    versions = log(a, a.runs / "e1" / "train" / "doomed.bin")
    assert [v["sha256"] for v in versions] == [sha(b"v1")]
    assert not any(v["current"] for v in versions)
    assert not os.path.exists(a.runs / "e1" / "train" / "doomed.bin")


def test_mv_over_a_name_made_on_the_other_host_replaces_it(hosts: list[Host]) -> None:
    """B's kernel remembers `f` as absent; A makes it; `mv g f` on B replaces A's file as a
    rename over a file does (rsync's and editors' saves), never EIO."""
    a, b = hosts
    a.layer()
    layer_b = b.runs / "e1" / "train"
    assert not (layer_b / "f").exists()
    write(a.runs / "e1" / "train" / "f", b"from a")
    write(layer_b / "g", b"from b")
    subprocess.run(["mv", str(layer_b / "g"), str(layer_b / "f")], check=True)
    versions = log(a, a.runs / "e1" / "train" / "f")
    assert [v["sha256"] for v in versions] == [sha(b"from a"), sha(b"from b")]
    assert versions[-1]["current"]
    rows = manifest_sql(a.store, "SELECT path FROM artifacts WHERE execution = 'e1'")
    assert rows == [("runs/e1/train/f",)]
    # A directory in the way is refused (EEXIST if B had not seen it, else EISDIR), not
    # replaced, and never EIO.
    assert not (layer_b / "d").exists()
    os.mkdir(a.runs / "e1" / "train" / "d")
    write(layer_b / "h", b"h")
    with pytest.raises(OSError) as refused:
        os.rename(layer_b / "h", layer_b / "d")
    assert refused.value.errno in (errno.EEXIST, errno.EISDIR)
    assert (layer_b / "h").read_bytes() == b"h"


# -- creating one name on both hosts -------------------------------------------------------


def _create_rounds(directory: str, rounds: int, flags: int, tag: bytes,
                   barrier: Any, answers: Any) -> None:
    """One racer (a process of its own): for each round, wait for the other, then create
    the round's name and write `tag` into it."""
    results = []
    for index in range(rounds):
        barrier.wait(timeout=60)
        try:
            fd = os.open(os.path.join(directory, f"f{index}"), flags, 0o644)
        except OSError as exc:
            results.append(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            continue
        try:
            os.write(fd, tag)
        finally:
            os.close(fd)
        results.append("ok")
    answers.put((tag, results))


def race_creates(a: Host, b: Host, layer: str, rounds: int, flags: int
                 ) -> dict[bytes, list[str]]:
    barrier = FORK.Barrier(2)
    answers = FORK.Queue()
    racers = [FORK.Process(target=_create_rounds,
                           args=(str(host.runs / "e1" / layer), rounds, flags, tag, barrier,
                                 answers))
              for host, tag in ((a, b"from a"), (b, b"from b"))]
    for racer in racers:
        racer.start()
    found = dict(answers.get(timeout=300) for _ in racers)
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    return found


def test_o_excl_across_hosts_has_exactly_one_winner(hosts: list[Host]) -> None:
    a, b = hosts
    a.layer("e1", "excl")
    rounds = 40
    found = race_creates(a, b, "excl", rounds, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    for index in range(rounds):
        outcome = sorted((found[b"from a"][index], found[b"from b"][index]))
        assert outcome == ["EEXIST", "ok"], (index, outcome)
        winner = b"from a" if found[b"from a"][index] == "ok" else b"from b"
        # Both hosts read the winner's bytes (the loser's host forgot its negative entry).
        for host in (a, b):
            assert (host.runs / "e1" / "excl" / f"f{index}").read_bytes() == winner
        assert len(log(a, a.runs / "e1" / "excl" / f"f{index}")) == 1
    wins = Counter(found[b"from a"])["ok"]
    print(f"O_EXCL: {rounds} rounds, a won {wins}, b won {rounds - wins}")


def test_plain_creates_of_one_name_on_both_hosts_make_two_versions(hosts: list[Host]) -> None:
    a, b = hosts
    a.layer("e1", "plain")
    rounds = 30
    found = race_creates(a, b, "plain", rounds, os.O_CREAT | os.O_TRUNC | os.O_WRONLY)
    assert found[b"from a"] == found[b"from b"] == ["ok"] * rounds
    for index in range(rounds):
        versions = log(a, a.runs / "e1" / "plain" / f"f{index}")
        assert sorted(v["sha256"] for v in versions) == sorted(
            [sha(b"from a"), sha(b"from b")]), index
        assert versions[-1]["current"]
    assert not [line for host in (a, b) for line in host.log().splitlines()
                if "EIO" in line or "Input/output" in line]


# -- sealing -------------------------------------------------------------------------------


def test_seal_refuses_a_run_another_host_writes_in(hosts: list[Host]) -> None:
    a, b = hosts
    write(a.layer() / "done.bin", b"done")
    layer_b = b.runs / "e1" / "train"
    for how in ("existing", "new"):
        name = "done.bin" if how == "existing" else "new.bin"
        with open(layer_b / name, "ab") as out:
            out.write(b" and more")
            busy = cafs("seal", str(a.runs / "e1"), check=False, env=a.command_env())
            assert busy.returncode == 1, busy.stdout + busy.stderr
            assert "open for writing" in busy.stderr and "Traceback" not in busy.stderr
    sealed = cafs("seal", str(a.runs / "e1"), env=a.command_env())
    assert "sealed" in sealed.stdout
    # B had the run cached as open: its writers get EROFS, as on the host that sealed it.
    for attempt in (lambda: os.open(layer_b / "done.bin", os.O_WRONLY | os.O_APPEND),
                    lambda: os.open(layer_b / "fresh.bin", os.O_WRONLY | os.O_CREAT, 0o644),
                    lambda: os.mkdir(layer_b / "sub"),
                    lambda: os.truncate(layer_b / "new.bin", 0)):
        with pytest.raises(OSError) as refused:
            attempt()
        assert refused.value.errno == errno.EROFS
    root = os.getxattr(a.runs / "e1", "user.cafs.root").decode()
    rows = manifest_sql(a.store, "SELECT path, sha256 FROM artifacts WHERE execution = 'e1'")
    assert root == root_hash([(path.split("/", 2)[2], digest) for path, digest in rows])
    assert sorted(os.listdir(a.runs / "e1" / "train")) == ["done.bin", "new.bin"]
    assert manifest_sql(a.store, "SELECT count(*) FROM cafs_writers") == [(0,)]


def test_seal_and_a_writer_on_another_host_never_both_win(hosts: list[Host]) -> None:
    """Race `cafs seal` on A against a writer on B opening files in the run: either the seal
    refuses (EBUSY) or the writer does (EROFS), and a sealed run's root is its content's."""
    a, b = hosts
    outcomes: Counter[str] = Counter()
    for round_ in range(8):
        run = f"r{round_}"
        write(a.layer(run, "l") / "f", b"start")
        stop = threading.Event()
        refused: list[int | None] = []

        def writer(run: str = run, stop: threading.Event = stop,
                   refused: list[int | None] = refused) -> None:
            index = 0
            while not stop.is_set():
                try:
                    write(b.runs / run / "l" / f"w{index % 3}", os.urandom(5000))
                except OSError as exc:
                    refused.append(exc.errno)
                    return
                index += 1
                time.sleep(random.uniform(0, 0.03))  # gaps: the seal wins some rounds

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(random.uniform(0, 0.3))
        result = cafs("seal", str(a.runs / run), check=False, env=a.command_env())
        stop.set()
        thread.join()
        if result.returncode == 0:
            outcomes["sealed"] += 1
            if not refused:  # the writer may have stopped before meeting the seal
                with pytest.raises(OSError) as late:
                    write(b.runs / run / "l" / "w0", b"late")
                refused.append(late.value.errno)
            assert refused == [errno.EROFS]
            # Read after the writer stopped: nothing was published after the seal, whose
            # root is over what the run held when it committed.
            rows = manifest_sql(a.store, "SELECT path, sha256 FROM artifacts WHERE "
                                "execution = ?", (run,))
            root = os.getxattr(a.runs / run, "user.cafs.root").decode()
            assert root == root_hash([(p.split("/", 2)[2], d) for p, d in rows])
        else:
            outcomes["busy"] += 1
            assert "open for writing" in result.stderr, result.stderr
            assert not refused
    print(f"seal against a writer on the other host: {dict(outcomes)}")


# -- the soak (issue 17, test 7) -----------------------------------------------------------


class Soak:
    """Writers on both hosts; readers on each host reading what the other host writes.

    Paths: `own-<host>-<i>` are written only by that host (so its readers, which see their
    own host's writes in progress, never read them); `shared-<i>` are written by both hosts
    at once (checked through history at the end); `new-<n>` are created on both hosts at once
    (O_EXCL on even n, plain creates on odd n). Readers check every read is ENOENT or a whole
    version (its hash is among those written there); writers record what each successful
    close published."""

    def __init__(self, a: Host, b: Host, seconds: float) -> None:
        self.hosts = {"a": a, "b": b}
        self.seconds = seconds
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.published: dict[str, list[str]] = {}  # path below the layer: hashes, each close
        self.attempted: dict[str, set[str]] = {}  # every hash a writer tried there
        self.recent: dict[str, list[bytes]] = {}  # the newest versions' bytes, per path
        self.torn: list[str] = []  # how each read that was no version came about
        self.reads: list[tuple[str, str | None]] = []  # (path, hash or None for ENOENT)
        self.failures: list[str] = []
        self.excl = Counter[str]()

    def layer(self, host: str) -> Path:
        return self.hosts[host].runs / "soak" / "l"

    def note(self, rel: str, digest: str, *, published: bool) -> None:
        with self.lock:
            self.attempted.setdefault(rel, set()).add(digest)
            if published:
                self.published.setdefault(rel, []).append(digest)

    def write_one(self, host: str, rel: str, rng: random.Random) -> None:
        size = rng.choice([0, 10, 4096, 70_000, 300_000, rng.randrange(1, 1_500_000)])
        data = rng.randbytes(size)
        digest = sha(data)
        self.note(rel, digest, published=False)
        with self.lock:  # the newest versions' bytes: a failure tells how a bad read was made
            recent = self.recent.setdefault(rel, [])
            recent[:] = [*recent[-15:], data]
        target = self.layer(host) / rel
        if rng.random() < 0.2:  # an ordinary tool
            source = self.hosts[host].mountpoint.parent / f"src-{threading.get_ident()}"
            source.write_bytes(data)
            done = subprocess.run(["cp", str(source), str(target)], capture_output=True)
            if done.returncode != 0:
                self.failures.append(f"cp to {rel} on {host}: {done.stderr!r}")
                return
        else:
            try:
                write(target, data)
            except OSError as exc:
                self.failures.append(f"write {rel} on {host}: {exc}")
                return
        self.note(rel, digest, published=True)

    def writer(self, host: str, index: int, seed: int) -> None:
        """Two writers on one host never write one path at once: on one host, rewrites that
        overlap in time are one write (they share the file's content in progress)."""
        rng = random.Random(seed)
        while not self.stop.is_set():
            if index == 0 and rng.random() < 0.5:
                self.write_one(host, f"shared-{rng.randrange(3)}", rng)
            else:
                self.write_one(host, f"own-{host}{index}-{rng.randrange(3)}", rng)

    def creator(self, host: str, barrier: threading.Barrier) -> None:
        index = 0
        while True:
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                return
            if self.stop.is_set():
                barrier.abort()
                return
            rel = f"new-{index}"
            data = f"{rel} from {host}".encode()
            self.note(rel, sha(data), published=False)
            flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if index % 2 == 0 else os.O_TRUNC)
            try:
                fd = os.open(self.layer(host) / rel, flags, 0o644)
            except OSError as exc:
                if exc.errno == errno.EEXIST and index % 2 == 0:
                    with self.lock:
                        self.excl["lost"] += 1
                else:
                    self.failures.append(f"create {rel} on {host}: {exc}")
                index += 1
                continue
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.note(rel, sha(data), published=True)
            if index % 2 == 0:
                with self.lock:
                    self.excl["won"] += 1
            index += 1

    def reader(self, host: str, seed: int) -> None:
        rng = random.Random(seed)
        other = "b" if host == "a" else "a"
        while not self.stop.is_set():
            rel = f"own-{other}{rng.randrange(2)}-{rng.randrange(3)}"
            try:
                data = (self.layer(host) / rel).read_bytes()
            except FileNotFoundError:
                with self.lock:
                    self.reads.append((rel, None))
                continue
            except OSError as exc:
                self.failures.append(f"read {rel} on {host}: {exc}")
                continue
            with self.lock:
                self.reads.append((rel, sha(data)))
                if sha(data) not in self.attempted.get(rel, set()):
                    self.torn.append(describe_bad_read(rel, data, self.recent.get(rel, [])))

    def run(self) -> None:
        self.hosts["a"].layer("soak", "l")
        # Each path exists before the readers look: a name made on the other host after a
        # reader's kernel found it missing shows once the change feed tells that kernel.
        rng = random.Random(7)
        for host in ("a", "b"):
            for rel in [f"own-{host}{i}-{k}" for i in range(2) for k in range(3)]:
                self.write_one(host, rel, rng)
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=self.writer, args=(host, index, seed))
                   for seed, (host, index) in enumerate([("a", 0), ("a", 1), ("b", 0),
                                                         ("b", 1)])]
        threads += [threading.Thread(target=self.reader, args=(host, 100 + seed))
                    for seed, host in enumerate(["a", "b"])]
        threads += [threading.Thread(target=self.creator, args=(host, barrier))
                    for host in ("a", "b")]
        for thread in threads:
            thread.start()
        time.sleep(self.seconds)
        self.stop.set()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive()

    def check(self) -> None:
        assert not self.failures, self.failures[:10]
        found = [rel for rel, digest in self.reads if digest is not None]
        assert found, "the readers read nothing"
        torn = [(rel, digest) for rel, digest in self.reads
                if digest is not None and digest not in self.attempted.get(rel, set())]
        assert not torn, (f"{len(torn)} reads were not a version written there: {torn[:5]}; "
                          f"how: {self.torn[:5]}")
        # Every version is in history, whole, numbered 1..n: all paths at once from the
        # manifest, and `cafs log` on both hosts for the paths both wrote.
        a, b = self.hosts["a"], self.hosts["b"]
        rows = manifest_sql(a.store, "SELECT path, sha256, number FROM versions v JOIN "
                            "blobs b ON b.id = v.blob_id WHERE path LIKE 'runs/soak/l/%'")
        history: dict[str, list[tuple[int, str]]] = {}
        for path, digest, number in rows:
            history.setdefault(path.rsplit("/", 1)[1], []).append((number, digest))
        assert sorted(history) == sorted(self.published)
        for rel, digests in self.published.items():
            numbers = sorted(number for number, _ in history[rel])
            assert numbers == list(range(1, len(digests) + 1)), rel
            assert Counter(d for _, d in history[rel]) == Counter(digests), rel
        for rel in sorted(r for r in self.published if r.startswith("shared-")):
            for host in (a, b):
                logged = log(host, self.layer(host.name) / rel)
                assert [v["sha256"] for v in logged] == [
                    d for _, d in sorted(history[rel])], rel
                assert logged[-1]["current"], rel
        assert self.excl["won"] > 0


def run_soak(hosts: list[Host], seconds: float) -> None:
    soak = Soak(*hosts, seconds=seconds)
    started = time.monotonic()
    soak.run()
    soak.check()
    versions = sum(len(digests) for digests in soak.published.values())
    print(f"soak: {time.monotonic() - started:.0f} s, {versions} versions published on two "
          f"hosts, {len(soak.reads)} reads checked on the other host "
          f"({sum(d is None for _, d in soak.reads)} ENOENT), O_EXCL {dict(soak.excl)}")


def test_soak_short(hosts: list[Host]) -> None:
    """The soak's short version, run in CI (~25 s of writing)."""
    run_soak(hosts, float(os.environ.get("CAFS_SOAK_SHORT_SECONDS", "25")))


@pytest.mark.skipif(not os.environ.get("CAFS_SOAK"), reason="the long soak: set CAFS_SOAK=1")
def test_soak_long(hosts: list[Host]) -> None:
    """Minutes of it (CAFS_SOAK_SECONDS, default 300)."""
    run_soak(hosts, float(os.environ.get("CAFS_SOAK_SECONDS", "300")))


def describe_bad_read(rel: str, data: bytes, versions: list[bytes]) -> str:
    """How a read that is no version relates to the newest versions written: their sizes,
    whether it is a prefix of one, one followed by zeros, or where it first differs."""
    parts = []
    for version in versions:
        if data == version[:len(data)]:
            parts.append(f"{len(version)}:prefix")
        elif data[:len(version)] == version and not data[len(version):].strip(b"\0"):
            parts.append(f"{len(version)}:then-zeros")
        else:
            pairs = enumerate(zip(version, data, strict=False))
            differs = next((i for i, (x, y) in pairs if x != y), min(len(version), len(data)))
            parts.append(f"{len(version)}:differs-at-{differs}")
    return f"{rel}: read {len(data)} bytes; newest versions {parts}"

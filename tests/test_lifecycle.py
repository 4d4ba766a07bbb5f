"""The artifact life cycle through a real mount and the CLI: history, records, sealing, tags and
queries, gc, fsck --repair, export and import. Admin commands run through the daemon while the
store is mounted and directly when it is not; both ways are exercised."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from backends import StoredBlobs, another_store_env, current_blobs_spec
from conftest import (
    CAFS,
    Mount,
    cafs,
    cafs_bytes,
    is_mounted,
    log_of,
    manifest_sql,
    sh,
    sha,
    xattr,
)


def find(store: Path, *args: str) -> list[str]:
    return json.loads(cafs("find", "--store", str(store), "--json", *args).stdout)["paths"]


# -- history ------------------------------------------------------------------------------


def test_every_publish_is_a_version_and_old_ones_stay_readable(mount: Mount) -> None:
    layer = mount.layer()
    path = layer / "model.bin"
    contents = [os.urandom(5000), b"second\n", os.urandom(2_000_000)]
    path.write_bytes(contents[0])
    sh(f"echo second > {path}")  # a shell redirect: one version, not an empty one as well
    staging = layer.parent / "stage"
    staging.mkdir()
    (staging / "model.bin").write_bytes(contents[2])
    sh(f"rsync -a {staging}/model.bin {path}")  # rsync: temp file + rename over it
    versions = log_of(path)
    assert [v["sha256"] for v in versions] == [sha(c) for c in contents]
    assert [v["current"] for v in versions] == [False, False, True]
    assert all(v["uid"] == 0 for v in versions)
    assert xattr(path, "user.cafs.version") == str(versions[-1]["version"])
    for version, content in zip(versions, contents, strict=True):
        assert cafs_bytes("cat", f"{path}@{version['version']}") == content
        assert (mount.mountpoint / "blobs" / version["sha256"]).read_bytes() == content
    assert cafs_bytes("cat", str(path)) == contents[-1]
    # The same history, and the same bytes, when the store is not mounted.
    mount.stop()
    store = ["--store", str(mount.store)]
    assert log_of("runs/e1/train/model.bin", *store) == versions
    first = f"runs/e1/train/model.bin@{versions[0]['version']}"
    assert cafs_bytes("cat", *store, first) == contents[0]
    mount.start()


def test_log_and_cat_errors_are_clear(mount: Mount) -> None:
    layer = mount.layer()
    (layer / "a").write_text("a")
    missing = cafs("log", str(layer / "nope"), check=False)
    assert missing.returncode == 1 and "no such artifact" in missing.stderr
    bad_version = cafs("cat", f"{layer / 'a'}@999999", check=False)
    assert bad_version.returncode == 1 and "no version 999999" in bad_version.stderr
    outside = cafs("log", "/etc/passwd", check=False)
    assert outside.returncode == 2 and "inside a cafs mount" in outside.stderr
    directory = cafs("log", str(layer), check=False)
    assert directory.returncode == 1 and "directory" in directory.stderr
    assert "Traceback" not in missing.stderr + bad_version.stderr + outside.stderr


# -- records ------------------------------------------------------------------------------


def test_records_of_layers_and_executions(mount: Mount) -> None:
    layer = mount.layer("e1", "train")
    (layer / "nested").mkdir()
    shared = os.urandom(10_000)
    (layer / "data.bin").write_bytes(shared)
    (layer / "nested" / "own.txt").write_text("mine\n" * 100)
    (mount.layer("e1", "eval") / "score.json").write_text('{"acc": 1}')
    record = json.loads((layer / ".record.json").read_text())
    assert record["kind"] == "layer" and (record["execution"], record["layer"]) == ("e1", "train")
    assert record["artifacts"] == 2
    assert record["logical_bytes"] == 10_000 + 500
    assert record["first_write"] <= record["last_write"] and record["sealed"] is False

    def held_only_here() -> int:
        out = cafs("stats", "--json", "--store", str(mount.store), str(layer)).stdout
        return int(json.loads(out)["unique_bytes"])
    assert held_only_here() == 10_500
    # The same content in another run is no longer unique to this layer (cafs stats PATH
    # says so to the store's owner; records do not: see cafs.records).
    (mount.layer("e2", "train") / "copy.bin").write_bytes(shared)
    record = json.loads((layer / ".record.json").read_text())
    assert held_only_here() == 500 and record["logical_bytes"] == 10_500
    assert "unique_bytes" not in record
    (layer / "late.txt").write_text("late")  # a record is never served stale
    assert json.loads((layer / ".record.json").read_text())["artifacts"] == 3
    os.unlink(layer / "late.txt")
    run = json.loads((mount.runs / "e1" / ".record.json").read_text())
    assert run["kind"] == "execution" and run["artifacts"] == 3
    assert [entry["name"] for entry in run["layers"]] == ["eval", "train"]
    # Read-only, not listed, and in nobody's way: cp -r and rm -rf of a run just work.
    assert sh(f"echo x > {layer}/.record.json", check=False).returncode != 0
    assert sh(f"rm {layer}/.record.json", check=False).returncode != 0
    assert ".record.json" not in os.listdir(layer)
    sh(f"cp -r {mount.runs}/e1 {mount.runs}/e3")
    sh(f"diff -r {mount.runs}/e1 {mount.runs}/e3")
    sh(f"rm -rf {mount.runs}/e3")
    assert not (mount.runs / "e3").exists()


# -- sealing ------------------------------------------------------------------------------


def test_a_sealed_run_refuses_every_change_even_for_root(mount: Mount) -> None:
    layer = mount.layer("e1", "train")
    (layer / "sub").mkdir()
    (layer / "model.bin").write_bytes(b"weights")
    (layer / "sub" / "log.txt").write_text("log\n")
    result = cafs("seal", str(mount.runs / "e1"))
    root = xattr(mount.runs / "e1", "user.cafs.root")
    assert root in result.stdout
    expected = hashlib.sha256(b"".join(
        rel.encode() + b"\0" + sha(data).encode() + b"\n"
        for rel, data in sorted([("train/model.bin", b"weights"),
                                 ("train/sub/log.txt", b"log\n")]))).hexdigest()
    assert root == expected
    refused = [
        f"touch {layer}/new", f"echo x >> {layer}/model.bin", f"echo x > {layer}/model.bin",
        f"truncate -s 0 {layer}/model.bin", f"rm {layer}/model.bin",
        f"mv {layer}/model.bin {layer}/moved.bin", f"chmod 600 {layer}/model.bin",
        f"touch -d 2001-01-01 {layer}/model.bin", f"setfattr -n user.k -v v {layer}/model.bin",
        f"setfattr -n user.k -v v {mount.runs}/e1", f"mkdir {layer}/newdir",
        f"rmdir {layer}/sub", f"mkdir {mount.runs}/e1/newlayer", f"rm -rf {mount.runs}/e1",
        f"mv {mount.runs}/e1 {mount.runs}/renamed", f"chown 1000 {layer}/model.bin",
        f"mv {layer}/sub/log.txt {mount.layer('open', 'x')}/",
        f"cp /etc/hostname {layer}/sub/log.txt",
    ]
    for command in refused:
        result = sh(command, check=False)
        assert result.returncode != 0, f"{command} succeeded in a sealed run"
        assert b"Read-only file system" in result.stderr, (command, result.stderr)
    # Nothing changed, and reading works as before.
    assert (layer / "model.bin").read_bytes() == b"weights"
    assert sorted(os.listdir(layer)) == ["model.bin", "sub"]
    record = json.loads((mount.runs / "e1" / ".record.json").read_text())
    assert record["sealed"] is True and record["root_sha256"] == root
    # Two runs with byte-identical outputs have the same root, whatever their names.
    sh(f"mkdir -p {mount.runs}/twin2 && cp -r {layer} {mount.runs}/twin2/")
    cafs("seal", str(mount.runs / "twin2"))
    assert xattr(mount.runs / "twin2", "user.cafs.root") == root
    # Unsealing opens it again.
    cafs("unseal", str(mount.runs / "e1"))
    (layer / "model.bin").write_bytes(b"retrained")
    assert (layer / "model.bin").read_bytes() == b"retrained"


def test_sealing_waits_for_no_writer(mount: Mount) -> None:
    layer = mount.layer()
    with open(layer / "open.bin", "wb") as out:
        out.write(b"in progress")
        busy = cafs("seal", str(mount.runs / "e1"), check=False)
        assert busy.returncode == 1 and "open for writing" in busy.stderr
    cafs("seal", str(mount.runs / "e1"))
    assert (layer / "open.bin").read_bytes() == b"in progress"


# -- tags and queries ---------------------------------------------------------------------


def test_tags_and_queries(mount: Mount) -> None:
    model = mount.layer("e1", "train") / "model.bin"
    model.write_bytes(b"model-A")
    (mount.layer("e1", "eval") / "report.txt").write_text("report")
    (mount.layer("e2", "train") / "model.bin").write_bytes(b"model-A")
    (mount.layer("e2", "train") / "other.bin").write_bytes(b"model-B")
    sh(f"setfattr -n user.stage -v prod {model}")
    sh(f"setfattr -n user.owner -v team-a {model}")
    sh(f"setfattr -n user.stage -v dev {mount.runs}/e2/train/other.bin")
    sh(f"setfattr -n user.stage -v prod {mount.runs}/e2")
    assert find(mount.store, "--tag", "stage=prod") == ["runs/e1/train/model.bin", "runs/e2"]
    assert find(mount.store, "--tag", "user.stage=dev") == ["runs/e2/train/other.bin"]
    assert find(mount.store, "--tag", "stage") == [
        "runs/e1/train/model.bin", "runs/e2", "runs/e2/train/other.bin"]
    assert find(mount.store, "--tag", "stage=prod", "--tag", "owner=team-a") == [
        "runs/e1/train/model.bin"]
    assert find(mount.store, "--sha256", sha(b"model-A")) == [
        "runs/e1/train/model.bin", "runs/e2/train/model.bin"]
    assert find(mount.store, "--sha256", sha(b"model-A"), "--run", "e2") == [
        "runs/e2/train/model.bin"]
    assert find(mount.store, "--run", "e1") == ["runs/e1/eval/report.txt",
                                                "runs/e1/train/model.bin"]
    assert find(mount.store, "--run", "e1", "--layer", "eval") == ["runs/e1/eval/report.txt"]
    assert find(mount.store, "--sha256", sha(b"nothing")) == []
    # Plain output: one path per line.
    plain = cafs("find", "--store", str(mount.store), "--tag", "owner=team-a").stdout
    assert plain == "runs/e1/train/model.bin\n"
    for bad in (["--sha256", "xyz"], ["--run", "nope"], ["--layer", "train"]):
        result = cafs("find", "--store", str(mount.store), *bad, check=False)
        assert result.returncode in (1, 2) and "Traceback" not in result.stderr, bad
    # Tags follow the artifact; deleting it drops them.
    sh(f"rm {model}")
    assert find(mount.store, "--tag", "owner=team-a") == []


# -- deleting and collecting --------------------------------------------------------------


def test_rm_rf_then_gc_reclaims_only_what_nothing_uses(mount: Mount) -> None:
    shared, own = os.urandom(300_000), os.urandom(200_000)
    (mount.layer("keep", "train") / "data.bin").write_bytes(shared)
    layer = mount.layer("doomed", "train")
    (layer / "data.bin").write_bytes(shared)
    (layer / "own.bin").write_bytes(own)
    sh(f"rm -rf {mount.runs}/doomed")
    assert not (mount.runs / "doomed").exists()
    dry = json.loads(cafs("gc", "--store", str(mount.store), "--dry-run", "--json").stdout)
    assert dry["blobs"] == [sha(own)] and dry["bytes_reclaimed"] >= 200_000
    assert StoredBlobs(mount.store).exists(sha(own))  # a dry run removes nothing
    assert (mount.mountpoint / "blobs" / sha(own)).exists()
    result = cafs("gc", "--store", str(mount.store))
    assert "removed 2 versions, 1 blobs" in result.stdout
    assert not StoredBlobs(mount.store).exists(sha(own))
    assert not (mount.mountpoint / "blobs" / sha(own)).exists()  # the kernel forgot it too
    assert (mount.runs / "keep" / "train" / "data.bin").read_bytes() == shared
    again = json.loads(cafs("gc", "--store", str(mount.store), "--json").stdout)
    assert again["bytes_reclaimed"] == 0 and again["versions_removed"] == 0


def test_gc_keeps_the_versions_asked_for(mount: Mount) -> None:
    path = mount.layer() / "model.bin"
    contents = [b"v%d-" % index + os.urandom(1000) for index in range(5)]
    for content in contents:
        path.write_bytes(content)
    assert len(log_of(path)) == 5
    cafs("gc", "--store", str(mount.store))  # default: all history of live artifacts stays
    assert len(log_of(path)) == 5
    cafs("gc", "--store", str(mount.store), "--keep-versions", "2")
    assert [v["sha256"] for v in log_of(path)] == [sha(c) for c in contents[2:]]
    assert not StoredBlobs(mount.store).exists(sha(contents[0]))
    cafs("gc", "--store", str(mount.store), "--keep-versions", "0")
    assert [v["sha256"] for v in log_of(path)] == [sha(contents[-1])]
    assert path.read_bytes() == contents[-1]


def test_gc_never_removes_content_a_write_in_flight_needs(mount: Mount) -> None:
    """Writers keep re-creating content that gc keeps finding unreferenced; every artifact that
    was closed successfully must read back whole afterwards."""
    layer = mount.layer()
    payloads = [os.urandom(1_500_000 + index) for index in range(3)]  # large: publish awaits
    stop = threading.Event()
    errors: list[str] = []

    def churn(index: int) -> None:
        path = layer / f"churn{index}.bin"
        while not stop.is_set():
            try:
                path.write_bytes(payloads[index])
                path.unlink()
            except OSError as exc:
                errors.append(f"{path}: {exc}")
                return

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(int(os.environ.get("CAFS_GC_ROUNDS", "8"))):
            cafs("gc", "--store", str(mount.store), "--keep-versions", "0")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for index, payload in enumerate(payloads):
        (layer / f"final{index}.bin").write_bytes(payload)
    cafs("gc", "--store", str(mount.store))
    for index, payload in enumerate(payloads):
        assert sha((layer / f"final{index}.bin").read_bytes()) == sha(payload)


def test_admin_commands_work_unmounted_and_refuse_a_busy_store(mount: Mount,
                                                               tmp_path: Path) -> None:
    (mount.layer("gone", "x") / "f").write_bytes(b"gone")
    sh(f"rm -rf {mount.runs}/gone")
    mount.stop()
    result = cafs("gc", "--store", str(mount.store))
    assert "removed 1 versions, 1 blobs" in result.stdout
    assert cafs("gc", "--store", str(tmp_path / "nostore"), check=False).returncode == 3
    # Another admin command holds the unmounted store: the next one is refused, not queued.
    from cafs.store import Store

    holder = Store.open(mount.store, lock=True, owner="running cafs gc",
                        blobs=current_blobs_spec())
    try:
        busy = cafs("gc", "--store", str(mount.store), check=False)
        assert busy.returncode == 3 and "in use (pid" in busy.stderr, busy.stderr
        assert "running cafs gc" in busy.stderr
    finally:
        holder.close()
    mount.start()
    assert is_mounted(mount.mountpoint)


# -- repair -------------------------------------------------------------------------------


def damage_store(store: Path, good: dict[str, bytes]) -> dict[str, str]:
    """Break a store by hand in every way fsck --repair must handle."""
    digests = {name: sha(data) for name, data in good.items()}
    blobs = StoredBlobs(store)
    blobs.remove(digests["deleted"])
    data = bytearray(blobs.read(digests["flipped"]))
    data[len(data) // 2] ^= 0x40
    blobs.write(digests["flipped"], bytes(data))
    manifest_sql(store, "UPDATE blobs SET refcount = 7 WHERE sha256 = ?", (digests["refcount"],))
    (store / "tmp" / "w-stray").write_bytes(b"left by a crash")
    if blobs.remote:  # an object's time cannot be set back: no old orphan to plant
        return {"orphan": "", **digests}
    orphan = os.urandom(100)
    orphan_path = blobs.path(sha(orphan))
    orphan_path.write_bytes(orphan)
    # A crash leftover from long ago: older than the manifest's last commit and than gc's grace.
    os.utime(orphan_path, (1_600_000_000, 1_600_000_000))
    return {"orphan": str(orphan_path), **digests}


@pytest.mark.parametrize("mounted", [False, True], ids=["unmounted", "mounted"])
def test_fsck_detects_and_repairs_each_kind_of_damage(mount: Mount, mounted: bool) -> None:
    layer = mount.layer()
    good = {"deleted": os.urandom(4000), "flipped": os.urandom(4000),
            "refcount": b"refcount" * 100, "healthy": b"healthy"}
    for name, data in good.items():
        (layer / name).write_bytes(data)
    if mounted:
        for name in good:  # the kernel caches these pages: repair must make it forget
            (layer / name).read_bytes()
    else:
        mount.stop()
    digests = damage_store(mount.store, good)
    check = mount.fsck("--full")
    assert check.returncode == 1
    assert f"blob {digests['deleted']}: missing" in check.stdout
    assert f"blob {digests['flipped']}: unreadable: " in check.stdout  # its block checksum
    assert f"blob {digests['refcount']}: refcount 7, but 1 artifacts use it" in check.stdout
    assert "orphan" in check.stdout or not digests["orphan"]
    if not mounted:
        assert "temp file w-stray" in check.stdout

    repair = mount.fsck("--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "DAMAGED         runs/e1/train/deleted" in repair.stdout
    assert "DAMAGED         runs/e1/train/flipped" in repair.stdout
    assert "fixed 1 refcounts" in repair.stdout
    quarantined = StoredBlobs(mount.store).quarantined()
    assert [name.split(".")[0] for name in quarantined] == [digests["flipped"]]
    assert not digests["orphan"] or not Path(digests["orphan"]).exists()
    assert not (mount.store / "tmp" / "w-stray").exists() or mounted
    after = mount.fsck("--full")
    assert after.returncode == 0, after.stdout
    assert [line.split()[0] for line in after.stdout.splitlines()].count("lost") == 2

    if not mounted:
        mount.start()
    # Damaged artifacts give EIO, never wrong bytes; the others read fine.
    for name in ("deleted", "flipped"):
        result = sh(f"cat {layer}/{name}", check=False)
        assert result.returncode != 0 and b"Input/output error" in result.stderr, name
        assert result.stdout == b""
    assert (layer / "refcount").read_bytes() == good["refcount"]
    assert (layer / "healthy").read_bytes() == good["healthy"]
    # Writing the same content again heals it.
    staging = mount.layer("e1", "staging")
    (staging / "restored").write_bytes(good["flipped"])
    assert (layer / "flipped").read_bytes() == good["flipped"]
    (layer / "deleted").write_bytes(good["deleted"])  # overwriting a damaged artifact works
    final = mount.fsck("--full")
    assert final.returncode == 0 and "lost" not in final.stdout, final.stdout
    mount.log_problems(accept=True)  # the EIO reads above were logged as warnings only


# -- export and import --------------------------------------------------------------------


def test_export_then_import_into_another_store(mount: Mount, tmp_path: Path,
                                               source_tree: Path) -> None:
    run = mount.runs / "e1"
    sh(f"mkdir -p {run}/train && cp -r {source_tree}/. {run}/train/")
    model = run / "train" / "weights" / "model.bin"
    first = model.read_bytes()
    model.write_bytes(b"retrained")
    sh(f"setfattr -n user.stage -v prod {model}")
    sh(f"setfattr -n user.note -v 'from a test' {run}/train")
    cafs("seal", str(run))
    root = xattr(run, "user.cafs.root")
    bundle = tmp_path / "e1.tar"
    cafs("export", str(run), "-o", str(bundle))
    # Ordinary tar lists and unpacks it; the blobs are named by their hashes.
    listing = sh(f"tar tf {bundle}").stdout.decode().split()
    assert listing[:3] == ["cafs-bundle.json", "cafs-entries.jsonl", "cafs-blobs.jsonl"]
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    sh(f"tar xf {bundle} -C {unpacked}")
    # Format 2: a small header of counts; one JSON object a line, each saying its kind.
    header = json.loads((unpacked / "cafs-bundle.json").read_bytes())
    lines = [json.loads(line) for line in (unpacked / "cafs-entries.jsonl").read_text()
             .splitlines()]
    assert header["format_version"] == 2 and header["entries"] + header["versions"] == len(lines)
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "layer" and kinds.count("version") == header["versions"]
    assert {"dir", "file"} <= set(kinds)
    for blob in (unpacked / "blobs").iterdir():
        assert sha(blob.read_bytes()) == blob.name
    assert sha(first) in os.listdir(unpacked / "blobs")  # history travels too

    # Import into a second store, not mounted, then mount it and compare.
    other_store, other_mnt = tmp_path / "store2", tmp_path / "mnt2"
    other_mnt.mkdir()
    env = another_store_env(tmp_path)
    cafs("mount", "--store", str(other_store), str(other_mnt), env=env)
    cafs("umount", str(other_mnt), env=env)
    result = cafs("import", "--store", str(other_store), str(bundle), env=env)
    assert "imported runs/e1" in result.stdout
    other = Mount(other_store, other_mnt)
    other.start(env=env)
    try:
        sh(f"diff -r {run} {other_mnt}/runs/e1")
        walk = "cd {} && find . -type f -print0 | sort -z | xargs -0 sha256sum"
        assert sh(walk.format(run)).stdout == sh(walk.format(other_mnt / "runs" / "e1")).stdout
        assert xattr(other_mnt / "runs" / "e1", "user.cafs.root") == root
        imported_model = other_mnt / "runs" / "e1" / "train" / "weights" / "model.bin"
        assert xattr(imported_model, "user.stage") == "prod"
        assert xattr(other_mnt / "runs" / "e1" / "train", "user.note") == "from a test"
        assert [v["sha256"] for v in log_of(imported_model)] == [sha(first), sha(b"retrained")]
        assert sh(f"touch {other_mnt}/runs/e1/train/x", check=False).returncode != 0  # sealed
        # Importing it again: the name is taken; under another name nothing new is stored.
        again = cafs("import", "--store", str(other_store), str(bundle), check=False,
                     env=env)
        assert again.returncode == 1 and "already exists" in again.stderr
        copy = cafs("import", "--store", str(other_store), str(bundle), "--as", "e1-copy",
                    env=env)
        assert "0 new blobs" in copy.stdout
        sh(f"diff -r {other_mnt}/runs/e1 {other_mnt}/runs/e1-copy")
        assert cafs("fsck", "--store", str(other_store), "--full", env=env).returncode == 0
    finally:
        other.stop()
    assert not other.log_problems()


def test_a_damaged_bundle_imports_nothing(mount: Mount, tmp_path: Path) -> None:
    (mount.layer() / "a.bin").write_bytes(os.urandom(50_000))
    bundle = tmp_path / "e1.tar"
    with open(bundle, "wb") as out:  # to stdout, as in a pipe
        subprocess.run([*CAFS, "export", f"{mount.runs}/e1", "-o", "-"], stdout=out, check=True)
    data = bytearray(bundle.read_bytes())
    data[-20_000] ^= 0xFF  # inside the blob's bytes
    broken = tmp_path / "broken.tar"
    broken.write_bytes(bytes(data))
    result = cafs("import", "--store", str(mount.store), str(broken), "--as", "e9", check=False)
    assert result.returncode == 1 and "hash" in result.stderr, result.stderr
    assert not (mount.runs / "e9").exists()
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all")
    result = cafs("import", "--store", str(mount.store), str(junk), check=False)
    assert result.returncode == 1 and "not a cafs bundle" in result.stderr
    check = mount.fsck("--full")
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout


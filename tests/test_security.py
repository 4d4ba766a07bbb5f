"""Other users against the store itself: planted symlinks and foreign entries in the store
directory (root must never follow them), and hash oracles that would tell another user whether
their guess equals content they cannot read. The other user is `nobody`, via setpriv."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    NOBODY,
    Mount,
    as_nobody,
    as_reader,
    cafs,
    is_mounted,
    mounted_for_everyone,
    reachable_dir,
    require_fuse,
    sh,
    unmount_whatever_state,
    write_artifact,
)

from cafs.model import Kind
from cafs.store import Store


def cafs_for_nobody() -> str:
    """A `cafs` command line nobody can run: this interpreter may live where only root may go
    (a pyenv under /root); then the system's, with this environment's packages."""
    if as_nobody(f"{sys.executable} -c 'import cafs.cli'", Path("/")).returncode == 0:
        return f"{sys.executable} -m cafs"
    packages = sysconfig.get_paths()["purelib"]
    repo = Path(__file__).resolve().parent.parent
    return f"env PYTHONPATH={packages}:{repo} /usr/bin/python3 -m cafs"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone can reach (tmp_path is 0700), removed afterwards."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.fail("these tests need root and setpriv (util-linux)")
    with reachable_dir("cafs-sec-") as parent:
        yield parent


def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 3 (store error), one clear line naming the problem, no traceback."""
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# -- finding 8: the store directory and its layout ------------------------------------------


def test_root_refuses_a_store_another_user_made(open_dir: Path) -> None:
    """nobody, able to write the store's parent, makes the store with tmp/ and daemon.log
    pointing at root's files: root's mount must follow neither."""
    victim_dir = open_dir / "victim"
    victim_dir.mkdir(mode=0o700)
    (victim_dir / "precious").write_text("keep me\n")
    root_file = open_dir / "root-only"
    root_file.write_text("root's\n")
    root_file.chmod(0o600)
    shared = open_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    mnt = open_dir / "mnt"
    mnt.mkdir()
    made = as_nobody(f"mkdir -m 700 {shared}/store && ln -s {victim_dir} {shared}/store/tmp && "
                     f"ln -s {root_file} {shared}/store/daemon.log", open_dir)
    assert made.returncode == 0, made.stderr
    try:
        refused(cafs("mount", "--store", str(shared / "store"), str(mnt), check=False),
                "owned by uid 65534")
        refused(cafs("fsck", "--store", str(shared / "store"), check=False), "owned by uid 65534")
    finally:
        unmount_whatever_state(mnt)
    assert not is_mounted(mnt)
    assert (victim_dir / "precious").read_text() == "keep me\n"
    assert root_file.read_text() == "root's\n"
    # root's own store in that directory is no safer: nobody could rename it away and put
    # theirs in its place while the daemon runs.
    mine = shared / "mine"
    mine.mkdir(mode=0o700)
    try:
        refused(cafs("mount", "--store", str(mine), str(mnt), check=False),
                str(shared), "writable by other users")
    finally:
        unmount_whatever_state(mnt)
    # The same directory with the sticky bit (like /tmp): others cannot move root's store.
    shared.chmod(0o1777)
    sticky = cafs("stats", "--store", str(mine), check=False)
    assert "writable by other users" not in sticky.stderr


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o711, 0o701, 0o770])
def test_a_store_others_may_enter_is_refused(tmp_path: Path, mode: int) -> None:
    store = tmp_path / "store"
    Store.open(store, create=True).close()
    store.chmod(mode)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        refused(cafs("mount", "--store", str(store), str(mnt), check=False), "chmod 700")
    finally:
        unmount_whatever_state(mnt)
    refused(cafs("stats", "--store", str(store), check=False), "chmod 700")


def test_a_new_store_is_private(tmp_path: Path) -> None:
    require_fuse()
    store = tmp_path / "store"
    mount = Mount(store, tmp_path / "mnt")
    mount.mountpoint.mkdir()
    mount.start()
    try:
        (mount.layer() / "f").write_bytes(b"x")
        assert stat.S_IMODE(store.stat().st_mode) == 0o700
        # SQLite gives the -wal and -shm files the mode of the database file.
        for name in ("manifest.sqlite", "manifest.sqlite-wal", "manifest.sqlite-shm",
                     "daemon.log", "lock", "dirty", "control.sock"):
            assert stat.S_IMODE((store / name).lstat().st_mode) == 0o600, name
        for name in ("blobs", "tmp", "blobs/00", "blobs/ff"):
            assert stat.S_IMODE((store / name).stat().st_mode) == 0o700, name
        mount.stop()
    finally:
        unmount_whatever_state(mount.mountpoint)
    assert not mount.log_problems()


FILES = ["manifest.sqlite", "manifest.sqlite-wal", "manifest.sqlite-shm", "lock", "daemon.log",
         "dirty"]
DIRS = ["blobs", "blobs/00", "blobs/a7", "tmp", "quarantine", "backups"]


def _plant(store: Path, entry: str, how: str, victim_dir: Path, victim_file: Path) -> None:
    path = store / entry
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    expects_dir = entry in DIRS or entry.startswith("blobs/")
    if how == "symlink":
        path.symlink_to(victim_dir if expects_dir else victim_file)
    elif how == "other-owner":
        if expects_dir:
            path.mkdir(mode=0o700)
        elif entry == "control.sock":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(path))
        else:
            path.write_bytes(b"")
        os.lchown(path, NOBODY, NOBODY)
    elif how == "wrong-type":
        if expects_dir:
            path.write_bytes(b"")
        else:
            path.mkdir(mode=0o700)
    elif how == "hard-link":
        os.link(victim_file, path)
    elif how == "fifo":
        os.mkfifo(path, 0o600)


CASES = ([(entry, "symlink") for entry in [*FILES, *DIRS, "control.sock"]]
         + [(entry, "other-owner") for entry in [*FILES, *DIRS, "control.sock"]]
         + [(entry, "wrong-type") for entry in [*FILES, "blobs", "blobs/3c", "tmp", "backups",
                                                 "control.sock"]]
         + [(entry, "hard-link") for entry in ["manifest.sqlite-wal", "daemon.log", "dirty",
                                                "lock"]]
         + [("dirty", "fifo"), ("control.sock", "fifo")])


@pytest.mark.parametrize(("entry", "how"), CASES, ids=[f"{e}-{h}" for e, h in CASES])
def test_a_planted_layout_entry_is_refused(tmp_path: Path, entry: str, how: str) -> None:
    store = tmp_path / "store"
    Store.open(store, create=True).close()
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir(mode=0o700)
    (victim_dir / "precious").write_text("keep me\n")
    victim_file = tmp_path / "root-only"
    victim_file.write_text("root's\n")
    victim_file.chmod(0o600)
    _plant(store, entry, how, victim_dir, victim_file)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        refused(cafs("mount", "--store", str(store), str(mnt), check=False), entry)
        refused(cafs("fsck", "--full", "--store", str(store), check=False), entry)
    finally:
        unmount_whatever_state(mnt)
    assert not is_mounted(mnt)
    assert (victim_dir / "precious").read_text() == "keep me\n"
    assert victim_file.read_text() == "root's\n"
    assert stat.S_IMODE(victim_file.stat().st_mode) == 0o600


def test_the_store_path_may_be_a_symlink_of_its_owner_only(open_dir: Path) -> None:
    real = open_dir / "real"
    Store.open(real, create=True).close()
    (open_dir / "link").symlink_to(real)
    assert cafs("stats", "--store", str(open_dir / "link"), check=False).returncode == 0
    # A link nobody made (they could point it anywhere): never followed.
    os.symlink(real, open_dir / "theirs")
    os.lchown(open_dir / "theirs", NOBODY, NOBODY)
    refused(cafs("stats", "--store", str(open_dir / "theirs"), check=False), "symlink")



def test_a_store_symlink_swapped_after_mounting_is_never_followed(open_dir: Path) -> None:
    """root's store path runs through a directory nobody owns; once mounted, nobody swaps the
    link for a store of theirs with tmp -> a root-only directory. The daemon keeps using the
    store it checked: no temp file in root's directory, no blob or backup in nobody's store."""
    require_fuse()
    real = open_dir / "rootstore"
    real.mkdir(mode=0o700)
    root_only = open_dir / "rootonly"
    root_only.mkdir(mode=0o700)
    theirs = open_dir / "p"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    (theirs / "store").symlink_to(real)
    mnt = open_dir / "mnt"
    mnt.mkdir()
    mount = Mount(theirs / "store", mnt, options=("allow_other",))
    try:
        mount.start()
        evil = theirs / "evil"
        made = as_nobody(
            f"mkdir -p {evil}/blobs && for i in $(seq 0 255); do mkdir -m 777 "
            f"{evil}/blobs/$(printf %02x $i); done && ln -s {root_only} {evil}/tmp && "
            f"ln -s {evil} {theirs}/new && mv -T {theirs}/new {theirs}/store", open_dir)
        assert made.returncode == 0, made.stderr
        data = os.urandom(100_000)
        write_artifact(mount.layer() / "a", data)
        mount.stop()
    finally:
        unmount_whatever_state(mnt)
    assert os.listdir(root_only) == []
    assert sorted(os.listdir(evil)) == ["blobs", "tmp"]
    assert not any(os.listdir(shard) for shard in (evil / "blobs").iterdir())
    assert sh(f"{sys.executable} -m cafs cat --store {real} runs/e1/train/a").stdout == data
    stored = [blob for shard in (real / "blobs").iterdir() for blob in shard.iterdir()]
    assert len(stored) == 1
    assert (real / "backups").is_dir()
    mount.store = real
    assert not mount.log_problems()
    assert mount.fsck("--full").returncode == 0


# -- finding 9: hash oracles ----------------------------------------------------------------


@pytest.fixture
def shared(tmp_path: Path, open_dir: Path) -> Iterator[Mount]:
    """Mounted by root with allow_other at a mountpoint other users can reach."""
    require_fuse()
    with mounted_for_everyone(tmp_path / "store", open_dir) as mount:
        yield mount


def test_refcount_tells_another_user_nothing(shared: Mount) -> None:
    """The PIN attack: write each guess into a file of one's own and read its refcount."""
    secret = shared.layer("e1", "train") / "pin"
    secret.write_bytes(b"4821\n")
    secret.chmod(0o600)
    here = shared.mountpoint
    guesses = " ".join(f"{pin:04d}" for pin in range(4815, 4825))
    result = as_nobody(
        "mkdir -p runs/n1/guess && cd runs/n1/guess && "
        f"for pin in {guesses}; do echo $pin > g; "
        "echo $pin $(getfattr --only-values -n user.cafs.refcount g 2>&1); done", here)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 10
    assert all("Permission denied" in line for line in lines), lines
    # Not listed to them either; everything about their own content still is.
    dump = as_nobody("getfattr -d -m - runs/n1/guess/g", here)
    assert dump.returncode == 0 and "user.cafs.sha256" in dump.stdout, dump.stderr
    assert "refcount" not in dump.stdout
    # The mount's owner (root here) still sees the sharing.
    assert as_nobody("echo 4821 > runs/n1/guess/right", here).returncode == 0
    assert os.getxattr(secret, "user.cafs.refcount") == b"2"
    assert "user.cafs.refcount" in os.listxattr(shared.runs / "n1" / "guess" / "g")


def test_records_tell_another_user_nothing_about_sharing(shared: Mount) -> None:
    secret = shared.layer("e1", "train") / "pin"
    secret.write_bytes(b"4821\n")
    secret.chmod(0o600)
    here = shared.mountpoint
    made = as_nobody("mkdir -p runs/n1/l && echo 4821 > runs/n1/l/a && echo 0000 > runs/n1/l/b",
                     here)
    assert made.returncode == 0, made.stderr
    for record in ("runs/n1/l/.record.json", "runs/n1/.record.json"):
        seen = as_nobody(f"cat {record} && stat -c %s {record}", here)
        assert seen.returncode == 0, seen.stderr
        text, _, size = seen.stdout.rpartition("}\n")
        parsed = json.loads(text + "}")
        assert int(size) == len((text + "}\n").encode())  # stat tells the size they read
        assert parsed["artifacts"] == 2 and parsed["logical_bytes"] == 10
        # Records carry no sharing facts for anyone (cafs stats PATH computes them).
        for fields in (parsed, *parsed.get("layers", [])):
            assert not {"unique_bytes", "unique_stored_bytes", "refcount"} & set(fields)
    # The store's owner (root here) learns that only "0000" is held by nothing else.
    stats = cafs("stats", "--store", str(shared.store), "--json", "runs/n1/l")
    assert json.loads(stats.stdout)["unique_bytes"] == 5
    # Another user cannot ask: the store is its owner's alone.
    denied = as_nobody(f"{cafs_for_nobody()} stats --store {shared.store} runs/n1/l", here)
    assert denied.returncode == 3 and denied.stderr.startswith("cafs: "), denied.stderr


def read_record(run: Callable[[str, Path], subprocess.CompletedProcess[str]], record: str,
                here: Path) -> tuple[dict[str, Any], str]:
    """The record as that user reads it, checked against the size their stat shows."""
    seen = run(f"cat {record} && stat -c %s {record}", here)
    assert seen.returncode == 0, seen.stderr
    text, _, size = seen.stdout.rpartition("}\n")
    assert int(size) == len((text + "}\n").encode())
    return json.loads(text + "}"), text


def test_records_sum_only_what_the_reader_may_list(shared: Mount) -> None:
    """nobody's run holds a 0700 layer and a 0700 sub-directory in an open layer: another
    user reading the run's and the layers' records learns neither their names nor anything
    of their totals (artifacts, bytes, first and last write); nobody and root see it all."""
    here = shared.mountpoint
    steps = [
        "mkdir -p runs/e/mixed/vault runs/e/open runs/e/private-weights",
        "chmod 700 runs/e/mixed/vault runs/e/private-weights",
        "head -c 7000 /dev/urandom > runs/e/mixed/vault/oldest-secret.bin",  # written first
        "head -c 300 /dev/urandom > runs/e/open/a.txt",
        "head -c 20 /dev/urandom > runs/e/mixed/b.txt",
        "head -c 50000 /dev/urandom > runs/e/private-weights/newest-secret.bin",  # last
    ]
    for step in steps:  # apart by more than the records' millisecond times
        made = as_nobody(step, here)
        assert made.returncode == 0, (step, made.stderr)
        time.sleep(0.05)

    everything, _ = read_record(as_nobody, "runs/e/.record.json", here)
    assert everything["artifacts"] == 4 and everything["logical_bytes"] == 57320
    assert everything["unlisted_directories"] == 0
    layers = {layer["name"]: layer for layer in everything["layers"]}
    assert sorted(layers) == ["mixed", "open", "private-weights"]
    assert layers["private-weights"]["logical_bytes"] == 50000
    assert layers["mixed"]["artifacts"] == 2
    assert json.loads((shared.runs / "e" / ".record.json").read_bytes()) == everything  # root

    seen, text = read_record(as_reader, "runs/e/.record.json", here)
    assert "private-weights" not in text and "secret" not in text and "vault" not in text
    assert [layer["name"] for layer in seen["layers"]] == ["mixed", "open"]
    assert seen["artifacts"] == 2 and seen["logical_bytes"] == 320
    assert seen["unlisted_directories"] == 2
    mixed = {layer["name"]: layer for layer in seen["layers"]}["mixed"]
    assert (mixed["artifacts"], mixed["logical_bytes"]) == (1, 20)
    # The oldest write is in the hidden sub-directory, the newest in the hidden layer: the
    # reader's times are those of what they can see.
    assert seen["first_write"] == layers["open"]["first_write"] > everything["first_write"]
    assert seen["last_write"] == mixed["last_write"] < everything["last_write"]
    assert mixed["first_write"] == mixed["last_write"] > layers["mixed"]["first_write"]

    layer, _ = read_record(as_reader, "runs/e/mixed/.record.json", here)
    assert (layer["artifacts"], layer["logical_bytes"]) == (1, 20)
    assert layer["unlisted_directories"] == 1
    assert layer["first_write"] == layer["last_write"] == mixed["last_write"]
    whole, _ = read_record(as_nobody, "runs/e/mixed/.record.json", here)
    assert (whole["artifacts"], whole["logical_bytes"]) == (2, 7020)
    denied = as_reader("cat runs/e/private-weights/.record.json", here)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    # Nothing else the reader may ask sums the hidden parts: no totals in any attribute.
    attributes = as_reader("getfattr -d -m - runs/e runs/e/mixed runs/e/open", here)
    assert "50000" not in attributes.stdout and "7020" not in attributes.stdout

    # Opened to everyone, the layer is in the reader's record at once.
    assert as_nobody("chmod 755 runs/e/private-weights", here).returncode == 0
    now, text = read_record(as_reader, "runs/e/.record.json", here)
    assert "private-weights" in text and now["artifacts"] == 3
    assert now["last_write"] == everything["last_write"]
    assert now["unlisted_directories"] == 1


def test_a_root_hash_is_shown_only_to_who_can_read_every_file(shared: Mount) -> None:
    here = shared.mountpoint
    layer = shared.layer("e1", "train")
    (layer / "public.txt").write_text("for everyone\n")
    (layer / "secret").write_bytes(b"4821\n")
    (layer / "secret").chmod(0o600)
    open_layer = shared.layer("e2", "train")
    (open_layer / "public.txt").write_text("for everyone\n")
    (open_layer / "sub").mkdir()
    (open_layer / "sub" / "also.txt").write_text("readable\n")
    for run in ("e1", "e2"):
        cafs("seal", str(shared.runs / run))
    root1 = os.getxattr(shared.runs / "e1", "user.cafs.root").decode()
    root2 = os.getxattr(shared.runs / "e2", "user.cafs.root").decode()

    denied = as_nobody("getfattr --only-values -n user.cafs.root runs/e1", here)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert "user.cafs.root" not in as_nobody("getfattr -d -m - runs/e1", here).stdout
    for record in ("runs/e1/.record.json", "runs/e1/train/.record.json"):
        seen = json.loads(as_nobody(f"cat {record}", here).stdout)
        assert seen["sealed"] is True and seen["root_sha256"] is None
        assert root1 not in json.dumps(seen)
    # Everything in e2 is readable by everyone: its root tells nothing they cannot compute.
    shown = as_nobody("getfattr --only-values -n user.cafs.root runs/e2", here)
    assert shown.returncode == 0 and shown.stdout == root2, shown.stderr
    assert json.loads(as_nobody("cat runs/e2/train/.record.json", here).stdout)[
        "root_sha256"] == root2
    # A run of their own whose files they may read: they get its root.
    made = as_nobody("mkdir -p runs/n1/l && echo mine > runs/n1/l/f && chmod 600 runs/n1/l/f",
                     here)
    assert made.returncode == 0, made.stderr
    cafs("seal", str(shared.runs / "n1"))
    theirs = as_nobody("getfattr --only-values -n user.cafs.root runs/n1", here)
    assert theirs.returncode == 0 and len(theirs.stdout) == 64, theirs.stderr


def test_admin_commands_answer_only_the_store_owner(shared: Mount) -> None:
    secret = shared.layer("e1", "train") / "pin"
    secret.write_bytes(b"4821\n")
    secret.chmod(0o600)
    digest = os.getxattr(secret, "user.cafs.sha256").decode()
    here = shared.mountpoint
    store = shared.store
    command_line = cafs_for_nobody()
    assert as_nobody(f"{command_line} --help", here).returncode == 0
    for command in (f"find --sha256 {digest} --store {store}",
                    f"stats --store {store}",
                    f"log --store {store} runs/e1/train/pin",
                    f"log {here}/runs/e1/train/pin",
                    f"stats {here}/runs/e1",
                    f"find {here}/runs/e1",
                    f"cat --store {store} runs/e1/train/pin@1",
                    f"gc --dry-run --store {store}"):
        result = as_nobody(f"{command_line} {command}", here)
        assert result.returncode in (1, 3), (command, result.returncode, result.stderr)
        assert result.stderr.startswith("cafs: "), (command, result.stderr)
        assert "Traceback" not in result.stderr, (command, result.stderr)
        assert "4821" not in result.stdout and "runs/e1" not in result.stdout, command


def test_emptying_tmp_never_follows_a_symlinked_tmp(tmp_path: Path) -> None:
    """Below the store's checks too: the blob store empties tmp/ only through tmp/ itself."""
    from cafs.blobstore import BlobStore

    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    (store / "tmp").symlink_to(victim)
    with pytest.raises(OSError):
        BlobStore(store).clean_tmp()
    assert (victim / "precious").read_text() == "keep me\n"


@pytest.mark.parametrize(("mode", "uid", "gid", "readable"), [
    (0o644, 1, 1, True),  # other may read
    (0o640, 7, 1, True),  # their primary group may read
    (0o640, 7, 7, False),  # neither: they might still be in group 7, which may read; not them
    (0o604, 7, 7, False),  # other may, group may not: they may be in group 7, so not shown
    (0o400, 1000, 1, True),  # their own file
    (0o040, 1000, 1000, False),  # their own, owner bits closed: the kernel refuses them too
])
def test_readable_by_follows_the_mode_bits(tmp_path: Path, mode: int, uid: int, gid: int,
                                           readable: bool) -> None:
    """Who may see a sealed run's root: every file readable, every directory listable."""
    store = Store.open(tmp_path / "store", create=True)
    try:
        manifest = store.manifest
        db = manifest.admin()
        now = 1
        run = manifest.add_node(2, "e1", Kind.EXECUTION, 0o755, 0, 0, now).ino
        layer = manifest.add_node(run, "l", Kind.LAYER, 0o755, 0, 0, now).ino
        node = manifest.add_node(layer, "f", Kind.FILE, mode, uid, gid, now).ino
        assert db.execute("SELECT kind FROM nodes WHERE id = ?", [node]).fetchone()[0] == "file"
        assert manifest.readable_by(run, 1000, 1) is readable
        db.execute("UPDATE nodes SET mode = 448 WHERE id = ?", [layer])  # 0700, root's
        assert manifest.readable_by(run, 1000, 1) is False
    finally:
        store.close()

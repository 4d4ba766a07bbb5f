"""Bundles from strangers: a failed import never costs content anyone uses, and a hostile
bundle is refused whole — one clear line, exit code 1, no traceback, nothing imported, the
store fsck-clean — through the daemon (mounted) and under the store's lock (unmounted).

Every hostile bundle here is built in Python, byte for byte, next to the good one it spoils."""

from __future__ import annotations

import base64
import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import CAFS, Mount, cafs, require_fuse, sh, sha, unmount_whatever_state, xattr

from cafs.errors import CafsError

T0 = 1_700_000_000_000_000_000


# -- building bundles ---------------------------------------------------------------------


def version(content: bytes, **extra: Any) -> dict[str, Any]:
    return {"sha256": sha(content), "size": len(content), "mode": 0o644, "uid": 0, "gid": 0,
            "mtime_ns": T0, "ctime_ns": T0, "content_type": None, "created_ns": T0,
            "replaced_ns": None, "published_at": "", **extra}


def entry(path: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "kind": kind, "mode": 0o755 if kind != "file" else 0o644,
            "uid": 0, "gid": 0, "mtime_ns": T0, "ctime_ns": T0, "tags": {}, **extra}


def tags(**values: bytes) -> dict[str, str]:
    return {f"user.{name}": base64.b64encode(value).decode() for name, value in values.items()}


def good_header(contents: dict[str, bytes], name: str = "e1") -> dict[str, Any]:
    """A header as export writes it: runs/<name>/train/<file> for each content."""
    entries = [entry("train", "layer")]
    for leaf, data in contents.items():
        entries.append(entry(f"train/{leaf}", "file", versions=[version(data)]))
    blobs = {sha(data): len(data) for data in contents.values()}
    return {"format": "cafs-bundle", "format_version": 1, "exported_ns": T0,
            "execution": {**entry("", "execution"), "name": name, "sealed_ns": None,
                          "root_sha256": None},
            "entries": entries,
            "blobs": [{"sha256": digest, "size": size} for digest, size in sorted(blobs.items())]}


def member(name: str, data: bytes, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, T0 // 10**9
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


# The format bundles are built in: 1 (a header holding everything), or 2 (a small header, then
# the entries and the blob list as JSON lines) for test_hostile_bundles_in_format_2, which
# builds every case of HOSTILE again in it.
LAYOUT = 1


def bundle_members(header: dict[str, Any] | bytes, blobs: list[bytes]
                   ) -> list[tuple[tarfile.TarInfo, bytes]]:
    if LAYOUT == 2 and isinstance(header, dict):
        return [*format2_members(header), *[member(f"blobs/{sha(data)}", data) for data in blobs]]
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return [member("cafs-bundle.json", text),
            *[member(f"blobs/{sha(data)}", data) for data in blobs]]


def head_members() -> int:
    """How many members come before the blobs."""
    return 3 if LAYOUT == 2 else 1


def lines(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def format2_records(header: dict[str, Any]
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A format 1 header as format 2 writes the same run: (header, entry and version lines,
    blob lines), the counts true."""
    records: list[dict[str, Any]] = []
    for raw in header["entries"]:
        records.append({key: value for key, value in raw.items() if key != "versions"})
        records += [{"kind": "version", "artifact": raw["path"], **v}
                    for v in raw.get("versions", [])]
    small = {key: value for key, value in header.items() if key not in ("entries", "blobs")}
    small.update(format_version=2, entries=len(header["entries"]),
                 versions=sum(len(raw.get("versions", [])) for raw in header["entries"]),
                 blobs=len(header["blobs"]))
    return small, records, list(header["blobs"])


def format2_members(header: dict[str, Any], records: list[dict[str, Any]] | None = None,
                    blob_list: list[dict[str, Any]] | None = None
                    ) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The three members before the blobs: from a format 1 header, or (header given as
    format 2) from the lines given."""
    if records is None or blob_list is None:
        header, records, blob_list = format2_records(header)
    return [member("cafs-bundle.json", json.dumps(header).encode()),
            member("cafs-entries.jsonl", lines(records)),
            member("cafs-blobs.jsonl", lines(blob_list))]


def bundle(header: dict[str, Any] | bytes, blobs: list[bytes]) -> bytes:
    return tar_bytes(bundle_members(header, blobs))


# -- running imports ----------------------------------------------------------------------


def run_import(store: Path, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CAFS, "import", "--store", str(store), "-", *args], input=data,
                          capture_output=True, timeout=300)


def blob_files(store: Path) -> set[str]:
    return {path.name for path in (store / "blobs").glob("??/*")}


def refused(store: Path, data: bytes, message: str, *args: str) -> str:
    """Import `data`; it must be refused with `message` and leave the store as it was."""
    before = blob_files(store)
    runs_before = set(os.listdir(store.parent / "mnt" / "runs")) if mounted(store) else None
    result = run_import(store, data, *args)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, (result.returncode, stderr)
    assert "Traceback" not in stderr and stderr.startswith("cafs: "), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr, stderr
    assert blob_files(store) == before  # not one blob of it stays
    if runs_before is not None:
        assert set(os.listdir(store.parent / "mnt" / "runs")) == runs_before
    return stderr  # (the fixture's fsck --full at the end finds nothing, orphans included)


def mounted(store: Path) -> bool:
    return (store.parent / "mnt" / "runs").exists()


@pytest.fixture(scope="module", params=["mounted", "unmounted"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Mount]:
    """A store with one artifact, imported into through the daemon or under the lock. One per
    module: every refused import must leave it exactly as it was, so the cases share it."""
    require_fuse()
    root = tmp_path_factory.mktemp(f"target-{request.param}")
    (root / "mnt").mkdir()
    store = Mount(root / "store", root / "mnt")
    try:
        store.start()
        (store.layer("e0") / "kept.bin").write_bytes(b"already here\n")
        if request.param == "unmounted":
            store.stop()
        yield store
    finally:
        unmount_whatever_state(store.mountpoint)
    assert not store.log_problems()
    check = store.fsck("--full")
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout


# -- finding 2: a failed import deletes only what nothing uses ----------------------------


def test_a_failed_import_leaves_content_written_meanwhile(mount: Mount) -> None:
    """A bundle cut short, imported (through the daemon) while someone writes, through the
    mount, content the bundle also holds: the writer's artifact stays readable."""
    shared = os.urandom(300_000)
    rest = os.urandom(2_000_000)
    data = bundle(good_header({"shared.bin": shared, "rest.bin": rest}), [shared, rest])
    cut = data.index(rest[:64]) + 500_000  # inside the second blob
    layer = mount.layer("e5")
    proc = subprocess.Popen([*CAFS, "import", "--store", str(mount.store), "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[:cut])
    proc.stdin.flush()
    blob = mount.store / "blobs" / sha(shared)[:2] / sha(shared)
    deadline = time.monotonic() + 30
    while not blob.exists():  # the import stored the shared content and waits for the rest
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    (layer / "victim").write_bytes(shared)  # close() succeeds: published, by dedup
    proc.stdin.close()  # the bundle ends here: the import fails
    assert proc.wait(timeout=60) is not None and proc.stderr is not None
    err = proc.stderr.read()
    assert (layer / "victim").read_bytes() == shared
    assert proc.returncode == 1 and b"Traceback" not in err, err
    assert b"truncated" in err, err
    assert not (mount.runs / "e1").exists()
    check = mount.fsck("--full")
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout


def test_a_failed_unmounted_import_keeps_content_the_manifest_names(unstarted_mount: Mount
                                                                      ) -> None:
    """Unmounted: an artifact whose blob file went missing, and a truncated bundle holding
    that content. The import writes the blob again and then fails; the blob stays (a row
    names it), every other blob it stored goes."""
    mount = unstarted_mount
    mount.start()
    shared, other = os.urandom(100_000), os.urandom(400_000)
    (mount.layer("e0") / "victim").write_bytes(shared)
    mount.stop()
    os.unlink(mount.store / "blobs" / sha(shared)[:2] / sha(shared))
    assert f"blob {sha(shared)}: missing" in mount.fsck().stdout
    data = bundle(good_header({"a": shared, "b": other, "c": b"x" * 300_000}),
                  [shared, other, b"x" * 300_000])
    cut = data.index(b"x" * 1000) + 1000  # inside the last blob
    result = run_import(mount.store, data[:cut])
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr
    assert "truncated" in stderr, stderr
    assert blob_files(mount.store) == {sha(shared)}  # healed; `other` is gone again
    check = mount.fsck("--full")
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout
    mount.start()
    assert (mount.runs / "e0" / "train" / "victim").read_bytes() == shared
    mount.stop()
    assert not mount.log_problems()


# -- finding 10 and the rest: hostile bundles are refused whole ---------------------------

GOOD = b"good content\n" * 100
OTHER = b"other content\n" * 50


def good() -> dict[str, Any]:
    return good_header({"a.txt": GOOD, "b.txt": OTHER})


def with_header(change: Callable[[dict[str, Any]], object]) -> bytes:
    header = good()
    change(header)
    return bundle(header, [GOOD, OTHER])


def file_entry(header: dict[str, Any]) -> dict[str, Any]:
    return header["entries"][1]


def special(name: str, kind: bytes, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, T0 // 10**9
    for key, value in fields.items():
        setattr(info, key, value)
    return info, b""


def raw_header_block(name: str, kind: bytes, size: int) -> bytes:
    """One ustar header block claiming `size` bytes, with nothing after it."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def after_header(*extra: tuple[tarfile.TarInfo, bytes]) -> bytes:
    members, head = bundle_members(good(), [GOOD, OTHER]), head_members()
    return tar_bytes([*members[:head], *extra, *members[head:]])


def many_junk_members() -> bytes:
    members, head = bundle_members(good(), [GOOD, OTHER]), head_members()
    junk = [member(f"junk/{i}", b"") for i in range(5000)]
    return tar_bytes([*members[:head], *junk, *members[head:]])


def nested(depth: int) -> bytes:
    text = json.dumps(good())[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    return bundle(text.encode(), [GOOD, OTHER])


def many_values(count: int) -> bytes:
    text = json.dumps(good())[:-1] + ', "x": [' + "{}," * count + "{}]}"
    return bundle(text.encode(), [GOOD, OTHER])


def duplicate_keys() -> bytes:
    text = json.dumps(good())
    return bundle(text.replace('"format": "cafs-bundle"',
                               '"format": "cafs-bundle", "format": "cafs-bundle"').encode(),
                  [GOOD, OTHER])


def damaged_blob() -> bytes:
    members = bundle_members(good(), [GOOD])
    return tar_bytes([*members, member(f"blobs/{sha(OTHER)}", OTHER[:-1] + b"?")])


def truncated() -> bytes:
    data = bundle(good(), [GOOD, OTHER])
    return data[:data.index(OTHER) + 100]


def swap_size() -> bytes:
    """A blob member larger than the header declares."""
    members = bundle_members(good(), [GOOD])
    return tar_bytes([*members, member(f"blobs/{sha(OTHER)}", OTHER + b"more")])


def set_tags(**values: bytes) -> Callable[[dict[str, Any]], object]:
    return lambda h: file_entry(h).update(tags=tags(**values))


def set_version(**fields: Any) -> Callable[[dict[str, Any]], object]:
    return lambda h: file_entry(h)["versions"][0].update(fields)


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    # what export never writes
    "gzip": (lambda: gzip.compress(bundle(good(), [GOOD, OTHER])), "gzip-compressed"),
    "bzip2": (lambda: bz2.compress(bundle(good(), [GOOD, OTHER])), "bzip2-compressed"),
    "xz": (lambda: lzma.compress(bundle(good(), [GOOD, OTHER])), "xz-compressed"),
    "huge header": (lambda: raw_header_block("cafs-bundle.json", tarfile.REGTYPE, 1 << 30),
                    "bundle header is 1073741824 bytes"),
    "huge pax header": (lambda: raw_header_block("pax", tarfile.XHDTYPE, 1 << 30),
                        "extended header"),
    "too many JSON values": (lambda: many_values(2_100_000), "JSON values"),
    "JSON nested deeply": (lambda: nested(200_000), "nested too deeply"),
    "duplicate JSON keys": (duplicate_keys, "appears twice"),
    "symlink member": (lambda: after_header(special("blobs/x", tarfile.SYMTYPE,
                                                    linkname="/etc/passwd")), "symbolic link"),
    "hard link member": (lambda: after_header(special("blobs/x", tarfile.LNKTYPE,
                                                      linkname="cafs-bundle.json")),
                         "hard link"),
    "device member": (lambda: after_header(special("blobs/x", tarfile.CHRTYPE, devmajor=1,
                                                   devminor=3)), "character device"),
    "directory member": (lambda: after_header(special("blobs", tarfile.DIRTYPE)),
                         "directory"),
    "GNU long name": (lambda: after_header(special("././@LongLink", tarfile.GNUTYPE_LONGNAME)),
                      "GNU long name"),
    "path trick": (lambda: after_header(member("blobs/../../etc/cron.d/x", b"* * * * *")),
                   "is not one of the blobs"),
    "absolute member": (lambda: after_header(member("/etc/passwd", b"root")),
                        "is not one of the blobs"),
    "5000 junk members": (many_junk_members, "is not one of the blobs"),
    "header not first": (lambda: tar_bytes(bundle_members(good(), [GOOD, OTHER])[::-1]),
                         "first member"),
    "blob twice": (lambda: bundle(good(), [GOOD, GOOD, OTHER]), "twice"),
    "member after the blobs": (lambda: tar_bytes([*bundle_members(good(), [GOOD, OTHER]),
                                                  member("extra", b"x")]),
                               "follows the last blob"),
    "member larger than declared": (swap_size, "the header says"),
    "digest mismatch": (damaged_blob, "hash to"),
    "truncated": (truncated, "truncated"),
    "missing blob": (lambda: bundle(good(), [GOOD]), "incomplete"),
    "blob listed twice": (lambda: with_header(lambda h: h["blobs"].append(h["blobs"][0])),
                          "twice"),
    "blob nothing uses": (lambda: bundle({**good(), "blobs": [
        *good()["blobs"], {"sha256": sha(b"z"), "size": 1}]}, [GOOD, OTHER, b"z"]),
        "no version uses"),
    # tags beyond what setxattr through the mount takes
    "tag value over 64 KiB": (lambda: with_header(set_tags(big=b"v" * (2 << 20))),
                              "values are at most 65536"),
    "tag values over 1 MiB": (lambda: with_header(set_tags(
        **{f"t{i}": b"v" * 65536 for i in range(17)})), "1048576"),
    "tag names over 60 KiB": (lambda: with_header(set_tags(
        **{f"{i:03}" + "n" * 240: b"" for i in range(260)})), "61440"),
    "tag name over 255 bytes": (lambda: with_header(set_tags(**{"n" * 300: b"v"})),
                                "at most 255"),
    "read-only tag": (lambda: with_header(lambda h: file_entry(h).update(
        tags={"user.cafs.sha256": base64.b64encode(b"0" * 64).decode()})), "read-only"),
    "trusted tag": (lambda: with_header(lambda h: file_entry(h).update(
        tags={"trusted.x": base64.b64encode(b"v").decode()})), "not a user tag"),
    # names, placement, modes, ids and times as the mount takes them
    "name over 255 bytes": (lambda: with_header(
        lambda h: file_entry(h).update(path="train/" + "n" * 256)), "at most 255 bytes"),
    "name not UTF-8": (lambda: with_header(
        lambda h: file_entry(h).update(path="train/\udcff")), "not UTF-8"),
    "execution name with /": (lambda: with_header(
        lambda h: h["execution"].update(name="a/b")), "bad name"),
    "dot-dot": (lambda: with_header(lambda h: file_entry(h).update(path="train/..")),
                "bad name"),
    "empty component": (lambda: with_header(lambda h: file_entry(h).update(path="train//x")),
                        "bad name"),
    "file in an execution": (lambda: with_header(
        lambda h: file_entry(h).update(path="a.txt")), "cannot be in"),
    "reserved name": (lambda: with_header(
        lambda h: file_entry(h).update(path="train/.record.json")), "reserved"),
    "mode with a file type": (lambda: with_header(
        lambda h: file_entry(h).update(mode=0o100644)), "mode"),
    "uid -1": (lambda: with_header(lambda h: file_entry(h).update(uid=-1)), "uid"),
    "uid over 32 bits": (lambda: with_header(set_version(gid=1 << 40)), "gid"),
    "time over 64 bits": (lambda: with_header(set_version(mtime_ns=1 << 64)), "mtime_ns"),
    "time as a float": (lambda: with_header(lambda h: file_entry(h).update(ctime_ns=1.5)),
                        "ctime_ns"),
    "time as a boolean": (lambda: with_header(set_version(created_ns=True)), "created_ns"),
    "size that lies": (lambda: with_header(set_version(size=5)), "not in the bundle"),
    # history that would turn gc against the current version
    "current version says replaced": (lambda: with_header(set_version(replaced_ns=T0)),
                                      "says it was replaced"),
    "published outside a layer": (lambda: with_header(set_version(published_at="x")),
                                  "not in a layer"),
    # a seal the artifacts do not give
    "root hash that lies": (lambda: with_header(lambda h: h["execution"].update(
        sealed_ns=T0, root_sha256=sha(b"another run"))), "its recorded root hash"),
    "kind unknown": (lambda: with_header(lambda h: h["entries"].append(
        entry("train/pipe", "fifo"))), "unknown kind 'fifo'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bundles_are_refused_whole(target: Mount, case: str) -> None:
    build, message = HOSTILE[case]
    refused(target.store, build(), message)


# -- format 2: the same defences, and those of its pieces --------------------------------

# Built the same in either format, or refused before the format is known.
SAME_IN_EITHER = {"gzip", "bzip2", "xz", "huge header", "huge pax header",
                  "too many JSON values", "JSON nested deeply", "duplicate JSON keys"}


@pytest.mark.parametrize("case", [case for case in HOSTILE if case not in SAME_IN_EITHER])
def test_hostile_bundles_are_refused_whole_in_format_2(target: Mount, case: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case above built again in format 2, the header's content carried by the lines of
    cafs-entries.jsonl and cafs-blobs.jsonl: refused the same way, with the same reason."""
    monkeypatch.setitem(globals(), "LAYOUT", 2)
    build, message = HOSTILE[case]
    refused(target.store, build(), message)


Edit = Callable[[dict[str, Any], list[Any], list[Any]], object]


def format2(edit: Edit) -> bytes:
    """The good bundle in format 2, its header, lines (entry and version records) and blob
    list changed by `edit`. Lines: 0 the layer, 1 a.txt, 2 its version, 3 b.txt, 4 its."""
    header, records, blob_list = format2_records(good())
    edit(header, records, blob_list)
    return tar_bytes([*format2_members(header, records, blob_list),
                      member(f"blobs/{sha(GOOD)}", GOOD), member(f"blobs/{sha(OTHER)}", OTHER)])


def format2_entries(entries: bytes) -> bytes:
    """The good bundle in format 2 with cafs-entries.jsonl replaced by these bytes."""
    members = bundle_members_2()
    return tar_bytes([members[0], member("cafs-entries.jsonl", entries), *members[2:]])


def bundle_members_2() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [*format2_members(good()), member(f"blobs/{sha(GOOD)}", GOOD),
            member(f"blobs/{sha(OTHER)}", OTHER)]


def far_apart(header: dict[str, Any], records: list[Any], what: int) -> None:
    """Record `what` again after 3,000 other entries (directories), the counts true."""
    fillers = [entry(f"train/d{i}", "dir") for i in range(3000)]
    again = [records[what], *([records[what + 1]] if "kind" in records[what] and
                              records[what]["kind"] == "file" else [])]
    records += [*fillers, *again]
    header["entries"] += len(fillers) + 1
    header["versions"] += len(again) - 1


def blob_again_far_apart(header: dict[str, Any], records: list[Any], blobs: list[Any]
                         ) -> None:
    blobs += [*[{"sha256": sha(str(i).encode()), "size": 1} for i in range(3000)], blobs[0]]
    header["blobs"] += 3001


def set_in(what: str, **values: Any) -> Edit:
    return lambda h, r, b: {"header": h, "execution": h["execution"], "a.txt": r[1],
                            "version": r[2]}[what].update(values)


HOSTILE_2: dict[str, tuple[Callable[[], bytes], str]] = {
    # each piece bounded
    "a line over its bound": (lambda: format2(set_in("a.txt", pad="x" * (4 << 20))),
                              "cafs-entries.jsonl has a line of"),
    "an unfinished line over its bound": (lambda: format2_entries(
        lines(format2_records(good())[1]) + b'{"path": "' + b"x" * (5 << 20)),
        "has a line of over 4194304 bytes"),
    "a last line without its newline": (lambda: format2_entries(
        lines(format2_records(good())[1])[:-1]), "does not end with a newline"),
    "a line of too many JSON values": (lambda: format2(set_in("a.txt", x=[{}] * 60_000)),
                                       "JSON values"),
    "a line that is not an object": (lambda: format2(lambda h, r, b: r.insert(1, [1, 2])),
                                     "not an object"),
    "a header over its bound": (lambda: format2(set_in("execution", pad="x" * (5 << 20))),
                                "a version 2 header holds at most"),
    # said plainly: what is wrong and where, not a Python exception's name
    "a line without a mode": (lambda: format2(lambda h, r, b: r[1].pop("mode")),
                              "line 2 of cafs-entries.jsonl is malformed: missing 'mode'"),
    "tags that are not an object": (lambda: format2(set_in("a.txt", tags=["user.k"])),
                                    "bundle is malformed: train/a.txt: tags is not an object"),
    "a tag that is not base64": (lambda: format2(set_in("a.txt", tags={"user.k": "!!"})),
                                 "train/a.txt: tag 'user.k' is not base64 text"),
    # counts that lie
    "more entries than declared": (lambda: format2(set_in("header", entries=2)),
                                   "declares 2 entries"),
    "fewer entries than declared": (lambda: format2(set_in("header", entries=4)),
                                    "declares 4 entries"),
    "more versions than declared": (lambda: format2(set_in("header", versions=1)),
                                    "declares 1 versions"),
    "fewer blobs than declared": (lambda: format2(set_in("header", blobs=3)),
                                  "declares 3 blobs"),
    "a negative count": (lambda: format2(set_in("header", blobs=-1)), "header: blobs"),
    # duplicates and order across lines
    "an artifact again, far apart": (lambda: format2(lambda h, r, b: far_apart(h, r, 1)),
                                     "train/a.txt: listed twice"),
    "a layer again, far apart": (lambda: format2(lambda h, r, b: far_apart(h, r, 0)),
                                 "train: listed twice"),
    "a blob listed again, far apart": (lambda: format2(blob_again_far_apart), "twice"),
    "a version away from its artifact": (lambda: format2(
        lambda h, r, b: r.__setitem__(slice(2, 5), [r[4], r[3], r[2]])), "does not follow"),
    "an entry before its directory": (lambda: format2(lambda h, r, b: r.append(r.pop(0))),
                                      "its directory is not in the bundle"),
    "versions inside an entry": (lambda: format2(set_in("a.txt", versions=[])),
                                 "lines of their own"),
    "a version line without its kind": (lambda: format2(
        lambda h, r, b: r[2].pop("kind")), "a line without its kind (line 3 of"),
    "a line of a kind this cafs does not know": (lambda: format2(lambda h, r, b: (
        r.insert(3, entry("train/pipe", "fifo")),
        h.update(entries=h["entries"] + 1))), "train/pipe: unknown kind 'fifo'"),
    "an artifact without versions": (lambda: format2(
        lambda h, r, b: (r.pop(2), h.update(versions=1))), "without any version"),
    # the layout
    "an unknown format version": (lambda: format2(set_in("header", format_version=3)),
                                  "unknown bundle format 'cafs-bundle' version 3"),
    "the entries member missing": (lambda: tar_bytes(
        [m for m in bundle_members_2() if m[0].name != "cafs-entries.jsonl"]),
        "cafs-entries.jsonl must come next"),
    "the blob list after the blobs": (lambda: tar_bytes(
        [*bundle_members_2()[:2], *bundle_members_2()[3:], bundle_members_2()[2]]),
        "cafs-blobs.jsonl must come next"),
}


@pytest.mark.parametrize("case", list(HOSTILE_2))
def test_hostile_pieces_of_format_2_are_refused_whole(target: Mount, case: str) -> None:
    build, message = HOSTILE_2[case]
    refused(target.store, build(), message)


def test_the_good_bundle_these_are_made_from_imports(target: Mount) -> None:
    """(Last: it changes the shared store.)"""
    result = run_import(target.store, bundle(good(), [GOOD, OTHER]), "--as", "good")
    assert result.returncode == 0, result.stderr
    assert b"imported runs/good: 2 artifacts" in result.stdout
    was_mounted = mounted(target.store)
    if not was_mounted:
        target.start()
    assert (target.runs / "good" / "train" / "a.txt").read_bytes() == GOOD
    assert (target.runs / "good" / "train" / "b.txt").read_bytes() == OTHER
    if not was_mounted:
        target.stop()


def test_the_good_bundle_in_format_2_imports(target: Mount,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """(After the other: it changes the shared store too.)"""
    monkeypatch.setitem(globals(), "LAYOUT", 2)
    result = run_import(target.store, bundle(good(), [GOOD, OTHER]), "--as", "good2")
    assert result.returncode == 0, result.stderr
    assert b"imported runs/good2: 2 artifacts" in result.stdout
    was_mounted = mounted(target.store)
    if not was_mounted:
        target.start()
    assert (target.runs / "good2" / "train" / "a.txt").read_bytes() == GOOD
    assert (target.runs / "good2" / "train" / "b.txt").read_bytes() == OTHER
    if not was_mounted:
        target.stop()


def test_a_format_1_bundle_imports_as_it_did(mount: Mount, tmp_path: Path) -> None:
    """Users hold bundles cafs wrote before format 2: one header holding the entries and the
    blob list. Such a run — sealed, nested, tagged, with history — imports whole, and
    exported again (in format 2) and imported again it is the same run."""
    from cafs.admin import root_hash

    old, new, deep = b"old weights\n", b"new weights\n", b"deep\n" * 1000
    header = good_header({"model.bin": new})
    model = file_entry(header)
    model["versions"] = [version(old, created_ns=T0 - 10), version(new)]
    model["tags"] = tags(stage=b"prod")
    header["entries"] += [entry("train/sub", "dir", tags=tags(note=b"nested")),
                          entry("train/sub/deep.txt", "file", versions=[version(deep)])]
    header["blobs"] = sorted([*header["blobs"], {"sha256": sha(old), "size": len(old)},
                              {"sha256": sha(deep), "size": len(deep)}],
                             key=lambda blob: blob["sha256"])
    root = root_hash([("train/model.bin", sha(new)), ("train/sub/deep.txt", sha(deep))])
    header["execution"].update(sealed_ns=T0, root_sha256=root)
    assert header["format_version"] == 1
    result = run_import(mount.store, bundle(header, [new, old, deep]), "--as", "old")
    assert result.returncode == 0, result.stderr
    assert b"imported runs/old: 2 artifacts; 3 new blobs" in result.stdout
    run = mount.runs / "old"
    assert (run / "train" / "model.bin").read_bytes() == new
    assert (run / "train" / "sub" / "deep.txt").read_bytes() == deep
    assert xattr(run, "user.cafs.root") == root
    assert xattr(run / "train" / "model.bin", "user.stage") == "prod"
    assert xattr(run / "train" / "sub", "user.note") == "nested"
    log = json.loads(cafs("log", "--json", str(run / "train" / "model.bin")).stdout)
    assert [v["sha256"] for v in log["versions"]] == [sha(old), sha(new)]
    again = tmp_path / "again.tar"
    cafs("export", str(run), "-o", str(again))
    cafs("import", "--store", str(mount.store), str(again), "--as", "again")
    assert xattr(mount.runs / "again", "user.cafs.root") == root
    assert artifact_hashes(mount.store, "again") == artifact_hashes(mount.store, "old")


def artifact_hashes(store: Path, execution: str) -> list[tuple[str, str]]:
    """(path below the execution, sha256) of every artifact, read as the README says to read
    a store's manifest from outside: read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{store}/manifest.sqlite?mode=ro",
                                            uri=True)) as db:
        return [(path.split("/", 2)[2], digest) for path, digest in db.execute(
            "SELECT path, sha256 FROM artifacts WHERE execution = ? ORDER BY path",
            (execution,))]


def test_a_run_larger_than_format_1_could_hold_exports_and_imports(mount: Mount,
                                                                    tmp_path: Path) -> None:
    """70,000 artifacts (format 1 refused a run of more than about 60,000): made by the
    bench's bulk generator, exported, imported through the daemon. Every artifact has the same
    hash, fsck finds nothing, and the daemon's peak RSS grows by less than 64 MiB (format 1
    grew it by ~180 MB for 55,000)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from cafs_bench import generate_store

    source = tmp_path / "source"
    started = time.monotonic()
    generate_store(source, 70_000, per_layer=7_000)  # runs/exec00000, 10 layers
    data = tmp_path / "big.tar"
    generated = time.monotonic()
    exported = cafs("export", "--store", str(source), "runs/exec00000", "-o", str(data),
                    timeout=300)
    assert "exported runs/exec00000: 70000 artifacts, 1000 blobs" in exported.stdout
    pid = mount.daemon_pid()
    before = vm_peak_kib(pid)
    export_done = time.monotonic()
    imported = cafs("import", "--store", str(mount.store), str(data), "--as", "big",
                    timeout=300)
    grown = vm_peak_kib(pid) - before
    print(f"70,000 artifacts: generated in {generated - started:.1f} s, exported in "
          f"{export_done - generated:.1f} s, imported in {time.monotonic() - export_done:.1f} "
          f"s; daemon VmHWM {before} KiB, grew by {grown} KiB")
    assert "imported runs/big: 70000 artifacts; 1000 new blobs" in imported.stdout
    expected = artifact_hashes(source, "exec00000")
    assert len(expected) == 70_000 and artifact_hashes(mount.store, "big") == expected
    assert (mount.runs / "big" / "layer3" / "a00042.bin").read_bytes() == \
        b"artifact content 42\n"
    checking = time.monotonic()
    for store in (source, mount.store):
        check = cafs("fsck", "--store", str(store), "--full", check=False)
        assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout
    print(f"checked in {time.monotonic() - checking:.1f} s")
    assert grown < 64 << 10


def test_sizes_are_held_to_the_stores_maximum(unstarted_mount: Mount, tmp_path: Path) -> None:
    """A 1 MiB maximum (mount option, or the configuration file when unmounted) refuses a
    bundle holding a 2 MiB content, through the daemon and under the lock alike."""
    big = b"b" * (2 << 20)
    data = bundle(good_header({"big.bin": big}), [big])
    unstarted_mount.options = ("max_artifact_size=1048576",)
    unstarted_mount.start()
    refused(unstarted_mount.store, data, "over this store's maximum artifact size (1048576)")
    unstarted_mount.stop()
    config = tmp_path / "cafs.toml"
    config.write_text("max_artifact_size = 1048576\n")
    refused(unstarted_mount.store, data, "maximum artifact size", "--config", str(config))
    assert run_import(unstarted_mount.store, data).returncode == 0  # the default: 256 GiB
    assert not unstarted_mount.log_problems()


def test_a_pax_size_is_read_as_the_decimal_it_is(mount: Mount) -> None:
    """Export writes a blob of 8 GiB or more with its size in a pax record (ustar's octal field
    cannot hold it), and pax numbers are decimal: 10737418240 (10 GiB, digits 8 and 9) was
    refused as "not an octal number", so no run holding such an artifact could be imported
    again. Small sizes in pax records stand in for the big ones: 19 (a 9) and 10 (octal 8)."""
    nine, ten = b"nineteen bytes long", b"ten bytes!"
    members = format2_members(*format2_records(good_header({"a.bin": nine, "b.bin": ten})))
    for data in (nine, ten):
        members.append(member(f"blobs/{sha(data)}", data, pax_headers={"size": str(len(data))}))
    result = run_import(mount.store, tar_bytes(members), "--as", "pax")
    assert result.returncode == 0, result.stderr
    assert (mount.runs / "pax" / "train" / "a.bin").read_bytes() == nine
    assert (mount.runs / "pax" / "train" / "b.bin").read_bytes() == ten


def test_an_export_piped_into_an_import_of_one_store_does_not_wedge_the_daemon(
        mount: Mount) -> None:
    """`cafs export runs/e1 -o - | cafs import - --as e2` on one mounted store waits for ever:
    the daemon runs one admin command at a time, the export fills the pipe, and the import,
    which alone would read it, waits for its turn. The user's ^C ends both clients; the
    daemon, which held the queued import's end of the pipe, kept the export blocked on it and
    every later admin command (gc, seal, ...) waiting behind it until unmounted. A queued
    command whose client has gone is dropped with its descriptors: the export then fails
    (broken pipe) and the admin commands work again."""
    (mount.layer() / "big.bin").write_bytes(os.urandom(1 << 20))  # more than a pipe holds
    export = subprocess.Popen([*CAFS, "export", str(mount.runs / "e1"), "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while "admin command export" not in mount.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert export.stdout is not None
    importer = subprocess.Popen([*CAFS, "import", "-", "--as", "e2", "--store", str(mount.store)],
                                stdin=export.stdout, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    export.stdout.close()
    time.sleep(2)
    assert export.poll() is None and importer.poll() is None  # the wait itself is inherent
    for client in (importer, export):  # ^C
        client.kill()
        client.wait()
    result = cafs("gc", "--dry-run", "--store", str(mount.store), check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (mount.runs / "e2").exists()
    assert (mount.layer() / "big.bin").stat().st_size == 1 << 20


def test_a_bundle_kept_in_the_mount_exports_and_imports(mount: Mount) -> None:
    """A bundle is a file like any other, so people keep it in the mount: `cafs export -o`
    into a layer, `cafs import` from one. The daemon closed the descriptors passed to it on
    its event loop, and closing a file of its own mount sends it a FLUSH it could then never
    answer: the daemon hung for good (unkillable: the kernel waits for a FLUSH's answer even
    after SIGKILL) and the whole mount with it."""
    data = os.urandom(300_000)
    (mount.layer() / "model.bin").write_bytes(data)
    kept = mount.layer("keep", "bundles")
    cafs("export", str(mount.runs / "e1"), "-o", str(kept / "e1.tar"), timeout=60)
    cafs("import", str(kept / "e1.tar"), "--as", "e2", "--store", str(mount.store), timeout=60)
    assert (mount.runs / "e2" / "train" / "model.bin").read_bytes() == data
    result = cafs("import", str(mount.layer() / "model.bin"), "--as", "e3", "--store",
                  str(mount.store), check=False, timeout=60)  # refused; its descriptor closed
    assert result.returncode == 1 and "not a cafs bundle" in result.stderr, result.stderr
    assert sorted(os.listdir(mount.runs)) == ["e1", "e2", "keep"]


def test_export_to_a_device_writes_to_it_and_leaves_it_a_device(mount: Mount,
                                                                 tmp_path: Path) -> None:
    """`-o FILE` is written as FILE.partial-PID and renamed over FILE when complete, which is
    right for a regular file only: `cafs export ... -o /dev/full` (a char device, here a node
    of our own) ran as root replaced the device with a regular file and exited 0. A FILE
    that exists and is not a regular file is written directly, and its errors are the
    command's (ENOSPC: exit 1)."""
    (mount.layer() / "model.bin").write_bytes(os.urandom(100_000))
    full = tmp_path / "full"
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # what /dev/full is
    result = cafs("export", str(mount.runs / "e1"), "-o", str(full), check=False, timeout=60)
    assert stat.S_ISCHR(full.lstat().st_mode)
    assert result.returncode == 1 and "No space left on device" in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["full", "mnt", "store"]
    mount.log_problems(accept=True)  # the daemon logged the export's failure as a warning


def test_imported_history_cannot_turn_gc_against_the_current_version(mount: Mount) -> None:
    """History as export writes it for a path an artifact was renamed onto (earlier versions
    without replaced_ns); modes with setuid. What gc trusts is derived: `gc --keep-versions 0`
    drops the old versions and keeps every current one; setuid is dropped as chmod drops it."""
    old, new = b"old\n", b"new\n"
    header = good_header({"model.bin": new, "run.sh": b"#!/bin/sh\n"})
    model = file_entry(header)
    model["versions"] = [version(old, created_ns=T0 - 10), version(old, created_ns=T0 - 5),
                         version(new, mode=0o6755)]
    model["mode"] = 0o4755
    header["blobs"].append({"sha256": sha(old), "size": len(old)})
    result = run_import(mount.store, bundle(header, [new, b"#!/bin/sh\n", old]))
    assert result.returncode == 0, result.stderr
    path = mount.runs / "e1" / "train" / "model.bin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    log = json.loads(cafs("log", "--json", str(path)).stdout)["versions"]
    assert [v["sha256"] for v in log] == [sha(old), sha(old), sha(new)]
    assert [v["current"] for v in log] == [False, False, True] and log[-1]["mode"] == "755"
    assert [v["replaced"] is not None for v in log] == [True, True, False]
    gc = json.loads(cafs("gc", "--store", str(mount.store), "--keep-versions", "0",
                         "--json").stdout)
    assert gc["versions_removed"] == 2 and gc["blobs"] == [sha(old)]
    assert path.read_bytes() == new
    assert (mount.runs / "e1" / "train" / "run.sh").read_bytes() == b"#!/bin/sh\n"


def test_export_puts_the_current_version_last(mount: Mount, tmp_path: Path) -> None:
    """A file renamed over one that was published later: the path's history is ordered by
    publish, so the current version is not the newest; the imported run must hold the same
    current content."""
    layer = mount.layer()
    (layer / "p").write_bytes(b"p1\n")
    (layer / "q").write_bytes(b"q1\n")
    (layer / "p").write_bytes(b"p2\n")
    os.rename(layer / "q", layer / "p")
    bundle_path = tmp_path / "e1.tar"
    cafs("export", str(mount.runs / "e1"), "-o", str(bundle_path))
    cafs("import", "--store", str(mount.store), str(bundle_path), "--as", "copy")
    assert (mount.runs / "copy" / "train" / "p").read_bytes() == b"q1\n"
    assert json.loads(cafs("log", "--json", str(mount.runs / "copy" / "train" / "p")).stdout
                      )["versions"][-1]["sha256"] == sha(b"q1\n")


def as_format_1(data: bytes) -> bytes:
    """A bundle export wrote (format 2) as format 1 writes the same run: one header holding
    the entries, each with its versions, and the blob list; the same blob members."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {info.name: (info, tar.extractfile(info).read())  # type: ignore[union-attr]
                   for info in tar.getmembers()}
    header = json.loads(members.pop("cafs-bundle.json")[1])
    records = [json.loads(line) for line in members.pop("cafs-entries.jsonl")[1].splitlines()]
    blob_list = [json.loads(line) for line in members.pop("cafs-blobs.jsonl")[1].splitlines()]
    entries: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["kind"] == "version":
            entries[record.pop("artifact")].setdefault("versions", []).append(
                {key: value for key, value in record.items() if key != "kind"})
        else:
            entries[record["path"]] = record
    header.update(format_version=1, entries=list(entries.values()), blobs=blob_list)
    del header["versions"]
    return tar_bytes([member("cafs-bundle.json", json.dumps(header).encode()),
                      *members.values()])


@pytest.mark.parametrize("layout", [1, 2])
def test_an_imported_run_keeps_each_paths_numbered_history(mount: Mount, tmp_path: Path,
                                                           layout: int) -> None:
    """A file with three versions, the last published under a temporary name and renamed over
    it (as rsync does), exported and imported under a new name: the imported path lists the
    same contents as versions 1, 2, 3. Imported into the name of an execution removed before,
    the path continues the history it left there, as a file written there again would."""
    layer = mount.layer()
    contents = [b"v1\n", b"v2\n", b"v3\n"]
    (layer / "f").write_bytes(contents[0])
    (layer / "f").write_bytes(contents[1])
    (layer / ".f.tmp").write_bytes(contents[2])
    os.rename(layer / ".f.tmp", layer / "f")
    (layer / "g").write_bytes(b"g\n")

    def log(path: Path) -> list[tuple[int, str, bool]]:
        return [(v["version"], v["sha256"], v["current"])
                for v in json.loads(cafs("log", "--json", str(path)).stdout)["versions"]]

    three = [(number, sha(content), number == 3)
             for number, content in enumerate(contents, start=1)]
    assert log(layer / "f") == three
    exported = tmp_path / "e1.tar"
    cafs("export", str(mount.runs / "e1"), "-o", str(exported))
    data = exported.read_bytes() if layout == 2 else as_format_1(exported.read_bytes())
    assert run_import(mount.store, data, "--as", "copy").returncode == 0
    assert log(mount.runs / "copy" / "train" / "f") == three
    assert log(mount.runs / "copy" / "train" / "g") == [(1, sha(b"g\n"), True)]

    gone = mount.layer("gone")  # a run whose paths the import will take over
    (gone / "f").write_bytes(b"gone 1\n")
    (gone / "f").write_bytes(b"gone 2\n")
    sh(f"rm -rf {mount.runs / 'gone'}")
    assert run_import(mount.store, data, "--as", "gone").returncode == 0
    assert log(gone / "f") == [(1, sha(b"gone 1\n"), False), (2, sha(b"gone 2\n"), False),
                               *[(number + 2, digest, current)
                                 for number, digest, current in three]]
    assert log(gone / "g") == [(1, sha(b"g\n"), True)]
    assert cafs("cat", f"{gone / 'f'}@1").stdout == "gone 1\n"
    check = mount.fsck("--full")
    assert check.returncode == 0 and "orphan" not in check.stdout, check.stdout


def vm_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def gzip_bomb(header_bytes: int) -> bytes:
    """A gzip bundle whose first member, a header of `header_bytes` spaces, unpacks from a
    few hundred KB: tar's transparent decompression would read it all into the daemon."""
    info = tarfile.TarInfo("cafs-bundle.json")
    info.size = header_bytes
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    parts = [compressor.compress(info.tobuf(tarfile.PAX_FORMAT))]
    spaces = b" " * (1 << 20)
    for _ in range(header_bytes >> 20):
        parts.append(compressor.compress(spaces))
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("case", ["gzip bomb", "32 MiB header of empty objects"])
def test_a_hostile_bundle_cannot_grow_the_daemon(mount: Mount, case: str) -> None:
    """The daemon's peak RSS (VmHWM) grows by less than 64 MiB importing either: a 256 MiB
    header gzipped to 250 KB (refused at its first bytes), or the largest header accepted
    for reading, 32 MiB, made of empty JSON objects (refused before it is parsed)."""
    if case == "gzip bomb":
        data, message = gzip_bomb(256 << 20), "gzip-compressed"
    else:
        text = b'{"x":[' + b"{}," * ((32 << 20) // 3 - 4) + b"{}]}"
        data, message = bundle(text, []), "JSON values"
    pid = mount.daemon_pid()
    before = vm_peak_kib(pid)
    refused(mount.store, data, message)
    grown = vm_peak_kib(pid) - before
    print(f"{case}: {len(data)} bytes; daemon VmHWM {before} KiB, grew by {grown} KiB")
    assert grown < 64 << 10


def test_a_failed_import_spares_content_a_write_in_flight_pins(tmp_path: Path) -> None:
    """The core, without a mount: a write is publishing content the failing import stored (its
    digest pinned, no row yet): the clean-up leaves that blob and removes the other."""
    from test_vfs import Runtime

    from cafs.admin import Admin
    from cafs.daemon import TrioRuntime
    from cafs.store import Store
    from cafs.vfs import Vfs

    opened = Store.open(tmp_path / "store")
    vfs = Vfs(opened.manifest, opened.blobs, Runtime())
    pinned, other = b"being published\n" * 100, b"nobody's\n" * 100
    data = bundle(good_header({"a": pinned, "b": other, "c": OTHER}), [pinned, other, OTHER])
    vfs._pinned[sha(pinned)] += 1
    admin = Admin(opened, TrioRuntime(), vfs, mounted=True)
    with pytest.raises(CafsError, match="truncated"):
        trio.run(admin.run, "import", {}, [io.BytesIO(data[:data.index(OTHER) + 10])])
    assert blob_files(opened.root) == {sha(pinned)}
    opened.close()

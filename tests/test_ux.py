"""Mistakes caught early and every command scriptable (issue 15): mountpoint checks, the
configuration in use, progress on a terminal only, --json everywhere, exit codes, import into a
new store, refused writes explained in the daemon's log, atime kept."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from pathlib import Path

from conftest import (
    BEFORE_M006,
    CAFS,
    Mount,
    as_nobody,
    cafs,
    code_of,
    is_mounted,
    old_cafs,
    reachable_dir,
    require_fuse,
    unmount_whatever_state,
)
from test_security import cafs_for_nobody


def one_line_failure(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- the mountpoint ------------------------------------------------------------------------


def test_mount_refuses_a_nonempty_mountpoint_unless_asked(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "notes.txt").write_text("mine\n")
    store = tmp_path / "store"
    try:
        one_line_failure(cafs("mount", "--store", str(store), str(mnt), check=False), 4,
                         "is not empty")
        assert not is_mounted(mnt)
        for asked in (["--nonempty"], ["-o", "nonempty"]):
            cafs("mount", "--store", str(store), *asked, str(mnt))
            assert is_mounted(mnt) and (mnt / "runs").is_dir()
            cafs("umount", str(mnt))
        assert (mnt / "notes.txt").read_text() == "mine\n"
    finally:
        unmount_whatever_state(mnt)


def test_mount_refuses_a_mountpoint_already_mounted(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    first = Mount(tmp_path / "store1", mnt)
    first.start()
    try:
        # A live cafs mount (of another store), and an empty tmpfs.
        one_line_failure(cafs("mount", "--store", str(tmp_path / "store2"), str(mnt),
                              check=False), 4, "is already mounted")
        first.stop()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
        try:
            one_line_failure(cafs("mount", "--store", str(tmp_path / "store2"), str(mnt),
                                  check=False), 4, "already mounted (tmpfs")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert not is_mounted(mnt)
    finally:
        unmount_whatever_state(mnt)
    first.assert_clean()


# -- which configuration file -------------------------------------------------------------


def status_json(*args: str, env: dict[str, str]) -> dict[str, object]:
    result = cafs("status", "--json", *args, env=env)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_system_configuration_is_root_s_and_status_says_which(tmp_path: Path) -> None:
    system = tmp_path / "system.toml"
    system.write_text(f'store = "{tmp_path / "system-store"}"\nmountpoint = "/mnt/cafs"\n'
                      "allow_other = true\n")
    env = {key: value for key, value in os.environ.items() if key != "CAFS_CONFIG"}
    env["CAFS_SYSTEM_CONFIG"] = str(system)
    env.pop("CAFS_STORE", None)
    # Root (the operator of the service) gets it without naming it, and is told so.
    found = status_json(env=env)
    assert found["config"] == str(system) and "system" in str(found["config_source"])
    assert found["store"] == str(tmp_path / "system-store")
    assert found["store_source"] == "the configuration file"
    text = cafs("status", env=env).stdout
    assert str(system) in text and str(tmp_path / "system-store") in text
    # Another user never gets it silently: their own file, else none, and their own store.
    with reachable_dir("cafs-ux-") as home:
        command = (f"env -u CAFS_CONFIG -u CAFS_STORE CAFS_SYSTEM_CONFIG={system} HOME={home} "
                   f"XDG_CONFIG_HOME={home}/cfg {cafs_for_nobody()} status --json")
        seen = json.loads(as_nobody(command, home).stdout)
        assert seen["config"] is None, seen
        assert seen["store"] == f"{home}/.local/share/cafs"
        (home / "cfg" / "cafs").mkdir(parents=True)
        own = home / "cfg" / "cafs" / "cafs.toml"
        own.write_text(f'store = "{home}/mine"\n')
        own.chmod(0o644)
        (home / "cfg").chmod(0o755)
        (home / "cfg" / "cafs").chmod(0o755)
        seen = json.loads(as_nobody(command, home).stdout)
        assert seen["config"] == str(own) and seen["store"] == f"{home}/mine", seen
    # Named explicitly, any file is used, whoever runs it.
    named = status_json("--config", str(system), env={**env, "CAFS_SYSTEM_CONFIG": "/none"})
    assert named["config"] == str(system) and named["config_source"] == "--config"


def test_mount_says_which_store_and_configuration(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "mine.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\ncompression = 5\n')
    try:
        result = cafs("mount", "--config", str(config), "--verbose", "--json", str(mnt))
        said = json.loads(result.stdout)
        assert said["store"] == str(tmp_path / "store") and said["config"] == str(config)
        assert f"store {tmp_path / 'store'}" in result.stderr and str(config) in result.stderr
        log = (tmp_path / "store" / "daemon.log").read_text()
        assert f"mounting store {tmp_path / 'store'} at {mnt} (configuration: {config})" in log
        status = status_json("--config", str(config), env=dict(os.environ))
        assert status["mounted_at"] == [str(mnt)] and status["daemon_pid"] == said["pid"]
    finally:
        unmount_whatever_state(mnt)


# -- scriptable: --json, paths as given, import into a new store, progress -----------------


def fill(mount: Mount) -> None:
    layer = mount.layer("e1", "train")
    (layer / "sub").mkdir()
    (layer / "model.bin").write_bytes(os.urandom(300_000))
    (layer / "sub" / "metrics.csv").write_text("step,loss\n" * 20_000)
    os.setxattr(layer / "model.bin", "user.stage", b"prod")
    os.setxattr(layer / "sub" / "metrics.csv", "user.stage", b"prod")


def test_seal_unseal_export_import_print_json_and_import_makes_a_new_store(
        mount: Mount, tmp_path: Path) -> None:
    fill(mount)
    run = mount.runs / "e1"
    sealed = json.loads(cafs("seal", "--json", str(run)).stdout)
    assert sealed["path"] == str(run) and sealed["store_path"] == "runs/e1"
    assert len(sealed["root_sha256"]) == 64 and sealed["already"] is False
    assert cafs("seal", str(run)).stdout.startswith(f"{run} was already sealed")
    bundle = tmp_path / "e1.tar"
    exported = json.loads(cafs("export", "--json", str(run), "-o", str(bundle)).stdout)
    assert exported["artifacts"] == 2 and exported["output"] == str(bundle)
    result = cafs("export", "--json", str(run), "-o", "-", check=False)
    assert result.returncode == 2 and "--json needs -o FILE" in result.stderr
    assert json.loads(cafs("unseal", "--json", str(run)).stdout) == {
        "path": str(run), "store_path": "runs/e1"}
    # A store that was never mounted: the directory missing, then an empty one.
    for fresh in (tmp_path / "never" / "mounted", tmp_path / "empty"):
        if fresh.name == "empty":
            fresh.mkdir(mode=0o700)
        imported = json.loads(cafs("import", "--json", "--store", str(fresh), str(bundle),
                                   "--as", "copy").stdout)
        assert imported["path"] == "runs/copy" and imported["blobs_added"] == 2
        assert imported["mounted_path"] is None
        assert json.loads(cafs("find", "--json", "--store", str(fresh), "--tag",
                               "stage=prod").stdout)["paths"] == [
            "runs/copy/train/model.bin", "runs/copy/train/sub/metrics.csv"]
        assert cafs("fsck", "--full", "--store", str(fresh)).returncode == 0
    # Into the mounted store: the new run is shown where the user sees it.
    imported = json.loads(cafs("import", "--json", "--store", str(mount.store), str(bundle),
                               "--as", "again").stdout)
    assert imported["mounted_path"] == str(mount.runs / "again")
    assert imported["path"] == "runs/again" and imported["blobs_present"] == 2
    assert (mount.runs / "again" / "train" / "model.bin").read_bytes() == (
        run / "train" / "model.bin").read_bytes()


def test_find_prints_paths_the_way_they_were_given(mount: Mount) -> None:
    fill(mount)
    found = cafs("find", str(mount.mountpoint), "--tag", "stage=prod").stdout.split()
    assert found == [f"{mount.mountpoint}/runs/e1/train/model.bin",
                     f"{mount.mountpoint}/runs/e1/train/sub/metrics.csv"]
    # Relative to the current directory, like find(1); below a sub-directory, only it.
    here = mount.runs / "e1"
    result = subprocess.run([*CAFS, "find", "./train/sub", "--tag", "stage=prod", "--json"],
                            cwd=here, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["paths"] == ["./train/sub/metrics.csv"]
    result = subprocess.run([*CAFS, "find", "."], cwd=here, capture_output=True, text=True,
                            check=True)
    assert sorted(result.stdout.split()) == ["./train/model.bin", "./train/sub/metrics.csv"]
    # Without PATH: the whole store, as store paths (runs/...).
    assert cafs("find", "--store", str(mount.store), "--sha256", sha_of(
        here / "train" / "model.bin")).stdout.split() == ["runs/e1/train/model.bin"]
    bad = cafs("find", str(mount.mountpoint), "--run", "e1", check=False)
    assert bad.returncode == 2 and "not both" in bad.stderr


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def on_a_terminal(command: list[str]) -> str:
    """What `command` shows on a terminal (a pty made by script(1)), stderr included."""
    line = " ".join(shlex.quote(arg) for arg in command)
    result = subprocess.run(["script", "-qec", line, "/dev/null"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_long_commands_show_progress_on_a_terminal_only(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = Mount(tmp_path / "store", mnt)
    mount.start()
    try:
        fill(mount)
        (mount.runs / "e1" / "train" / "model.bin").write_bytes(os.urandom(1000))  # history
        bundle = tmp_path / "e1.tar"
        store = ["--store", str(mount.store)]
        mounted = [  # each runs in the daemon; progress comes over the control socket
            (["gc", *store], "reading history"),
            (["export", str(mount.runs / "e1"), "-o", str(bundle)], "exporting"),
            (["import", *store, str(bundle), "--as", "e2"], "importing"),
            (["fsck", "--repair", *store], "checking blobs"),
            (["fsck", "--full", *store], "re-hashing blobs"),
        ]
        for args, words in mounted:
            shown = on_a_terminal([*CAFS, *args])
            assert words in shown and "100%" in shown, (args, shown)
            piped = cafs(*[arg.replace("e2", "e2-piped") for arg in args])
            assert words not in piped.stdout + piped.stderr, (args, piped)
        mount.stop()
        for args, words in [(["gc", *store, "--keep-versions", "0"], "reading history"),
                            (["fsck", "--full", *store], "re-hashing blobs"),
                            (["import", *store, str(bundle), "--as", "e3"], "importing")]:
            shown = on_a_terminal([*CAFS, *args])
            assert words in shown and "100%" in shown, (args, shown)
            piped = cafs(*[arg.replace("e3", "e3-piped") for arg in args])
            assert "%" not in piped.stderr, (args, piped)
    finally:
        unmount_whatever_state(mnt)
    mount.assert_clean()


# -- exit codes ----------------------------------------------------------------------------


def cli_section(readme: str) -> str:
    start = readme.index("## Command line")
    return readme[start:readme.index("\n## ", start + 1)]


def test_every_command_s_exit_codes_and_every_command_in_the_readme(tmp_path: Path) -> None:
    """Each command `cafs --help` lists: a bad option and a wrong argument are usage errors
    (2), a normal failure is 1 (the command failed), 3 (the store) or 4 (the mount)."""
    from cafs.cli import cli

    names = sorted(cli.commands)  # type: ignore[attr-defined]
    listed = cafs("--help").stdout
    assert all(name in listed for name in names)
    readme = cli_section((Path(__file__).parent.parent / "README.md").read_text())
    for name in names:
        assert f"`cafs {name}" in readme, f"cafs {name} is not in README.md's CLI section"
    # Every command but cat (whose output is the content) prints one JSON document on --json.
    for name in names:
        flags = {opt for param in cli.commands[name].params  # type: ignore[attr-defined]
                 for opt in getattr(param, "opts", [])}
        assert ("--json" in flags) == (name != "cat"), name
    # The store exists (empty) so that failures are the command's own.
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    cafs("import", "--store", str(store), "/dev/null", check=False)  # makes the manifest
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = str(tmp_path / "no-store")
    s = ["--store", str(store)]
    usage = {  # a wrong argument or value, beyond click's own checks of a bad option
        "mount": ["-o", "bogus", "--store", str(store), str(empty)],
        "umount": [],  # no MOUNTPOINT and none configured
        "status": ["--config", str(tmp_path / "no.toml")],
        "stats": ["--json", "/tmp"],
        "log": ["/tmp"], "cat": ["/tmp"], "seal": ["/tmp"], "unseal": ["/tmp"],
        "find": [*s, "--sha256", "xyz"], "gc": [*s, "--keep-versions", "-1"],
        "fsck": [*s, "--orphan-grace", "-1"], "export": [*s, "runs/e1"],
        "import": [*s, "--as", "..", "/dev/null"], "restore": ["--config", "/no/such.toml"],
        "ui": [*s, "--port", "99999"],
    }
    failure = {  # what goes wrong in normal use, and the code it must give
        "mount": (["--store", str(store), str(tmp_path / "no-dir")], 4),
        "umount": ([str(empty)], 4),
        "status": (["--store", "/proc/self/fd/no/such"], 0),  # reports; never fails
        "stats": (["--store", missing], 3),
        "log": ([*s, "runs/e1/l/f"], 1), "cat": ([*s, "runs/e1/l/f"], 1),
        "seal": ([*s, "runs/e1"], 1), "unseal": ([*s, "runs/e1"], 1),
        "find": ([*s, "--run", "e1"], 1), "gc": (["--store", missing], 3),
        "fsck": (["--store", missing], 3), "export": ([*s, "runs/e1", "-o", "x.tar"], 1),
        "import": ([*s, str(empty)], 1), "restore": ([*s], 3),  # no backups
        "ui": (["--store", missing], 3),
    }
    assert sorted(usage) == names and sorted(failure) == names, "a command is not tested"
    env = {**os.environ, "CAFS_SYSTEM_CONFIG": "/nonexistent"}
    for name in names:
        for args in (["--no-such-option"], usage[name]):
            result = cafs(name, *args, check=False, env=env)
            assert result.returncode == 2, (name, args, result.stderr)
            assert "Traceback" not in result.stderr
        args, code = failure[name]
        result = cafs(name, *args, check=False, env=env)
        assert result.returncode == code, (name, args, result.stdout + result.stderr)
        assert "Traceback" not in result.stderr
        if code:
            assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)


# -- the scrub unit ----------------------------------------------------------------------


def test_the_scrub_unit_scrubs_the_store_cafs_toml_names(tmp_path: Path) -> None:
    units = Path(__file__).resolve().parent.parent / "systemd"
    text = (units / "cafs-scrub.service").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any("/var/lib/cafs" in line for line in lines), "the store is cafs.toml's"
    staged = text.replace("/usr/bin/cafs", "/bin/true")
    (tmp_path / "cafs-scrub.service").write_text(staged)
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", "cafs-scrub.service"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    # Its own ExecStart, with a cafs.toml naming a store elsewhere: that store is scrubbed.
    store = tmp_path / "elsewhere" / "store"
    store.parent.mkdir()
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(b"")
    cafs("import", "--store", str(store), str(bundle), check=False)  # creates the store
    config = tmp_path / "cafs.toml"
    config.write_text(f'store = "{store}"\n')
    (exec_start,) = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStart=")]
    args = shlex.split(exec_start.replace("/etc/cafs/cafs.toml", str(config)))
    assert args[0] == "/usr/bin/cafs"
    result = subprocess.run([*CAFS, *args[1:], "--json"], capture_output=True, text=True,
                            env={**os.environ, "CAFS_SYSTEM_CONFIG": "/nonexistent"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["damage"] == []
    (store / "manifest.sqlite").write_bytes(b"")  # now the scrub must fail on that store
    failed = subprocess.run([*CAFS, *args[1:]], capture_output=True, text=True)
    assert failed.returncode == 3 and str(store) in failed.stderr, failed.stderr


# -- atime ---------------------------------------------------------------------------------


def test_an_explicit_atime_is_kept_on_a_store_made_before_it(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    code = code_of(BEFORE_M006, tmp_path / "old")  # the code before m006..m008
    old_cafs(code, "mount", "--store", str(store), str(mnt))
    try:
        (mnt / "runs" / "e1" / "l").mkdir(parents=True)
        (mnt / "runs" / "e1" / "l" / "f").write_text("old store\n")
    finally:
        old_cafs(code, "umount", str(mnt))
    assert not is_mounted(mnt)
    mount = Mount(store, mnt)
    mount.start()  # this code: migrates to m008
    try:
        f = mnt / "runs" / "e1" / "l" / "f"
        mtime = os.stat(f).st_mtime_ns
        assert os.stat(f).st_atime_ns == mtime  # never set: shown as mtime
        for path in (f, f.parent):
            subprocess.run(["touch", "-a", "-d", "@1500000000", str(path)], check=True)
            shown = subprocess.run(["stat", "-c", "%X", str(path)], capture_output=True,
                                   text=True, check=True).stdout
            assert shown.strip() == "1500000000"
        assert os.stat(f).st_mtime_ns == mtime  # touch -a leaves mtime alone
        assert f.read_text() == "old store\n"  # reads leave atime alone (noatime)
        subprocess.run(["touch", "-m", "-d", "@1600000000", str(f)], check=True)
        os.utime(f, ns=(1_400_000_000_123_456_789, 1_600_000_000_000_000_000))
        mount.stop()
        mount.start()
        assert os.stat(f).st_atime_ns == 1_400_000_000_123_456_789
        assert os.stat(f).st_mtime_ns == 1_600_000_000_000_000_000
        assert os.stat(f.parent).st_atime == 1500000000
    finally:
        unmount_whatever_state(mnt)
    mount.assert_clean()
    ddl = subprocess.run(["sqlite3", "-readonly", str(store / "manifest.sqlite"),
                          "SELECT sql FROM sqlite_master WHERE name = 'nodes'"],
                         capture_output=True, text=True, check=True).stdout
    assert "atime_ns INTEGER /* access time (ns) as last set explicitly" in ddl


# -- a write in the wrong place ------------------------------------------------------------


def test_a_write_in_the_wrong_place_is_explained_once_per_directory(mount: Mount) -> None:
    mount.layer("e1", "train")
    attempts = [mount.runs / "stray.txt", mount.runs / "e1" / "stray.txt",
                mount.runs / "e1" / "other.txt", mount.mountpoint / "top.txt"]
    for _ in range(5):  # a tool retrying: one line per directory, not one per attempt
        for path in attempts:
            result = subprocess.run(["cp", "/etc/hostname", str(path)], capture_output=True,
                                    text=True)
            assert result.returncode == 1 and "Operation not permitted" in result.stderr
    (mount.runs / "e1" / "train" / "f").write_text("f\n")
    (mount.runs / "e2").mkdir()
    for _ in range(3):  # a file moved out of its layer, into an execution
        moved = subprocess.run(["mv", str(mount.runs / "e1" / "train" / "f"),
                                str(mount.runs / "e2" / "f")], capture_output=True, text=True)
        assert moved.returncode == 1 and "Operation not permitted" in moved.stderr
    log = mount.log()
    lines = [line for line in log.splitlines() if "EPERM:" in line]
    assert len(lines) == 4, lines
    assert "moving file 'f' as 'f' in runs/e2 refused" in lines[3]
    assert "file 'stray.txt' in runs/ refused" in lines[0]
    assert "runs/ holds only executions" in lines[0]
    assert "in runs/e1 refused" in lines[1] and "an execution holds only layers" in lines[1]
    assert "in the mount root refused" in lines[2] and "only runs/ and blobs/" in lines[2]
    assert all("WARNING" in line for line in lines)
    assert all("(uid 0)" in line for line in lines[:3])

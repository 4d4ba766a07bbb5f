"""The layers of cafs, enforced: a lower layer never imports a higher one, each outside library
is imported only where its layer allows, and the `cafs` admin commands never load the daemon.

Every module of cafs/ is parsed with `ast` (imports inside functions count too) and placed in a
layer by the RANKS table below. A new module must be placed there: the test fails until it is.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

CAFS_DIR = Path(__file__).resolve().parent.parent / "cafs"

# Lowest first. A module is named relative to cafs/ ("vfs", "blobstore.local", "__init__") and
# placed by the first layer with a matching pattern (fnmatch: "manifest_*" matches
# "manifest_api"). To add a module, add its name or a pattern to the layer it belongs to.
RANKS: list[tuple[str, list[str]]] = [
    # stdlib only: errors carrying an errno, records, the Digest type, naming rules, helpers,
    # settings, and the protocols the core needs from outside it.
    ("base", ["__init__", "errors", "model", "digest", "lru", "rules", "crashpoints", "wal",
              "writers",
              "options", "config", "mountpoint", "runtime"]),
    ("blob store", ["blobstore", "blobstore.*", "blob_*", "encoding", "encodings",
                    "encodings.*"]),
    ("manifest", ["schema", "manifest", "manifest_*", "manifest.*", "sqlite_manifest",
                  "sqlite_manifest.*", "pg_manifest", "pg_manifest.*"]),
    # The filesystem core and what sits beside it: no pyfuse3, no trio, no daemon.
    ("core", ["vfs", "vfs.*", "vfs_*", "namespace", "openfiles", "xattrs", "virtual",
              "visibility", "symlinks", "records", "bundle", "bundle_*", "store", "fsck", "admin",
              "admin_*", "maintenance", "lifecycle", "transfer", "control", "sessions"]),
    # `cafs ui`, the web view: over the core like the admin commands; no trio, no pyfuse3.
    ("ui", ["ui", "ui.*"]),
    ("ops", ["ops", "control_server"]),
    ("daemon", ["daemon"]),
    ("cli", ["cli", "cli_*", "__main__"]),
]
RANK_OF_LAYER = {layer: rank for rank, (layer, _) in enumerate(RANKS)}

# Outside libraries and the modules that alone may import them.
ONLY_IMPORTED_BY: dict[str, list[str]] = {
    "pyfuse3": ["ops", "daemon"],
    "trio": ["daemon", "ops", "control_server"],
    # (and a bundle's scratch index, a private SQLite file in tmp/ that is never the manifest)
    "sqlite3": ["schema", "manifest", "manifest_*", "manifest.*", "sqlite_manifest",
                "sqlite_manifest.*", "bundle_index"],
    "sqlite_utils": ["schema", "manifest", "manifest_*", "manifest.*", "sqlite_manifest",
                     "sqlite_manifest.*"],
    "jinja2": ["ui.pages"],
    "psycopg": ["pg_manifest", "pg_manifest.*"],
    "zstandard": ["blobstore", "blobstore.*", "blob_*", "encoding", "encodings",
                  "encodings.*"],
}
# Rules the code on this branch does not meet yet, each waiting for another part of the
# refactor. strict: once that part lands the test passes, and the mark must go.
PENDING = {
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, relative to cafs/
    line: int
    target: str  # absolute dotted name: "cafs.daemon", "trio.lowlevel"

    def where(self) -> str:
        return f"cafs/{self.module.replace('.', '/')}.py:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules(root: Path = CAFS_DIR) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in one module, wherever it stands (top level, function, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package
                base = package.split(".") if package and package != "__init__" else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join(["cafs", *base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:  # `from cafs import daemon` imports the module cafs.daemon
                sub = f"{source}.{alias.name}"
                inside = sub.removeprefix("cafs.")
                is_module = sub.startswith("cafs.") and inside in known
                found.append(Import(name, node.lineno, sub if is_module else source))
    return found


def layer_of(name: str) -> str | None:
    for layer, patterns in RANKS:
        if any(fnmatchcase(name, pattern) for pattern in patterns):
            return layer
    return None


def cafs_module(target: str, known: set[str]) -> str | None:
    """The module of cafs/ an import names (its package for a name inside it), or None."""
    if target == "cafs":
        return "__init__"
    if not target.startswith("cafs."):
        return None
    inside = target.removeprefix("cafs.")
    while inside and inside not in known:
        inside = inside.rpartition(".")[0]
    return inside or "__init__"


def all_imports(root: Path = CAFS_DIR) -> tuple[dict[str, Path], list[Import]]:
    found = modules(root)
    known = set(found)
    return found, [imp for name, path in found.items() for imp in imports_of(name, path, known)]


def unplaced_modules(root: Path = CAFS_DIR) -> list[str]:
    return [name for name in modules(root) if layer_of(name) is None]


def layer_violations(root: Path = CAFS_DIR) -> list[str]:
    found, imports = all_imports(root)
    problems = []
    for imp in imports:
        target = cafs_module(imp.target, set(found))
        here, there = layer_of(imp.module), layer_of(target) if target else None
        if target is None or here is None or there is None:
            continue
        if RANK_OF_LAYER[there] > RANK_OF_LAYER[here]:
            problems.append(f"{imp.where()}: {imp.module} ({here} layer) imports cafs.{target} "
                            f"({there} layer, higher)")
    return problems


def library_violations(library: str, root: Path = CAFS_DIR) -> list[str]:
    allowed = ONLY_IMPORTED_BY[library]
    _, imports = all_imports(root)
    return [f"{imp.where()}: {imp.module} imports {imp.target}; only "
            f"{', '.join(allowed)} may import {library}"
            for imp in imports
            if imp.target.split(".")[0] == library
            and not any(fnmatchcase(imp.module, pattern) for pattern in allowed)]


def outside_stdlib(root: Path = CAFS_DIR) -> list[str]:
    """Imports of the base layer that are neither the standard library nor cafs."""
    _, imports = all_imports(root)
    return [f"{imp.where()}: {imp.module} (base layer: stdlib only) imports {imp.target}"
            for imp in imports
            if layer_of(imp.module) == "base"
            and imp.target.split(".")[0] not in (*sys.stdlib_module_names, "cafs", "")]


def test_every_module_is_placed_in_a_layer() -> None:
    unplaced = unplaced_modules()
    assert not unplaced, (
        f"modules not in the layer table: {', '.join(f'cafs/{n}' for n in unplaced)}; add each "
        "to RANKS in tests/test_layering.py, in the lowest layer whose modules it imports")


def test_a_lower_layer_never_imports_a_higher_one() -> None:
    problems = layer_violations()
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_base_layer_needs_only_the_standard_library() -> None:
    problems = outside_stdlib()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("library", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=PENDING[name]))
    if name in PENDING else name
    for name in ONLY_IMPORTED_BY])
def test_outside_libraries_are_imported_only_where_their_layer_allows(library: str) -> None:
    problems = library_violations(library)
    assert not problems, "\n".join(problems)


# Run in a fresh interpreter: records which cafs line first imports each module that the
# command line must not load, then runs `cafs --help` and `cafs fsck` in-process.
_NOT_LOADED_CHECK = """
import sys, traceback
FORBIDDEN = ("pyfuse3", "trio", "cafs.daemon")
first = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in FORBIDDEN and name not in first:
            chain = [f"{f.filename.split('/cafs/', 1)[-1]}:{f.lineno}"
                     for f in traceback.extract_stack() if "/cafs/" in f.filename]
            first[name] = " <- ".join(reversed(chain)) or "?"
        return None

sys.meta_path.insert(0, Watch())
from cafs.cli import cli
for args in (["--help"], ["fsck", "--store", sys.argv[1]]):
    try:
        cli.main(args=args, prog_name="cafs")
    except SystemExit as exc:
        if exc.code:
            sys.exit(f"cafs {' '.join(args)} exited {exc.code}")
for name in FORBIDDEN:
    if name in sys.modules:
        print(f"LOADED {name}: first imported at {first.get(name, '?')}", file=sys.stderr)
"""


def test_admin_commands_load_neither_the_daemon_nor_pyfuse3_nor_trio(tmp_path: Path) -> None:
    from cafs.store import Store

    Store.open(tmp_path / "store", create=True).close()
    result = subprocess.run([sys.executable, "-c", _NOT_LOADED_CHECK, str(tmp_path / "store")],
                            capture_output=True, text=True, cwd=CAFS_DIR.parent, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = [line for line in result.stderr.splitlines() if line.startswith("LOADED")]
    assert not loaded, "the command line loaded what only `cafs mount` may:\n" + "\n".join(loaded)

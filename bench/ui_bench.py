"""Page times of `cafs ui` on a store of a million artifacts (scripts/bench --ui).

Usage: scripts/bench --ui [--artifacts N] [--workdir DIR] [--json FILE] [--keep]

Builds a store through the manifest's bulk load (no mount): one execution with a
100,000-artifact layer, the rest in executions of two 10,000-artifact layers published an hour
apart, sharing 1,000 contents, each execution with a few contents of its own; then history (500
re-publishes) and tags (1,000 artifacts tagged stage=prod).
Then `cafs ui` serves it, unmounted (read-only manifest) and mounted (through the daemon), and
every page is fetched: the first fetch, and the best of three after it. The summary the sharing
page and the executions' stored bytes need is computed in the background; its time is reported
separately. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cafs.blobstore import Blobs  # noqa: E402
from cafs.digest import digest_of_bytes  # noqa: E402
from cafs.manifest import BulkArtifact, NewVersion  # noqa: E402
from cafs.model import StoredBlob  # noqa: E402
from cafs.store import Store  # noqa: E402

HOUR = 3600 * 10**9
CAFS = [sys.executable, "-m", "cafs"]


def shared_content(i: int) -> bytes:
    return f"shared artifact content {i}\n".encode()


def store_blob(blobs: Blobs, data: bytes) -> StoredBlob:
    temp = blobs.new_temp()
    try:
        temp.write(0, data)
        return blobs.publish(temp, temp.digest())
    finally:
        temp.discard()


def generate(root: Path, artifacts: int) -> dict[str, str]:
    """The store; answers the names the pages are fetched with."""
    store = Store.open(root)
    try:
        blobs = store.blobs
        shared = [store_blob(blobs, shared_content(i)) for i in range(1000)]
        big = min(100_000, artifacts // 2)
        rest = artifacts - big
        layers = max(1, rest // 10_000)
        per_layer = rest // layers
        start = time.time_ns() - (layers + 2) * HOUR
        manifest = store.manifest
        manifest.bulk_load_layer(
            "exec00000", "big", [BulkArtifact(f"a{i:06d}.bin", shared[i % 1000])
                                 for i in range(big)],
            mode=0o755, uid=0, gid=0, now_ns=start)
        for n in range(layers):
            execution = f"exec{n // 2 + 1:05d}"
            own = [store_blob(blobs, f"{execution} own {i}\n".encode() * 100) for i in range(5)]
            count = per_layer if n < layers - 1 else rest - per_layer * (layers - 1)
            manifest.bulk_load_layer(
                execution, ("train", "eval")[n % 2],
                [BulkArtifact(f"a{i:05d}.bin", own[i] if i < 5 else shared[(i + n) % 1000])
                 for i in range(count)],
                mode=0o755, uid=0, gid=0, now_ns=start + (n + 1) * HOUR)
        history_path = "runs/exec00001/train/a00007.bin"
        node = manifest.resolve(history_path)
        assert node is not None
        now = time.time_ns()
        for i in range(500):
            stored = shared[(i * 7) % 1000]
            manifest.publish(stored, NewVersion(node.ino, 0o644, 0, 0, now + i, now + i, None,
                                                now + i))
        tagged = manifest.resolve("runs/exec00001/train")
        assert tagged is not None
        for i in range(min(1000, per_layer)):
            found = manifest.resolve(f"runs/exec00001/train/a{i:05d}.bin")
            assert found is not None
            manifest.set_tag(found.ino, "user.stage", b"prod", now)
        current = manifest.resolve(history_path)
        assert current is not None and current.version_id is not None
    finally:
        store.close()
    return {"history": history_path, "shared": digest_of_bytes(shared_content(0)),
            "big": "runs/exec00000/big", "version": str(current.version_id)}


class Ui:
    def __init__(self, store: Path) -> None:
        self.process = subprocess.Popen([*CAFS, "ui", "--store", str(store), "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, cwd=ROOT)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"http://\S+/", line)
        if not found:
            self.process.kill()
            raise SystemExit(f"cafs ui did not start: {line!r}")
        self.url = found.group()

    def fetch(self, page: str) -> float:
        start = time.perf_counter()
        with urllib.request.urlopen(self.url + page.lstrip("/"), timeout=120) as answer:
            answer.read()
        return time.perf_counter() - start

    def wait_for_summary(self, timeout: float = 600) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            with urllib.request.urlopen(self.url + "sharing", timeout=120) as answer:
                text = answer.read().decode()
            if "summary-pending" not in text and "being recomputed" not in text:
                return time.perf_counter() - start
            time.sleep(0.2)
        raise SystemExit("the summary did not finish")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def pages(names: dict[str, str]) -> list[tuple[str, str]]:
    return [
        ("executions", "/"),
        ("executions, second page", "/?after=exec00010"),
        ("execution (timeline of 100,000 publishes)", "/dir?path=runs/exec00000"),
        ("100,000-entry layer, first page", f"/dir?path={names['big']}"),
        ("100,000-entry layer, page at 50,000", f"/dir?path={names['big']}&after=a050000.bin"),
        ("100,000-entry layer, last page", f"/dir?path={names['big']}&after=a099950.bin"),
        ("artifact with 501 versions", f"/artifact?path={names['history']}"),
        ("content held by ~1,000 artifacts", f"/content?sha256={names['shared']}"),
        ("content, page after 50,000", f"/content?sha256={names['shared']}&after=50000"),
        ("search tag stage=prod (1,000)", "/search?tag=stage=prod"),
        ("search tag stage", "/search?tag=stage"),
        ("search sha256 prefix", "/search?sha256=ab"),
        ("sharing and gc (summary ready)", "/sharing"),
        ("download a version", f"/download?path={names['history']}&version={names['version']}"),
    ]


def measure(ui: Ui, names: dict[str, str], label: str) -> list[dict[str, object]]:
    rows = []
    for title, page in pages(names):
        first = ui.fetch(page)
        best = min(ui.fetch(page) for _ in range(3))
        rows.append({"mode": label, "page": title, "url": page, "first_ms": first * 1000,
                     "best_ms": best * 1000, "ok": max(first, best) < 0.2})
        print(f"  {label:<10} {title:<44} first {first * 1000:7.1f} ms  "
              f"best {best * 1000:7.1f} ms  {'ok' if best < 0.2 else 'SLOW'}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cafs-bench"))
    parser.add_argument("--json", type=Path, default=Path("bench-results/ui.json"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir / f"ui-{os.getpid()}"
    work.mkdir(parents=True)
    store, mnt = work / "store", work / "mnt"
    results: dict[str, object] = {"artifacts": args.artifacts,
                                  "load_average": os.getloadavg()}
    try:
        start = time.perf_counter()
        names = generate(store, args.artifacts)
        results["generate_s"] = time.perf_counter() - start
        print(f"generated {args.artifacts:,} artifacts in {results['generate_s']:.1f} s",
              flush=True)
        ui = Ui(store)
        try:
            results["summary_s"] = ui.wait_for_summary()
            print(f"  summary (background, read-only): {results['summary_s']:.1f} s", flush=True)
            rows = measure(ui, names, "unmounted")
            mnt.mkdir()
            subprocess.run([*CAFS, "mount", "--store", str(store), str(mnt)], check=True)
            try:
                rows += measure(ui, names, "mounted")
            finally:
                subprocess.run([*CAFS, "umount", str(mnt)], check=True)
        finally:
            ui.close()
        results["rows"] = rows
        results["load_average_after"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"load average {results['load_average']} -> {results.get('load_average_after')}; "
          f"wrote {args.json}")


if __name__ == "__main__":
    main()

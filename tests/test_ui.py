"""`cafs ui` against real stores: plain HTTP for every page and for read-only behaviour, then
headless Chromium (selenium + Debian's chromium-driver) driving the pages of a real mount.

The store is filled through the mount with ordinary tools (cp, shell redirects, setfattr), with
names chosen to break pages (HTML, quotes, <script>, ampersands) and a tag value that is not
UTF-8; a hand-edited manifest holds a name that is not UTF-8 (the mount itself refuses one).
Screenshots go to the test's tmp directory; their paths are printed. Browser tests skip only
where Chromium is missing, and never in CI (CI or CAFS_REQUIRE_FUSE set).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CAFS, Mount, cafs, write_artifact

HOSTILE_RUN = "\"><script>alert('run')<&#x2f;script>&amp;"
HOSTILE_FILE = "<img src=x onerror=alert(1)>'\"&.bin"
BAD_UTF8_TAG = b"\xff\xfe<script>alert('tag')</script>"


class Ui:
    """A `cafs ui` process on a free port, stopped (by its pid) at the end."""

    def __init__(self, store: Path) -> None:
        self.process = subprocess.Popen([*CAFS, "ui", "--store", str(store), "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"http://\S+/", line)
        if found is None:
            self.process.kill()
            raise AssertionError(f"cafs ui did not start: {line!r} "
                                 f"{self.process.stderr.read() if self.process.stderr else ''}")
        self.url = found.group()

    def get(self, page: str, *, method: str = "GET", headers: dict[str, str] | None = None,
            data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + page.lstrip("/"), method=method,
                                         headers=headers or {}, data=data)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def page(self, page: str) -> str:
        status, _, body = self.get(page)
        assert status == 200, (page, status, body[:2000])
        return body.decode()

    def wait_for_summary(self) -> None:
        deadline = time.monotonic() + 60
        while "summary-pending" in self.page("/sharing"):
            assert time.monotonic() < deadline, "the summary never finished"
            time.sleep(0.1)

    def stop(self) -> str:
        self.process.terminate()
        _, err = self.process.communicate(timeout=30)
        return err


@contextlib.contextmanager
def serving(store: Path) -> Iterator[Ui]:
    ui = Ui(store)
    try:
        yield ui
    finally:
        err = ui.stop()
        assert "Traceback" not in err, err


def fill(mount: Mount, tmp_path: Path) -> dict[str, Any]:
    """A store with history, tags, sharing and hostile names, written through the mount."""
    train = mount.layer("e1", "train")
    write_artifact(train / "model.bin", b"first weights\n")
    subprocess.run(["bash", "-c", f"echo 'second weights' > {train}/model.bin"], check=True)
    (tmp_path / "dataset.csv").write_bytes(b"x,y\n" + b"1,2\n" * 5000)
    subprocess.run(["cp", str(tmp_path / "dataset.csv"), str(train / "dataset.csv")], check=True)
    evaluation = mount.layer("e2", "eval")
    subprocess.run(["cp", str(tmp_path / "dataset.csv"), str(evaluation / "dataset.csv")],
                   check=True)
    subprocess.run(["setfattr", "-n", "user.stage", "-v", "prod", str(train / "model.bin")],
                   check=True)
    hostile = mount.layer(HOSTILE_RUN, "l'<b>\"")
    write_artifact(hostile / HOSTILE_FILE, b"hostile content\n")
    os.setxattr(hostile / HOSTILE_FILE, "user.note", BAD_UTF8_TAG)
    for i in range(130):  # more than a page (100)
        write_artifact(evaluation / f"f{i:03d}.txt", f"file {i}\n".encode())
    return {
        "v1": hashlib.sha256(b"first weights\n").hexdigest(),
        "v2": hashlib.sha256(b"second weights\n").hexdigest(),
        "dataset": hashlib.sha256((tmp_path / "dataset.csv").read_bytes()).hexdigest(),
    }


# -- plain HTTP -------------------------------------------------------------------------------


def test_every_page_answers_and_the_view_is_read_only(mount: Mount, tmp_path: Path) -> None:
    digests = fill(mount, tmp_path)
    with serving(mount.store) as ui:
        executions = ui.page("/")
        assert "mounted: answers from the daemon" in executions
        assert 'href="/dir?path=runs%2Fe1"' in executions
        ui.wait_for_summary()
        assert "…" not in ui.page("/").split("<tbody>")[1].split("</tbody>")[0]
        layer = ui.page("/dir?path=runs/e1/train")
        assert "model.bin" in layer and "user.stage=prod" in layer
        run = ui.page("/dir?path=runs/e1")
        assert 'id="plot-timeline"' in run and "<svg" in run
        history = ui.page("/artifact?path=runs/e1/train/model.bin")
        assert digests["v1"] in history and digests["v2"] in history
        # A symlink is an artifact whose versions hold its target: listed, with a history.
        (mount.runs / "e1" / "train" / "latest").symlink_to("model.bin")
        assert 'href="/artifact?path=runs%2Fe1%2Ftrain%2Flatest"' in ui.page(
            "/dir?path=runs/e1/train")
        link = ui.page("/artifact?path=runs/e1/train/latest")
        assert hashlib.sha256(b"model.bin").hexdigest() in link
        assert history.count('class="download"') == 2
        content = ui.page(f"/content?sha256={digests['dataset']}")
        assert "runs/e1/train/dataset.csv" in content and "runs/e2/eval/dataset.csv" in content
        sharing = ui.page("/sharing")
        assert 'id="plot-dedup"' in sharing and 'id="pairs"' in sharing
        assert re.search(r"e1</a></td><td><a[^>]*>e2|e2</a></td><td><a[^>]*>e1", sharing)
        found = ui.page("/search?tag=stage=prod")
        assert "runs/e1/train/model.bin" in found
        assert digests["dataset"] in ui.page(f"/search?sha256={digests['dataset'][:6]}")
        # Paging: 131 files (dataset.csv first), a page of 100, then the rest by keyset.
        first = ui.page("/dir?path=runs/e2/eval")
        assert "f098.txt" in first and "f099.txt" not in first
        following = re.search(r'id="next" href="([^"]+)"', first)
        assert following is not None
        second = ui.page(following.group(1).replace("&amp;", "&"))
        assert "f099.txt" in second and "f129.txt" in second and "f098.txt" not in second
        # Missing things and bad parameters: an error page, never a traceback.
        assert ui.get("/dir?path=runs/nope")[0] == 404
        assert ui.get("/artifact?path=runs/e1/train/nope")[0] == 404
        assert ui.get("/dir?path=../../etc")[0] == 400
        assert ui.get("/content?sha256=xyz")[0] == 400
        assert ui.get("/download?path=runs/e1/train/model.bin&version=999999")[0] == 404
        assert ui.get("/nowhere")[0] == 404
        # Read-only: every other method is refused, and nothing changed.
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, _ = ui.get("/", method=method, data=b"x=1")
            assert status == 405 and headers["Allow"] == "GET, HEAD", method
        status, headers, body = ui.get("/", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        # Headers: no script from anywhere, no framing, no sniffing.
        _, headers, _ = ui.get("/")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "script-src" not in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        # DNS rebinding: a page elsewhere whose name points at 127.0.0.1 gets nothing.
        assert ui.get("/", headers={"Host": "attacker.example:80"})[0] == 421
    assert (mount.runs / "e1" / "train" / "model.bin").read_bytes() == b"second weights\n"


def test_downloads_are_the_exact_bytes_with_a_safe_name(mount: Mount, tmp_path: Path) -> None:
    digests = fill(mount, tmp_path)
    with serving(mount.store) as ui:
        history = ui.page("/artifact?path=runs/e1/train/model.bin")
        links = re.findall(r'href="(/download\?[^"]+)" data-version="(\d+)" '
                           r'data-sha256="([0-9a-f]+)"', history)
        assert {sha for _, _, sha in links} == {digests["v1"], digests["v2"]}
        for url, _, sha in links:
            status, headers, body = ui.get(url.replace("&amp;", "&"))
            assert status == 200 and hashlib.sha256(body).hexdigest() == sha
            assert headers["Content-Disposition"] == (
                "attachment; filename=\"model.bin\"; filename*=UTF-8''model.bin")
            assert headers["ETag"] == f'"{sha}"'
        path = f"runs/{HOSTILE_RUN}/l'<b>\"/{HOSTILE_FILE}"
        layer = ui.page("/dir?" + urllib.parse.urlencode({"path": path.rpartition("/")[0]}))
        assert "<img" not in layer and "&lt;img src=x onerror=alert(1)&gt;" in layer
        found = re.search(r'href="(/artifact\?[^"]+)"', layer)
        assert found is not None
        history = ui.page(found.group(1).replace("&amp;", "&"))
        url = re.search(r'href="(/download\?[^"]+)"', history)
        assert url is not None
        status, headers, body = ui.get(url.group(1).replace("&amp;", "&"))
        assert status == 200 and body == b"hostile content\n"
        disposition = headers["Content-Disposition"]
        assert re.fullmatch(r"attachment; filename=\"[A-Za-z0-9._ -]+\"; "
                            r"filename\*=UTF-8''[A-Za-z0-9%._~-]+", disposition), disposition
        assert disposition.endswith("''" + urllib.parse.quote(HOSTILE_FILE))


def test_unmounted_store_read_only_and_a_name_that_is_not_utf8(mount: Mount,
                                                               tmp_path: Path) -> None:
    fill(mount, tmp_path)
    mount.stop()
    manifest = mount.store / "manifest.sqlite"
    before = hashlib.sha256(manifest.read_bytes()).hexdigest()
    with serving(mount.store) as ui:
        page = ui.page("/")
        assert "not mounted: read-only manifest" in page
        assert "model.bin" in ui.page("/dir?path=runs/e1/train")
        ui.wait_for_summary()
        assert ui.get("/", method="POST")[0] == 405
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == before
    # A hand-edited manifest can hold a name that is not UTF-8 (the mount refuses one with
    # EILSEQ): shown as \xff, linked by its bytes, and its page opens.
    with sqlite3.connect(manifest) as db:
        db.execute("UPDATE nodes SET name = CAST(x'6531ff3c623e' AS TEXT) WHERE name = 'e1' "
                   "AND kind = 'execution'")
    db.close()
    with serving(mount.store) as ui:
        page = ui.page("/")
        assert "e1\\xff&lt;b&gt;" in page
        assert 'href="/dir?path=runs%2Fe1%FF%3Cb%3E"' in page
        assert "model.bin" not in page
        assert "train" in ui.page("/dir?path=runs%2Fe1%FF%3Cb%3E")
        assert "e1\\xff" in ui.page("/sharing")
    with sqlite3.connect(manifest) as db:  # put it back for the fixture's fsck
        db.execute("UPDATE nodes SET name = 'e1' WHERE name = CAST(x'6531ff3c623e' AS TEXT)")
    db.close()


def test_cli_refuses_a_missing_store_and_warns_off_loopback(tmp_path: Path) -> None:
    result = cafs("ui", "--store", str(tmp_path / "none"), "--port", "0", check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.startswith("cafs: ")


# -- headless Chromium --------------------------------------------------------------------


def chromium_missing() -> str | None:
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    reason = chromium_missing()
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("CAFS_REQUIRE_FUSE"):
            pytest.fail(f"the browser tests must run here but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900", "--no-first-run",
                     f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "safebrowsing.enabled": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.execute_cdp_cmd("Page.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    keep = os.environ.get("CAFS_UI_SCREENSHOTS")  # a directory to copy them to (README's)
    if keep:
        shutil.copy(path, Path(keep) / path.name)
    return path


def click_link(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.LINK_TEXT, text).click()


def wait_for(driver: Any, css: str) -> Any:
    """The element once the page that has it is loaded (a click returns before that)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    return WebDriverWait(driver, 30).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def test_browser_navigates_to_a_version_and_downloads_it(mount: Mount, tmp_path: Path,
                                                          browser: Any) -> None:
    from selenium.webdriver.common.by import By

    digests = fill(mount, tmp_path)
    with serving(mount.store) as ui:
        ui.wait_for_summary()
        browser.get(ui.url)
        assert browser.find_element(By.ID, "executions").is_displayed()
        screenshot(browser, tmp_path, "1-executions")
        click_link(browser, "e1")
        wait_for(browser, "#entries")
        assert browser.find_element(By.ID, "title").text == "e1"
        assert browser.find_element(By.ID, "plot-timeline").is_displayed()
        screenshot(browser, tmp_path, "2-execution")
        click_link(browser, "train/")
        wait_for(browser, "a.artifact")
        assert browser.find_element(By.ID, "title").text == "train"
        screenshot(browser, tmp_path, "3-layer")
        click_link(browser, "model.bin")
        wait_for(browser, "#history")
        rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
        assert len(rows) == 2 and "current" in rows[0].text
        screenshot(browser, tmp_path, "4-history")
        old = browser.find_element(By.CSS_SELECTOR, f'a.download[data-sha256="{digests["v1"]}"]')
        old.click()
        target = browser.downloads / "model.bin"
        deadline = time.monotonic() + 30
        while not (target.exists() and not list(browser.downloads.glob("*.crdownload"))):
            assert time.monotonic() < deadline, list(browser.downloads.iterdir())
            time.sleep(0.1)
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digests["v1"]
        # Search by tag from the form in the header.
        browser.find_element(By.ID, "search-tag").send_keys("stage=prod")
        browser.find_element(By.ID, "search-go").click()
        wait_for(browser, "#results")
        results = browser.find_elements(By.CSS_SELECTOR, "#results tbody a.name")
        assert [r.text for r in results] == ["runs/e1/train/model.bin"]
        screenshot(browser, tmp_path, "5-search")
        browser.find_element(By.ID, "nav-sharing").click()
        assert wait_for(browser, "#plot-dedup").is_displayed()
        screenshot(browser, tmp_path, "6-sharing")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
                  and "favicon" not in entry["message"]]
        assert not errors, errors


def test_browser_shows_hostile_names_as_text(mount: Mount, tmp_path: Path,
                                             browser: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    fill(mount, tmp_path)
    with serving(mount.store) as ui:
        ui.wait_for_summary()
        browser.get(ui.url)
        names = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#executions a.name")]
        assert HOSTILE_RUN in names
        browser.find_element(By.LINK_TEXT, HOSTILE_RUN).click()
        wait_for(browser, "#entries")
        assert browser.find_element(By.ID, "title").text == HOSTILE_RUN
        browser.find_element(By.LINK_TEXT, "l'<b>\"/").click()
        wait_for(browser, "a.artifact")
        assert browser.find_element(By.ID, "title").text == "l'<b>\""
        tags = browser.find_element(By.CSS_SELECTOR, "#entries td.tags").text
        assert tags == "user.note=\\xff\\xfe<script>alert('tag')</script>"
        screenshot(browser, tmp_path, "hostile-layer")
        browser.find_element(By.LINK_TEXT, HOSTILE_FILE).click()
        wait_for(browser, "#history")
        assert browser.find_element(By.ID, "title").text == HOSTILE_FILE
        screenshot(browser, tmp_path, "hostile-artifact")
        for page in ("/", "/sharing"):
            browser.get(ui.url + page.lstrip("/"))
            wait_for(browser, "footer")
            assert not browser.find_elements(By.TAG_NAME, "script")
            assert not browser.find_elements(By.TAG_NAME, "img")
            with pytest.raises(NoAlertPresentException):
                browser.switch_to.alert.text  # noqa: B018
        assert HOSTILE_RUN in browser.find_element(By.ID, "unique").text


# -- attacks and hard cases (plain HTTP) ------------------------------------------------------


def small_store(mount: Mount) -> dict[str, str]:
    """One tagged artifact with two versions: enough for every page to have something."""
    train = mount.layer("e1", "train")
    write_artifact(train / "model.bin", b"first weights\n")
    write_artifact(train / "model.bin", b"second weights\n")
    subprocess.run(["setfattr", "-n", "user.stage", "-v", "prod", str(train / "model.bin")],
                   check=True)
    return {"sha": hashlib.sha256(b"second weights\n").hexdigest()}


def test_numbers_past_64_bits_or_not_ascii_are_a_400(mount: Mount) -> None:
    """Cursors and version numbers are checked where they enter: 19 digits past 2**63 or a
    digit that is not ASCII ('²', an Arabic-Indic one) is a 400, not a traceback in the UI or
    the daemon (the fixture fails on an error in the daemon's log)."""
    sha = small_store(mount)["sha"]
    artifact = "path=runs/e1/train/model.bin"
    with serving(mount.store) as ui:
        for number in ("9999999999999999999", "9223372036854775808", "%C2%B2", "%D9%A1",
                       "-1", "1e3", "%201"):
            for page in (f"/content?sha256={sha}&after={number}",
                         f"/download?{artifact}&version={number}",
                         f"/search?tag=stage&after_node={number}"):
                status, _, body = ui.get(page)
                assert status == 400, (page, status, body[:300])
        assert ui.get(f"/content?sha256={sha}&after=9223372036854775807")[0] == 200


def test_the_daemon_answers_a_browse_out_of_range_with_einval(mount: Mount) -> None:
    """The control socket's `browse` checks what a client other than cafs ui might send: an
    integer SQLite cannot hold is EINVAL, not an unexpected error in the daemon's log."""
    import errno

    from cafs.control import AdminError, call

    sha = small_store(mount)["sha"]
    with pytest.raises(AdminError) as raised:
        call(mount.store, "browse", {"query": "content",
                                     "params": {"sha256": sha, "after": 2**70}}, [],
             lambda *_: None)
    assert raised.value.errno == errno.EINVAL


def test_another_local_user_gets_nothing_from_roots_ui(mount: Mount, tmp_path: Path) -> None:
    """The store is 0700 and its control socket answers only root and its owner; the UI
    listening on 127.0.0.1 keeps that rule: a connection from another local user (found by
    its socket's owner in /proc/net/tcp) is refused, pages and downloads alike."""
    from conftest import as_nobody

    small_store(mount)
    with serving(mount.store) as ui:
        for page in ("", "dir?path=runs/e1/train",
                     "download?path=runs/e1/train/model.bin&version=1"):
            done = as_nobody(f"curl -s -w '\\n%{{http_code}}' '{ui.url}{page}'", tmp_path)
            body, _, status = done.stdout.rpartition("\n")
            assert status == "403", (page, done.stdout[-500:], done.stderr)
            assert "weights" not in body and "model.bin" not in body
            assert "only root or uid 0" in body
        assert "model.bin" in ui.page("/dir?path=runs/e1/train")


def test_the_timeline_scan_never_runs_in_the_daemon(mount: Mount) -> None:
    """An execution's timeline counts every publish in it (100,000 rows for a big run): in the
    daemon, between filesystem requests, hammering that page took a `cat` on the mount from
    1 ms to 61 ms (p50). The daemon refuses it; the UI runs it on its own read-only
    connection, and a mounted execution page still plots it."""
    import errno

    from cafs.control import AdminError, call

    small_store(mount)
    with pytest.raises(AdminError) as raised:
        call(mount.store, "browse", {"query": "timeline", "params": {
            "path": "runs/e1", "first_ns": 0, "last_ns": 10**19 // 2}}, [], lambda *_: None)
    assert raised.value.errno == errno.EINVAL
    with serving(mount.store) as ui:
        page = ui.page("/dir?path=runs/e1")
        assert "mounted: answers from the daemon" in ui.page("/")
        assert 'id="plot-timeline"' in page and "<rect" in page


def test_a_long_history_is_paged(mount: Mount) -> None:
    """An artifact rewritten at every step (a checkpoint) has as many versions as steps: its
    page shows the newest 100 with a link to older ones, so neither the daemon's answer nor
    the page grows with the history."""
    train = mount.layer("e1", "train")
    for step in range(130):
        write_artifact(train / "ckpt.bin", f"step {step}\n".encode())
    with serving(mount.store) as ui:
        first = ui.page("/artifact?path=runs/e1/train/ckpt.bin")
        assert first.count('class="download"') == 100
        assert hashlib.sha256(b"step 129\n").hexdigest() in first
        assert hashlib.sha256(b"step 29\n").hexdigest() not in first
        older = re.search(r'id="older" href="([^"]+)"', first)
        assert older is not None
        second = ui.page(older.group(1).replace("&amp;", "&"))
        assert second.count('class="download"') == 30
        assert hashlib.sha256(b"step 0\n").hexdigest() in second
        assert hashlib.sha256(b"step 30\n").hexdigest() not in second
        assert 'id="older"' not in second and 'id="newest"' in second


def test_a_refused_request_body_is_never_read_as_a_request(mount: Mount) -> None:
    """A POST's body is not read (405): the connection closes after the answer, so the body
    cannot be taken as a next request on it (a form posting text elsewhere could smuggle a
    GET that way); and a request line's control characters reach the operator's terminal
    escaped."""
    import socket

    small_store(mount)
    ui = Ui(mount.store)
    try:
        host, port = urllib.parse.urlsplit(ui.url).netloc.rsplit(":", 1)

        def exchange(data: bytes) -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(data)
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
                return received

        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        received = exchange(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                            + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
        assert received.startswith(b"HTTP/1.1 405") and received.count(b"HTTP/1.1 ") == 1
        received = exchange(b"GET /\x1b]2;owned\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Connection: close\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 404")
    finally:
        err = ui.stop()
    assert "Traceback" not in err and "\x1b" not in err and "\\x1b" in err


def test_a_port_in_use_is_one_line_naming_it(mount: Mount) -> None:
    with serving(mount.store) as ui:
        port = urllib.parse.urlsplit(ui.url).port
        result = cafs("ui", "--store", str(mount.store), "--port", str(port), check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr == (f"cafs: cannot listen on 127.0.0.1:{port}: Address already "
                                 "in use (--port 0 takes any free port)\n")

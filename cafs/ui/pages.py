"""The pages of `cafs ui`: one function per page, each a query (cafs.ui.source) and a template.

Owns: what each URL shows, its parameters and their checks, and the helpers templates use to
show names, sizes and times and to build links. Templates are Jinja2 with autoescaping on, so
every name is escaped however hostile; names not valid as UTF-8 (decoded with surrogateescape)
and control characters are shown as \\xNN; links are built with `link` (every parameter
percent-encoded from its bytes) and never by pasting strings. Must not write anything, speak
HTTP (cafs.ui.server) or hold SQL (cafs.sqlite_manifest.ui_queries).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from cafs.sqlite_manifest.ui_queries import PAGE, TIMELINE_BUCKETS
from cafs.ui import plots
from cafs.ui.source import Source

Params = dict[str, str]


class NotFoundPage(Exception):
    """The page asked for does not exist (404), with a message for the page."""


class BadRequest(Exception):
    """Parameters the page cannot use (400)."""


@dataclass
class Page:
    template: str
    context: dict[str, Any] = field(default_factory=dict)
    status: int = 200


_CONTROL = re.compile(r"[\x00-\x1f\x7f\udc80-\udcff]")


def shown(name: str | None) -> str:
    """A name as text to show: bytes that were not UTF-8 (surrogateescape) and control
    characters as \\xNN, so that two different names never look the same."""
    if name is None:
        return ""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}", name)


def link(page: str, **params: Any) -> str:
    """A URL of this server: `page` and its parameters, each percent-encoded from its bytes
    (a surrogate-escaped name goes back as the bytes it came from)."""
    given = {key: str(value) for key, value in params.items() if value is not None}
    if not given:
        return page
    return page + "?" + urlencode(given, quote_via=quote, encoding="utf-8",
                                  errors="surrogateescape")


def size(value: int | None) -> str:
    return "" if value is None else plots.human(value)


def when(ns: int | None) -> str:
    if ns is None:
        return ""
    seconds = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9))
    return f"{seconds}.{ns % 10**9 // 10**6:03d}Z"


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def crumbs(path: str) -> list[tuple[str, str]]:
    """(name, link) for each directory above and including `path` (runs/e/l/a)."""
    parts = path.split("/")
    return [(part, link("/dir", path="/".join(parts[:i + 1])))
            for i, part in enumerate(parts) if i > 0]


def environment() -> Environment:
    env = Environment(loader=PackageLoader("cafs.ui", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(shown=shown, size=size, when=when)
    env.globals.update(link=link, crumbs=crumbs, parent_of=parent_of, PAGE=PAGE)
    return env


# -- parameters ------------------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-f]{1,64}")


def _path(params: Params) -> str:
    path = params.get("path", "")
    parts = path.split("/")
    if parts[0] != "runs" or len(parts) < 2 or "" in parts or "." in parts or ".." in parts:
        raise BadRequest("path must be runs/<execution>/... with no empty, . or .. parts")
    return path


_NUMBER = re.compile(r"[0-9]{1,19}")
MAX_NUMBER = 2**63 - 1  # what an SQLite INTEGER holds


def number(value: str, name: str) -> int:
    """A cursor or version number: ASCII digits only (str.isdigit also takes '²', which int
    refuses, and other scripts' digits) and no more than SQLite holds."""
    if not _NUMBER.fullmatch(value) or int(value) > MAX_NUMBER:
        raise BadRequest(f"{name} must be a number from 0 to {MAX_NUMBER}")
    return int(value)


def _int(params: Params, name: str, default: int | None = None) -> int:
    value = params.get(name)
    if value is None or value == "":
        if default is None:
            raise BadRequest(f"{name} is missing")
        return default
    return number(value, name)


def _sha(value: str, *, whole: bool) -> str:
    value = value.strip().lower()
    if not _HEX.fullmatch(value) or (whole and len(value) != 64):
        raise BadRequest("a sha256 is 64 hex digits" if whole else "give hex digits")
    return value


# -- the pages -------------------------------------------------------------------------------


def executions_page(source: Source, params: Params) -> Page:
    answer = source.query("executions", after=params.get("after"))
    summary = source.summary()
    stored = {}
    chart = None
    if summary.data is not None:
        stored = {e["name"]: e for e in summary.data["executions"]}
        by_time = sorted(summary.data["executions"],
                         key=lambda e: (e["first_write_ns"] or 0, e["name"] or ""))[-60:]
        chart = plots.bars("stored and logical bytes per execution, oldest first",
                           [(shown(e["name"]), e["stored_bytes"], e["logical_bytes"])
                            for e in by_time], legend=("stored", "logical"))
    last = answer["executions"][-1]["name"] if answer["executions"] else None
    return Page("executions.html", {
        "answer": answer, "stored": stored, "summary": summary, "chart": chart,
        "next": link("/", after=last) if answer["more"] else None,
        "mounted": source.mounted()})


def directory_page(source: Source, params: Params) -> Page:
    path = _path(params)
    answer = source.query("directory", path=path, after=params.get("after"))
    if answer.get("missing"):
        raise NotFoundPage(f"{path}: no such execution, layer or directory")
    node = answer["node"]
    chart = None
    if node["kind"] == "execution" and node["first_write_ns"] is not None:
        found = source.timeline(path, node["first_write_ns"], node["last_write_ns"])
        chart = plots.histogram(f"publishes in {shown(node['name'])} over time",
                                found["first_ns"], found["width_ns"], found["buckets"],
                                TIMELINE_BUCKETS)
    last = answer["entries"][-1]["name"] if answer["entries"] else None
    return Page("directory.html", {
        "answer": answer, "node": node, "path": path, "chart": chart,
        "next": link("/dir", path=path, after=last) if answer["more"] else None,
        "first": link("/dir", path=path) if params.get("after") else None})


def artifact_page(source: Source, params: Params) -> Page:
    path = _path(params)
    before = _int(params, "before", 0) or None
    answer = source.query("artifact", path=path, before=before)
    if answer.get("directory"):
        raise NotFoundPage(f"{path} is a directory")
    if answer.get("missing"):
        raise NotFoundPage(f"{path}: no such artifact, and none was ever published there")
    last = answer["versions"][-1]["version"] if answer["versions"] else None
    return Page("artifact.html", {
        "answer": answer, "path": path, "name": path.rpartition("/")[2],
        "older": link("/artifact", path=path, before=last) if answer["more"] else None,
        "newest": link("/artifact", path=path) if before else None})


def content_page(source: Source, params: Params) -> Page:
    digest = _sha(params.get("sha256", ""), whole=True)
    answer = source.query("content", sha256=digest, after=_int(params, "after", 0))
    if answer.get("missing"):
        raise NotFoundPage(f"no content {digest} in this store")
    last = answer["holders"][-1]["version"] if answer["holders"] else None
    return Page("content.html", {
        "answer": answer,
        "next": link("/content", sha256=digest, after=last) if answer["more"] else None})


def sharing_page(source: Source, params: Params) -> Page:
    summary = source.summary()
    charts = {}
    if summary.data is not None:
        growth = summary.data["growth"]
        charts["growth"] = plots.lines(
            "logical bytes against the distinct contents stored, as runs were added",
            [row[0] for row in growth],
            [("logical", [row[1] for row in growth]), ("unique", [row[2] for row in growth]),
             ("stored", [row[3] for row in growth])])
        largest = sorted(summary.data["executions"], key=lambda e: -e["logical_bytes"])[:30]
        charts["only"] = plots.bars(
            "bytes held only by each execution (largest 30 by logical bytes)",
            [(shown(e["name"]), e["unique_bytes"], e["logical_bytes"]) for e in largest],
            legend=("only here", "logical"))
    return Page("sharing.html", {"summary": summary, "charts": charts})


def search_page(source: Source, params: Params) -> Page:
    tag, prefix = params.get("tag", "").strip(), params.get("sha256", "").strip()
    context: dict[str, Any] = {"tag": tag, "sha256": prefix, "answer": None, "next": None,
                               "kind": None}
    if tag:
        key, has_value, value = tag.partition("=")
        if not key:
            raise BadRequest("a tag is KEY or KEY=VALUE")
        name = key if key.startswith("user.") else f"user.{key}"
        answer = source.query(
            "search_tag", name=name, value=value if has_value else None,
            after_value=params.get("after_value"), after_node=_int(params, "after_node", 0))
        context.update(kind="tag", answer=answer)
        if answer["more"]:
            last = answer["found"][-1]
            context["next"] = link("/search", tag=tag, after_node=last["node"],
                                   after_value=None if has_value else last["value"])
    elif prefix:
        answer = source.query("search_sha", prefix=_sha(prefix, whole=False))
        context.update(kind="sha256", answer=answer)
    return Page("search.html", context)


PAGES: dict[str, Callable[[Source, Params], Page]] = {
    "/": executions_page, "/dir": directory_page, "/artifact": artifact_page,
    "/content": content_page, "/sharing": sharing_page, "/search": search_page,
}

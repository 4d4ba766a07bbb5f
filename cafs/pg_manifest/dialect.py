"""SQLite's SQL as PostgreSQL runs it: the few spellings that differ, rewritten once per
statement text.

Owns: translating a statement written for the SQLite manifest (cafs/sqlite_manifest/) into the
same statement for PostgreSQL — placeholders (`?`, `?N`, `:name` become psycopg's `%s` and
`%(name)s`, literal `%` doubled), scalar `min(a, b)`/`max(a, b)` (LEAST/GREATEST), `IS NOT x`
(IS DISTINCT FROM), `INSERT OR IGNORE`, `length(CAST(x AS BLOB))`, `temp.` tables and INTEGER
columns of temporary tables (BIGINT). String literals and quoted names are left alone. Must not
run anything: a pure function of the text, so every statement is translated once and cached.

Why translate instead of keeping two sets of queries: one set of queries is one meaning; the
differences are spelling, and a statement whose meaning truly differs (PRAGMAs, the catalog,
backups) is overridden by the PostgreSQL core, not translated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Statement:
    sql: str  # for psycopg
    order: tuple[int, ...] | None  # ?N placeholders: the 0-based parameter of each %s, in order
    named: bool  # parameters are a mapping (`:name`)
    quiet: bool  # a change that answers no rows: nobody needs to wait for its answer


def _segments(sql: str) -> list[tuple[bool, str]]:
    """(is code, text) pieces: string literals and quoted identifiers are not code."""
    pieces: list[tuple[bool, str]] = []
    start = i = 0
    while i < len(sql):
        char = sql[i]
        if char in "'\"":
            end = i + 1
            while True:
                end = sql.index(char, end)
                if end + 1 < len(sql) and sql[end + 1] == char:  # a doubled quote
                    end += 2
                    continue
                break
            pieces.append((True, sql[start:i]))
            pieces.append((False, sql[i:end + 1]))
            start = i = end + 1
            continue
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            end = len(sql) if end < 0 else end
            pieces.append((True, sql[start:i]))
            start = i = end
            continue
        i += 1
    pieces.append((True, sql[start:]))
    return pieces


def _matching(code: str, open_at: int) -> int:
    depth = 0
    for index in range(open_at, len(code)):
        if code[index] == "(":
            depth += 1
        elif code[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced parentheses in {code!r}")


def _scalar_min_max(sql: str) -> str:
    """min(a, b) and max(a, b) with two or more arguments are SQLite's scalar functions."""
    out = []
    i = 0
    pattern = re.compile(r"\b(min|max)\s*\(", re.IGNORECASE)
    while True:
        match = pattern.search(sql, i)
        if match is None:
            out.append(sql[i:])
            return "".join(out)
        open_at = match.end() - 1
        close = _matching(sql, open_at)
        inner = sql[open_at + 1:close]
        depth, top_comma = 0, False
        for char in inner:
            depth += char == "("
            depth -= char == ")"
            top_comma = top_comma or (char == "," and depth == 0)
        out.append(sql[i:match.start()])
        name = match.group(1).lower()
        if top_comma:
            out.append(("LEAST(" if name == "min" else "GREATEST(") + _scalar_min_max(inner) + ")")
        else:
            out.append(sql[match.start():open_at + 1] + _scalar_min_max(inner) + ")")
        i = close + 1


@lru_cache(maxsize=1024)
def translate(sql: str) -> Statement:
    order: list[int] = []
    named = False
    pieces = []
    for is_code, text in _segments(sql):
        if not is_code:  # psycopg reads every % as its own, even inside a literal
            pieces.append(text.replace("%", "%%"))
            continue
        text = text.replace("%", "%%")
        text = re.sub(r"\bIS NOT (?!NULL\b)", "IS DISTINCT FROM ", text)
        text = re.sub(r"length\(CAST\((\w+) AS BLOB\)\)", r"octet_length(\1)", text)
        text = re.sub(r"\btemp\.", "pg_temp.", text)

        def placeholder(match: re.Match[str]) -> str:
            nonlocal named
            token = match.group(0)
            if token.startswith(":"):
                named = True
                return f"%({token[1:]})s"
            if len(token) > 1:
                order.append(int(token[1:]) - 1)
            return "%s"

        pieces.append(re.sub(r"\?\d*|(?<![:\w]):[A-Za-z_]\w*", placeholder, text))
    out = _scalar_min_max("".join(pieces))
    if re.match(r"\s*CREATE\s+TEMP", out, re.IGNORECASE):
        out = re.sub(r"\bINTEGER\b", "BIGINT", out)
    ignore = re.match(r"(\s*)INSERT OR IGNORE INTO", out, re.IGNORECASE)
    if ignore:
        out = f"{ignore.group(1)}INSERT INTO{out[ignore.end():]} ON CONFLICT DO NOTHING"
    # Rows come from a SELECT (a WITH ending in one) or a RETURNING; anything else (a change,
    # DDL) answers with a row count at most.
    change = re.search(r"\)\s*(UPDATE|DELETE|INSERT)\b", out, re.IGNORECASE) is not None
    rows = (re.match(r"\s*SELECT\b", out, re.IGNORECASE) is not None
            or (re.match(r"\s*WITH\b", out, re.IGNORECASE) is not None and not change)
            or re.search(r"\bRETURNING\b", out, re.IGNORECASE) is not None)
    quiet = not rows
    return Statement(out, tuple(order) if order else None, named, quiet)


def insert_table(sql: str) -> str | None:
    """The table a plain INSERT (no RETURNING) writes, for lastrowid; None otherwise."""
    match = re.match(r"\s*INSERT\s+INTO\s+(\w+)", sql, re.IGNORECASE)
    if match is None or re.search(r"\bRETURNING\b", sql, re.IGNORECASE):
        return None
    return match.group(1)


def explicit_id_table(sql: str) -> str | None:
    """The table an INSERT gives ids of its own (an import): its sequence must follow."""
    match = re.match(r"\s*INSERT\s+INTO\s+(\w+)\s*\(\s*id\s*,", sql, re.IGNORECASE)
    return match.group(1) if match else None

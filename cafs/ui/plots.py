"""The plots of `cafs ui`, drawn here as inline SVG: no script, no library, no network.

Owns: three small chart shapes — bars (a value per labelled item, with an optional second value
drawn behind it), lines (series over time) and a histogram of counts over time. Every label is
escaped here (labels are execution names, which anyone who can mkdir chooses), and styling uses
presentation attributes only, never a `style` attribute, so the page's Content-Security-Policy
needs no 'unsafe-inline'. Must not query anything: the pages pass the numbers.
"""

from __future__ import annotations

import time
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 40
COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")


def human(size: float) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _day(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ns / 1e9))


def _frame(title: str, body: list[str], top_value: float, unit: str) -> Markup:
    label = human(top_value) if unit == "bytes" else f"{top_value:,.0f}"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">',
             f"<title>{escape(title)}</title>",
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="#888"/>',
             f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" '
             f'y2="{HEIGHT - BOTTOM}" stroke="#888"/>',
             f'<text x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end" font-size="10">'
             f"{escape(label)}</text>",
             f'<text x="{LEFT - 4}" y="{HEIGHT - BOTTOM}" text-anchor="end" font-size="10">0'
             "</text>",
             *body, "</svg>"]
    return Markup("".join(parts))


def bars(title: str, items: list[tuple[str, float, float | None]], unit: str = "bytes",
         legend: tuple[str, str] = ("", "")) -> Markup:
    """One bar per (label, value, behind): `behind` (e.g. logical bytes) drawn lighter behind
    `value` (e.g. stored bytes). At most 60 items are drawn (the caller picks which)."""
    items = items[:60]
    top = max([max(value, behind or 0) for _, value, behind in items] or [1]) or 1
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = inner_w / max(1, len(items))
    body = []
    for index, (label, value, behind) in enumerate(items):
        x = LEFT + index * step + step * 0.1
        width = max(1.0, step * 0.8)
        tip = f"{label}: {human(value) if unit == 'bytes' else value}"
        if behind is not None:
            height = inner_h * behind / top
            body.append(f'<rect x="{x:.1f}" y="{TOP + inner_h - height:.1f}" width="{width:.1f}" '
                        f'height="{height:.1f}" fill="#cbd5e0"><title>{escape(label)}: '
                        f"{escape(legend[1])} {escape(human(behind))}</title></rect>")
        height = inner_h * value / top
        body.append(f'<rect x="{x + width * 0.2:.1f}" y="{TOP + inner_h - height:.1f}" '
                    f'width="{width * 0.6:.1f}" height="{height:.1f}" fill="{COLOURS[0]}">'
                    f"<title>{escape(tip)}</title></rect>")
        if len(items) <= 20:
            short = label if len(label) <= 14 else label[:13] + "…"
            body.append(f'<text x="{x + width / 2:.1f}" y="{HEIGHT - BOTTOM + 14}" '
                        f'text-anchor="middle" font-size="10">{escape(short)}</text>')
    if legend[0]:
        body.append(_legend([(legend[0], COLOURS[0]), (legend[1], "#cbd5e0")]))
    return _frame(title, body, top, unit)


def _legend(entries: list[tuple[str, str]]) -> str:
    parts = []
    x = LEFT + 8
    for name, colour in entries:
        parts.append(f'<rect x="{x}" y="{HEIGHT - 14}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{HEIGHT - 5}" font-size="10">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return "".join(parts)


def lines(title: str, xs: list[int], series: list[tuple[str, list[float]]],
          unit: str = "bytes") -> Markup:
    """Series over time: xs are times (ns), each series one value per x."""
    top = max([max(values or [0]) for _, values in series] or [1]) or 1
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    low, high = (min(xs), max(xs)) if xs else (0, 1)
    span = (high - low) or 1
    body = []
    for index, (_name, values) in enumerate(series):
        pairs = zip(xs, values, strict=True)
        points = " ".join(
            f"{LEFT + inner_w * (x - low) / span if len(xs) > 1 else LEFT + inner_w / 2:.1f},"
            f"{TOP + inner_h - inner_h * value / top:.1f}" for x, value in pairs)
        body.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS[index]}" '
                    'stroke-width="2"/>')
    if xs:
        body.append(f'<text x="{LEFT}" y="{HEIGHT - BOTTOM + 14}" font-size="10">'
                    f"{escape(_day(low))}</text>")
        body.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - BOTTOM + 14}" font-size="10" '
                    f'text-anchor="end">{escape(_day(high))}</text>')
    body.append(_legend([(name, COLOURS[i]) for i, (name, _) in enumerate(series)]))
    return _frame(title, body, top, unit)


def histogram(title: str, first_ns: int, width_ns: int, buckets: list[list[int]],
              count: int) -> Markup:
    """Counts per time slice: buckets are [slice number, count]; `count` slices in all."""
    top = max([n for _, n in buckets] or [1]) or 1
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = inner_w / max(1, count)
    body = []
    for index, n in buckets:
        height = inner_h * n / top
        start = first_ns + index * width_ns
        body.append(f'<rect x="{LEFT + index * step:.1f}" y="{TOP + inner_h - height:.1f}" '
                    f'width="{max(1.0, step - 1):.1f}" height="{height:.1f}" '
                    f'fill="{COLOURS[2]}"><title>{escape(_day(start))}: {n} publishes'
                    "</title></rect>")
    body.append(f'<text x="{LEFT}" y="{HEIGHT - BOTTOM + 14}" font-size="10">'
                f"{escape(_day(first_ns))}</text>")
    body.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - BOTTOM + 14}" font-size="10" '
                f'text-anchor="end">{escape(_day(first_ns + count * width_ns))}</text>')
    return _frame(title, body, top, "count")

"""Charts drawn on the server as inline SVG: no script, no library, nothing from a CDN.

Each chart is a list of ``Bar(label, value, text)``: ``value`` is an exact Decimal used only
for the bar's length, ``text`` the exact figure shown (money stays a formatted string). The
SVG carries ``role="img"`` and a ``<title>``; the page also renders the same figures as a
table, so screen readers and printouts lose nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from html import escape

from markupsafe import Markup


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: Decimal
    text: str


def _width(value: Decimal, top: Decimal, full: int) -> str:
    if top <= 0 or value <= 0:
        return "0"
    return str((value / top * full).quantize(Decimal("0.1")))


def column_chart(bars: list[Bar], title: str, *, height: int = 160) -> Markup:
    """Vertical bars (e.g. spend per day), labels under every few bars."""
    width = max(320, 14 * len(bars))
    top = max((b.value for b in bars), default=Decimal(0))
    slot = Decimal(width) / max(len(bars), 1)
    every = max(1, len(bars) // 6)
    parts = [(f'<svg class="chart" viewBox="0 0 {width} {height + 24}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>'),
             f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#d0d7de"/>']
    for i, bar in enumerate(bars):
        h = Decimal(_width(bar.value, top, height - 10))
        x = (slot * i + slot * Decimal("0.15")).quantize(Decimal("0.1"))
        w = (slot * Decimal("0.7")).quantize(Decimal("0.1"))
        parts.append(f'<rect x="{x}" y="{height - h}" width="{w}" height="{h}" fill="#0b5cad">'
                     f'<title>{escape(bar.label)}: {escape(bar.text)}</title></rect>')
        if i % every == 0 and x + 36 <= width:  # a label that fits inside the chart
            parts.append(f'<text x="{x}" y="{height + 16}">{escape(bar.label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(bars: list[Bar], title: str) -> Markup:
    """Horizontal bars with their label and figure (e.g. spend per model, call share)."""
    row, label_w, bar_w = 24, 105, 140
    height = max(row * len(bars), row)
    top = max((b.value for b in bars), default=Decimal(0))
    parts = [(f'<svg class="chart" viewBox="0 0 {label_w + bar_w + 105} {height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>')]
    for i, bar in enumerate(bars):
        y = i * row
        label = bar.label if len(bar.label) <= 16 else bar.label[:15] + "…"
        parts.append(f'<text x="0" y="{y + 17}">{escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 5}" height="16" '
                     f'width="{_width(bar.value, top, bar_w)}" fill="#0b5cad">'
                     f'<title>{escape(bar.label)}: {escape(bar.text)}</title></rect>')
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 17}">{escape(bar.text)}</text>')
    if not bars:
        parts.append('<text x="0" y="17">no usage in this period</text>')
    parts.append("</svg>")
    return Markup("".join(parts))

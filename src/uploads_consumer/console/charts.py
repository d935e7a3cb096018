"""Bar charts as numbers a template draws in SVG: no script, no style attribute (the CSP allows neither)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    width: int
    height: int
    top: int
    """The largest value: the chart's scale."""


def columns(values: Sequence[tuple[str, int]], width: int = 480, height: int = 120, gap: float = 2.0) -> Chart:
    """Vertical bars, left to right, scaled to the largest value."""
    top = max([v for _, v in values] or [0]) or 1
    step = width / max(1, len(values))
    bars = [
        Bar(label, value, i * step, height - height * value / top, max(1.0, step - gap), height * value / top)
        for i, (label, value) in enumerate(values)
    ]
    return Chart(bars, width, height, top)


def rows(values: Sequence[tuple[str, int]], width: int = 360, row: int = 18) -> Chart:
    """Horizontal bars, top to bottom, scaled to the largest value."""
    top = max([v for _, v in values] or [0]) or 1
    bars = [
        Bar(label, value, 0, i * row, max(1.0, width * value / top), row - 4) for i, (label, value) in enumerate(values)
    ]
    return Chart(bars, width, row * len(values), top)


def size_text(count: int) -> str:
    """Bytes as people read them: 1.5 MiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"

"""A grouped bar chart as plain SVG: one group per scenario, one bar per system, a whisker for the spread."""

from __future__ import annotations

import math
from html import escape

from bench.stats import Spread

COLOURS = ("#8c8c8c", "#4c78a8", "#f58518", "#54a24b", "#b279a2")
WIDTH, HEIGHT = 960, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 56, 150


def nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (the axis's top)."""
    if value <= 0 or math.isnan(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(float(step * power) for step in (1, 2, 5, 10) if step * power >= value)


def bar_chart(
    title: str, unit: str, groups: list[str], series: list[str], values: dict[tuple[str, str], Spread]
) -> str:
    """An SVG document: per group, a bar per series that has a value (its median, a min-max whisker)."""
    top = nice_top(max((s.high for s in values.values() if not math.isnan(s.high)), default=1.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(groups))
    bar = slot * 0.8 / max(1, len(series))

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for i in range(6):
        value = top * i / 5
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#ddd"/>'
        )
        out.append(f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:,.0f}</text>')
    out.append(
        f'<text x="14" y="{TOP + plot_h / 2}" transform="rotate(-90 14 {TOP + plot_h / 2})" '
        f'text-anchor="middle">{escape(unit)}</text>'
    )
    for g, group in enumerate(groups):
        x0 = LEFT + g * slot + slot * 0.1
        for s, name in enumerate(series):
            spread = values.get((group, name))
            if spread is None or math.isnan(spread.median):
                continue
            x = x0 + s * bar
            colour = COLOURS[s % len(COLOURS)]
            out.append(
                f'<rect x="{x:.1f}" y="{y(spread.median):.1f}" width="{bar * 0.9:.1f}" '
                f'height="{y(0) - y(spread.median):.1f}" fill="{colour}">'
                f"<title>{escape(name)}: {spread.median:,.0f} {escape(unit)}</title></rect>"
            )
            mid = x + bar * 0.45
            out.append(
                f'<line x1="{mid:.1f}" x2="{mid:.1f}" y1="{y(spread.low):.1f}" y2="{y(spread.high):.1f}" '
                'stroke="black"/>'
            )
        label_x = LEFT + g * slot + slot / 2
        out.append(
            f'<text x="{label_x:.1f}" y="{TOP + plot_h + 14}" text-anchor="end" '
            f'transform="rotate(-35 {label_x:.1f} {TOP + plot_h + 14})">{escape(group)}</text>'
        )
    for s, name in enumerate(series):
        x = LEFT + 10 + s * 150  # the legend, under the title
        out.append(f'<rect x="{x}" y="30" width="12" height="12" fill="{COLOURS[s % len(COLOURS)]}"/>')
        out.append(f'<text x="{x + 16}" y="40">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

"""Training curves as a PNG drawn with PIL: one panel per group of metrics, one line per metric.

Pure plotting, no torch: ``plot_curves({"loss": {"train": [...], "val": [...]}, "score": {...}})``.
Missing values (``None``/NaN) leave gaps.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_PANEL_H, _WIDTH, _LEFT, _RIGHT, _TOP, _BOTTOM = 260, 720, 70, 20, 30, 40


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps 1, 2 or 5 × 10^k)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: Mapping[str, Sequence[float | None]],
           x_label: str, font) -> None:
    x0, x1, y0, y1 = _LEFT, _WIDTH - _RIGHT, top + _TOP, top + _PANEL_H - _BOTTOM
    values = [v for s in series.values() for v in _finite(s)]
    n = max((len(s) for s in series.values()), default=0)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 0.5
    yt = _nice_ticks(lo - pad, hi + pad)
    ylo, yhi = yt[0], yt[-1]
    xs = list(range(1, n + 1)) or [1]
    xlo, xhi = 1, max(n, 2)
    to_x = lambda i: x0 + (i - xlo) / (xhi - xlo) * (x1 - x0)  # noqa: E731
    to_y = lambda v: y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)  # noqa: E731

    draw.text((x0, top + 6), title, fill="black", font=font)
    for v in yt:
        y = to_y(v)
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        draw.text((x0 - 6, y), _fmt(v), fill="black", font=font, anchor="rm")
    step = max(1, math.ceil(len(xs) / 10))
    for i in xs[::step]:
        draw.line([(to_x(i), y1), (to_x(i), y1 + 4)], fill="black")
        draw.text((to_x(i), y1 + 6), str(i), fill="black", font=font, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, y1 + 22), x_label, fill="black", font=font, anchor="mt")

    lx = x0 + draw.textlength(title, font=font) + 30  # legend: one row in the top margin, after the title
    for k, (name, s) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        draw.line([(lx, top + 13), (lx + 20, top + 13)], fill=color, width=3)
        draw.text((lx + 26, top + 6), name, fill="black", font=font)
        lx += 26 + draw.textlength(name, font=font) + 20
        run: list[tuple[float, float]] = []
        for i, v in enumerate(s, 1):
            if v is None or not math.isfinite(v):
                run = []
                continue
            point = (to_x(i), to_y(float(v)))
            if run:
                draw.line([run[-1], point], fill=color, width=2)
            draw.ellipse([point[0] - 2, point[1] - 2, point[0] + 2, point[1] + 2], fill=color)
            run.append(point)


def plot_curves(panels: Mapping[str, Mapping[str, Sequence[float | None]]], x_label: str = "epoch") -> bytes:
    """PNG bytes: one panel per ``panels`` entry (title → {metric name → value per epoch}), stacked."""
    panels = {t: s for t, s in panels.items() if s} or {"(no data yet)": {}}
    image = Image.new("RGB", (_WIDTH, _PANEL_H * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    for k, (title, series) in enumerate(panels.items()):
        _panel(draw, k * _PANEL_H, title, series, x_label, font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["plot_curves"]

"""What ``gigaseg eval`` writes and prints: eval.json, the confusion-matrix PNG, the table."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.storage import join, write_bytes


def write_outputs(result: dict[str, Any], out: str, so: Mapping[str, Any]) -> dict[str, str | None]:
    """Write ``<out>/confusion.png`` (when any image was scored), then ``<out>/eval.json``."""
    paths = {"json": join(out, "eval.json"), "confusion_png": None}
    if result["overall"] is not None:
        paths["confusion_png"] = join(out, "confusion.png")
        title = f"{result['pred']} vs {result['gt']}: {result['counts']['ok']} image(s)"
        write_bytes(paths["confusion_png"], confusion_png(result["overall"]["confusion"], result["class_names"],
                                                          title), so)
    write_bytes(paths["json"], json.dumps({**result, "outputs": paths}, indent=2).encode(), so)
    return paths


def confusion_png(cm: Sequence[Sequence[int]], names: Sequence[str], title: str = "") -> bytes:
    """PNG of the row-normalised confusion matrix: cell ``(g, p) = M[g, p] / Σ_p M[g, p]`` as a white → blue
    heat map with its percentage (up to 40 classes), class names on both axes (rows ground truth, columns
    prediction) and each row's pixel count on the right."""
    cm = np.asarray(cm, dtype=np.float64)
    n = len(cm)
    totals = cm.sum(1)
    norm = np.divide(cm, totals[:, None], out=np.zeros_like(cm), where=totals[:, None] > 0)
    font, small = _font(14), _font(12)
    ruler = ImageDraw.Draw(Image.new("L", (1, 1)))
    width = lambda s, f=font: int(ruler.textlength(s, font=f))  # noqa: E731
    labels = [s if len(s) <= 24 else s[:21] + "..." for s in (f"{i} {names[i]}" for i in range(n))]
    cell = 52 if n <= 40 else max(6, 1600 // n)
    pad, line = 16, 20
    label_w = max(width(s) for s in labels) + 10
    left, top = pad + line + label_w, pad + (line if title else 0) + line + label_w
    right = max(width(f"{int(t):,} px", small) for t in totals) + 2 * pad
    img = Image.new("RGB", (left + n * cell + right, top + n * cell + pad + line), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    draw.text((left, top - label_w - line), "prediction", fill="black", font=font)
    _paste_text(img, "ground truth", pad, top, font, rotate=True)
    for i, label in enumerate(labels):
        draw.text((left - 6 - width(label), top + i * cell + (cell - 16) // 2), label, fill="black", font=font)
        _paste_text(img, label, left + i * cell + (cell - 16) // 2, top - 6 - width(label), font, rotate=True)
        draw.text((left + n * cell + 8, top + i * cell + (cell - 14) // 2), f"{int(totals[i]):,} px",
                  fill=(90, 90, 90), font=small)
        for j in range(n):
            v = norm[i, j]
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=_blue(v) if totals[i] else (235, 235, 235), outline=(200, 200, 200))
            if n <= 40 and totals[i]:
                text = f"{100 * v:.1f}"
                draw.text((box[0] + (cell - width(text, small)) // 2, box[1] + (cell - 14) // 2), text,
                          fill="white" if v > 0.5 else "black", font=small)
    draw.text((left, top + n * cell + 6), "cells: % of each ground-truth row (white 0, dark blue 100); grey: class "
              "absent from the ground truth", fill=(90, 90, 90), font=small)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType (Pillow ≥ 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _blue(v: float) -> tuple[int, int, int]:
    """White (0) → dark blue (1), linear in RGB (the end of matplotlib's "Blues")."""
    end = (8, 48, 107)
    return tuple(round(255 + (e - 255) * float(v)) for e in end)  # type: ignore[return-value]


def _paste_text(img: Image.Image, text: str, x: int, y: int, font, *, rotate: bool) -> None:
    """Black ``text`` at (x, y), rotated to read bottom-to-top when ``rotate``."""
    w = int(ImageDraw.Draw(img).textlength(text, font=font)) + 2
    mask = Image.new("L", (w, 18), 0)
    ImageDraw.Draw(mask).text((1, 0), text, fill=255, font=font)
    if rotate:
        mask = mask.rotate(90, expand=True)
    img.paste((0, 0, 0), (x, y, x + mask.width, y + mask.height), mask)


def format_table(result: Mapping[str, Any]) -> str:
    """Per-image rows, the overall scores and a per-class table, as plain text for the terminal."""
    f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    rows = [("image", "status", "pixels", "mIoU", "acc", "BF1", "")]
    for r in result["images"]:
        if r["status"] == "ok":
            rows.append((r["name"], "ok", f"{r['pixels']:,}", f(r["miou"]), f(r["pixel_accuracy"]),
                         f(r["boundary_f1"]["f1"]), ""))
        else:
            rows.append((r["name"], r["status"], "-", "-", "-", "-", (r["error"] or "")[:120]))
    lines = _columns(rows)
    o = result["overall"]
    if o is None:
        lines.append("overall: no image scored")
        return "\n".join(lines)
    excluded = [result["class_names"][c] for c in result["exclude"]]
    lines += [
        "",
        f"overall ({result['counts']['ok']} image(s), {o['pixels']:,} px): mIoU {f(o['miou'])}"
        + (f" (without {', '.join(excluded)})" if excluded else "")
        + f", pixel accuracy {f(o['pixel_accuracy'])}, boundary F1 {f(o['boundary_f1']['f1'])}"
        f" (tol {result['boundary']['tol_px']} px)",
        "",
    ]
    rows = [("class", "IoU", "precision", "recall", "gt px", "pred px")]
    for c in o["per_class"]:
        name = f"{c['id']} {c['name']}" + ("" if c["in_miou"] else " (excluded)")
        rows.append((name, f(c["iou"]), f(c["precision"]), f(c["recall"]), f"{c['gt_px']:,}", f"{c['pred_px']:,}"))
    return "\n".join(lines + _columns(rows))


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


# ---------------------------------------------------------------- command line



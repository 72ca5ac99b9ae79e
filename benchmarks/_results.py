"""Benchmark results: the machine line and the sections appended to ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """CPU model, logical cores, RAM and library versions of this machine."""
    cpu = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    ram = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "avx512_bf16": "avx512_bf16" in flags,
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
    }


def machine_line(m: dict[str, Any]) -> str:
    bf16 = ", avx512_bf16" if m["avx512_bf16"] else ""
    return (f"{m['cpu']}{bf16}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}, "
            f"torch {m['torch']}, ray {m['ray']}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns, readable on a terminal too."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def command_line() -> str:
    return " ".join([f"python -m benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def append_results(title: str, body: str, m: dict[str, Any]) -> None:
    """Append one section (title, date, command, machine, body) to ``benchmarks/RESULTS.md``."""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by `python -m benchmarks.<name>`; newest last. "
                           "Absolute figures are noisy on shared machines: compare ratios within one section.\n")
    with RESULTS.open("a") as f:
        f.write(f"\n## {title} — {date}\n\n`{command_line()}`  \nMachine: {machine_line(m)}\n\n{body.strip()}\n")
    print(f"\nappended to {RESULTS}")

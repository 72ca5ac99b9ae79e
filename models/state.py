"""Comparing a state dict with a model: the one place that explains why weights do not fit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

_SHOWN = 5  # names listed per category; the rest are counted


@dataclass(frozen=True)
class StateDiff:
    """How a state dict disagrees with a model's own state dict (all names sorted)."""

    missing: tuple[str, ...]  # in the model, not in the state dict
    unexpected: tuple[str, ...]  # in the state dict, not in the model
    # (name, shape in the state dict, shape in the model)
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One line per non-empty category, the first few names of each and their count."""
        lines = []
        if self.mismatched:
            shown = ", ".join(
                f"{n} checkpoint {list(a)} vs model {list(b)}"
                for n, a, b in self.mismatched[:_SHOWN]
            )
            lines.append(
                f"{len(self.mismatched)} shape mismatches: {shown}{_more(self.mismatched)}"
            )
        if self.missing:
            shown = ", ".join(self.missing[:_SHOWN])
            lines.append(
                f"{len(self.missing)} missing from checkpoint: {shown}{_more(self.missing)}"
            )
        if self.unexpected:
            shown = ", ".join(self.unexpected[:_SHOWN])
            lines.append(
                f"{len(self.unexpected)} unexpected in checkpoint: {shown}{_more(self.unexpected)}"
            )
        return "\n".join(lines)


def _more(items: tuple[object, ...]) -> str:
    return f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""


def diff_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> StateDiff:
    """Compare names and shapes of ``state`` (e.g. a checkpoint) with ``expected`` (a model's)."""
    names, wanted = set(state), set(expected)
    mismatched = tuple(
        (n, tuple(state[n].shape), tuple(expected[n].shape))
        for n in sorted(names & wanted)
        if state[n].shape != expected[n].shape
    )
    return StateDiff(
        missing=tuple(sorted(wanted - names)),
        unexpected=tuple(sorted(names - wanted)),
        mismatched=mismatched,
    )

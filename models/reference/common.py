"""Reading a reference implementation's checkpoint and renaming its tensors, refusing what is not recognised.

A reference checkpoint is a ``torch.save``d state dict. It is read with ``torch.load(weights_only=True)`` only,
which unpickles tensors and plain containers and nothing else. ``Keys`` then takes the tensors the
conversion names, one by one; every key of the file must be either taken or ignored for a stated reason
(aliases of taken tensors, the ImageNet classifier of a backbone, a training loss's weights), and every key
the conversion asks for must be there. Otherwise the file is refused with both lists.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable, Mapping

import torch

from models.errors import CheckpointError
from models.state import diff_state

_SHOWN = 8  # keys listed per category in an error; the rest are counted
#: Wrappers around a model's own names: DataParallel's ``module.`` and MagNet's training wrapper's ``model.``.
WRAPPERS = ("module.", "model.")


def looks_like_torch_file(data: bytes) -> bool:
    """Whether ``data`` starts as a ``torch.save`` file does: a zip archive (torch ≥ 1.6) or a pickle (older)."""
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def read_torch_state(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The state dict in a ``torch.save`` file, read with ``torch.load(weights_only=True)``; a dict holding it
    under ``state_dict`` (as many training scripts save) is unwrapped. ``where`` names the file in errors."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{where}: not a PyTorch checkpoint that torch.load(weights_only=True) can read ({first}); gigaseg "
            "never unpickles anything else, so convert it to a plain state dict where it was made") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(obj)[:_SHOWN] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{where}: holds a {type(obj).__name__}{f' with keys {keys}' if keys else ''}, not a state dict "
            "(names → tensors); save the model's state_dict()")
    return {str(k): v for k, v in obj.items()}


def unwrap(state: Mapping[str, torch.Tensor], keep: Callable[[str], bool] = lambda k: True) -> dict[str, torch.Tensor]:
    """``state`` with a wrapper prefix (``WRAPPERS``) removed where every key ``keep`` selects carries it
    (repeatedly: ``module.model.x`` → ``x``); other keys stay as they are."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPERS:
            kept = [k for k in state if keep(k)]
            if kept and all(k.startswith(prefix) for k in kept):
                state = {k.removeprefix(prefix) if keep(k) else k: v for k, v in state.items()}
                changed = True
    return state


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


class Keys:
    """The tensors of one reference file, taken by name (``take``) or set aside (``ignore``), then ``check``ed:
    a key neither taken nor ignored is unexpected, a key asked for and absent is missing."""

    def __init__(self, state: Mapping[str, torch.Tensor], where: str, what: str) -> None:
        self.state, self.where, self.what = dict(state), where, what
        self.taken: set[str] = set()
        self.missing: list[str] = []
        self.ignored: dict[str, str] = {}  # key → why

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        """The tensor named ``key`` (recorded as missing when absent: ``check`` then refuses the file)."""
        if key not in self.state:
            self.missing.append(key)
            return torch.empty(0)
        self.taken.add(key)
        return self.state[key]

    def take_or(self, key: str, default: torch.Tensor, why: str) -> torch.Tensor:
        """``key``'s tensor, or ``default`` when the file lacks it (``why`` says why that is harmless)."""
        if key in self.state:
            return self.take(key)
        self.ignored[f"{key} (absent)"] = why
        return default

    def ignore(self, match: Callable[[str], bool], why: str) -> None:
        """Set aside every key ``match`` selects (not taken), recording ``why`` for the report."""
        for k in self.state:
            if match(k) and k not in self.taken:
                self.ignored[k] = why

    def check(self) -> None:
        unexpected = set(self.state) - self.taken - set(self.ignored)
        if self.missing or unexpected:
            lines = [f"{self.where}: not {self.what} as gigaseg knows it"]
            if unexpected:
                lines.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
            if self.missing:
                lines.append(f"{len(self.missing)} missing key(s): {_listed(self.missing)}")
            raise CheckpointError("; ".join(lines) + ". Check --from and the order of the files")

    def same(self, key: str, other: str, why: str) -> None:
        """Ignore ``key`` as an alias of the taken ``other`` (the same tensor saved twice), after checking it is."""
        if key in self.state and other in self.state:
            a, b = self.state[key], self.state[other]
            if a.shape != b.shape or not (a.is_meta or b.is_meta or torch.equal(a, b)):  # meta: shapes only
                raise CheckpointError(
                    f"{self.where}: {key} should equal {other} (in the reference they are one layer, saved twice) "
                    "but differs; the file was edited or comes from another model")
            self.ignored[key] = why


def fit(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str,
        origin: Mapping[str, str]) -> None:
    """Refuse ``state`` unless its names and shapes are exactly ``expected``'s (a model's state dict); a
    mismatch names the gigaseg tensor and the reference key it came from (``origin``)."""
    diff = diff_state(state, expected)
    if diff.ok:
        return
    lines = []
    if diff.mismatched:
        lines.append(", ".join(f"{origin.get(n, n)} {list(a)} (expected {list(b)} for {n})"
                               for n, a, b in diff.mismatched[:_SHOWN]))
    if diff.missing:
        lines.append(f"not filled: {_listed(diff.missing)}")
    if diff.unexpected:
        lines.append(f"not in the model: {_listed(diff.unexpected)}")
    raise CheckpointError(f"{where}: tensors do not fit the architecture: " + "; ".join(lines))


__all__ = ["WRAPPERS", "Keys", "fit", "looks_like_torch_file", "read_torch_state", "unwrap"]

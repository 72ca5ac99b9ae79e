"""What a training task and the loop agree on: the task's registry entry (``Task``), the plan the driver resolves
and every worker receives (``TrainPlan``), and what a task builds on each worker (``Trainee``).

Imports flow one way: ``jobs.train.driver`` → ``jobs.train.loop`` → ``jobs.train.tasks`` → this module. A task
module knows nothing of the loop; the loop knows no task by name (``jobs.train.tasks.TASKS``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from jobs.train.spec import TrainSpec
from jobs.train.store import FINAL


class ModelPlan(Protocol):
    """A task's model section of the plan: what fixes the trained model. ``to_dict`` is what ``latest.json``
    records, so a resume with another model (or other inputs) is refused."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrainPlan:
    """What the driver resolved from the spec and the dataset, sent to every worker (``to_dict``/``from_dict``).

    ``model`` is the task's ``ModelPlan``; ``normalization`` is the dataset's, or the frozen segmenter's (the
    refiner), or the local checkpoint's (FCtL), or the ImageNet encoder's that ``model.init`` starts from."""

    model: ModelPlan
    class_names: list[str]
    class_colors: list[list[int]]
    normalization: dict[str, list[float]]
    ignore_index: int
    train_names: list[str]
    val_names: list[str]
    exclude_classes: list[int]
    class_weights: list[float] | None = None  # loss.class_weights resolved against the dataset

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "class_names": self.class_names, "class_colors": self.class_colors,
                "normalization": self.normalization, "ignore_index": self.ignore_index,
                "train_names": self.train_names, "val_names": self.val_names,
                "exclude_classes": self.exclude_classes, "class_weights": self.class_weights}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], read_model: Callable[[Mapping[str, Any]], ModelPlan]) -> TrainPlan:
        return cls(**{**data, "model": read_model(data["model"])})


@dataclass(frozen=True)
class Trainee:
    """What a task builds on every worker for the loop. ``forward(model, batch) → (logits, target)``;
    ``validation(module, rank, world)`` yields ``(logits, target, baseline probabilities or None)`` over this
    rank's share."""

    model: Any
    batches: Callable[[int, int], Iterator]
    forward: Callable[[Any, Any], tuple[Any, Any]]
    weights: Callable[[Any], bytes]
    validation: Callable[[Any, int, int], Iterator[tuple[Any, Any, Any]]]
    baseline: bool = False  # validation also scores the frozen segmenter alone (segmenter_miou)
    # The task's own loss, ``(out, target) → {term name: scalar}``, summed (each term logged as train_<name>);
    # None: the spec's loss on the logits (and the auxiliary heads' logits).
    loss_terms: Callable[[Any, Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Task:
    """One entry of ``jobs.train.tasks.TASKS``.

    - ``plan(spec, dataset_info, problems) → (ModelPlan, normalization dict)`` on the driver: checks the spec
      against the dataset and the checkpoints it names, appending one line per problem to ``problems``;
    - ``read_model(dict) → ModelPlan``: the inverse of ``ModelPlan.to_dict``, on the workers;
    - ``trainee(spec, plan, rank, device, weights) → Trainee`` on every worker (``weights``: a resume's);
    - ``weights``: the file name of the trained weights (each epoch's and the final one).
    """

    plan: Callable[[TrainSpec, Any, list[str]], tuple[ModelPlan, dict[str, list[float]]]]
    read_model: Callable[[Mapping[str, Any]], ModelPlan]
    trainee: Callable[[TrainSpec, TrainPlan, int, Any, bytes | None], Trainee]
    weights: str = field(default=FINAL)


__all__ = ["ModelPlan", "Task", "TrainPlan", "Trainee"]

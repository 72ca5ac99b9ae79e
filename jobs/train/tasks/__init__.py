"""The training tasks, one module each, registered here: ``spec.task`` → its ``jobs.train.contract.Task``."""

from __future__ import annotations

from jobs.train.contract import Task
from jobs.train.tasks import fctl, magnet_refiner, segmenter

TASKS: dict[str, Task] = {
    "segmenter": segmenter.TASK,
    "magnet_refiner": magnet_refiner.TASK,
    "fctl": fctl.TASK,
}

__all__ = ["TASKS"]

"""The segmentation frameworks, one module each behind one contract (``pipeline.frameworks.base.Framework``),
registered here by the name ``model.framework`` gives. Adding one: its module, its line below, and its section
in the job spec (``jobs.spec``)."""

from __future__ import annotations

from pipeline.frameworks.base import Framework
from pipeline.frameworks.fctl import Fctl
from pipeline.frameworks.magnet import Magnet
from pipeline.frameworks.segment import Segment

FRAMEWORKS: dict[str, type[Framework]] = {
    "segment": Segment,
    "magnet": Magnet,
    "fctl": Fctl,
}

__all__ = ["FRAMEWORKS", "Framework"]

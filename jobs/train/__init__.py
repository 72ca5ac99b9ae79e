"""``gigaseg train``: data-parallel training with Ray Train, resumable from per-epoch checkpoints.

The package, in the order its imports flow:

- ``cli``: the ``gigaseg train`` and ``gigaseg import-pairs`` commands;
- ``driver``: the spec checked against the dataset into a ``TrainPlan`` (``make_plan``), Ray, the ``TorchTrainer``;
- ``loop``: the loop every Ray Train worker runs, the same for every task;
- ``tasks``: one module per task (``segmenter`` with its PointRend point head, ``magnet_refiner``, ``fctl``),
  registered in ``tasks.TASKS``;
- ``contract`` (``Task``, ``TrainPlan``, ``Trainee``), ``common`` (normalisation, loss, scores), ``spec`` (the
  training spec), ``store`` (checkpoints and ``latest.json``).
"""

from jobs.train.driver import TrainResult, make_plan, train

__all__ = ["TrainResult", "make_plan", "train"]

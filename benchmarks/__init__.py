"""Benchmarks: not tests. Each prints a table and appends it to ``benchmarks/RESULTS.md``.

Run from the repository root: ``python -m benchmarks.pipeline_efficiency`` or
``python -m benchmarks.memory_scaling`` (``--quick`` for a run of about two minutes, ``--help`` for options).

Importing the package sets the environment a local Ray run needs (before any module imports Ray).
"""

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

"""``gigaseg status`` and the weights the workers load, against outputs laid out in the test."""

from __future__ import annotations

import hashlib

from jobs.plan import stage_weights
from jobs.report import status
from pipeline.blocks import Block
from pipeline.output.layout import JobLayout
from pipeline.output.state import mark, mark_block
from pipeline.plan import OutputPlan
from pipeline.storage import write_json
from pipeline.tiling import Window


def test_status_counts_the_tiles_of_every_stage(tmp_path):
    """A MagNet image in progress: stage 0 (4 tiles, one block) done, stage 1 (16 tiles, 4 blocks of 4) 6 done
    in two blocks; ``tiles`` counts both stages."""
    layout = JobLayout(str(tmp_path))
    write_json(layout.plan_url, {"images": ["scene"]})
    out = layout.image("scene")
    mark(out, fingerprint="f", complete=False, shape=[64, 64], tiles=4 + 16)
    mark_block(out, 0, Block((0, 0), Window(0, 0, 32, 32)), owned=4, tiles=4)
    mark_block(out, 1, Block((0, 0), Window(0, 0, 32, 32)), owned=4, tiles=6)
    mark_block(out, 1, Block((0, 1), Window(0, 32, 32, 32)), owned=2, tiles=4)
    [row] = status(str(tmp_path), {})["images"]
    assert (row["status"], row["tiles_done"], row["tiles"]) == ("in progress", 4 + 6, 20)


def test_a_torn_weights_copy_is_replaced_not_taken(tmp_path):
    """The workers' copy of the checkpoint is named by its content hash: a copy cut short by a killed driver
    (a plain write, as before atomic writes) must be rewritten by the next run, not accepted by name."""
    data = bytes(range(256)) * 1000
    output = OutputPlan(str(tmp_path))
    [ref] = stage_weights(output, {"model": data}).values()
    assert ref.url.endswith(f"model-{hashlib.sha256(data).hexdigest()[:16]}.safetensors")
    with open(ref.url, "wb") as f:  # what a copy killed midway leaves under the final name
        f.write(data[:1000])
    assert stage_weights(output, {"model": data})["model"] == ref
    with open(ref.url, "rb") as f:
        assert f.read() == data

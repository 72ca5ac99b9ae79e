"""What a job writes: every path of the output layout (``layout``), the per-image state that makes runs
resumable (``state``), and the arrays (``arrays``: masks, extras, tile stores, stage maps)."""

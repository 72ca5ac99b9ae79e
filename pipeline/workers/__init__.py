"""Where the work runs: the Ray actors that run tiles (``worker``: reads, predicts, writes; ``predictor``: a
network on a device; ``dispatch``: the pool and its bounded in-flight calls), the Ray cluster they run on
(``ray_cluster``) and the Dask scheduler that blends (``dask_cluster``)."""

"""The data path, from an archive of images to OME-Zarr masks; no process holds a whole image.

    sources/     find the images and read them lazily (``discover``, ``formats``, ``pixels``, ``convert``)
    pyramid      ingest a source as a Zarr pyramid, or use an OME-Zarr pyramid in place
    tiling       the tile grid and the blend windows (pure geometry)
    reader       windows of a pyramid level, padded past the image (what a tile reads)
    frameworks/  segment, MagNet, FCtL: which stages an image needs, what a tile reads, what the model does
    workers/     the Ray actors that read, predict and write tiles, their pool, the Ray and Dask clusters
    blend        the tiles blended chunk by chunk into probabilities, labels and the label pyramid (Dask)
    stages       how a stage's blend becomes its result and the map the next stage reads
    engine       one job: every image through prepare → tiles → finish, overlapped
    output/      the output layout, per-image state, and the arrays written
    plan         a job as typed objects (built from a spec by ``jobs.plan``)
    storage      URLs → filesystems and Zarr stores; whole-file reads and atomic writes
    errors       the data path's errors (their root: ``models.errors``)

Beside the inference path, for training and scoring (the inference path imports neither): ``training/``
(datasets and crops), ``evaluation/`` (masks, palettes, metrics), ``synth/`` (the synthetic archive).
"""

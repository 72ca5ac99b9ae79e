"""Where images come from: an archive's images found by name and metadata alone (``discover``), each described
and opened lazily whatever its format (``formats``: TIFF, Zarr, OME-Zarr, PNG/JPEG), its pixels as a chunked Dask
array (``pixels``), and the one rule that turns any supported block into RGB uint8 (``convert``)."""

"""Scoring masks out of core: masks of any size opened lazily (``masks``), colour-coded ground truth decoded to
class ids (``palette``), and the confusion matrix, mIoU and boundary F1 as Dask graphs (``metrics``)."""

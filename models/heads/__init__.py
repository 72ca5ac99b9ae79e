"""Segmentation heads, one module each, all behind the contract in ``models.heads.base``."""

from models.heads.base import EncoderSpec, Head
from models.heads.deeplab import DeepLabV3Head
from models.heads.dupsampling import DUpsamplingHead, compress_labels, fit_dupsampling
from models.heads.fcn import FCNHead
from models.heads.fcn8s import FCN8sHead
from models.heads.fpn import FPNDecoder
from models.heads.magnet_fpn import MagnetFPNHead
from models.heads.ocr import OCRHead
from models.heads.segnet import SegNetDecoder
from models.heads.unet import UNetDecoder

__all__ = [
    "DUpsamplingHead",
    "DeepLabV3Head",
    "EncoderSpec",
    "FCN8sHead",
    "FCNHead",
    "FPNDecoder",
    "Head",
    "MagnetFPNHead",
    "OCRHead",
    "SegNetDecoder",
    "UNetDecoder",
    "compress_labels",
    "fit_dupsampling",
]

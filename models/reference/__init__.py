"""Published checkpoints of the seed methods' reference implementations, converted to gigaseg's formats.

One module per source (``--from`` of ``gigaseg import-checkpoint``): ``magnet`` (VinAIResearch/MagNet: the
ResNet-50 FPN segmenter and the refinement modules), ``fctl`` (liqiokkk/FCtL, main branch: FCN-8s on VGG-16
and the correlation module), ``torchvision`` (ImageNet ResNets in pytorch/vision's layout, as encoders).
Files are read with ``torch.load(weights_only=True)`` only (``common.read_torch_state``); every key is mapped
or set aside for a stated reason, and anything else refuses the file, listing what was unexpected or missing.
"""

from models.reference.common import Keys, looks_like_torch_file, read_torch_state

#: ``--from`` names, in the order the command line lists them.
SOURCES = ("magnet", "fctl", "torchvision-resnet")

__all__ = ["SOURCES", "Keys", "looks_like_torch_file", "read_torch_state"]

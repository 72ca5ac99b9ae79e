"""State dicts in the layout of the reference implementations' published files: their key names and shapes,
seeded random values (``torch.randn``), written down from reading the reference code:

- torchvision ResNets (pytorch/vision ``torchvision/models/resnet.py``);
- MagNet's ``ResnetFPN`` inside its backbone trainer's ``FullModel`` (keys ``model.``, the loss's class weights
  under ``loss.``) and ``RefinementMagNet(n, use_bn=True)`` (VinAIResearch/MagNet ``magnet/model``);
- FCtL's ``FCN8`` in modes 1, 2, 3 saved through ``DataParallel`` (keys ``module.``; liqiokkk/FCtL
  ``models/fcn.py``, ``models/FCtL.py``), with torchvision's VGG-16 it takes its layers from.

At ``width`` 64 the shapes are those of the published files; tests use small widths. ``device="meta"`` gives
the shapes without memory. Aliases (a layer reachable under two names) share one tensor, as ``torch.save``
stores them. The harness outside the repository checks these layouts against the reference code itself.
"""

from __future__ import annotations

import torch

Shapes = dict[str, tuple[int, ...]]


def _bn(prefix: str, c: int) -> Shapes:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def resnet_shapes(blocks: tuple[int, ...], bottleneck: bool, width: int = 64, prefix: str = "",
                  fc: int | None = 1000) -> Shapes:
    """torchvision's ResNet: conv1, bn1, layer1..4 of BasicBlocks or Bottlenecks, fc."""
    s: Shapes = {f"{prefix}conv1.weight": (width, 3, 7, 7), **_bn(f"{prefix}bn1", width)}
    expansion = 4 if bottleneck else 1
    inplanes = width
    for stage, n in enumerate(blocks):
        planes = width * 2**stage
        for b in range(n):
            p = f"{prefix}layer{stage + 1}.{b}"
            if bottleneck:
                s.update({f"{p}.conv1.weight": (planes, inplanes, 1, 1), **_bn(f"{p}.bn1", planes),
                          f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes),
                          f"{p}.conv3.weight": (planes * 4, planes, 1, 1), **_bn(f"{p}.bn3", planes * 4)})
            else:
                s.update({f"{p}.conv1.weight": (planes, inplanes, 3, 3), **_bn(f"{p}.bn1", planes),
                          f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes)})
            if b == 0 and (stage > 0 or inplanes != planes * expansion):
                s.update({f"{p}.downsample.0.weight": (planes * expansion, inplanes, 1, 1),
                          **_bn(f"{p}.downsample.1", planes * expansion)})
            inplanes = planes * expansion
    if fc:
        s.update({f"{prefix}fc.weight": (fc, inplanes), f"{prefix}fc.bias": (fc,)})
    return s


RESNETS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False), "resnet50": ((3, 4, 6, 3), True)}


def magnet_fpn_shapes(num_classes: int = 7, width: int = 64) -> Shapes:
    """MagNet's ``ResnetFPN`` state dict as its backbone trainer saves it (``model.`` + ``loss.``)."""
    s = resnet_shapes(*RESNETS["resnet50"], width=width, prefix="resnet_backbone.", fc=None)
    p, level = 4 * width, 2 * width  # 256, 128
    for name, c in (("toplayer", 32 * width), ("latlayer1", 16 * width), ("latlayer2", 8 * width),
                    ("latlayer3", 4 * width)):
        s.update({f"{name}.weight": (p, c, 1, 1), f"{name}.bias": (p,)})
    for i in range(1, 5):
        s.update({f"smooth{i}_1.weight": (p, p, 3, 3), f"smooth{i}_1.bias": (p,),
                  f"smooth{i}_2.weight": (level, p, 3, 3), f"smooth{i}_2.bias": (level,)})
    s.update({"classify.weight": (num_classes, 4 * level, 3, 3), "classify.bias": (num_classes,)})
    return {**{f"model.{k}": v for k, v in s.items()}, "loss.criterion.weight": (num_classes,)}


def magnet_refiner_shapes(num_classes: int = 7, width: int = 64) -> Shapes:
    """``RefinementMagNet(num_classes, use_bn=True)``: bn0, two 3×3 convs, two Bottlenecks(·, 32), seg_conv."""
    c, mid, out = num_classes, width // 2, 2 * width
    s: Shapes = {**_bn("bn0", 2 * c), "conv1.weight": (width, 2 * c, 3, 3), **_bn("bn1", width),
                 "conv2.weight": (width, width, 3, 3), **_bn("bn2", width)}
    for b, inplanes in ((0, width), (1, out)):
        p = f"residual.{b}"
        s.update({f"{p}.conv1.weight": (mid, inplanes, 1, 1), **_bn(f"{p}.bn1", mid),
                  f"{p}.conv2.weight": (mid, mid, 3, 3), **_bn(f"{p}.bn2", mid),
                  f"{p}.conv3.weight": (out, mid, 1, 1), **_bn(f"{p}.bn3", out)})
    s.update({"residual.0.downsample.0.weight": (out, width, 1, 1), **_bn("residual.0.downsample.1", out),
              "seg_conv.weight": (c, out, 1, 1)})
    return s


# torchvision vgg16.features indices of the 13 convs, and where FCN8 cuts them (pool3 | pool4 | pool5)
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_CUTS = {"pool3": 0, "pool4": 17, "pool5": 24}


def _vgg_conv_shapes(width: int) -> list[tuple[int, tuple[int, ...]]]:
    chans = [3] + [width] * 2 + [2 * width] * 2 + [4 * width] * 3 + [8 * width] * 6
    return [(i, (chans[j + 1], chans[j], 3, 3)) for j, i in enumerate(VGG_CONVS)]


def fctl_shapes(mode: int, num_classes: int = 2, width: int = 64) -> tuple[Shapes, dict[str, str]]:
    """FCtL's ``FCN8(num_classes, mode)`` saved through DataParallel: shapes, and aliases (key → the key whose
    tensor it shares)."""
    s: Shapes = {}
    aliases: dict[str, str] = {}
    c5 = 8 * width
    fc = 8 * c5
    for i, shape in _vgg_conv_shapes(width):
        part = max((p for p, o in _CUTS.items() if o <= i), key=_CUTS.get)
        own = f"{part}.{i - _CUTS[part]}"
        s.update({f"{own}.weight": shape, f"{own}.bias": (shape[0],)})
        for param in ("weight", "bias"):
            aliases[f"vgg.features.{i}.{param}"] = f"{own}.{param}"
            if mode == 2:
                aliases[f"big_{own}.{param}"] = f"{own}.{param}"
    s.update({"vgg.classifier.0.weight": (fc, c5 * 49), "vgg.classifier.0.bias": (fc,),
              "vgg.classifier.3.weight": (fc, fc), "vgg.classifier.3.bias": (fc,),
              "vgg.classifier.6.weight": (1000, fc), "vgg.classifier.6.bias": (1000,)})
    k = num_classes
    s.update({"adj_pool3.weight": (k, 4 * width, 1, 1), "adj_pool3.bias": (k,),
              "adj_pool4.weight": (k, 8 * width, 1, 1), "adj_pool4.bias": (k,),
              "output.0.weight": (fc, c5, 7, 7), "output.0.bias": (fc,), "output.3.weight": (fc, fc, 1, 1),
              "output.3.bias": (fc,), "output.6.weight": (k, fc, 1, 1), "output.6.bias": (k,),
              "up_output.weight": (k, k, 4, 4), "up_pool4_out.weight": (k, k, 4, 4), "up_final.weight": (k, k, 16, 16)})
    if mode in (2, 3):
        a = "big_attention"
        for suffix in ("", "_1", "_2"):
            s.update({f"{a}.conv_value{suffix}.weight": (c5, c5, 1, 1),
                      f"{a}.conv_query{suffix}.weight": (c5, c5, 1, 1), f"{a}.conv_query{suffix}.bias": (c5,),
                      f"{a}.conv_key{suffix}.weight": (c5, c5, 1, 1), f"{a}.conv_key{suffix}.bias": (c5,),
                      f"{a}.gamma{suffix}": (1,)})
        for name in ("in_1", "in_2", "in_3", "out_1", "out_2", "out_3"):
            s.update({f"{a}.{name}.weight": (c5, c5, 1, 1), f"{a}.{name}.bias": (c5,)})
        s.update({f"{a}.trans.weight": (3 * c5, 3 * c5, 1, 1), f"{a}.trans.bias": (3 * c5,)})
    return {f"module.{k}": v for k, v in s.items()}, {f"module.{k}": f"module.{v}" for k, v in aliases.items()}


def materialise(shapes: Shapes, seed: int = 0, aliases: dict[str, str] | None = None,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random tensors of ``shapes`` (``num_batches_tracked`` as int64 counts, running variances
    positive); ``aliases`` share their target's tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if device == "meta":
            dtype = torch.long if name.endswith("num_batches_tracked") else torch.float32
            out[name] = torch.empty(shape, dtype=dtype, device="meta")
        elif name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(int(torch.randint(0, 1000, (), generator=g)))
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) + 0.5
        else:
            out[name] = torch.randn(shape, generator=g) * 0.1
    for alias, target in (aliases or {}).items():
        out[alias] = out[target]
    return out


__all__ = ["RESNETS", "fctl_shapes", "magnet_fpn_shapes", "magnet_refiner_shapes", "materialise", "resnet_shapes"]

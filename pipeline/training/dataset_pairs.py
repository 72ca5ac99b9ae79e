"""Pair the images of a training archive with their masks by a naming rule (``match_pairs``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputNotFoundError
from pipeline.sources.discover import ImageRef, discover


@dataclass(frozen=True)
class Pair:
    name: str
    image: ImageRef
    mask: ImageRef


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    if pattern.count("{id}") != 1:
        raise ValueError(f"pattern {pattern!r} must hold '{{id}}' exactly once, e.g. '{{id}}_sat.jpg'")
    head, tail = pattern.split("{id}")
    return re.compile(re.escape(head) + "(?P<id>.+?)" + re.escape(tail))


def _relative(url: str, root: str) -> str:
    return url[len(root.rstrip("/")) + 1 :] if url != root else url.rsplit("/", 1)[-1]


def match_pairs(
    images_url: str,
    masks_url: str | None = None,
    *,
    image_pattern: str = "{id}_sat.jpg",
    mask_pattern: str = "{id}_mask.png",
    storage_options: Mapping[str, Any] | None = None,
) -> list[Pair]:
    """Image/mask pairs by a naming rule: image ``image_pattern`` ↔ mask ``mask_pattern`` with the same id.

    Patterns are paths relative to ``images_url`` / ``masks_url`` (default: the images' folder) with ``{id}``
    standing for any text. Sorted by id; an image without its mask is an error listing them.
    """
    masks_url = masks_url or images_url
    rx_img, rx_mask = _pattern_regex(image_pattern), _pattern_regex(mask_pattern)
    glob = lambda p: p.replace("{id}", "*")  # noqa: E731
    images = {}
    for ref in discover(images_url, [glob(image_pattern)], storage_options):
        m = rx_img.fullmatch(_relative(ref.url, images_url))
        if m:
            images[m["id"]] = ref
    masks = {}
    for ref in discover(masks_url, [glob(mask_pattern)], storage_options):
        m = rx_mask.fullmatch(_relative(ref.url, masks_url))
        if m:
            masks[m["id"]] = ref
    if not images:
        raise InputNotFoundError(f"{images_url}: no image matches {image_pattern!r}; check --image-pattern.")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise InputNotFoundError(
            f"{len(missing)} image(s) under {images_url} have no mask {mask_pattern!r} under {masks_url}, e.g. "
            f"{[mask_pattern.format(id=i) for i in missing[:5]]}; add the masks or remove those images."
        )
    pairs, names = [], set()
    for i in sorted(images):
        name = re.sub(r"[^A-Za-z0-9._-]", "_", i.replace("/", "__")) or "image"
        if name in names:
            raise ValueError(f"two ids map to the sample name {name!r}; rename one of the images.")
        names.add(name)
        pairs.append(Pair(name, images[i], masks[i]))
    return pairs

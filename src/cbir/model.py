"""RetrievalNet = backbone feature map -> pooling -> L2 (-> whitening -> L2).

``build_model("efficientnet_lite0", pooling="gem")`` builds one from names; ``save_model`` /
``load_model`` persist it (weights + the plain-data config that rebuilds it) atomically, with a
format stamp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import OFFLINE_LITE, build_backbone
from .fileio import FormatError, atomic_write_with, check_format
from .pooling import Pooling, build_pooling
from .model_names import is_model_file, parse_pooling  # noqa: F401 (re-exported; torch-free module)
from .published import (PUBLISHED, CirtorchParts, cirtorch_skeleton, is_cirtorch, read_checkpoint, read_cirtorch,
                        read_published)

__all__ = [
    "RetrievalNet", "ModelSpec", "build_model", "from_cirtorch", "save_model", "load_model", "is_model_file",
    "parse_pooling", "MODEL_FORMAT", "MODEL_FORMAT_VERSION",
]

MODEL_FORMAT = "cbir-model"
MODEL_FORMAT_VERSION = 1

# ImageNet normalisation used by every backbone we build (timm and torchvision defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RetrievalNet(nn.Module):
    """Images (B,3,H,W), ImageNet-normalised -> L2-normalised descriptors (B,D).

    ``pool(x)``: backbone + pooling + L2 (the space in which scales are combined);
    ``head(v)``: optional ``whiten`` (nn.Linear) then L2; ``forward = head ∘ pool``.
    """

    def __init__(self, backbone: nn.Module, pooling: Pooling, channels: int, config: dict[str, Any], whiten: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.channels = int(channels)
        self.whiten = whiten
        self.config = dict(config)
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    @property
    def pooled_dim(self) -> int:
        k = getattr(self.pooling, "k", None)
        return int(k) if self.pooling.name == "bow" else self.channels

    @property
    def dim(self) -> int:
        return int(self.whiten.out_features) if self.whiten is not None else self.pooled_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map (B, C, h, w)."""
        return self.backbone(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B, pooled_dim) L2-normalised pooled vector (before whitening)."""
        v = self.pooling(self.backbone(x)).float()
        return F.normalize(v, dim=-1)

    def head(self, v: torch.Tensor) -> torch.Tensor:
        """Whitening (if any) and L2 on pooled vectors: (B, pooled_dim) -> (B, dim)."""
        if self.whiten is None:
            return v
        return F.normalize(self.whiten(v.to(self.whiten.weight.dtype)).float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))

    def set_whitening(self, whiten: nn.Linear | None, description: Any = None) -> None:
        """Attach (or remove) a whitening layer; ``description`` goes into ``describe()``."""
        if whiten is not None and whiten.in_features != self.pooled_dim:
            raise ValueError(f"whitening expects {whiten.in_features}-D input, pooling gives {self.pooled_dim}-D")
        self.whiten = whiten
        self.config["whitening"] = None if whiten is None else {
            "in": whiten.in_features, "out": whiten.out_features, "about": description,
        }

    def multiscale_p(self) -> float:
        return self.pooling.multiscale_p()

    def describe(self) -> dict[str, Any]:
        """Plain-data settings for descriptor meta (``Descriptors.meta``)."""
        whitening = self.config.get("whitening")
        return {
            "model": self.config["model"],
            "weights": self.config.get("weights_about", self.config.get("weights")),
            "pooling": self.pooling.name,
            "pooling_params": self.pooling.params(),
            "whitening": None if whitening is None else (whitening.get("about") or f"linear {whitening['in']}->{whitening['out']}"),
            "dim": self.dim,
        }


def build_model(
    model: str = "efficientnet_lite0",
    pooling: str = "gem",
    weights: str | os.PathLike[str] | None = "default",
    whiten: nn.Linear | None = None,
    **pooling_kw: Any,
) -> RetrievalNet:
    """RetrievalNet from names: backbone ``model`` (timm/torchvision name) + ``pooling`` (+ its params).

    ``pooling_kw`` go to the pooling (e.g. ``p=3.0``; ``per_channel=True`` for per-channel GeM;
    ``k=``/``soft=`` for BoW). The result is in eval mode. A published network's name
    (``cbir.published.PUBLISHED``, e.g. ``gl18-tl-resnet101-gem-w``) loads that network (downloaded once).
    """
    if model in PUBLISHED:
        return from_cirtorch(read_published(model))
    backbone, channels = build_backbone(model, weights)
    kw = dict(pooling_kw)
    if pooling.lower() == "gem" and kw.pop("per_channel", False):
        kw["channels"] = channels
    if pooling.lower() == "bow":
        kw["channels"] = channels
    pool = build_pooling(pooling, **kw)
    if isinstance(weights, (str, os.PathLike)) and weights not in ("default", "imagenet", "hub", "none"):
        weights_about = f"file:{Path(weights).name}"
    elif weights == "default" and model in OFFLINE_LITE:
        weights_about = "imagenet (offline: " + OFFLINE_LITE[model][0].replace("_", "-") + ")"
    elif weights in ("default", "imagenet", "hub"):
        weights_about = "imagenet (library download)"
    else:
        weights_about = "none"
    config = {
        "model": model,
        "pooling": pool.name,
        "pooling_kw": kw,
        "weights_about": weights_about,
        "whitening": None,
    }
    net = RetrievalNet(backbone, pool, channels, config)
    if whiten is not None:
        net.set_whitening(whiten)
    return net.eval()


def from_cirtorch(parts: CirtorchParts) -> RetrievalNet:
    """RetrievalNet of a cnnimageretrieval-pytorch network (``cbir.published``): features -> GeM -> L2
    (-> FC whitening -> L2), its mean/std, and the learned whitening of its meta as ``whiten``."""
    net = RetrievalNet(parts.backbone, parts.pooling, parts.channels, parts.config)
    net.mean, net.std = parts.mean, parts.std
    if parts.lw is not None:
        net.set_whitening(parts.lw, parts.lw_about)
    return net.eval()


def save_model(net: RetrievalNet, path: str | os.PathLike[str]) -> None:
    """Write ``net`` (config + state dict, format-stamped) atomically to ``path``."""
    blob = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "config": dict(net.config, pooling_params=net.pooling.params()),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    atomic_write_with(path, lambda tmp: torch.save(blob, tmp))


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> RetrievalNet:
    """Rebuild a RetrievalNet saved by ``save_model`` (no download: weights come from the file)."""
    path = Path(path)
    try:
        blob = read_checkpoint(path)  # weights_only (numpy arrays allowed, nothing that runs code)
    except FormatError as exc:
        raise FormatError(f"{path} is not a cbir model file (unreadable: {exc})") from exc
    if is_cirtorch(blob):  # a cnnimageretrieval-pytorch network (cbir.published)
        return from_cirtorch(read_cirtorch(path, blob=blob))
    check_format(blob, MODEL_FORMAT, (MODEL_FORMAT_VERSION,), path, what="cbir model")
    cfg = blob["config"]
    kw = dict(cfg.get("pooling_kw", {}))
    kw.pop("channels", None) if cfg["pooling"] in ("bow",) else None
    if cfg.get("cirtorch"):  # saved from a cnnimageretrieval-pytorch network
        net = from_cirtorch(cirtorch_skeleton({**cfg, "whitening": None}))
    else:
        backbone, channels = build_backbone(cfg["model"], "none")
        if cfg["pooling"] == "bow":
            kw["channels"] = channels
        pool = build_pooling(cfg["pooling"], **kw)
        net = RetrievalNet(backbone, pool, channels, {**cfg, "whitening": None})
    state = blob["state_dict"]
    if "whiten.weight" in state:
        w = state["whiten.weight"]
        net.set_whitening(nn.Linear(w.shape[1], w.shape[0], bias="whiten.bias" in state),
                          (cfg.get("whitening") or {}).get("about"))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise FormatError(f"{path}: weights do not fit the saved configuration: {exc}") from exc
    net.config.pop("pooling_params", None)
    return net.eval()


def model_file_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The configuration a model file carries (backbone name, pooling, its own ``resolution`` when
    it has one), without building the network for a cbir model file; a cnnimageretrieval-pytorch
    checkpoint is read into its parts (its configuration is derived from them)."""
    path = Path(path)
    try:
        blob = read_checkpoint(path)
    except FormatError as exc:
        raise FormatError(f"{path} is not a cbir model file (unreadable: {exc})") from exc
    if is_cirtorch(blob):
        return dict(read_cirtorch(path, blob=blob).config)
    check_format(blob, MODEL_FORMAT, (MODEL_FORMAT_VERSION,), path, what="cbir model")
    return dict(blob["config"])


@dataclass(frozen=True)
class ModelSpec:
    """How to make a RetrievalNet, as plain hashable settings.

    ``model``: a backbone name (timm/torchvision, e.g. ``efficientnet_lite0``, ``torchvision:resnet101``)
    or a model file saved by cbir (then ``pooling``/``weights`` are the file's own and ignored);
    ``pooling``: ``NAME[:key=value,...]`` (``gem:p=4``); ``weights``: default / imagenet / none / a FILE.
    """

    model: str = "efficientnet_lite0"
    pooling: str = "gem"
    weights: str = "default"

    @property
    def is_file(self) -> bool:
        return is_model_file(self.model)

    def build(self) -> RetrievalNet:
        """The RetrievalNet (eval mode): loaded from the model file, or built from the names."""
        if self.is_file:
            return load_model(self.model)
        name, kw = parse_pooling(self.pooling)
        return build_model(self.model, pooling=name, weights=self.weights, **kw)

    def identity(self) -> dict[str, Any]:
        """What the descriptors depend on, files by content (sha256): the extraction cache key's
        model part (:func:`cbir.cache.identity.spec_identity`)."""
        from .cache.identity import spec_identity

        return spec_identity(self)

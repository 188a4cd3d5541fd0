"""Published retrieval networks: cnnimageretrieval-pytorch (cirtorch) checkpoints, by file or by name.

Format of a cirtorch checkpoint (Radenović, Tolias & Chum, TPAMI'18; github.com/filipradenovic/
cnnimageretrieval-pytorch), a ``torch.save`` of a dict::

    {"meta": {"architecture": "resnet101", "pooling": "gem", "whitening": True,
              "local_whitening": False, "regional": False, "mean": [...], "std": [...],
              "outputdim": 2048, "Lw": {"retrieval-SfM-120k": {"ss": {"m": (D,1), "P": (D,D)},
                                                               "ms": {...}}}},   # Lw optional
     "state_dict": {"features.0.weight": ..., ..., "pool.p": (1,), "whiten.weight": (D,C),
                    "whiten.bias": (D,)},                                        # whiten.* optional
     "epoch": ..., "optimizer": ..., "min_loss": ...}                            # optional

``features`` is the torchvision trunk (ResNet: conv1 … layer4; VGG/AlexNet: ``features`` without
its last max-pool), and the network computes ``v = L2(GeM_p(features(x)))``, then, when the FC
whitening layer is present, ``v = L2(W v + b)``. Multi-scale vectors are combined after that by
``(1/S Σ_s v_s^q)^(1/q)`` then L2, with q = p when there is no FC whitening, else q = 1 (cirtorch's
test scripts). ``meta["Lw"]`` holds a learned whitening applied to the final vectors,
``L2(P (v − m))``, learned on single-scale (``ss``) or multi-scale (``ms``) vectors.

The tensors of ``features.*`` are mapped one to one, in order and shape, onto torchvision's network
(``cbir.weights.map_in_order``; BatchNorm's ``num_batches_tracked``, absent from old files, is left
out on both sides). Files are read with ``torch.load(weights_only=True)``; the numpy arrays of
``meta["Lw"]`` are allowed through the restricted unpickler (``ndarray``/``dtype`` reconstruction
only, under the names numpy 1.x and 2.x pickle them with); nothing in the file can run code.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fileio import FormatError, load_error_reason
from .networks import FeatureMap
from .weights import WeightsUnavailable, check_hash_in_name, map_in_order
from .pooling import Pooling, build_pooling

__all__ = [
    "PUBLISHED", "PublishedModel", "CirtorchParts", "WhitenedPooling", "read_checkpoint", "is_cirtorch",
    "cirtorch_parts", "cirtorch_skeleton", "read_cirtorch", "fetch_published", "read_published", "check_hash_in_name", "models_dir",
]

CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"
R2 = math.sqrt(2.0)


@dataclass(frozen=True)
class PublishedModel:
    """A published network: where it is, how its figures were measured, and the figures.

    ``figures``: mAP (percent) as published in the cirtorch README, keys ``roxford5k``/``rparis6k``,
    values ``(medium, hard)``; measured at ``imsize`` px with ``scales`` (and ``lw``, the learned
    whitening of ``meta["Lw"]`` used for them, or None).
    """

    url: str
    arch: str
    about: str
    figures: Mapping[str, tuple[float, float]]
    scales: tuple[float, ...]
    imsize: int = 1024
    lw: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


_SFM = (1.0, 1.0 / R2, 0.5)  # test.py with --multiscale '[1, 1/2**(1/2), 1/2]' and --whitening retrieval-SfM-120k
_E2E = (1.0, R2, 1.0 / R2)   # test_e2e.py with --multiscale '[1, 2**(1/2), 1/2**(1/2)]', no post-whitening

PUBLISHED: dict[str, PublishedModel] = {
    "retrievalSfM120k-vgg16-gem": PublishedModel(
        f"{CIRTORCH}/retrieval-SfM-120k/retrievalSfM120k-vgg16-gem-b4dcdc6.pth", "vgg16",
        "VGG16 + GeM fine-tuned on SfM-120k, Lw in meta (TPAMI'18), 512-D",
        {"roxford5k": (60.9, 32.9), "rparis6k": (69.3, 44.2)}, _SFM, lw="retrieval-SfM-120k"),
    "retrievalSfM120k-resnet101-gem": PublishedModel(
        f"{CIRTORCH}/retrieval-SfM-120k/retrievalSfM120k-resnet101-gem-b80fb85.pth", "resnet101",
        "ResNet101 + GeM fine-tuned on SfM-120k, Lw in meta (TPAMI'18), 2048-D",
        {"roxford5k": (65.4, 40.1), "rparis6k": (76.7, 55.2)}, _SFM, lw="retrieval-SfM-120k"),
    "rSfM120k-tl-resnet50-gem-w": PublishedModel(
        f"{CIRTORCH}/retrieval-SfM-120k/rSfM120k-tl-resnet50-gem-w-97bf910.pth", "resnet50",
        "ResNet50 + GeM + FC whitening, triplet loss on SfM-120k, 2048-D",
        {"roxford5k": (64.7, 39.0), "rparis6k": (76.3, 54.9)}, _E2E),
    "rSfM120k-tl-resnet101-gem-w": PublishedModel(
        f"{CIRTORCH}/retrieval-SfM-120k/rSfM120k-tl-resnet101-gem-w-a155e54.pth", "resnet101",
        "ResNet101 + GeM + FC whitening, triplet loss on SfM-120k, 2048-D",
        {"roxford5k": (67.8, 41.7), "rparis6k": (77.6, 56.3)}, _E2E),
    "rSfM120k-tl-resnet152-gem-w": PublishedModel(
        f"{CIRTORCH}/retrieval-SfM-120k/rSfM120k-tl-resnet152-gem-w-f39cada.pth", "resnet152",
        "ResNet152 + GeM + FC whitening, triplet loss on SfM-120k, 2048-D",
        {"roxford5k": (68.8, 41.3), "rparis6k": (78.0, 57.2)}, _E2E),
    "gl18-tl-resnet50-gem-w": PublishedModel(
        f"{CIRTORCH}/gl18/gl18-tl-resnet50-gem-w-83fdc30.pth", "resnet50",
        "ResNet50 + GeM + FC whitening, triplet loss on Google Landmarks 2018, 2048-D",
        {"roxford5k": (63.6, 40.9), "rparis6k": (78.0, 57.5)}, _E2E),
    "gl18-tl-resnet101-gem-w": PublishedModel(
        f"{CIRTORCH}/gl18/gl18-tl-resnet101-gem-w-a4d43db.pth", "resnet101",
        "ResNet101 + GeM + FC whitening, triplet loss on Google Landmarks 2018, 2048-D",
        {"roxford5k": (67.3, 44.3), "rparis6k": (80.6, 61.5)}, _E2E),
    "gl18-tl-resnet152-gem-w": PublishedModel(
        f"{CIRTORCH}/gl18/gl18-tl-resnet152-gem-w-21278d5.pth", "resnet152",
        "ResNet152 + GeM + FC whitening, triplet loss on Google Landmarks 2018, 2048-D",
        {"roxford5k": (68.7, 44.2), "rparis6k": (79.7, 60.3)}, _E2E),
}


# --------------------------------------------------------------------------------------------
# Reading


def _numpy_globals() -> list:
    """What the restricted unpickler needs for plain numpy arrays (numpy 2 and numpy 1.x names)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    rec = multiarray._reconstruct
    allowed: list = [rec, np.ndarray, np.dtype,
                     (rec, "numpy.core.multiarray._reconstruct"), (rec, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 may pickle dtypes by their class
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n[0].isupper()]
    return allowed


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)``, numpy arrays (and only them) allowed in addition.

    Raises FileNotFoundError, or FormatError naming the file when it is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors of many kinds, or a forbidden global
        raise FormatError(f"{path} is not a readable PyTorch checkpoint: {load_error_reason(exc)}") from exc


def is_cirtorch(blob: Any) -> bool:
    """True for a cnnimageretrieval-pytorch checkpoint (``meta`` with architecture + pooling, ``state_dict``)."""
    return (isinstance(blob, Mapping) and isinstance(blob.get("meta"), Mapping)
            and isinstance(blob.get("state_dict"), Mapping)
            and "architecture" in blob["meta"] and "pooling" in blob["meta"])


# --------------------------------------------------------------------------------------------
# The network


def _torchvision_trunk(arch: str) -> FeatureMap:
    """cirtorch's ``features`` for ``arch`` with random weights: cbir's one torchvision cut
    (:func:`cbir.networks.torchvision_trunk`; VGG/AlexNet without their last max-pool, as cirtorch)."""
    import torchvision

    from .networks import torchvision_net, torchvision_trunk

    if arch not in torchvision.models.list_models():
        raise FormatError(f"cirtorch architecture {arch!r} is not a torchvision model")
    if not arch.startswith(("vgg", "alexnet", "resnet", "resnext", "wide_resnet", "densenet")):
        raise FormatError(f"cirtorch architecture {arch!r} is not supported (resnet*, vgg*, alexnet, densenet*)")
    return torchvision_trunk(torchvision_net(arch, False), arch)


class WhitenedPooling(Pooling):
    """cirtorch's pooling followed by its FC whitening: ``fc(L2(pool(X)))`` (RetrievalNet adds the
    final L2). Scales are combined after the whitening with an arithmetic mean (q = 1), as cirtorch
    does for networks with whitening."""

    def __init__(self, pool: Pooling, fc: nn.Linear):
        super().__init__()
        self.inner, self.fc = pool, fc
        self.name = pool.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.inner(x).float(), dim=-1)
        return self.fc(v.to(self.fc.weight.dtype))

    def params(self) -> dict:
        return {**self.inner.params(), "fc_whitening": [self.fc.in_features, self.fc.out_features]}

    def multiscale_p(self) -> float:
        return 1.0


@dataclass
class CirtorchParts:
    """What a RetrievalNet is built from (``cbir.model.from_cirtorch`` assembles it)."""

    backbone: nn.Module
    pooling: Pooling
    channels: int  # dimension of the pooled (and FC-whitened) vector
    config: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    lw: nn.Linear | None = None
    lw_about: str | None = None


def _lw_layer(lw: Mapping[str, Any]) -> nn.Linear:
    """x -> P (x − m) as an nn.Linear (weight P, bias −P m); ``m`` (D,1) or (D,), ``P`` (D',D)."""
    p = torch.as_tensor(np.asarray(lw["P"], dtype=np.float64))
    m = torch.as_tensor(np.asarray(lw["m"], dtype=np.float64)).reshape(-1)
    if p.ndim != 2 or p.shape[1] != m.shape[0]:
        raise FormatError(f"learned whitening has P {tuple(p.shape)} and m {tuple(m.shape)}, which do not fit")
    layer = nn.Linear(p.shape[1], p.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(p.float())
        layer.bias.copy_((-(p @ m)).float())
    return layer


def _pick_lw(meta: Mapping[str, Any], lw: str | None, has_fc: bool) -> tuple[str, Mapping[str, Any]] | None:
    """The learned whitening to use: ``lw`` = "auto" (multi-scale Lw when the net has no FC
    whitening), "none", "ss", "ms", or "DATASET/ss"."""
    table = meta.get("Lw")
    if lw in (None, "none") or not isinstance(table, Mapping) or not table:
        if lw not in (None, "none", "auto"):
            raise FormatError(f"learned whitening {lw!r} asked for, but the checkpoint has none (meta['Lw'])")
        return None
    if lw == "auto":
        if has_fc:
            return None
        lw = "ms"
    dataset, _, kind = lw.rpartition("/")
    if not dataset:
        dataset = "retrieval-SfM-120k" if "retrieval-SfM-120k" in table else sorted(table)[0]
    if dataset not in table or kind not in table[dataset]:
        have = [f"{d}/{k}" for d in table for k in table[d]]
        raise FormatError(f"learned whitening {dataset}/{kind} not in the checkpoint (it has {', '.join(have)})")
    return f"{dataset}/{kind}", table[dataset][kind]


def cirtorch_parts(blob: Mapping[str, Any], name: str, lw: str | None = "auto") -> CirtorchParts:
    """The pieces of a loaded cirtorch checkpoint (see the module doc); ``name`` goes into its description.
    ``lw``: "auto" (the multi-scale Lw of meta when the net has no FC whitening), "none", "ss", "ms"."""
    meta, state = blob["meta"], {re.sub(r"^module\.", "", k): v for k, v in blob["state_dict"].items()}
    if meta.get("local_whitening") or meta.get("regional"):
        raise FormatError(f"{name}: cirtorch networks with local whitening or regional pooling are not supported")
    arch, pooling = str(meta["architecture"]), str(meta["pooling"]).lower()
    if pooling not in ("gem", "mac", "spoc"):
        raise FormatError(f"{name}: cirtorch pooling {pooling!r} is not supported (gem, mac, spoc)")
    cut = _torchvision_trunk(arch)
    trunk, channels = cut.net, cut.channels
    own = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    feats = {k[len("features."):]: v for k, v in state.items()
             if k.startswith("features.") and not k.endswith("num_batches_tracked")}
    try:
        mapped = map_in_order(feats, own)
    except ValueError as exc:
        raise FormatError(f"{name}: the features do not fit torchvision's {arch}: {exc}") from exc
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise FormatError(f"{name}: features left unmapped: {(unexpected or missing)[:3]}")
    pool = build_pooling(pooling)
    if pooling == "gem":
        if "pool.p" not in state:
            raise FormatError(f"{name}: GeM network without pool.p")
        p = state["pool.p"].detach().float().reshape(-1)
        if p.numel() != 1:
            raise FormatError(f"{name}: GeM with {p.numel()} exponents (gemmp) is not supported")
        with torch.no_grad():
            pool.p.fill_(float(p[0]))
    fc = None
    if "whiten.weight" in state:
        w = state["whiten.weight"]
        fc = nn.Linear(w.shape[1], w.shape[0], bias="whiten.bias" in state)
        fc.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("whiten.")})
        if fc.in_features != channels:
            raise FormatError(f"{name}: whitening takes {fc.in_features}-D vectors, {arch} gives {channels}-D")
    elif meta.get("whitening"):
        raise FormatError(f"{name}: meta says whitening but the state dict has no whiten.weight")
    mean = tuple(float(v) for v in meta.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in meta.get("std", (0.229, 0.224, 0.225)))
    entry = PUBLISHED.get(name)
    scales = entry.scales if entry is not None else (_SFM if fc is None else _E2E)
    resolution = {"imsize": 1024, "scales": [round(x, 4) for x in scales],
                  "why": "the setting of the published figures (cirtorch " + ("test.py" if fc is None else "test_e2e.py") + ")"}
    config = {"model": name, "pooling": pool.name, "pooling_kw": {}, "weights_about": f"cirtorch:{name}",
              "whitening": None, "resolution": resolution, "cirtorch": {"architecture": arch, "pooling": pooling, "mean": list(mean),
                                              "std": list(std), "fc_whitening": None if fc is None else
                                              [fc.in_features, fc.out_features, fc.bias is not None]}}
    parts = CirtorchParts(cut.eval(), pool if fc is None else WhitenedPooling(pool, fc),
                          channels if fc is None else fc.out_features, config, mean, std)
    chosen = _pick_lw(meta, lw, fc is not None)
    if chosen is not None:
        parts.lw, parts.lw_about = _lw_layer(chosen[1]), f"Lw {chosen[0]} (from the checkpoint)"
    return parts


def cirtorch_skeleton(config: Mapping[str, Any]) -> CirtorchParts:
    """Random-weight parts shaped as ``config["cirtorch"]`` says (to load a cbir model file saved from
    a cirtorch network: its state dict then fills them)."""
    c = config["cirtorch"]
    cut = _torchvision_trunk(c["architecture"])
    channels = cut.channels
    pool: Pooling = build_pooling(c.get("pooling", "gem"))
    dim = channels
    if c.get("fc_whitening"):
        d_in, dim, bias = c["fc_whitening"]
        pool = WhitenedPooling(pool, nn.Linear(d_in, dim, bias=bias))
    return CirtorchParts(cut.eval(), pool, dim, dict(config), tuple(c["mean"]),
                         tuple(c["std"]))


def read_cirtorch(path: str | os.PathLike[str], lw: str | None = "auto", name: str | None = None,
                  blob: Any = None) -> CirtorchParts:
    """Read a cirtorch checkpoint file into its parts (``blob``: the file already loaded); a file
    carrying a published name (``gl18-tl-resnet101-gem-w-a4d43db.pth``) is checked against the hash
    in that name."""
    path = Path(path)
    blob = read_checkpoint(path) if blob is None else blob
    if not is_cirtorch(blob):
        raise FormatError(f"{path} is not a cnnimageretrieval-pytorch checkpoint (no meta/state_dict)")
    if _name_of(path) in PUBLISHED:
        check_hash_in_name(path)
    return cirtorch_parts(blob, name or _name_of(path), lw)


def _name_of(path: Path) -> str:
    """The published name for a published file name (``gl18-tl-resnet101-gem-w-a4d43db.pth``), else the stem."""
    for key, entry in PUBLISHED.items():
        if path.name == entry.filename:
            return key
    return path.stem


# --------------------------------------------------------------------------------------------
# By name


def models_dir() -> Path:
    """Where downloaded networks are kept: :func:`cbir.paths.cache_dir` ``("models")`` (``$CBIR_MODELS``,
    else ``$XDG_CACHE_HOME/cbir/models``)."""
    from .paths import cache_dir

    return cache_dir("models")


def fetch_published(name: str, folder: str | os.PathLike[str] | None = None, *, timeout: float = 30.0,
                    progress: Callable[[int, int | None], None] | None = None, url: str | None = None) -> Path:
    """The file of published network ``name`` in ``folder`` (default ``models_dir()``), downloaded
    when missing (resumable) and checked against the hash in its name. Offline: WeightsUnavailable
    naming the file to fetch, its URL and where to put it. ``url`` overrides the source (mirrors, tests)."""
    from .datasets.download import DownloadError, download_file

    if name not in PUBLISHED:
        raise WeightsUnavailable(f"unknown published model {name!r} (known: {', '.join(PUBLISHED)})")
    entry = PUBLISHED[name]
    dest = Path(folder) if folder is not None else models_dir()
    dest = dest / entry.filename
    if not dest.is_file():
        try:
            download_file(url or entry.url, dest, None, timeout=timeout, progress=progress)
        except DownloadError as exc:
            raise WeightsUnavailable(
                f"{name}: cannot download {entry.filename} ({exc}); fetch {entry.url} yourself and put it "
                f"in {dest.parent}/ (or set CBIR_MODELS), or pass --model /path/to/{entry.filename}"
            ) from exc
    try:
        check_hash_in_name(dest)
    except WeightsUnavailable:
        dest.unlink()
        raise
    return dest


def read_published(name: str, folder: str | os.PathLike[str] | None = None, lw: str | None = "auto") -> CirtorchParts:
    """Parts of published network ``name`` (see PUBLISHED), fetched if needed."""
    return read_cirtorch(fetch_published(name, folder), lw=lw, name=name)

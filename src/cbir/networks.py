"""Networks cut at their last feature map: any timm or torchvision classifier -> ``(B, C, h, w)``.

Building a network with random weights and cutting it (:func:`timm_trunk`, :func:`torchvision_trunk`)
is all this module does; where weights come from is :mod:`cbir.weights`, and
:func:`cbir.backbones.build_backbone` puts the two together. Vision transformers give patch tokens,
reshaped to a map (:func:`tokens_to_map`); class/register tokens are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .offline_weights import OFFLINE_LITE

__all__ = ["Source", "resolve_source", "FeatureMap", "tokens_to_map", "timm_net", "is_vit", "timm_trunk",
           "torchvision_net", "torchvision_trunk", "channels_of"]


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


def timm_net(arch: str, pretrained: bool) -> nn.Module:
    """The whole timm network (classifier kept so that full weight files map onto it)."""
    import timm

    kwargs: dict = {"pretrained": pretrained}
    if is_vit(arch):
        kwargs["dynamic_img_size"] = True
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError:  # a model without dynamic_img_size
        kwargs.pop("dynamic_img_size", None)
        return timm.create_model(arch, **kwargs)


def is_vit(arch: str) -> bool:
    return any(key in arch for key in ("vit", "deit", "beit", "eva", "dino"))


def timm_trunk(net: nn.Module) -> FeatureMap:
    """Cut a timm network at ``forward_features`` (ViT-like: tokens -> map)."""
    net.reset_classifier(0)
    embed = getattr(net, "patch_embed", None)
    if embed is not None and hasattr(embed, "patch_size") and getattr(net, "dynamic_img_size", False):
        patch = tuple(int(p) for p in embed.patch_size)
        return FeatureMap(net, "timm_vit", int(net.num_features), int(getattr(net, "num_prefix_tokens", 1)), patch)
    return FeatureMap(net, "timm", int(net.num_features))


def torchvision_net(arch: str, pretrained: bool) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None)


def channels_of(trunk: nn.Module) -> int:
    """Channels of a trunk's feature map (one 64 x 64 forward, eval mode)."""
    with torch.no_grad():
        return int(trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1])


def torchvision_trunk(net: nn.Module, arch: str) -> FeatureMap:
    """Cut a torchvision classifier at its last feature map (before its global pooling): the one cut of
    cbir, for ``torchvision:NAME`` backbones and for published cirtorch networks alike.

    * VGG and AlexNet: ``features`` **without its last max-pool** (cirtorch's convention,
      ``list(net.features.children())[:-1]``: the published VGG16 GeM networks were trained and
      evaluated so; the map keeps stride 16, twice as fine as the classifier's stride 32);
    * ResNet/ResNeXt/Wide-ResNet: ``conv1`` ... ``layer4`` (no avgpool, fc);
    * DenseNet: ``features`` then ReLU (torchvision applies it in ``forward``);
    * EfficientNet, MobileNet, ConvNeXt: ``features``; RegNet: ``stem`` + ``trunk_output``.
    """
    if arch.startswith(("vgg", "alexnet")):
        trunk: nn.Module = nn.Sequential(*list(net.features.children())[:-1])
    elif hasattr(net, "features") and isinstance(net.features, nn.Module):  # efficientnet, mobilenet, densenet, convnext
        trunk = net.features
        if arch.startswith("densenet"):
            trunk = nn.Sequential(trunk, nn.ReLU())
    elif hasattr(net, "layer4"):  # resnet, resnext, wide_resnet
        trunk = nn.Sequential(*[m for k, m in net.named_children() if k not in ("avgpool", "fc")])
    elif hasattr(net, "trunk_output"):  # regnet
        trunk = nn.Sequential(net.stem, net.trunk_output)
    else:
        raise ValueError(f"torchvision model {arch!r}: don't know where its feature map ends; use a timm name")
    return FeatureMap(trunk, "module", channels_of(trunk))

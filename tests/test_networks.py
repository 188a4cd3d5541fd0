"""cbir.networks: one torchvision cut for backbones and published cirtorch networks.

The VGG fact (settled here): cirtorch's published VGG16 GeM networks (retrievalSfM120k-vgg16-gem,
TPAMI'18) use ``features`` without its last max-pool (``list(net.features.children())[:-1]`` in
cnnimageretrieval-pytorch's init_network): 13 conv + ReLU layers and 4 max-pools of VGG16's
configuration D, stride 16, 512 channels (its ``outputdim``). No network access here, so the fact is
tested on the architecture (an independent re-implementation of configuration D from torch.nn.functional)
and by reading a checkpoint written in cirtorch's format through cbir.published: both paths of cbir
give that network, the same numbers for the same weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbir.backbones import build_backbone
from cbir.networks import channels_of, torchvision_net, torchvision_trunk

# VGG16 = configuration "D" of Simonyan & Zisserman (2015), Table 1: channels, "M" = 2x2 max-pool.
CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def naive_vgg_features(x: torch.Tensor, convs: list[nn.Conv2d], cfg: list) -> torch.Tensor:
    """Configuration ``cfg`` by hand (3x3 conv pad 1 + ReLU, 2x2 max-pool), weights from ``convs``."""
    k = 0
    for c in cfg:
        if c == "M":
            x = F.max_pool2d(x, 2, 2)
        else:
            x = F.relu(F.conv2d(x, convs[k].weight, convs[k].bias, padding=1))
            k += 1
    return x


def test_vgg16_is_cut_before_its_last_max_pool():
    torch.manual_seed(0)
    fm, c = build_backbone("torchvision:vgg16", weights="none")
    assert c == 512
    layers = list(fm.net)
    assert len(layers) == 30 and isinstance(layers[-1], nn.ReLU)  # torchvision's 31 minus the last pool
    assert sum(isinstance(m, nn.MaxPool2d) for m in layers) == 4
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        y = fm(x)
        convs = [m for m in layers if isinstance(m, nn.Conv2d)]
        want = naive_vgg_features(x, convs, CFG_D[:-1])  # configuration D without its last "M"
    assert y.shape == (1, 512, 96 // 16, 128 // 16)  # stride 16
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the classifier's cut (with the pool) would be stride 32: not what cbir uses
        assert naive_vgg_features(x, convs, CFG_D).shape[-2:] == (3, 4)


def test_alexnet_and_resnet_cuts():
    alex = torchvision_trunk(torchvision_net("alexnet", False), "alexnet")
    assert not isinstance(list(alex.net)[-1], nn.MaxPool2d) and alex.channels == 256
    res = torchvision_trunk(torchvision_net("resnet18", False), "resnet18")
    assert [type(m).__name__ for m in res.net][-1] == "Sequential" and res.channels == 512
    with torch.no_grad():
        assert res(torch.zeros(1, 3, 64, 96)).shape == (1, 512, 2, 3)  # stride 32, no pooling
    assert channels_of(nn.Conv2d(3, 7, 1)) == 7
    with pytest.raises(ValueError, match="don't know where its feature map ends"):
        torchvision_trunk(nn.Linear(2, 2), "swin_t")


def test_cirtorch_vgg16_checkpoint_and_backbone_are_one_network(tmp_path):
    """The same VGG16 weights, once as a torchvision weights file (cbir's torchvision:vgg16 backbone),
    once as a cirtorch checkpoint (its features.* keys, cirtorch's cut): the same feature map."""
    from cbir.published import read_cirtorch

    torch.manual_seed(1)
    tv = torchvision_net("vgg16", False)
    torch.save(tv.state_dict(), tmp_path / "vgg16.pth")
    fm, _ = build_backbone("torchvision:vgg16", weights=str(tmp_path / "vgg16.pth"))
    cirtorch_features = list(tv.features.children())[:-1]  # cirtorch's init_network
    state = {f"features.{k}": v for k, v in nn.Sequential(*cirtorch_features).state_dict().items()}
    state["pool.p"] = torch.tensor([3.0])
    meta = {"architecture": "vgg16", "pooling": "gem", "whitening": False, "local_whitening": False,
            "regional": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "outputdim": 512}
    torch.save({"meta": meta, "state_dict": state}, tmp_path / "cirtorch-vgg16.pth")
    parts = read_cirtorch(tmp_path / "cirtorch-vgg16.pth", lw="none")
    assert parts.channels == meta["outputdim"]
    x = torch.randn(2, 3, 80, 64)
    with torch.no_grad():
        torch.testing.assert_close(parts.backbone(x), fm(x))
        assert fm(x).shape == (2, 512, 5, 4)

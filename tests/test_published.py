"""cnnimageretrieval-pytorch (cirtorch) checkpoints: a file written in exactly that format, with random
weights, gives the descriptors of a reference forward written here from the format's definition."""

from __future__ import annotations

import math
import urllib.parse

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cbir.backbones import WeightsUnavailable
from cbir.extract import extract
from cbir.fileio import FormatError
from cbir.model import load_model
from cbir.published import PUBLISHED, check_hash_in_name, fetch_published, read_checkpoint

# ------------------------------------------------------------------ reference (the format's definition)

def ref_l2n(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=1, keepdim=True) + 1e-6)


def ref_gem(x: torch.Tensor, p: float) -> torch.Tensor:
    return nn.functional.avg_pool2d(x.clamp(min=1e-6).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)


class RefNet(nn.Module):
    """features -> GeM -> L2 -> (whiten -> L2), keys features.*, pool.p, whiten.*; as cirtorch defines it."""

    def __init__(self, arch: str, whitening: bool, p: float):
        super().__init__()
        tv = torchvision.models.get_model(arch, weights=None)
        layers = list(tv.children())[:-2] if arch.startswith("resnet") else list(tv.features.children())[:-1]
        self.features = nn.Sequential(*layers)
        self.pool = nn.Module()
        self.pool.p = nn.Parameter(torch.ones(1) * p)
        dim = 2048 if arch.startswith("resnet") else 512
        self.whiten = nn.Linear(dim, dim, bias=True) if whitening else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = ref_l2n(ref_gem(self.features(x), float(self.pool.p)).squeeze(-1).squeeze(-1))
        return ref_l2n(self.whiten(o)) if self.whiten is not None else o


def ref_multiscale(net: RefNet, x: torch.Tensor, scales, msp: float) -> torch.Tensor:
    v = torch.zeros(net(x).shape[1])
    for s in scales:
        xs = x if s == 1 else nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                        antialias=True)
        v += net(xs)[0].pow(msp)
    v = (v / len(scales)).pow(1.0 / msp)
    return v / v.norm()


def write_cirtorch(path, net: RefNet, arch: str, lw=None, legacy_numpy1: bool = True) -> None:
    """A checkpoint as cirtorch's train.py saves it; the old (pre-zip) serialization of 2018-19 files,
    with numpy 1.x's module names for the arrays of meta['Lw'] when ``legacy_numpy1``."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random but not degenerate BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as old files
    meta = {"architecture": arch, "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": net.whiten is not None, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "outputdim": 2048 if arch.startswith("resnet") else 512}
    if lw is not None:
        meta["Lw"] = lw
    opt = torch.optim.Adam([p for p in net.parameters()][:2], lr=5e-7).state_dict()
    blob = {"epoch": 30, "meta": meta, "state_dict": state, "min_loss": 0.42, "optimizer": opt}
    torch.save(blob, path, _use_new_zipfile_serialization=False)
    if legacy_numpy1:
        data = path.read_bytes()
        assert (lw is None) or b"numpy._core.multiarray" in data or b"numpy.core.multiarray" in data
        path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def random_lw(d: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"m": rng.normal(0, 0.02, (d, 1)), "P": rng.normal(0, 1.0 / math.sqrt(d), (d, d))}


@pytest.fixture(scope="module")
def images():
    from cbir.datasets import load_demo

    ds = load_demo()
    return [ds.db_paths[0], ds.db_paths[5]]


def _tensor(path, imsize, mean, std):
    from cbir.extract import image_tensor, load_image

    return image_tensor(load_image(path), imsize, mean, std)[None]


# ------------------------------------------------------------------ tests

def test_resnet50_fc_whitening_matches_reference(tmp_path, images):
    torch.manual_seed(1)
    ref = RefNet("resnet50", whitening=True, p=2.7).eval()
    f = tmp_path / "gl18-like-resnet50-gem-w.pth"
    write_cirtorch(f, ref, "resnet50")
    net = load_model(f)
    assert net.dim == 2048 and net.whiten is None and net.config["cirtorch"]["fc_whitening"]
    assert abs(net.multiscale_p() - 1.0) < 1e-9  # cirtorch: scales combined after the whitening with q = 1
    scales = (1.0, math.sqrt(2.0), 1 / math.sqrt(2.0))
    got = extract(net, images, imsize=96, scales=scales, device="cpu", progress=False, strict=True,
                  channels_last=False, precision="fp32").vectors
    with torch.no_grad():
        want = torch.stack([ref_multiscale(ref, _tensor(p, 96, net.mean, net.std), scales, 1.0) for p in images])
        single = ref(_tensor(images[0], 96, net.mean, net.std))[0]
        np.testing.assert_allclose(net(_tensor(images[0], 96, net.mean, net.std))[0].numpy(), single.numpy(), atol=1e-5)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_vgg16_with_lw_in_meta_matches_reference(tmp_path, images):
    torch.manual_seed(2)
    ref = RefNet("vgg16", whitening=False, p=3.1).eval()
    lw = {"retrieval-SfM-120k": {"ss": random_lw(512, 0), "ms": random_lw(512, 1)}}
    f = tmp_path / "retrievalSfM120k-vgg16-like.pth"
    write_cirtorch(f, ref, "vgg16", lw=lw)
    net = load_model(f)  # default: the multi-scale Lw of the checkpoint, GeM's p combines scales
    assert net.whiten is not None and "retrieval-SfM-120k/ms" in net.describe()["whitening"]
    assert abs(net.multiscale_p() - 3.1) < 1e-5
    scales = (1.0, 1 / math.sqrt(2.0), 0.5)
    # 128 px: every scale keeps both sides >= MIN_SIDE (32 px), so no enlargement rule applies here
    got = extract(net, images, imsize=128, scales=scales, device="cpu", progress=False, strict=True,
                  channels_last=False, precision="fp32").vectors
    with torch.no_grad():
        vecs = torch.stack([ref_multiscale(ref, _tensor(p, 128, net.mean, net.std), scales, 3.1) for p in images])
    x = vecs.numpy().T.astype(np.float64)  # cirtorch whitenapply: P (X - m), columns L2-normalised
    m, P = lw["retrieval-SfM-120k"]["ms"]["m"], lw["retrieval-SfM-120k"]["ms"]["P"]
    want = P @ (x - m)
    want = (want / (np.linalg.norm(want, axis=0, keepdims=True) + 1e-6)).T
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_numpy_arrays_load_but_code_does_not(tmp_path):
    f = tmp_path / "lw.pth"
    torch.save({"meta": {"Lw": {"x": {"ss": random_lw(4, 0)}}}}, f, _use_new_zipfile_serialization=False)
    f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert read_checkpoint(f)["meta"]["Lw"]["x"]["ss"]["P"].shape == (4, 4)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    g = tmp_path / "evil.pth"
    torch.save({"meta": Evil()}, g)
    with pytest.raises(FormatError, match="evil.pth"):
        read_checkpoint(g)


def test_features_that_do_not_fit_are_named(tmp_path):
    ref = RefNet("resnet50", whitening=False, p=3.0)
    f = tmp_path / "wrong.pth"
    write_cirtorch(f, ref, "resnet101")  # meta says resnet101, tensors are resnet50's
    with pytest.raises(FormatError, match="wrong"):
        load_model(f)


def test_hash_in_name(tmp_path):
    import hashlib

    f = tmp_path / "x.pth"
    f.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    good = tmp_path / f"net-{digest[:7]}.pth"
    good.write_bytes(b"abc")
    check_hash_in_name(good)
    bad = tmp_path / "net-0000000.pth"
    bad.write_bytes(b"abc")
    with pytest.raises(WeightsUnavailable, match="does not start with"):
        check_hash_in_name(bad)


def test_fetch_by_name_checks_hash_and_offline_names_the_file(tmp_path, monkeypatch):
    name = "gl18-tl-resnet50-gem-w"
    entry = PUBLISHED[name]
    src = tmp_path / "mirror.pth"
    src.write_bytes(b"not the published bytes")
    with pytest.raises(WeightsUnavailable, match="does not start with"):
        fetch_published(name, tmp_path / "models", url=src.as_uri())
    assert not (tmp_path / "models" / entry.filename).exists()  # a damaged download is not kept
    with pytest.raises(WeightsUnavailable) as err:
        fetch_published(name, tmp_path / "models", url="http://127.0.0.1:9/" + urllib.parse.quote(entry.filename),
                        timeout=2)
    assert entry.filename in str(err.value) and entry.url in str(err.value)
    monkeypatch.setenv("CBIR_MODELS", str(tmp_path / "models"))
    with pytest.raises(WeightsUnavailable, match="CBIR_MODELS"):  # default folder from the environment
        fetch_published(name, url="http://127.0.0.1:9/x", timeout=2)


def test_published_table_is_the_cirtorch_readme():
    assert PUBLISHED["gl18-tl-resnet101-gem-w"].figures["rparis6k"] == (80.6, 61.5)
    assert PUBLISHED["retrievalSfM120k-resnet101-gem"].figures["roxford5k"] == (65.4, 40.1)
    for entry in PUBLISHED.values():
        assert entry.url.startswith("http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/")
        assert entry.filename.endswith(".pth")


def test_saved_as_cbir_model_round_trip(tmp_path, images):
    from cbir.model import save_model

    torch.manual_seed(3)
    ref = RefNet("resnet50", whitening=True, p=3.3).eval()
    f = tmp_path / "net.pth"
    write_cirtorch(f, ref, "resnet50", lw={"retrieval-SfM-120k": {"ss": random_lw(2048, 0), "ms": random_lw(2048, 1)}})
    net = load_model(f)
    assert net.whiten is None  # FC-whitened network: the meta's Lw is not applied by default
    save_model(net, tmp_path / "cbir.pt")
    again = load_model(tmp_path / "cbir.pt")
    assert again.describe() == net.describe() and again.mean == net.mean
    x = _tensor(images[1], 80, net.mean, net.std)
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), net(x).numpy(), atol=1e-6)
        np.testing.assert_allclose(again(x).numpy(), ref(x).numpy(), atol=1e-5)


def test_cli_uses_the_models_default_resolution(tmp_path, images):
    """`cbir extract` without --imsize/--scales takes the backbone's default (Lite0: the measured 512 px,
    3 scales; a cirtorch network: 1024 px and the scales of its published figures); given ones win."""
    import json

    from cbir.backbones import default_resolution
    from cbir.cli import main

    assert default_resolution("efficientnet_lite0") == (512, (1.0, 0.7071, 0.5))
    assert default_resolution("torchvision:resnet101")[0] == 1024
    assert main(["extract", str(images[0]), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["imsize"] == 512 and meta["scales"] == [1.0, 0.7071, 0.5]
    assert main(["extract", str(images[0]), "--out", str(tmp_path / "b"), "--quiet", "--imsize", "64",
                 "--scales", "1"]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["imsize"] == 64 and meta["scales"] == [1.0]
    torch.manual_seed(4)
    f = tmp_path / "e2e.pth"
    write_cirtorch(f, RefNet("resnet50", whitening=True, p=3.0).eval(), "resnet50")
    net = load_model(f)
    assert default_resolution(net.config["model"], net.config) == (1024, (1.0, 1.4142, 0.7071))


def test_published_names_default_to_their_published_setting():
    from cbir.backbones import default_resolution

    for name, entry in PUBLISHED.items():
        imsize, scales = default_resolution(name)
        assert imsize == entry.imsize == 1024
        np.testing.assert_allclose(scales, entry.scales, atol=1e-4)

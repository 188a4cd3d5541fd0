"""RetrievalNet: forward contract, whitening, describe(), save/load round trip, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbir.fileio import FormatError
from cbir.model import build_model, load_model, save_model


@pytest.fixture(scope="module")
def lite0():
    return build_model("efficientnet_lite0", pooling="gem")


def test_forward_is_l2_normalised_and_dim(lite0):
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        v = lite0(x)
    assert v.shape == (2, 1280)
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    d = lite0.describe()
    assert d["model"] == "efficientnet_lite0" and d["pooling"] == "gem" and d["dim"] == 1280
    assert d["pooling_params"] == {"p": 3.0} and d["whitening"] is None


def test_whitening_is_linear_after_pooling_then_l2():
    net = build_model("efficientnet_lite0", pooling="mac", weights="none")
    lin = nn.Linear(1280, 16)
    net.set_whitening(lin, "test-pca")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = net.pool(x)
        expect = lin(pooled)
        expect = expect / expect.norm(dim=1, keepdim=True)
        got = net(x)
    assert got.shape == (1, 16) and net.dim == 16
    assert torch.allclose(got, expect, atol=1e-6)
    assert net.describe()["whitening"] == "test-pca"
    with pytest.raises(ValueError, match="1280"):
        net.set_whitening(nn.Linear(10, 4))


def test_save_load_round_trip(tmp_path, lite0):
    net = build_model("efficientnet_lite0", pooling="gem", weights="none", per_channel=True)
    with torch.no_grad():
        net.pooling.p.uniform_(2.0, 4.0)  # trained-looking per-channel p
    net.set_whitening(nn.Linear(1280, 32), "lw")
    path = tmp_path / "m.pt"
    save_model(net, path)
    back = load_model(path)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(net(x), back(x), atol=1e-6)
    assert back.describe() == net.describe()
    assert torch.equal(back.pooling.p, net.pooling.p)


def test_load_model_wrong_file(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"hello": torch.zeros(1)}, bad)
    with pytest.raises(FormatError, match="not a cbir model"):
        load_model(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match="not a cbir model"):
        load_model(junk)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def test_bow_model_round_trip(tmp_path):
    import numpy as np

    net = build_model("efficientnet_lite0", pooling="bow", weights="none", k=8)
    rng = np.random.default_rng(0)
    cb = rng.standard_normal((8, 1280)).astype(np.float32)
    net.pooling.set_codebook(cb / np.linalg.norm(cb, axis=1, keepdims=True), rng.random(8).astype(np.float32))
    save_model(net, tmp_path / "bow.pt")
    back = load_model(tmp_path / "bow.pt")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(net(x), back(x), atol=1e-6)
    assert back.dim == 8 and back.describe()["pooling_params"] == {"k": 8, "soft": False}

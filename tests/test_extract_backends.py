"""Optional extraction paths: CPU inference backends (OpenVINO, ONNX Runtime) give the torch
descriptors to float tolerance; the GPU-decode path (nvjpeg on CUDA) crops, shrinks and normalises
like PIL — checked here with torchvision's CPU JPEG decoder, the same code path on another device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.extract import extract, image_tensor, load_image

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"


@pytest.fixture(scope="module")
def lite0():
    from cbir.model import build_model

    return build_model("efficientnet_lite0", pooling="gem")


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return sorted(DEMO.glob("*.jpg"))[:3]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_backend_equals_torch(lite0, images, backend):
    pytest.importorskip(backend)
    kw = dict(imsize=96, scales=(1.0, 0.5), progress=False, device="cpu", workers=0, precision="fp32")
    ref = extract(lite0, images, **kw)
    got = extract(lite0, images, backend=backend, **kw)
    assert got.ok.tolist() == ref.ok.tolist() == [0, 1, 2]
    np.testing.assert_allclose(got.vectors, ref.vectors, atol=1e-4)
    again = extract(lite0, images[:1], backend=backend, **kw)  # converted once, cached on the model
    np.testing.assert_allclose(again.vectors[0], ref.vectors[0], atol=1e-4)


def test_unknown_or_misplaced_backend_is_named(lite0, images):
    with pytest.raises(ValueError, match="backend must be one of"):
        extract(lite0, images[:1], imsize=64, progress=False, device="cpu", backend="tensorrt")


def test_gpu_decode_path_matches_pil(lite0, images):
    from cbir.extraction.batching import _gpu_decode
    from cbir.extraction.images import image_size, resized_size

    boxes = [None, (30, 20, 200, 150), None]
    sizes = {i: resized_size(*image_size(p, b), 128) for i, (p, b) in enumerate(zip(images, boxes))}
    raw = [(i, torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)) for i, p in enumerate(images)]
    stacked, fallback = _gpu_decode(raw, images, boxes, sizes, lite0.mean, lite0.std, torch.device("cpu"))
    assert fallback == []
    got = {i: x[j] for idx, x in stacked for j, i in enumerate(idx)}
    assert sorted(got) == [0, 1, 2]
    for i, p in enumerate(images):
        want = image_tensor(load_image(p, boxes[i]), 128, lite0.mean, lite0.std)
        assert got[i].shape == want.shape
        # another decoder (libjpeg-turbo in torchvision vs PIL) and another bicubic: close, not equal
        assert (got[i] - want).abs().mean() < 0.05, (p.name, float((got[i] - want).abs().mean()))


def test_gpu_decode_needs_cuda(lite0, images):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        extract(lite0, images[:1], imsize=64, progress=False, device="cpu", decode="cuda")

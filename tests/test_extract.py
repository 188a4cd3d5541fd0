"""Extraction: batching does not change descriptors, failures are reported, retrieval works on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.extract import extract, load_image


@pytest.fixture(scope="module")
def lite0():
    from cbir.model import build_model

    return build_model("efficientnet_lite0", pooling="gem")


@pytest.fixture()
def small_images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(96, 64), (96, 64), (64, 80), (96, 64)]):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        p = tmp_path / f"im{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_batched_equals_alone(lite0, small_images):
    kw = dict(imsize=96, scales=(1.0, 0.75), progress=False, device="cpu", workers=0)
    batched = extract(lite0, small_images, batch_size=3, **kw)
    alone = [extract(lite0, [p], batch_size=1, **kw).vectors[0] for p in small_images]
    assert batched.ok.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(batched.vectors, np.stack(alone), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(batched.vectors, axis=1), 1.0, atol=1e-5)


def test_failed_images_are_listed(lite0, small_images, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(small_images[0].read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    res = extract(lite0, [empty, small_images[0], trunc, text], imsize=64, scales=(1.0,), progress=False)
    assert res.ok.tolist() == [1]
    assert [f["path"] for f in res.failed] == [str(empty), str(trunc), str(text)]
    assert res.failed[0]["reason"] == "empty file"
    assert "not an image" in res.failed[2]["reason"]

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
    kw = dict(imsize=96, scales=(1.0, 0.75), progress=False, device="cpu", workers=0, precision="fp32")
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
    inputs = [empty, small_images[0], trunc, text, small_images[1]]
    # decoded in a worker process, batched: same descriptors, same failures as in-process
    kw = dict(imsize=64, scales=(1.0,), progress=False, precision="fp32")
    res = extract(lite0, inputs, workers=1, batch_size=4, **kw)
    ref = extract(lite0, [small_images[0], small_images[1]], workers=0, **kw)
    assert res.ok.tolist() == [1, 4]
    np.testing.assert_allclose(res.vectors, ref.vectors, atol=2e-5)
    assert [f["path"] for f in res.failed] == [str(empty), str(trunc), str(text)]
    assert res.failed[0]["reason"] == "empty file"
    assert "not an image" in res.failed[2]["reason"]


# ---------------------------------------------------------------------------------------------
# Image loading


def test_load_image_applies_exif_orientation_and_crop(tmp_path):
    from cbir.extract import ImageError, image_size

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    shown = load_image(path)
    assert shown.size == (20, 40) and image_size(path) == (20, 40)
    # after a 90° clockwise turn the white (left) half is on top
    a = np.asarray(shown).mean(axis=(1, 2))
    assert a[:15].mean() > 200 and a[-15:].mean() < 50
    crop = load_image(path, bbox=(0, 0, 10, 5))
    assert crop.size == (10, 5) and image_size(path, (0, 0, 10, 5)) == (10, 5)
    with pytest.raises(ImageError, match="crop box"):
        load_image(path, bbox=(30, 50, 40, 60))
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.jpg")


def test_resized_size_and_combine_scales():
    import torch

    from cbir.extract import combine_scales, resized_size

    assert resized_size(2048, 1536, 1024) == (1024, 768)
    assert resized_size(300, 1000, 500) == (150, 500)
    assert resized_size(300, 200, 1024) == (300, 200)  # never enlarged
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # 2 scales, 1 image, 2-D
    # p = 1: mean (0.5, 1) -> L2; p = 3: ((1/2)^(1/3), (8/2)^(1/3)) -> L2
    a = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(combine_scales(v, 1.0)[0], a / a.norm())
    b = torch.tensor([0.5 ** (1 / 3), 4 ** (1 / 3)])
    torch.testing.assert_close(combine_scales(v, 3.0)[0], b / b.norm())


def test_single_scale_equals_direct_forward(lite0, small_images):
    import torch

    from cbir.extract import image_tensor

    lite0.train()  # e.g. called from a training loop: described in eval mode, mode given back
    res = extract(lite0, small_images[:1], imsize=80, scales=(1.0,), progress=False, channels_last=False,
                  precision="fp32")
    assert lite0.training
    lite0.eval()
    bf16 = extract(lite0, small_images[:1], imsize=80, scales=(1.0,), progress=False, precision="bf16")
    assert float(bf16.vectors[0] @ res.vectors[0]) > 0.99  # bf16 autocast: same descriptor up to rounding
    with pytest.raises(ValueError, match="precision"):
        extract(lite0, small_images[:1], progress=False, precision="fp8")
    x = image_tensor(load_image(small_images[0]), 80, lite0.mean, lite0.std)[None]
    with torch.no_grad():
        direct = lite0(x).numpy()
    np.testing.assert_allclose(res.vectors, direct, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# extract_to_dir: files, dtype, resume


def test_extract_to_dir_resumes_after_interruption(lite0, small_images, tmp_path, monkeypatch):
    import cbir.extract as ex
    from cbir.descriptors import Descriptors
    from cbir.extraction import loop

    out = tmp_path / "feats"
    real = loop.extract
    calls = []
    fail_at = [2]

    def flaky(model, images, **kw):
        calls.append([Path(p).name for p in images])
        if len(calls) == fail_at[0]:
            raise RuntimeError("power cut")  # the run dies in the middle
        return real(model, images, **kw)

    monkeypatch.setattr(loop, "extract", flaky)
    kw = dict(imsize=64, scales=(1.0,), chunk=2, progress=False, dtype="float16", precision="fp32")
    with pytest.raises(RuntimeError, match="power cut"):
        ex.extract_to_dir(lite0, small_images, out, **kw)
    assert not (out / "meta.json").exists() and len(list((out / "shards").glob("*.json"))) == 2  # job + 1 shard
    calls.clear()
    fail_at[0] = 0
    desc = ex.extract_to_dir(lite0, small_images, out, **kw)
    assert calls == [["im2.png", "im3.png"]]  # only the unfinished chunk
    assert desc.ids == ["im0", "im1", "im2", "im3"] and desc.vectors.dtype == np.float16
    assert not (out / "shards" / "job.json").exists() and len(list((out / "shards").glob("*.npy"))) == 2
    fresh = real(lite0, small_images, imsize=64, scales=(1.0,), progress=False, precision="fp32").vectors
    np.testing.assert_allclose(Descriptors.load(out).vectors.astype(np.float32), fresh, atol=2e-3)
    # a complete folder with the same job: nothing to do
    calls.clear()
    again = ex.extract_to_dir(lite0, small_images, out, **kw)
    assert calls == [] and again.ids == desc.ids
    # other settings: extracted again
    ex.extract_to_dir(lite0, small_images, out, **{**kw, "imsize": 48})
    assert len(calls) == 2 and Descriptors.load(out).meta["imsize"] == 48


# ---------------------------------------------------------------------------------------------
# Real photos


@pytest.mark.slow
def test_same_landmark_is_nearer_on_real_photos(rparis250_lite0, rparis250_gnd):
    def landmark(name: str) -> str:
        return name.split("_")[1]

    db, q = rparis250_lite0["db"], rparis250_lite0["q"]
    assert db.shape == (238, 1280) and q.shape == (12, 1280)
    db_lm = np.array([landmark(n) for n in rparis250_gnd["imlist"]])
    aucs = []
    for qi, name in enumerate(rparis250_gnd["qimlist"]):
        s = db @ q[qi]
        same, other = s[db_lm == landmark(name)], s[db_lm != landmark(name)]
        assert np.median(same) > np.median(other), name
        # probability that a same-landmark photo is nearer than an other-landmark photo (random: 0.5)
        aucs.append((same[:, None] > other[None, :]).mean())
    aucs = np.array(aucs)
    assert np.mean(aucs) > 0.9 and (aucs > 0.85).sum() >= 10, aucs

"""Local features (cbir.local.features): COLMAP SIFT through pycolmap, in original pixel coordinates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.extraction.images import ImageError
from cbir.local.features import LocalFeatures, LocalFeatureSettings, extract_local

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
PHOTO = DEMO / "paris_louvre_000081.jpg"
SMALL = LocalFeatureSettings(max_size=256, max_features=512)


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each point of a (N, 2) to its nearest point of b (M, 2)."""
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return d.min(axis=1)


def test_features_have_the_documented_form():
    f = extract_local(PHOTO, SMALL, device="cpu")
    w, h = Image.open(PHOTO).size
    assert f.size == (w, h)
    assert f.keypoints.dtype == np.float32 and f.keypoints.shape == (len(f), 4)
    assert f.descriptors.dtype == np.uint8 and f.descriptors.shape == (len(f), 128)
    assert 100 < len(f) <= SMALL.max_features
    # keypoints inside the image, in its pixels (the photo is larger than max_size: mapped back)
    assert f.keypoints[:, 0].min() >= 0 and f.keypoints[:, 0].max() <= w
    assert f.keypoints[:, 1].min() >= 0 and f.keypoints[:, 1].max() <= h
    assert f.keypoints[:, 1].max() > 0.8 * h  # spread over the whole original height, not 256 px
    assert f.scale == pytest.approx(max(w, h) / 256, rel=0.01)
    # COLMAP's byte form: unit descriptors scaled by 512
    norms = np.linalg.norm(f.descriptors.astype(np.float64), axis=1)
    assert np.all(np.abs(norms - 512) < 8)


def test_keypoints_are_in_original_pixels_a_half_size_copy_gives_half():
    im = Image.open(PHOTO).convert("RGB")
    half = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
    s = LocalFeatureSettings(max_size=max(half.size), max_features=400)
    full = extract_local(im, s, device="cpu")  # shrunk to the half size inside, mapped back x2
    small = extract_local(half, s, device="cpu")
    assert small.scale == pytest.approx(1.0) and full.scale == pytest.approx(2.0, rel=0.01)
    d = _nearest(small.keypoints[:, :2] * 2.0, full.keypoints[:, :2])
    assert np.mean(d < 2.0) > 0.9  # the same points, twice the coordinates
    # and the scales too, for the keypoints that correspond
    close = d < 2.0
    idx = np.argmin(np.linalg.norm(small.keypoints[close, None, :2] * 2 - full.keypoints[None, :, :2], axis=2), axis=1)
    ratio = full.keypoints[idx, 2] / small.keypoints[close, 2]
    assert np.median(ratio) == pytest.approx(2.0, rel=0.05)


def test_crop_box_offsets_keypoints_exactly():
    im = Image.open(PHOTO).convert("RGB")
    box = (40, 30, 240, 190)  # 200 x 160: under max_size, so no resizing on either side
    crop = im.crop(box)
    a = extract_local(im, SMALL, bbox=box, device="cpu")
    b = extract_local(crop, SMALL, device="cpu")
    assert a.size == im.size and b.size == crop.size
    assert len(a) == len(b) > 20
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    np.testing.assert_allclose(a.keypoints[:, :2], b.keypoints[:, :2] + np.array(box[:2], np.float32), atol=1e-4)
    np.testing.assert_allclose(a.keypoints[:, 2:], b.keypoints[:, 2:], atol=1e-5)


def test_paths_bytes_and_pil_images_agree():
    s = LocalFeatureSettings(max_size=128, max_features=200)
    a = extract_local(PHOTO, s, device="cpu")
    b = extract_local(PHOTO.read_bytes(), s, device="cpu")
    c = extract_local(Image.open(PHOTO), s, device="cpu")
    for other in (b, c):
        np.testing.assert_array_equal(a.keypoints, other.keypoints)
        np.testing.assert_array_equal(a.descriptors, other.descriptors)


def test_exif_orientation_is_applied_like_the_global_descriptors(tmp_path):
    im = Image.open(PHOTO).convert("RGB").resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes())
    f = extract_local(path, LocalFeatureSettings(max_size=200, max_features=100), device="cpu")
    assert f.size == (120, 160)
    assert f.keypoints[:, 0].max() <= 120 and f.keypoints[:, 1].max() <= 160


def test_root_sift_and_plain_sift_differ_and_max_features_keeps_the_coarsest():
    root = extract_local(PHOTO, LocalFeatureSettings(max_size=256, max_features=4000), device="cpu")
    l2 = extract_local(PHOTO, LocalFeatureSettings(max_size=256, max_features=4000, root=False), device="cpu")
    np.testing.assert_array_equal(root.keypoints, l2.keypoints)
    assert not np.array_equal(root.descriptors, l2.descriptors)
    few = extract_local(PHOTO, LocalFeatureSettings(max_size=256, max_features=150), device="cpu")
    assert len(few) == 150
    # the coarsest features of the full list (COLMAP lists fine to coarse)
    np.testing.assert_array_equal(few.descriptors, root.descriptors[-150:])
    assert np.median(few.keypoints[:, 2]) > np.median(root.keypoints[:, 2])


@pytest.mark.parametrize("bad, reason", [
    ("missing.jpg", "file not found"),
    (b"this is not an image", "not an image"),
])
def test_bad_images_raise_one_line(tmp_path, bad, reason):
    src = tmp_path / bad if isinstance(bad, str) else bad
    with pytest.raises(ImageError) as err:
        extract_local(src, SMALL, device="cpu")
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_a_box_outside_the_image_and_a_tiny_image():
    with pytest.raises(ImageError, match="no pixel inside"):
        extract_local(PHOTO, SMALL, bbox=(5000, 5000, 5100, 5100), device="cpu")
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buf, format="PNG")
    f = extract_local(buf.getvalue(), SMALL, device="cpu")
    assert len(f) == 0 and f.size == (1, 1)


def test_settings_are_frozen_checked_and_keyed():
    s = LocalFeatureSettings()
    assert s.key() == LocalFeatureSettings().key()
    assert s.key() != LocalFeatureSettings(root=False).key()
    assert s.key() != LocalFeatureSettings(peak_threshold=0.01).key()
    assert s.key().startswith(f"sift-{s.max_size}px-{s.max_features}-root-")
    with pytest.raises(Exception):
        s.max_size = 10  # frozen
    with pytest.raises(ValueError):
        LocalFeatureSettings(max_featurez=3)
    with pytest.raises(ValueError):
        LocalFeatureSettings(max_size=0)


def test_local_features_check_their_arrays():
    kp = np.zeros((2, 4), np.float32)
    desc = np.zeros((2, 128), np.uint8)
    LocalFeatures(kp, desc, (10, 10))
    with pytest.raises(ValueError, match="float32"):
        LocalFeatures(kp.astype(np.float64), desc, (10, 10))
    with pytest.raises(ValueError, match="uint8"):
        LocalFeatures(kp, desc.astype(np.float32), (10, 10))
    with pytest.raises(ValueError, match="2 keypoints for 1 descriptors"):
        LocalFeatures(kp, desc[:1], (10, 10))
    bad = kp.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LocalFeatures(bad, desc, (10, 10))
    with pytest.raises(ValueError, match="scale"):
        LocalFeatures(kp, desc, (10, 10), scale=0.0)


def test_cuda_without_a_cuda_build_is_one_clear_error():
    import pycolmap

    if pycolmap.has_cuda:
        pytest.skip("this pycolmap has CUDA")
    with pytest.raises(ValueError, match="no CUDA") as err:
        extract_local(PHOTO, SMALL, device="cuda")
    assert not isinstance(err.value, ImageError)  # the device, not the image, is at fault

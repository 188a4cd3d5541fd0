"""cbir.extraction.numpy_path: the torch-free extraction arithmetic equals the torch loop's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.extraction import numpy_path as npp
from cbir.extraction.images import pixels_tensor
from cbir.extraction.loop import combine_scales, rescale


def test_aa_weights_by_hand():
    """4 -> 2 (step r = 2): output 0 is centred at 1.0 with a triangle of half-width 2 over inputs
    0, 1, 2 at distances 0.5, 0.5, 1.5 -> weights 0.75, 0.75, 0.25, normalised by 1.75."""
    w = npp.aa_bilinear_weights(4, 2)
    np.testing.assert_allclose(w[0], [0.75 / 1.75, 0.75 / 1.75, 0.25 / 1.75, 0.0], atol=1e-7)
    np.testing.assert_allclose(w[1], w[0][::-1], atol=1e-7)  # mirror image
    # enlarging 2 -> 4 (r = 0.5): plain bilinear, centres at 0.25, 0.75, 1.25, 1.75 (edges clamp)
    up = npp.aa_bilinear_weights(2, 4)
    np.testing.assert_allclose(up, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-7)
    assert np.allclose(npp.aa_bilinear_weights(517, 191).sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(512, 384), (384, 512), (101, 37), (375, 2), (33, 40), (7, 9)])
def test_rescale_equals_torch(shape):
    """Every scale of the extractor (downscale, upscale, the 32 px minimum side) to float rounding."""
    x = np.random.default_rng(sum(shape)).normal(size=(3, *shape)).astype(np.float32)
    for s in (1.0, 2 ** -0.5, 0.5, 0.3, 2.0):
        got = npp.rescale(x, s)
        ref = rescale(torch.from_numpy(x)[None], s)[0].numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=2e-6, err_msg=f"{shape} at scale {s}")


def test_normalise_and_combine_equal_torch():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    np.testing.assert_array_equal(npp.normalise(pixels, mean, std), pixels_tensor(pixels, mean, std).numpy())
    v = np.abs(rng.normal(size=(3, 1, 16))).astype(np.float32)
    for p in (1.0, 3.0):
        ref = combine_scales(torch.from_numpy(v), p)[0].numpy()
        np.testing.assert_allclose(npp.combine_scales(v[:, 0], p), ref, atol=1e-6)
    # by hand: p = 1 is the mean, then L2
    np.testing.assert_allclose(npp.combine_scales(np.array([[3, 0], [1, 0]], np.float32)), [1, 0])


def test_describe_array_is_the_loop_for_one_image():
    """pool = a fixed random projection of the global mean: the numpy path and the torch loop agree."""
    from cbir.extraction.loop import describe

    rng = np.random.default_rng(1)
    proj = rng.normal(size=(3, 8)).astype(np.float32)

    def pool_np(x):
        v = x.mean(axis=(2, 3)) @ proj
        return np.abs(v) / np.linalg.norm(v, axis=1, keepdims=True)

    class Net:
        def pool(self, x):
            return torch.from_numpy(pool_np(x.numpy()))

        def head(self, v):
            return v

    x = rng.normal(size=(3, 90, 61)).astype(np.float32)
    scales = (1.0, 2 ** -0.5, 0.5)
    ref = describe(Net(), torch.from_numpy(x)[None], scales, 3.0, channels_last=False)[0].numpy()
    np.testing.assert_allclose(npp.describe_array(x, scales, 3.0, pool_np), ref, atol=1e-6)

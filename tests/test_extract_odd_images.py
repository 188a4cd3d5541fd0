"""Odd but valid images never stop a run (issue 9.2): 1x1, 3000x2, a crop 1 px high.

Before the minimum-side rule, each of these crashed extraction with a torch error ("Input and
output sizes should be greater than 0") in `cbir extract`, `cbir index build` and `cbir index add`.
Only an unusable input (a crop with no pixel inside the image) is reported, with its reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.cli import main
from cbir.descriptors import Descriptors
from cbir.extract import MIN_SIDE, ImageError, extract, rescale, scaled_size

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo"


@pytest.fixture(scope="module")
def lite0():
    from cbir.model import build_model

    return build_model("efficientnet_lite0", pooling="gem")


@pytest.fixture()
def odd(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    out = {}
    for name, (w, h) in {"dot": (1, 1), "strip": (3000, 2), "tall": (2, 700), "photo": (120, 90)}.items():
        p = tmp_path / "odd" / f"{name}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(p)
        out[name] = p
    return out


def test_scaled_size_rule():
    assert scaled_size(768, 1024, 0.5) == ((384, 512), True)  # ordinary: what interpolate(scale_factor) gives
    assert scaled_size(1, 1, 1.0) == ((MIN_SIDE, MIN_SIDE), False)
    assert scaled_size(1, 1024, 0.5) == ((MIN_SIDE, 512), False)  # only the short side is raised
    assert scaled_size(45, 1024, 0.7071) == ((MIN_SIDE, 724), False)  # floor(45 * 0.7071) = 31 < 32


def test_rescale_keeps_ordinary_images_exact():
    import torch
    import torch.nn.functional as F

    x = torch.rand(1, 3, 100, 140)
    ref = F.interpolate(x, scale_factor=0.7071, mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(rescale(x, 0.7071), ref) and rescale(x, 1.0) is x
    assert rescale(torch.rand(1, 3, 1, 3000), 0.5).shape[-2:] == (MIN_SIDE, 1500)


def test_extract_describes_odd_images(lite0, odd):
    paths = [odd["dot"], odd["strip"], odd["tall"], odd["photo"], odd["photo"], odd["photo"]]
    boxes = [None, None, None, None, (0, 0, 120, 1), (10, 10, 10.2, 80)]  # 1 px high; zero-area crop
    res = extract(lite0, paths, bboxes=boxes, imsize=1024, scales=(1.0, 0.7071, 0.5), progress=False,
                  precision="fp32", batch_size=2)
    assert res.ok.tolist() == [0, 1, 2, 3, 4]
    assert np.isfinite(res.vectors).all()
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    assert [f["path"] for f in res.failed] == [str(odd["photo"])]
    assert "no pixel inside" in res.failed[0]["reason"]
    with pytest.raises(ImageError, match="no pixel inside the 120x90 image"):
        extract(lite0, [odd["photo"]], bboxes=[(500, 500, 600, 600)], imsize=64, progress=False, strict=True)


def test_cli_extract_with_a_thin_box_and_odd_files(odd, tmp_path, capsys):
    out = tmp_path / "feats"
    assert main(["extract", str(odd["dot"].parent), "--out", str(out), "--imsize", "256", "--quiet"]) == 0
    desc = Descriptors.load(out)
    assert sorted(desc.ids) == ["dot", "photo", "strip", "tall"] and not desc.failed


def test_index_build_and_add_odd_images(odd, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((DEMO / "jpg").glob("*.jpg"))[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "dot.png").write_bytes(odd["dot"].read_bytes())
    ix = tmp_path / "ix"
    assert main(["index", "build", str(folder), "--out", str(ix), "--imsize", "128"]) == 0
    assert main(["index", "add", str(ix), str(odd["strip"]), str(odd["tall"])]) == 0
    from cbir.index import Index

    assert len(Index.load(ix)) == 5


def test_one_source_for_extensions_boxes_and_devices():
    from cbir.datasets import folder
    from cbir.device import resolve_device
    from cbir.extract import IMAGE_EXTENSIONS, parse_bbox
    from cbir.index import build, exact
    from cbir.training import data

    assert folder.IMAGE_EXTS is build.IMAGE_SUFFIXES is data.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert ".gif" in IMAGE_EXTENSIONS and ".jpeg" in IMAGE_EXTENSIONS  # the three lists disagreed on .gif
    assert exact.resolve_device is resolve_device and str(resolve_device("cpu")) == "cpu"
    assert parse_bbox(" 0, 0,500,1 ") == (0.0, 0.0, 500.0, 1.0) and parse_bbox("") is None
    for bad in ["1,2,3", "a,b,c,d", "5,0,4,1", "0,0,nan,1", "0,0,1,1,1"]:
        with pytest.raises(ValueError, match="bbox must be"):
            parse_bbox(bad)

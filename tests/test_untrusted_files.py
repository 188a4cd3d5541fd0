"""Loading a user's file never runs code (issue 9.1).

One crafted file per entry point: a pickle whose ``__reduce__`` would create a marker file when
unpickled by plain ``pickle.load`` / ``torch.load(weights_only=False)``. Every loader must refuse it
with a clear error, and the marker must not exist afterwards. The payload itself is checked to work
(plain ``pickle.loads`` creates the marker), so the tests cannot pass because of a broken payload.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.fileio import FormatError


class _Touch:
    """Unpickling this calls ``Path.touch(marker)``: code run by a data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_pickle(path: Path, marker: Path, wrap=lambda x: x) -> Path:
    path.write_bytes(pickle.dumps(wrap(_Touch(marker))))
    return path


def _evil_torch(path: Path, marker: Path, wrap) -> Path:
    torch.save(wrap(_Touch(marker)), path)
    return path


def _no_unsafe_advice(message: str) -> None:
    """A refusal says what the file holds; it never repeats torch's advice to load it unsafely."""
    assert "holds a Python object" in message, message
    for advice in ("weights_only", "trust", "safe_globals", "can still be loaded"):
        assert advice not in message, message


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def test_payload_really_runs_code_with_plain_pickle(tmp_path, marker):
    """The control: the same bytes do run code through plain pickle and torch.load(weights_only=False)."""
    p = _evil_pickle(tmp_path / "x.pkl", marker)
    pickle.loads(p.read_bytes())
    assert marker.exists()
    marker.unlink()
    t = _evil_torch(tmp_path / "x.pt", marker, lambda x: {"state_dict": x})
    torch.load(t, weights_only=False)
    assert marker.exists()


def _gnd_wrap(x):
    return {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": x}]}


def test_gnd_pkl(tmp_path, marker):
    from cbir.datasets import from_gnd_file, load_gnd

    p = _evil_pickle(tmp_path / "gnd_x.pkl", marker, _gnd_wrap)
    with pytest.raises(FormatError, match="refusing to load pathlib"):
        load_gnd(p)
    with pytest.raises(FormatError):
        from_gnd_file(p)
    assert not marker.exists()


def test_whiten_gnd(tmp_path, marker, capsys):
    from cbir.cli import main
    from cbir.descriptors import Descriptors

    rng = np.random.default_rng(0)
    Descriptors(["a", "b", "c", "d"], rng.standard_normal((4, 3)).astype(np.float32)).save(tmp_path / "f")
    p = _evil_pickle(tmp_path / "gnd.pkl", marker, _gnd_wrap)
    rc = main(["whiten", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "w.npz"),
               "--method", "lw", "--gnd", str(p)])
    assert rc == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert str(p) in err and "refusing to load" in err and len(err.strip().splitlines()) == 1


def _sfm_wrap(x):
    return {"train": {"cids": ["a", "b"], "cluster": [0, 0], "qidxs": [0], "pidxs": [1], "note": x}}


def _train_cfg(tmp_path: Path, images: Path) -> Path:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "model: {name: test_efficientnet, weights: none}\n"
        f"data: {{root: {images}, imsize: 32}}\n"
        "mining: {queries_per_epoch: 4, pool_size: 8, negatives: 1}\n"
        "optim: {epochs: 1, batch_tuples: 2}\n"
        "tensorboard: false\n"
    )
    return cfg


@pytest.fixture
def class_images(tmp_path) -> Path:
    from PIL import Image

    for c in range(2):
        for j in range(2):
            d = tmp_path / "imgs" / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (100 * c, 50 * j, 0)).save(d / f"{j}.png")
    return tmp_path / "imgs"


def test_sfm_pkl(tmp_path, marker, class_images, capsys):
    from cbir.cli import main
    from cbir.training.data import load_sfm

    p = _evil_pickle(tmp_path / "db.pkl", marker, _sfm_wrap)
    with pytest.raises(FormatError, match="refusing to load"):
        load_sfm(p, tmp_path)
    cfg = _train_cfg(tmp_path, class_images)
    rc = main(["train", str(cfg), "data.kind=sfm", f"data.pkl={p}", f"data.root={tmp_path}",
               "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_validation_gnd(tmp_path, marker, class_images, capsys):
    from cbir.cli import main

    p = _evil_pickle(tmp_path / "gnd.pkl", marker, _gnd_wrap)
    cfg = _train_cfg(tmp_path, class_images)
    rc = main(["train", str(cfg), f"validation.gnd={p}", f"validation.images={class_images}",
               "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before any training


def test_model_file(tmp_path, marker):
    from cbir.model import MODEL_FORMAT, load_model

    p = _evil_torch(tmp_path / "model.pt", marker,
                    lambda x: {"format": MODEL_FORMAT, "format_version": 1, "config": x, "state_dict": {}})
    with pytest.raises(FormatError, match="not a cbir model file") as err:
        load_model(p)
    assert not marker.exists()
    _no_unsafe_advice(str(err.value))


def test_backbone_weights_file(tmp_path, marker):
    from cbir.backbones import WeightsUnavailable
    from cbir.model import build_model

    p = _evil_torch(tmp_path / "weights.pth", marker, lambda x: {"state_dict": {"w": torch.zeros(1)}, "x": x})
    with pytest.raises(WeightsUnavailable, match="not a readable PyTorch weights file") as err:
        build_model("test_efficientnet", weights=p)
    assert not marker.exists()
    _no_unsafe_advice(str(err.value))


def test_checkpoint(tmp_path, marker, class_images, capsys):
    from cbir.cli import main
    from cbir.training.checkpoint import CHECKPOINT_FORMAT

    out = tmp_path / "run"
    out.mkdir()
    _evil_torch(out / "last.pt", marker,
                lambda x: {"format": CHECKPOINT_FORMAT, "format_version": 2, "epoch": 1, "history": x})
    cfg = _train_cfg(tmp_path, class_images)
    rc = main(["train", str(cfg), "--resume", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a readable checkpoint" in err and str(out / "last.pt") in err
    assert not marker.exists()
    _no_unsafe_advice(err)

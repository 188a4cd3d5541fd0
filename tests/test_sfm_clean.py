"""Cleaning class-labelled photos by spatial verification (cbir.sfm.clean; data.clean: {method: verify})."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.local.features import LocalFeatureSettings
from cbir.sfm.clean import VerifyCleanSettings, candidate_classmates, clean_by_verification

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
H = [np.array([[0.85, 0.12, 30.0], [-0.08, 0.9, 25.0], [2e-4, 1e-4, 1.0]]),
     np.array([[1.05, -0.1, -10.0], [0.06, 0.95, 12.0], [-1e-4, 2e-4, 1.0]])]
# class -> [(demo photo, warp or None)]: "a" and "b" hold true class-mates and one injected photo of
# another landmark; "c" holds three photos of three landmarks (nothing verifies)
CLASSES = {
    "a": [("paris_louvre_000081", None), ("paris_louvre_000081", 0), ("paris_louvre_000081", 1),
          ("paris_moulinrouge_000010", None)],
    "b": [("paris_eiffel_000005", None), ("paris_eiffel_000005", 0), ("paris_defense_000015", None)],
    "c": [("paris_invalides_000017", None), ("paris_louvre_000018", None), ("paris_defense_000037", None)],
}
INJECTED = {"a": "a3.jpg", "b": "b2.jpg"}
SETTINGS = VerifyCleanSettings(candidates=10, local=LocalFeatureSettings(max_size=384, max_features=600))


def _warp(im: Image.Image, h: np.ndarray) -> Image.Image:
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return im.transform(im.size, Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "classes"
    for cls, items in CLASSES.items():
        (root / cls).mkdir(parents=True)
        for j, (name, w) in enumerate(items):
            im = Image.open(DEMO / f"{name}.jpg").convert("RGB")
            (im if w is None else _warp(im, H[w])).save(root / cls / f"{cls}{j}.jpg", quality=92)
    return root


def _inputs(folder: Path):
    paths = sorted(folder.rglob("*.jpg"))
    labels = [p.parent.name for p in paths]
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(len(paths), 16)).astype(np.float32)
    return paths, labels, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def test_candidate_classmates_bound_the_work():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    vecs = np.eye(10, dtype=np.float32) + 0.01
    for k in (1, 2, 10):
        pairs = candidate_classmates(vecs, labels, k)
        assert len(pairs) <= 9 * k and (pairs[:, 0] < pairs[:, 1]).all()
        assert all(labels[a] == labels[b] for a, b in pairs)  # only class-mates
        for i in range(9):  # every photo of a class of >= 2 has min(k, size - 1) of its class-mates
            assert (pairs == i).any(axis=1).sum() >= min(k, (labels == labels[i]).sum() - 1)
    assert len(candidate_classmates(vecs, labels, 10)) == 15 + 3  # all pairs inside each class


def test_injected_photos_dropped_true_classmates_kept_and_no_class_emptied(folder, tmp_path):
    paths, labels, vecs = _inputs(folder)
    rep = clean_by_verification(paths, labels, vecs, tmp_path / "feats", SETTINGS, device="cpu")
    kept = {p.name for p, k in zip(paths, rep.keep) if k}
    dropped = {p.name for p, k in zip(paths, rep.keep) if not k}
    assert dropped == set(INJECTED.values())
    assert {"a0.jpg", "a1.jpg", "a2.jpg", "b0.jpg", "b1.jpg"} <= kept
    # class c: nothing verifies; with on_unverified=keep it is kept whole and said so
    assert rep.unverified_classes == {"c": (0, 3)} and {"c0.jpg", "c1.jpg", "c2.jpg"} <= kept
    assert {k: [Path(f).name for f in v] for k, v in rep.dropped.items()} == {"a": ["a3.jpg"], "b": ["b2.jpg"]}
    text = "\n".join(rep.lines())
    assert "class a: dropped 1: a3.jpg" in text and "class c: 0 of 3 photos verified" in text and "kept whole" in text
    assert rep.verified_with[paths.index(folder / "a" / "a0.jpg")] == 2
    # on_unverified=drop: the class goes, named in the report (the features are reused from the store)
    rep2 = clean_by_verification(paths, labels, vecs, tmp_path / "feats",
                                 SETTINGS.model_copy(update={"on_unverified": "drop"}), device="cpu")
    assert {p.name for p, k in zip(paths, rep2.keep) if not k} == set(INJECTED.values()) | {"c0.jpg", "c1.jpg",
                                                                                          "c2.jpg"}
    assert "dropped whole (on_unverified=drop)" in "\n".join(rep2.lines())
    # a class where too few photos verify is not gutted: with min_class_fraction 0.8, class a (3 of 4
    # verified) and b (2 of 3) are judged unverifiable and kept whole
    rep3 = clean_by_verification(paths, labels, vecs, tmp_path / "feats",
                                 SETTINGS.model_copy(update={"min_class_fraction": 0.8}), device="cpu")
    assert rep3.keep.all() and rep3.unverified_classes == {"a": (3, 4), "b": (2, 3), "c": (0, 3)}


def test_training_config_cleans_by_verification(folder, tmp_path):
    from cbir.model import build_model
    from cbir.training.trainer import train

    cfg = {
        "data": {"kind": "folder", "root": str(folder), "imsize": 32,
                 "clean": {"method": "verify", "max_size": 384, "max_features": 600, "candidates": 10}},
        "mining": {"queries_per_epoch": 4, "pool_size": 8, "negatives": 1, "batch_size": 8},
        "optim": {"epochs": 1, "batch_tuples": 2},
        "out": str(tmp_path / "run"), "tensorboard": False, "device": "cpu",
    }
    said: list[str] = []
    res = train(cfg, model=build_model("test_efficientnet", pooling="gem", weights="none"), progress=False,
                log=said.append)
    setup = res["setup"]
    assert setup["cleaning_dropped"] == 2 and setup["cleaning_unverified_classes"] == ["c"]
    assert sorted(Path(p).name for p in setup["dropped_paths"]) == sorted(INJECTED.values())
    assert any("class a: dropped 1: a3.jpg" in line for line in said)
    assert (tmp_path / "run" / "clean-features" / "manifest.json").is_file()

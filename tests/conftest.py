"""Shared test fixtures.

``../shared`` (or ``$CBIR_SHARED``) holds the reference data; tests that need it skip with a
reason when it is missing and always run in CI where it is present.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared")).resolve()

# Keep the two CI cores for the two xdist workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _private_descriptor_cache(tmp_path, monkeypatch):
    """Each test gets its own extraction cache (cbir.pipeline), never the user's ~/.cache."""
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cbir-cache"))


def shared_path(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with a clear reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available: {path} (set CBIR_SHARED)")
    return path


@pytest.fixture(scope="session")
def roxford_gnd() -> dict:
    with open(shared_path("data", "revisitop", "gnd_roxford5k.pkl"), "rb") as fh:
        return pickle.load(fh)


@pytest.fixture(scope="session")
def oxford_fc7() -> tuple[np.ndarray, list[str]]:
    """Real Oxford5k fc7-128d descriptors (5063 x 128, L2-normalised) and the image name of each row."""
    from cbir.descriptors import l2_normalize, read_fvecs

    root = shared_path("data", "oxford5k-fc7-128d")
    x = read_fvecs(root / "oxford_features.fvecs")
    names = (root / "row_order_sorted_names.txt").read_text().split()
    return l2_normalize(x), names


@pytest.fixture(scope="session")
def rparis250() -> Path:
    """The folder data/rparis6k-250 (jpg/ + gnd_rparis6k_subset250.pkl)."""
    return shared_path("data", "rparis6k-250")


@pytest.fixture(scope="session")
def rparis250_gnd(rparis250: Path) -> dict:
    with open(rparis250 / "gnd_rparis6k_subset250.pkl", "rb") as fh:
        return pickle.load(fh)


def _code_version() -> str:
    """Hash of the code that makes descriptors, so a cache never outlives a change to it."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("backbones.py", "pooling.py", "model.py", "extract.py"):
        digest.update((REPO / "src" / "cbir" / name).read_bytes())
    return digest.hexdigest()[:12]


def _cached_extract(tmp_path_factory, rparis250: Path, gnd: dict, imsize: int) -> dict:
    """Lite0 + GeM, single scale: database rows (imlist order) and cropped queries (qimlist order).

    Computed once per test session and shared between xdist workers through a file lock.
    """
    from filelock import FileLock

    from cbir.extract import extract
    from cbir.model import build_model

    root = tmp_path_factory.getbasetemp().parent  # shared by xdist workers (and kept between runs)
    cache = root / f"rparis250_lite0_gem_{imsize}_{_code_version()}.npz"
    with FileLock(str(cache) + ".lock"):
        if not cache.exists():
            model = build_model("efficientnet_lite0", pooling="gem")
            jpg = rparis250 / "jpg"
            db = extract(model, [jpg / f"{n}.jpg" for n in gnd["imlist"]], imsize=imsize, scales=(1.0,), progress=False)
            q = extract(
                model,
                [jpg / f"{n}.jpg" for n in gnd["qimlist"]],
                imsize=imsize,
                scales=(1.0,),
                bboxes=[tuple(g["bbx"]) for g in gnd["gnd"]],
                progress=False,
            )
            assert not db.failed and not q.failed
            np.savez(cache, db=db.vectors, q=q.vectors)
    data = np.load(cache)
    return {"db": data["db"], "q": data["q"]}


@pytest.fixture(scope="session")
def rparis250_lite0(tmp_path_factory, rparis250, rparis250_gnd) -> dict:
    """{"db": (238, 1280), "q": (12, 1280)} Lite0-GeM descriptors at 512 px, single scale."""
    return _cached_extract(tmp_path_factory, rparis250, rparis250_gnd, imsize=512)

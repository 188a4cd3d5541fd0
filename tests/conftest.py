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


@pytest.fixture(scope="session", autouse=True)
def _converted_network_cache(tmp_path_factory):
    """Converted networks (ONNX, cbir.extraction.backends) go to one folder per test run, shared by the
    xdist workers and the CLI subprocesses (they inherit the variable), never the user's ~/.cache."""
    folder = tmp_path_factory.getbasetemp().parent / "cbir-converted"
    old = os.environ.get("CBIR_CONVERTED_CACHE")
    os.environ["CBIR_CONVERTED_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CBIR_CONVERTED_CACHE", None)
    else:
        os.environ["CBIR_CONVERTED_CACHE"] = old


@pytest.fixture(autouse=True)
def _private_descriptor_cache(tmp_path, monkeypatch):
    """Each test gets its own extraction cache (cbir.pipeline), never the user's ~/.cache."""
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cbir-cache"))


def toy_benchmark(tmp_path: Path) -> Path:
    """A 4-photo revisitop benchmark under tmp_path (jpg/ + gnd_toy.pkl, returned): 3 database images
    a (red-ish), b (green), c (blue) and one query q (red) with box (0, 0, 20, 20);
    easy = [a], hard = [c], junk = [b]."""
    from PIL import Image

    jpg = tmp_path / "jpg"
    jpg.mkdir()
    colours = {"q": (200, 10, 10), "a": (190, 20, 10), "b": (10, 200, 10), "c": (10, 10, 200)}
    for n, c in colours.items():
        Image.new("RGB", (40, 30), c).save(jpg / f"{n}.jpg")
    gnd = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
           "gnd": [{"bbx": [0, 0, 20, 20], "easy": [0], "hard": [2], "junk": [1]}]}
    gpath = tmp_path / "gnd_toy.pkl"
    gpath.write_bytes(pickle.dumps(gnd))
    return gpath


def shared_path(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with a clear reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available: {path} (set CBIR_SHARED)")
    return path


@pytest.fixture(scope="session")
def roxford_gnd() -> dict:
    from cbir.datasets.revisitop import load_gnd

    return load_gnd(shared_path("data", "revisitop", "gnd_roxford5k.pkl"))


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
    from cbir.datasets.revisitop import load_gnd

    return load_gnd(rparis250 / "gnd_rparis6k_subset250.pkl")


def _code_version() -> str:
    """Hash of the code that makes descriptors, so a cache never outlives a change to it."""
    import hashlib

    digest = hashlib.sha256()
    src = REPO / "src" / "cbir"
    for path in [src / n for n in ("backbones.py", "pooling.py", "model.py")] + sorted((src / "extraction").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _cached_extract(tmp_path_factory, rparis250: Path, gnd: dict, imsize: int) -> dict:
    """Lite0 + GeM, single scale: database rows (imlist order) and cropped queries (qimlist order)."""
    return cached_descriptors(tmp_path_factory, "rparis250", rparis250 / "jpg", gnd, imsize=imsize, crop=True)


def cached_descriptors(
    tmp_path_factory, name: str, jpg: Path, gnd: dict, imsize: int = 512, crop: bool = True
) -> dict:
    """Lite0 + GeM, single scale, of a revisitop-format set -> {"db": (n, D), "q": (nq, D)}.

    Database rows in ``imlist`` order, queries in ``qimlist`` order (cropped to ``bbx`` when
    ``crop``; else each query is the row of the same image, as Holidays' whole-image boxes).
    Computed once and kept in a file keyed by the set, the settings and a hash of the
    extraction code (:func:`_code_version`), shared between xdist workers through a file lock.
    """
    from filelock import FileLock

    from cbir.extract import extract
    from cbir.model import build_model

    root = tmp_path_factory.getbasetemp().parent  # shared by xdist workers (and kept between runs)
    cache = root / f"{name}_lite0_gem_{imsize}_{_code_version()}.npz"
    with FileLock(str(cache) + ".lock"):
        if not cache.exists():
            model = build_model("efficientnet_lite0", pooling="gem")
            db = extract(model, [jpg / f"{n}.jpg" for n in gnd["imlist"]], imsize=imsize, scales=(1.0,), progress=False)
            assert not db.failed
            if crop:
                q = extract(
                    model,
                    [jpg / f"{n}.jpg" for n in gnd["qimlist"]],
                    imsize=imsize,
                    scales=(1.0,),
                    bboxes=[tuple(g["bbx"]) for g in gnd["gnd"]],
                    progress=False,
                )
                assert not q.failed
                qv = q.vectors
            else:
                row = {n: i for i, n in enumerate(gnd["imlist"])}
                qv = db.vectors[[row[n] for n in gnd["qimlist"]]]
            np.savez(str(cache) + ".tmp.npz", db=db.vectors, q=qv)
            os.replace(str(cache) + ".tmp.npz", cache)
    data = np.load(cache)
    return {"db": data["db"], "q": data["q"]}


@pytest.fixture(scope="session")
def rparis250_lite0(tmp_path_factory, rparis250, rparis250_gnd) -> dict:
    """{"db": (238, 1280), "q": (12, 1280)} Lite0-GeM descriptors at 512 px, single scale."""
    return _cached_extract(tmp_path_factory, rparis250, rparis250_gnd, imsize=512)


DEMO = REPO / "src" / "cbir" / "data" / "demo"


@pytest.fixture(scope="session")
def demo() -> Path:
    """The bundled demo set (src/cbir/data/demo: jpg/ + gnd_demo.pkl, 33 database photos, 5 queries)."""
    return DEMO


@pytest.fixture(scope="session")
def demo_gnd() -> dict:
    from cbir.datasets.revisitop import load_gnd

    return load_gnd(DEMO / "gnd_demo.pkl")


@pytest.fixture(scope="session")
def demo_lite0(tmp_path_factory, demo_gnd) -> dict:
    """{"db": (33, 1280), "q": (5, 1280)} Lite0-GeM descriptors of the demo set at 512 px, single scale."""
    return cached_descriptors(tmp_path_factory, "demo", DEMO / "jpg", demo_gnd, imsize=512, crop=True)


LITE0_SOURCE = {"model": "efficientnet_lite0", "pooling": "gem", "weights": "default", "pooling_kw": {}}


@pytest.fixture(scope="session")
def lite0_gem():
    """EfficientNet-Lite0 + GeM (built once per session; the service tests share it)."""
    from cbir.model import build_model

    return build_model("efficientnet_lite0", pooling="gem")


@pytest.fixture()
def demo_index(tmp_path, lite0_gem, demo, demo_gnd, demo_lite0):
    """(Index, its folder, QueryEncoder): the 33 demo database photos, Lite0-GeM 512 px, saved under tmp_path."""
    from cbir.index import Index
    from cbir.index.embed import QueryEncoder, model_settings

    settings = model_settings(lite0_gem, LITE0_SOURCE, 512, (1.0,))
    idx = Index(lite0_gem.dim, "exact", settings=settings, device="cpu")
    idx.add(demo_lite0["db"], [str(demo / "jpg" / f"{n}.jpg") for n in demo_gnd["imlist"]])
    idx.save(tmp_path / "demo.index")
    return idx, tmp_path / "demo.index", QueryEncoder(settings, model=lite0_gem, device="cpu")


@pytest.fixture(scope="session")
def holidays805() -> Path:
    """The folder data/holidays-805 (jpg/ + gnd_holidays805.pkl)."""
    return shared_path("data", "holidays-805")


@pytest.fixture(scope="session")
def holidays805_gnd(holidays805: Path) -> dict:
    from cbir.datasets.revisitop import load_gnd

    return load_gnd(holidays805 / "gnd_holidays805.pkl")


@pytest.fixture(scope="session")
def holidays805_lite0(tmp_path_factory, holidays805, holidays805_gnd) -> dict:
    """{"db": (805, 1280), "q": (295, 1280)} Lite0-GeM at 512 px, single scale; queries = their rows."""
    return cached_descriptors(tmp_path_factory, "holidays805", holidays805 / "jpg", holidays805_gnd, crop=False)


# ----------------------------------------------------------------------------- spatial verification

#: Demo photos of three landmarks: the queries of the verification tests get warped copies.
VERIFY_QUERIES = ("paris_invalides_000072", "paris_louvre_000081", "paris_moulinrouge_000220")
VERIFY_OTHERS = ("paris_eiffel_000041", "paris_defense_000037", "paris_eiffel_000156", "paris_defense_000101")


def warped_copy(src: Path, dst: Path, angle: float = 8.0, scale: float = 0.8, shift=(30.0, -10.0)) -> np.ndarray:
    """Write ``dst``: ``src`` rotated by ``angle`` degrees, scaled by ``scale`` and shifted (a
    similarity, JPEG quality 95, same size). Returns M (2, 3) with ``p_src = M @ [x, y, 1]`` for a
    pixel position (x, y) of ``dst`` (PIL's AFFINE convention, pixel corners at integers)."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    w, h = im.size
    a = np.deg2rad(angle)
    c, s = np.cos(a) / scale, np.sin(a) / scale
    cx, cy = w / 2, h / 2  # about the centre: p_src = R/scale (p_dst - centre - shift) + centre
    m = np.array([[c, -s, 0.0], [s, c, 0.0]])
    m[:, 2] = np.array([cx, cy]) - m[:, :2] @ (np.array([cx, cy]) + np.asarray(shift))
    im.transform((w, h), Image.AFFINE, tuple(m.ravel()), resample=Image.BICUBIC, fillcolor=(128, 128, 128)) \
        .save(dst, quality=95)
    return m


def verify_benchmark(tmp_path: Path) -> Path:
    """A revisitop benchmark for spatial verification under tmp_path (returns its gnd .pkl; images in
    jpg/): database = a warped copy ``w_<name>`` of each of 3 demo photos (VERIFY_QUERIES), the 4
    photos of VERIFY_OTHERS and the first query photo itself; queries = the 3 photos (the first one
    uncropped: it is also a database photo, as a Holidays query; its own photo is junk), each with
    its warped copy as the one positive."""
    import shutil

    jpg = tmp_path / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    for name in VERIFY_QUERIES:
        shutil.copy(DEMO / "jpg" / f"{name}.jpg", jpg / f"{name}.jpg")
        warped_copy(jpg / f"{name}.jpg", jpg / f"w_{name}.jpg")
    for name in VERIFY_OTHERS:
        shutil.copy(DEMO / "jpg" / f"{name}.jpg", jpg / f"{name}.jpg")
    imlist = [f"w_{n}" for n in VERIFY_QUERIES] + list(VERIFY_OTHERS) + [VERIFY_QUERIES[0]]
    gnd = [{"bbx": None, "easy": [0], "hard": [], "junk": [len(imlist) - 1]},
           {"bbx": [40, 30, 480, 360], "easy": [1], "hard": [], "junk": []},
           {"bbx": None, "easy": [2], "hard": [], "junk": []}]
    gpath = tmp_path / "gnd_verify.pkl"
    gpath.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": list(VERIFY_QUERIES), "gnd": gnd}))
    return gpath


@pytest.fixture()
def verify_index(tmp_path, lite0_gem, demo, demo_gnd, demo_lite0):
    """(Index, its folder, QueryEncoder, id of the warped copy): 10 demo database photos + a warped copy
    of the demo query paris_eiffel_000266, Lite0-GeM 512 px, with local features (INDEX/local) and
    the verification setting top 20 (INDEX/verify.json), as `cbir index build --verify 20` leaves it."""
    from cbir.index import Index
    from cbir.index.embed import QueryEncoder, model_settings
    from cbir.index.local import save_verify, sync_local
    from cbir.rerank.verify import VerifyParams

    settings = model_settings(lite0_gem, LITE0_SOURCE, 512, (1.0,))
    encoder = QueryEncoder(settings, model=lite0_gem, device="cpu")
    idx = Index(lite0_gem.dim, "exact", settings=settings, device="cpu")
    idx.add(demo_lite0["db"][:10], [str(demo / "jpg" / f"{n}.jpg") for n in demo_gnd["imlist"][:10]])
    warped = tmp_path / "photos" / "w_paris_eiffel_000266.jpg"
    warped.parent.mkdir()
    warped_copy(demo / "jpg" / "paris_eiffel_000266.jpg", warped)
    wid = int(idx.add(encoder.encode(warped, None)[None], [str(warped)])[0])
    path = tmp_path / "verify.index"
    idx.save(path)
    sync_local(path, idx)
    save_verify(path, VerifyParams(k=20))
    return idx, path, encoder, wid

"""The library chain: benchmark -> descriptors -> whitening/re-ranking -> scores.

    from cbir.pipeline import load_benchmark, describe, score, evaluate
    from cbir.model import ModelSpec
    from cbir.rerank.options import Rerank

    bench = load_benchmark("demo")                       # or a .pkl, a gt folder, a labelled folder
    q, db = describe(bench, ModelSpec("efficientnet_lite0", "gem"), cache_dir="~/.cache/cbir")
    for qe in (0, 1, 2, 5):                              # described once, scored four times
        print(score(bench, q, db, Rerank(qe=qe))["mAP"])
    res = evaluate("demo", ModelSpec(), rerank=Rerank(qe=2))   # the whole chain in one call

Stage objects: ``Benchmark`` (a :class:`cbir.datasets.RetrievalDataset`: image lists, crop boxes,
ground truth, protocol) -> two :class:`cbir.descriptors.Descriptors` (queries cropped to their
box, database) -> a result dict (``mAP``, ``mP``, ``kappas``, ``applied`` re-ranking).

The extraction cache: ``describe(..., cache_dir=DIR)`` keeps the descriptors of a benchmark under
``DIR/<key>/{queries,database}`` where ``key`` hashes the model (a model or weights file by its
sha256), the pooling and its parameters, the extraction settings (image size, scales, precision,
device, crop) and the image list (path, size and modification time of every file, crop boxes). Any
change gives another key; a hit reads the saved descriptors and runs no network. An in-memory
``RetrievalNet`` is never cached (its weights may change between calls, e.g. during training).

Errors are ordinary exceptions (ValueError, FileNotFoundError, cbir.fileio.FormatError, ...);
nothing here prints or exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .datasets import DATASETS, RetrievalDataset
from .descriptors import Descriptors
from .rerank.options import Rerank

__all__ = [
    "Benchmark", "DEFAULT_IMSIZE", "DEFAULT_SCALES_TEXT", "default_cache_dir", "describe", "evaluate",
    "extraction_defaults", "load_benchmark", "lookup", "score", "with_distractors",
]

#: The benchmark a pipeline runs on (image lists, crop boxes, ground truth, protocol).
Benchmark = RetrievalDataset

DEFAULT_IMSIZE = 1024
DEFAULT_SCALES = (1.0, 2.0 ** -0.5, 0.5)
DEFAULT_SCALES_TEXT = "1,0.7071,0.5"
CACHE_VERSION = 1

# Benchmarks whose photos are already small: described at their own size, one scale.
_SMALL_SETS = {"demo": (512, (1.0,))}


# --------------------------------------------------------------------------------------------
# Benchmarks


def load_benchmark(
    source: str | os.PathLike[str] | None = None,
    *,
    dataset: str | None = None,
    gnd: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    database_ids: Sequence[str] | None = None,
    n_queries: int | None = None,
    seed: int = 0,
) -> Benchmark:
    """A benchmark from a name or a path.

    ``source`` (or the keywords): a dataset name (``demo``, ``roxford5k``, ... under ``data_root``),
    a revisitop ground-truth ``.pkl``, a folder of original ``*_query/good/ok/junk.txt`` files
    (original protocol; the database is ``database_ids`` or every .jpg of ``images``), or a
    labelled folder ``root/<class>/<image>`` (``n_queries`` sampled with ``seed``).
    ``images`` moves the image folder (same names, another place).
    """
    from . import datasets

    if source is not None:
        if dataset or gnd:
            raise ValueError("give the benchmark once: a source, or dataset=/gnd=")
        text = str(source)
        if text in DATASETS:
            dataset = text
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"benchmark not found: {path} (known datasets: {', '.join(DATASETS)})")
            if path.is_dir() and not any(path.glob("*_query.txt")):
                return datasets.from_folder(path, n_queries=n_queries, seed=seed)
            gnd = path
    if dataset and gnd:
        raise ValueError("give either a dataset name or a ground-truth file, not both")
    if dataset:
        ds = datasets.load_dataset(dataset, data_root)
        if images is not None:
            _move_images(ds, Path(images))
        return ds
    if gnd is None:
        raise ValueError("say what to evaluate on: a dataset name (e.g. demo) or a ground-truth file")
    gnd = Path(gnd)
    if gnd.is_dir():
        if database_ids is None:
            if images is None:
                raise ValueError("the original protocol needs the database: an image folder or descriptor ids")
            database_ids = sorted(p.stem for p in Path(images).glob("*.jpg"))
        return datasets.from_original_gt(gnd, list(database_ids), images=images, name=gnd.name)
    return datasets.from_gnd_file(gnd, images=images)


def _move_images(ds: Benchmark, images: Path) -> None:
    base = Path(ds.info.get("images") or ds.info.get("root") or ".")

    def move(p: Path) -> Path:
        try:
            return images / Path(p).relative_to(base)
        except ValueError:
            return images / Path(p).name

    ds.db_paths = [move(p) for p in ds.db_paths]
    ds.query_paths = [move(p) for p in ds.query_paths]


def extraction_defaults(bench: Benchmark | None = None) -> tuple[int, tuple[float, ...]]:
    """(imsize, scales) used when none are given: 1024 px and scales 1, 1/sqrt(2), 1/2, except for
    benchmarks of small photos (the bundled demo: 512 px, scale 1)."""
    if bench is not None and bench.name in _SMALL_SETS:
        return _SMALL_SETS[bench.name]
    return DEFAULT_IMSIZE, DEFAULT_SCALES


# --------------------------------------------------------------------------------------------
# Descriptors


def default_cache_dir() -> Path:
    """``$CBIR_CACHE``, else ``$XDG_CACHE_HOME/cbir/descriptors`` (``~/.cache/cbir/descriptors``)."""
    if os.environ.get("CBIR_CACHE"):
        return Path(os.environ["CBIR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cbir" / "descriptors"


def _file_stamp(p: Path) -> list:
    try:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p), None, None]


def cache_key(bench: Benchmark, spec: Any, settings: dict[str, Any]) -> str:
    """Hex key of (model identity, extraction settings, image list with sizes/mtimes, crop boxes)."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": CACHE_VERSION,
        "model": spec.identity(),
        "settings": settings,
        "db": [_file_stamp(Path(p)) for p in bench.db_paths],
        "queries": [_file_stamp(Path(p)) for p in bench.query_paths],
        "boxes": [list(b) if b is not None else None for b in bench.query_bboxes] if settings["crop"] else None,
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _run_extract(model: Any, paths: Sequence[Path], **kw: Any):
    """One extraction call (a seam: tests count the calls to see the cache work)."""
    from .extract import extract

    return extract(model, paths, **kw)


def describe(
    bench: Benchmark,
    model: Any,
    *,
    imsize: int | None = None,
    scales: Sequence[float] | None = None,
    crop: bool = True,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    progress: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Descriptors, Descriptors]:
    """(queries, database) descriptors of ``bench`` with ``model``.

    ``model``: a :class:`cbir.model.ModelSpec` (hashable settings: cached under ``cache_dir``), a
    backbone name or model file (read as ``ModelSpec(model)``), or an in-memory
    :class:`cbir.model.RetrievalNet` (never cached). Queries are cropped to their box unless
    ``crop=False``. ``imsize``/``scales`` default to :func:`extraction_defaults`. A BoW pooling
    without a codebook is fitted on the database images first (seeded). Every image must be
    readable (ImageError otherwise). ``meta`` of both holds the settings and ``cache`` ("hit",
    "miss" or None).
    """
    from .model import ModelSpec

    if isinstance(model, (str, os.PathLike)):
        model = ModelSpec(str(model))
    d_imsize, d_scales = extraction_defaults(bench)
    imsize = d_imsize if imsize is None else int(imsize)
    scales = tuple(float(s) for s in (d_scales if scales is None else scales))
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    settings = {"imsize": imsize, "scales": list(scales), "crop": bool(crop), "precision": precision,
                "device": str(device)}
    cached = None
    if cache_dir is not None and isinstance(model, ModelSpec):
        cached = Path(cache_dir).expanduser() / cache_key(bench, model, settings)
        hit = _read_cache(cached, bench)
        if hit is not None:
            return hit
    net = model.build() if isinstance(model, ModelSpec) else model
    missing = next((p for p in list(bench.db_paths[:1]) + list(bench.query_paths[:1]) if not Path(p).is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"image not found: {missing} (give the image folder, or `cbir download {bench.name}`)")
    if getattr(net.pooling, "name", "") == "bow" and not bool(net.pooling.fitted):
        from .extract import fit_bow

        fit_bow(net, bench.db_paths, imsize=imsize, device=device)
    common = dict(imsize=imsize, scales=scales, device=device, batch_size=batch_size, progress=progress,
                  strict=True, precision=precision)
    boxes = list(bench.query_bboxes) if crop else None
    t0 = time.perf_counter()
    db = _run_extract(net, list(bench.db_paths), **common)
    q = _run_extract(net, list(bench.query_paths), bboxes=boxes, **common)
    meta = {**net.describe(), "imsize": imsize, "scales": list(scales),
            "cropped_queries": bool(crop) and any(b is not None for b in bench.query_bboxes),
            "precision": precision, "extract_seconds": round(time.perf_counter() - t0, 2),
            "images": len(bench.db_paths) + len(bench.query_paths), "benchmark": bench.name,
            "cache": "miss" if cached is not None else None}
    qd = Descriptors(ids=list(bench.query_ids), vectors=q.vectors, meta=dict(meta, part="queries"))
    dbd = Descriptors(ids=list(bench.db_ids), vectors=db.vectors, meta=dict(meta, part="database"))
    if cached is not None:
        dbd.save(cached / "database")
        qd.save(cached / "queries")  # written last: its presence marks a complete entry
    return qd, dbd


def _read_cache(folder: Path, bench: Benchmark) -> tuple[Descriptors, Descriptors] | None:
    from .fileio import FormatError

    if not (folder / "queries" / "meta.json").is_file():
        return None
    try:
        q = Descriptors.load(folder / "queries")
        db = Descriptors.load(folder / "database")
    except (FormatError, FileNotFoundError, ValueError):
        return None  # damaged entry: describe again (and overwrite it)
    if q.ids != list(bench.query_ids) or db.ids != list(bench.db_ids):
        return None
    q.meta["cache"] = db.meta["cache"] = "hit"
    return q, db


def lookup(bench: Benchmark, features: str | os.PathLike[str] | Descriptors,
           query_features: str | os.PathLike[str] | Descriptors | None = None) -> tuple[Descriptors, Descriptors]:
    """(queries, database) rows of saved descriptors (a `cbir extract` folder), found by the
    benchmark's image ids; ``query_features`` holds separately described (cropped) queries.
    KeyError naming the first missing id."""
    feats = features if isinstance(features, Descriptors) else Descriptors.load(features, mmap=True)
    qfeats = feats if query_features is None else (
        query_features if isinstance(query_features, Descriptors) else Descriptors.load(query_features, mmap=True))
    where_db = "the descriptors" if isinstance(features, Descriptors) else str(features)
    where_q = where_db if query_features is None else (
        "the query descriptors" if isinstance(query_features, Descriptors) else str(query_features))

    def take(desc: Descriptors, names: list[str], what: str) -> Descriptors:
        try:
            rows = desc.row_of(names)
        except KeyError as exc:
            raise KeyError(f"{what}: {exc.args[0]}") from None
        return Descriptors(ids=list(names), vectors=np.asarray(desc.vectors[rows], dtype=np.float32),
                           meta={k: v for k, v in desc.meta.items() if k != "job"})

    db = take(feats, list(bench.db_ids), f"database image of {bench.name} missing in {where_db}")
    q = take(qfeats, list(bench.query_ids), f"query of {bench.name} missing in {where_q}")
    q.meta["features"], db.meta["features"] = where_q, where_db
    return q, db


def with_distractors(db: np.ndarray, distractors: str | os.PathLike[str] | Descriptors,
                     block: int = 65536) -> np.ndarray:
    """Database rows followed by the distractors' rows (a `cbir extract` folder, memory-mapped and
    copied in blocks): ground-truth indices are unchanged and every distractor is a negative (the
    revisitop +1M setting). Needs N x D x 4 bytes of memory."""
    dis = distractors if isinstance(distractors, Descriptors) else Descriptors.load(distractors, mmap=True)
    db = np.asarray(db, dtype=np.float32)
    if dis.dim != db.shape[1]:
        raise ValueError(f"distractor descriptors are {dis.dim}-D, the database {db.shape[1]}-D")
    out = np.empty((db.shape[0] + len(dis), db.shape[1]), dtype=np.float32)
    out[: db.shape[0]] = db
    for start in range(0, len(dis), block):
        out[db.shape[0] + start: db.shape[0] + start + block] = dis.vectors[start:start + block]
    return out


# --------------------------------------------------------------------------------------------
# Scores


def _matrix(x: Descriptors | np.ndarray) -> np.ndarray:
    return np.asarray(x.vectors if isinstance(x, Descriptors) else x, dtype=np.float32)


def score(
    bench: Benchmark,
    q: Descriptors | np.ndarray,
    db: Descriptors | np.ndarray,
    rerank: Rerank | None = None,
    *,
    top_k: int | None = None,
    distractors: str | os.PathLike[str] | Descriptors | None = None,
    keep_scores: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Re-rank (whitening, DBA, QE, diffusion as ``rerank`` says; default: cosine) and score with
    the benchmark's protocol.

    With ``distractors`` and ``top_k``, and no re-ranking beyond whitening, the database and the
    memory-mapped distractors are scored block by block (:func:`cbir.topk.chunked_topk`, on
    ``device``: "cpu" float32, "cuda" float16) and only the top K per query are kept: memory is
    bounded whatever the number of distractors, and the ranking is the in-memory one. Otherwise
    (DBA, QE, diffusion need every score) all rows are loaded (N x D x 4 bytes).

    Returns ``{"mAP": {easy, medium, hard} (or {"all"}), "mP": {...: {k: ..}}, "kappas", "applied",
    "n_distractors"}`` in percent (+ ``"scores"`` (nq, n) when ``keep_scores``). ``top_k`` ranks only
    the top K per query (large databases).
    """
    rerank = rerank or Rerank()
    qm, dbm = _matrix(q), _matrix(db)
    n_dis = 0
    if distractors is not None and top_k is not None and not keep_scores and (rerank.is_off() or _whiten_only(rerank)):
        return _score_chunked(bench, qm, dbm, rerank, top_k, distractors, device)
    if distractors is not None:
        before = dbm.shape[0]
        dbm = with_distractors(dbm, distractors)
        n_dis = dbm.shape[0] - before
    scores, applied = rerank.apply(qm, dbm)
    res = dict(bench.evaluate(scores, top_k=top_k))
    res["applied"] = applied
    res["n_distractors"] = n_dis
    if keep_scores:
        res["scores"] = scores
    return res


def _whiten_only(rerank: Rerank) -> bool:
    return bool(rerank.whiten) and Rerank(whiten=rerank.whiten) == rerank


def _score_chunked(bench: Benchmark, qm: np.ndarray, dbm: np.ndarray, rerank: Rerank, top_k: int,
                   distractors: str | os.PathLike[str] | Descriptors, device: str) -> dict[str, Any]:
    """:func:`score` for +distractors with a top-K cut: chunked top-k over [database, distractors]."""
    from .linalg import l2_normalize
    from .topk import chunked_topk, iter_blocks

    dis = distractors if isinstance(distractors, Descriptors) else Descriptors.load(distractors, mmap=True)
    if dis.dim != dbm.shape[1]:
        raise ValueError(f"distractor descriptors are {dis.dim}-D, the database {dbm.shape[1]}-D")
    applied: dict[str, Any] = {}
    transform = l2_normalize
    if rerank.whiten:
        from .whitening import Whitening

        w = Whitening.load(rerank.whiten)
        transform = w.apply
        applied["whiten"] = {k: v for k, v in w.meta.items() if isinstance(v, (int, float, str))}
        applied["whiten"].update(out_dim=w.out_dim, file=str(Path(rerank.whiten)))
    n_db = dbm.shape[0]

    def blocks():
        yield 0, dbm
        for start, block in iter_blocks(dis.vectors if isinstance(dis.vectors, np.ndarray) else dis):
            yield n_db + start, block

    _, ranks = chunked_topk(transform(qm), blocks(), top_k, device=device, transform=transform)
    res = dict(bench.evaluate(ranks, top_k=top_k))
    res["applied"] = applied
    res["n_distractors"] = len(dis)
    return res


def evaluate(
    bench: Benchmark | str | os.PathLike[str],
    model: Any = None,
    *,
    features: str | os.PathLike[str] | None = None,
    query_features: str | os.PathLike[str] | None = None,
    rerank: Rerank | None = None,
    top_k: int | None = None,
    distractors: str | os.PathLike[str] | None = None,
    keep_scores: bool = False,
    **describe_kw: Any,
) -> dict[str, Any]:
    """The whole chain: benchmark -> descriptors (``model`` through :func:`describe`, or saved
    ``features`` through :func:`lookup`) -> :func:`score`. The result also holds ``settings``
    (what made the descriptors) and ``dataset``/``protocol``/``n_db``/``n_queries``."""
    if not isinstance(bench, RetrievalDataset):
        bench = load_benchmark(bench)
    if (model is None) == (features is None):
        raise ValueError("give a model (to describe the images) or saved features, not both")
    if features is not None:
        q, db = lookup(bench, features, query_features)
    else:
        q, db = describe(bench, model, **describe_kw)
    res = score(bench, q, db, rerank, top_k=top_k, distractors=distractors, keep_scores=keep_scores)
    res.update(dataset=bench.name, protocol=bench.protocol, n_db=len(bench.db_ids), n_queries=len(bench.query_ids),
               settings={k: v for k, v in db.meta.items() if k != "part"})
    return res


# --------------------------------------------------------------------------------------------
# Searching a saved index


def search_index(index: Any, query: np.ndarray, k: int = 20, rerank: Rerank | None = None) -> tuple[list, dict]:
    """Top-``k`` hits (:class:`cbir.index.Hit`, best first) of one query descriptor (D,) in a
    :class:`cbir.index.Index`, re-ranked as ``rerank`` says (whitening, DBA, QE, diffusion need
    every stored vector and search exactly); without re-ranking, the index's own search structure.
    Returns (hits, applied)."""
    from .index import Hit

    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    if rerank is None or rerank == Rerank():
        return index.search(q, k)[0], {}
    ids, db = index.vectors()
    scores, applied = rerank.apply(q, db)
    order = np.argsort(-scores[0], kind="stable")[:k]
    return [Hit(int(ids[i]), index.get(int(ids[i])).path, float(scores[0, i])) for i in order], applied


def find_image(index: Any, name: str) -> int:
    """The id of an indexed image named by its id number, its path, or a `cbir extract` id
    (the path without extension, relative to a folder: ``a/b`` for ``.../photos/a/b.jpg``).
    KeyError when none matches, ValueError when a name matches several images."""
    text = str(name).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    direct = index.id_of_path(str(Path(text).resolve())) if Path(text).exists() else None
    if direct is not None:
        return direct
    stem = text[:-len(Path(text).suffix)] if Path(text).suffix else text
    found = [r.id for r in index.records() if Path(r.path).with_suffix("").as_posix().endswith("/" + stem.lstrip("/"))
             or Path(r.path).with_suffix("").as_posix() == stem]
    if not found:
        raise KeyError(f"no indexed image is named {text!r} (give an id number, a path, or a `cbir extract` id)")
    if len(found) > 1:
        raise ValueError(f"{len(found)} indexed images are named {text!r} (ids {found[:5]}); give more of the path")
    return found[0]

"""Benchmarks for the pipeline: load one by name or path, pick queries, default extraction sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..datasets import DATASETS, RetrievalDataset

#: The benchmark a pipeline runs on (image lists, crop boxes, ground truth, protocol).
Benchmark = RetrievalDataset

DEFAULT_IMSIZE = 1024
DEFAULT_SCALES = (1.0, 2.0 ** -0.5, 0.5)
DEFAULT_SCALES_TEXT = "1,0.7071,0.5"

# Benchmarks whose photos are already small: described at their own size, one scale.
SMALL_PHOTO_SETS = {"demo": (512, (1.0,))}


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
    from .. import datasets

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


def select_queries(bench: Benchmark, indices: Sequence[int]) -> Benchmark:
    """The same benchmark with only the queries ``indices`` (e.g. a leave-one-out fold); the
    database is unchanged."""
    import dataclasses

    idx = [int(i) for i in indices]
    return dataclasses.replace(
        bench, query_ids=[bench.query_ids[i] for i in idx], query_paths=[bench.query_paths[i] for i in idx],
        query_bboxes=[bench.query_bboxes[i] for i in idx], gnd=[bench.gnd[i] for i in idx],
        info=dict(bench.info, query_indices=idx))


def extraction_defaults(bench: Benchmark | None = None, model: str | None = None,
                        config: dict[str, Any] | None = None) -> tuple[int, tuple[float, ...]]:
    """(imsize, scales) used when none are given: for benchmarks of small photos their own (the
    bundled demo: 512 px, scale 1); else the default of backbone ``model`` (its ``config`` when
    built: ``cbir.backbones.default_resolution``, e.g. Lite0 512 px, ResNet/VGG 1024 px); else
    1024 px and scales 1, 1/sqrt(2), 1/2."""
    if bench is not None and bench.name in SMALL_PHOTO_SETS:
        return SMALL_PHOTO_SETS[bench.name]
    if model is not None:
        from ..backbones import default_resolution

        return default_resolution(model, config)
    return DEFAULT_IMSIZE, DEFAULT_SCALES

"""The resumable folder job: extract a list of images into a sharded descriptor folder.

Inputs are split into chunks of ``chunk`` consecutive images; each finished chunk is written at once
as one shard of the store (``DIR/shards/<start>.npy`` + ``.json``, see :mod:`cbir.descriptors`), so
the resume points are the store itself. ``DIR/shards/job.json`` holds the job's fingerprint (model
weights sampled, image list, ids, boxes, imsize, scales, precision, dtype, chunk): a rerun with the
same fingerprint skips finished shards (and returns at once when ``meta.json`` says the folder is
complete); another fingerprint starts over. ``meta.json`` is written last.

One front end, two engines: :func:`extract_to_dir` lists the work (:func:`plan`: fingerprint,
kept shards), hands the pending chunks to an engine and writes ``meta.json`` (:func:`finish`).
``engine="local"`` describes them in this process (:func:`cbir.extraction.loop.extract`);
``engine="ray"`` on a Ray cluster (:mod:`.ray_engine`, imported only then). Both write each chunk's
shard through :func:`save_chunk`, so either engine resumes the other's work and the outputs are the
same files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..descriptors import (ARRAY_NAME, META_NAME, SHARD_DIR, Descriptors, read_shard, write_shard,
                           write_sharded_meta)
from ..device import resolve_device
from ..fileio import FormatError, atomic_write_json, read_json
from . import loop
from .images import Box
from .loop import DEFAULT_SCALES, check_scales

if TYPE_CHECKING:
    from ..model import RetrievalNet

__all__ = ["extract_to_dir", "Job", "plan", "finish", "save_chunk", "LEGACY_PARTIAL", "JOB_NAME", "ENGINES"]

JOB_NAME = "job.json"
ENGINES = ("local", "ray")
LEGACY_PARTIAL = ".cbir-partial"  # the temporary chunk folder of cbir <= 0.1 (removed when found)


def fingerprint(model, ids, paths, bboxes, imsize, settings: Sequence[Any]) -> str:
    """Identity of what decides the output, 24 hex digits of :func:`cbir.cache.identity.key_of`: the
    model (its description and :func:`cbir.extraction.backends.weights_sha256`, every weight), the
    inputs and the settings."""
    from ..cache.identity import key_of
    from .backends import weights_sha256

    return key_of({"model": model.describe(), "weights": weights_sha256(model), "ids": list(ids),
                   "paths": [str(p) for p in paths], "bboxes": [list(b) if b else None for b in bboxes],
                   "imsize": imsize, "settings": list(settings)}, 24)


@dataclass
class Job:
    """One extraction job into ``out``: its inputs, settings, fingerprint and which chunks are done."""

    out: Path
    paths: list[Path]
    ids: list[str]
    bboxes: list[Box | None]
    imsize: int | None
    scales: tuple[float, ...]
    precision: str
    dtype: str
    chunk: int
    job: str
    complete: bool = False
    resubmits: int = 0  # runs of the chunks still missing after an engine lost a node (Ray)

    @property
    def shard_dir(self) -> Path:
        return self.out / SHARD_DIR

    @property
    def starts(self) -> list[int]:
        return list(range(0, len(self.paths), self.chunk))

    def stop(self, start: int) -> int:
        return min(start + self.chunk, len(self.paths))

    def pending(self) -> list[int]:
        """Chunk starts without a complete shard."""
        return [s for s in self.starts if read_shard(self.shard_dir, s) is None]

    def inputs_of(self, starts: Sequence[int]) -> int:
        """How many inputs the chunks starting at ``starts`` hold."""
        return sum(self.stop(s) - s for s in starts)


def plan(model, images: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
         ids: Sequence[str] | None = None, bboxes: Sequence[Box | None] | None = None,
         imsize: int | None = 1024, scales: Sequence[float] = DEFAULT_SCALES, dtype: str = "float32",
         chunk: int = 64, device: str | torch.device = "auto", precision: str = "auto", backend: str = "torch") -> Job:
    """Check the arguments, fingerprint the job and prepare ``out_dir`` (keep or clear earlier work).

    The job's precision is the one ``backend`` computes in (:func:`cbir.extraction.backends.resolve_backend`)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    paths = [Path(p) for p in images]
    ids = [p.stem for p in paths] if ids is None else list(ids)
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} ids for {len(paths)} images")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    boxes = [None] * len(paths) if bboxes is None else list(bboxes)
    if len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} crop boxes for {len(paths)} images")
    scales = check_scales(scales)
    out = Path(out_dir)
    # an explicit precision needs no device here (a Ray cluster's GPUs may be on other machines);
    # "auto" is what ``backend`` computes in (ONNX Runtime: fp32)
    from .backends import resolve_backend

    amp = precision if precision in ("fp32", "bf16") else resolve_backend(resolve_device(device), backend, precision)[1]
    key = fingerprint(model, ids, paths, boxes, imsize, (*scales, amp, dtype, chunk))
    job = Job(out, paths, ids, boxes, imsize, scales, amp, dtype, chunk, key)
    shutil.rmtree(out / LEGACY_PARTIAL, ignore_errors=True)
    if (out / META_NAME).is_file():
        try:
            meta = read_json(out / META_NAME, "descriptor metadata")
            if isinstance(meta, dict) and meta.get("job") == key and meta.get("dtype") == dtype:
                Descriptors.load(out)  # readable and consistent
                job.complete = True
                return job
        except (FormatError, FileNotFoundError, ValueError, KeyError):
            pass
        (out / META_NAME).unlink()  # another job's result (or damaged): this job replaces it
        (out / ARRAY_NAME).unlink(missing_ok=True)
    state = job.shard_dir / JOB_NAME
    if job.shard_dir.is_dir():
        try:
            same = read_json(state, "extraction job").get("job") == key
        except (FileNotFoundError, FormatError, AttributeError):
            same = False
        if not same:
            shutil.rmtree(job.shard_dir)
    job.shard_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"job": key, "n": len(paths), "chunk": chunk})
    return job


def save_chunk(job: Job, start: int, res: loop.ExtractResult) -> dict[str, Any]:
    """Write the shard of chunk ``start`` from its ExtractResult (``ok`` relative to ``start``)."""
    ok = [int(i) + start for i in res.ok]
    failed = [dict(f, id=job.ids[start + i]) for i, f in zip(_failed_rows(job, start, res), res.failed)]
    return write_shard(job.shard_dir, start, job.stop(start), [job.ids[i] for i in ok],
                       res.vectors.astype(job.dtype), failed)


def _failed_rows(job: Job, start: int, res: loop.ExtractResult) -> list[int]:
    where = {str(p): i for i, p in enumerate(job.paths[start:job.stop(start)])}
    return [where.get(str(Path(f["path"])), 0) for f in res.failed]


def finish(job: Job, model, extra_meta: dict | None = None) -> Descriptors:
    """Write ``meta.json`` over the complete shards (ValueError if one is missing); the loaded store."""
    if job.complete:
        return Descriptors.load(job.out)
    shards, failed = [], []
    for start in job.starts:
        got = read_shard(job.shard_dir, start)
        if got is None:
            raise ValueError(f"{job.shard_dir}: the shard of inputs {start}..{job.stop(start) - 1} is missing")
        info, arr = got
        shards.append({"name": info["name"], "rows": int(arr.shape[0]), "start": start, "stop": job.stop(start)})
        failed.extend(info.get("failed", []))
    meta = {
        **model.describe(),
        "imsize": job.imsize,
        "scales": list(job.scales),
        "multiscale_p": round(float(model.multiscale_p()), 4),
        "precision": job.precision,
        "job": job.job,
        "chunk": job.chunk,
        **(extra_meta or {}),
    }
    write_sharded_meta(job.out, shards, meta, failed, model.dim, job.dtype)
    (job.shard_dir / JOB_NAME).unlink(missing_ok=True)
    return Descriptors.load(job.out)


def extract_to_dir(
    model: "RetrievalNet",
    images: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    ids: Sequence[str] | None = None,
    bboxes: Sequence[Box | None] | None = None,
    imsize: int | None = 1024,
    scales: Sequence[float] = DEFAULT_SCALES,
    dtype: str = "float32",
    chunk: int = 64,
    extra_meta: dict | None = None,
    cache: Any = None,
    engine: str = "local",
    address: str | None = None,
    ray_workers: int | None = None,
    cpus_per_worker: int = 1,
    retries: int = 2,
    on_plan: Callable[[Job], None] | None = None,
    **kw: Any,
) -> Descriptors:
    """Extract into ``out_dir`` as a sharded descriptor store, resumably (see the module docstring).

    ``cache``: a :class:`cbir.cache.describe.DescriptorCache` opened with these settings: images it
    holds are read from it, the others described and kept (the extraction cache; local engine only).
    Returns the store (``Descriptors`` with memory-mapped ``vectors``). ``kw`` go to
    :func:`cbir.extraction.loop.extract` (batch_size, device, workers, progress, strict, precision,
    decode, backend); with ``engine="ray"`` only batch_size, device, progress, strict and precision
    apply (PIL decoding in Ray tasks, the torch backend).
    ``engine``: "local" (this process) or "ray" (:mod:`cbir.extraction.ray_engine`): ``address``
    ("auto", "HOST:6379", "ray://HOST:10001"; None = start a local Ray), ``ray_workers`` model actors
    (default: the cluster's GPUs, else its CPUs / ``cpus_per_worker``), ``retries``: how many times
    the chunks still missing after a lost node or actor are submitted again (the kept shards are
    the resume points, so nothing is described twice).
    ``on_plan(job)`` is called once the job is planned (``job.complete``, ``job.pending()`` tell
    whether it is finished or resumes), before any image is described.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    precision = kw.get("precision", "auto")
    device = kw.get("device", "auto")
    if engine == "ray":
        from . import ray_engine

        if cache is not None:
            raise ValueError("the extraction cache is read by the local engine only (engine='ray' describes every image)")
        ray_engine.check_options(kw)
        device, precision = ray_engine.connect(address, ray_workers, cpus_per_worker, device, precision)
    job = plan(model, images, out_dir, ids=ids, bboxes=bboxes, imsize=imsize, scales=scales, dtype=dtype,
               chunk=chunk, device=device, precision=precision,
               backend="torch" if engine == "ray" else kw.setdefault("backend", "auto"))
    if on_plan is not None:
        on_plan(job)
    if job.complete:
        return Descriptors.load(job.out)
    if engine == "ray":
        ray_engine.run(job, model, save_chunk, address=address, workers=ray_workers, cpus_per_worker=cpus_per_worker,
                       device=device, retries=retries, batch_size=kw.get("batch_size") or 8,
                       progress=kw.get("progress", True), strict=kw.get("strict", False))
    else:
        _run_local(job, model, dict(kw, precision=job.precision), cache)
    return finish(job, model, extra_meta)


def _run_local(job: Job, model, kw: dict[str, Any], cache: Any = None) -> None:
    """Describe the pending chunks in this process, one shard written per chunk (through the
    extraction ``cache`` when given)."""
    todo = job.pending()
    progress = kw.pop("progress", True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(job.paths), unit="img", desc="extract", dynamic_ncols=True,
                   initial=len(job.paths) - job.inputs_of(todo))
    run = loop.extract
    if cache is not None:
        from functools import partial

        from ..cache.describe import extract_with_cache

        run = partial(extract_with_cache, cache=cache)
    try:
        for start in todo:
            stop = job.stop(start)
            before = bar.n if bar is not None else 0
            res = run(model, job.paths[start:stop], bboxes=job.bboxes[start:stop], imsize=job.imsize,
                      scales=job.scales, progress=False,
                      on_progress=bar.update if bar is not None else None, **kw)
            save_chunk(job, start, res)
            if bar is not None:
                bar.update(before + (stop - start) - bar.n)  # failed images count as done too
    finally:
        if bar is not None:
            bar.close()

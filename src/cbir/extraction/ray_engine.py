"""The Ray engine of :func:`cbir.extraction.job.extract_to_dir`: decode in tasks, describe in an actor pool.

The front end (:func:`cbir.extraction.job.extract_to_dir` with ``engine="ray"``) lists the inputs,
plans the job (fingerprint, kept shards) and writes ``meta.json``; this module only describes the
pending chunks, on Ray Data, and writes each chunk's shard through the writer the front end hands
it (:func:`cbir.extraction.job.save_chunk`, as for the local engine). A run can therefore be
resumed by either engine, and the descriptors equal the local engine's to float tolerance (the same
PIL decoding and resizing, the same :func:`cbir.extraction.loop.describe`).

- decode: ``Dataset.map`` tasks, one row per image: EXIF-rotated, cropped, shrunk to ``imsize``,
  as uint8 pixels (a failure becomes a row with its reason);
- describe: ``Dataset.map_batches`` over an actor pool of ``workers`` actors, each holding one copy
  of the model (one GPU per actor when the cluster has GPUs, else ``cpus_per_worker`` CPU threads);
- write: the driver collects the results by chunk and writes each chunk's shard as soon as its
  last image is done (one writer; an interrupted run keeps every finished shard).

Fault tolerance, two layers. (1) Ray's own: a decoding task whose node dies is run again (task
retries; Ray Data's default), a model actor whose node dies is restarted elsewhere and its
unfinished batches are sent again (Ray Data creates the pool's actors with ``max_restarts=-1``,
``max_task_retries=-1``), lost blocks are rebuilt from their lineage. (2) Ours: when the run still
fails with a system error (a node, actor, worker or object lost: :data:`LOST`), the chunks without a
shard are submitted again as a new run, up to ``retries`` times. Rows are keyed by input index and a
chunk's shard is written once, when all its rows are in: a row that comes twice is dropped, a
chunk whose rows were lost is described again by the next run, so nothing is lost or doubled.

``address``: None starts a local Ray (``workers`` CPUs); "auto" or "ray://host:10001" or
"host:6379" joins a running cluster (``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others). ``import ray`` happens here only.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .images import ImageError, load_image, reason_of, resized_pixels

if TYPE_CHECKING:  # torch comes with it: the decoding tasks, which import this module, do without it
    from .job import Job

__all__ = ["connect", "run", "check_options", "LOST", "RowsLost"]

log = logging.getLogger(__name__)


class RowsLost(RuntimeError):
    """Ray Data finished without returning every row of the run (the chunks are submitted again)."""


#: the names of :mod:`ray.exceptions` that mean lost machines or processes, not a bad input: the
#: front end submits the chunks still missing again after one of these
LOST = ("NodeDiedError", "RayActorError", "WorkerCrashedError", "ObjectLostError", "RaySystemError",
        "LocalRayletDiedError", "OutOfMemoryError")


def _decode_row(row: dict[str, Any], imsize: int | None) -> dict[str, Any]:
    """One image -> {"i", "pixels" (H,W,3) uint8 or (0,0,3), "reason"} (runs in a Ray task)."""
    box = tuple(row["bbox"]) if row.get("has_box") else None
    try:
        pixels, reason = resized_pixels(load_image(row["path"], box), imsize), ""
    except ImageError as exc:
        pixels, reason = np.zeros((0, 0, 3), np.uint8), exc.reason
    except Exception as exc:  # pragma: no cover - unexpected decoder failure
        pixels, reason = np.zeros((0, 0, 3), np.uint8), reason_of(exc)
    return {"i": int(row["i"]), "pixels": pixels, "reason": reason}


class _Describer:
    """Ray actor: one model, (B rows of pixels) -> (B, D) descriptors, same-size images batched."""

    def __init__(self, model, scales: Sequence[float], device: str, precision: str, threads: int):
        import torch

        from ..device import resolve_device
        from .batching import prepare_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.dev = resolve_device(device)
        self.model = prepare_model(model, self.dev, True)
        self.scales, self.precision, self.p = tuple(scales), precision, model.multiscale_p()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ..device import autocast
        from .images import pixels_tensor
        from .loop import describe

        n = len(batch["i"])
        out = np.zeros((n, self.model.dim), np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for j in range(n):
            if not batch["reason"][j]:
                groups.setdefault(tuple(np.shape(batch["pixels"][j])), []).append(j)
        with torch.inference_mode(), autocast(self.dev, self.precision):
            for rows in groups.values():
                x = torch.stack([pixels_tensor(batch["pixels"][j], self.model.mean, self.model.std) for j in rows])
                out[rows] = describe(self.model, x.to(self.dev), self.scales, self.p).cpu().numpy()
        return {"i": np.asarray(batch["i"], np.int64), "vector": out,
                "reason": np.asarray(batch["reason"], dtype=object)}


def check_options(kw: dict[str, Any]) -> None:
    """ValueError for an option of the local engine that Ray does not have."""
    if kw.get("backend", "torch") not in ("torch", "auto"):
        raise ValueError(f"backend={kw['backend']!r}: the Ray engine runs the torch backend")
    if kw.get("decode", "auto") == "cuda":
        raise ValueError("decode='cuda': the Ray engine decodes with PIL in Ray tasks")
    if kw.get("workers") not in (None, 0):
        raise ValueError("workers (decoding processes) is for engine='local'; Ray decodes in its own tasks "
                         "(ray_workers sets the model actors)")


def connect(address: str | None, workers: int | None, cpus_per_worker: int, device: str,
            precision: str) -> tuple[str, str]:
    """Join (``address``) or start a Ray; the (device, precision) every actor will use.

    device "auto": "cuda" when the cluster has GPUs, else "cpu"; precision "auto": bf16 on CUDA,
    else what this machine's CPU computes natively (:func:`cbir.device.resolve_precision`).
    """
    import ray

    if cpus_per_worker < 1:
        raise ValueError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
    if workers is not None and workers < 1:
        raise ValueError(f"ray_workers must be >= 1, got {workers}")
    if address is None and not ray.is_initialized():
        # one logical CPU per model actor thread, plus one for the (light) decoding tasks
        # address="local": a new Ray of our own, even where `ray start` (or a test's cluster) runs on this machine
        ray.init(address="local", num_cpus=max(1, (workers or os.cpu_count() or 1) * cpus_per_worker) + 1,
                 include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _system_config={"worker_niceness": 0})  # Ray's default 15 starves the actors on a busy machine
    elif not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = str(device)
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise ValueError(f"device={device!r}: the Ray cluster has no GPU (use device='cpu')")
        return device, "bf16" if precision == "auto" else precision
    from ..device import resolve_precision

    import torch

    return device, resolve_precision(torch.device(device), precision)


def run(job: "Job", model, save: Callable[["Job", int, Any], Any], *, address: str | None = None,
        workers: int | None = None, cpus_per_worker: int = 1, device: str = "cpu", retries: int = 2,
        batch_size: int = 8, progress: bool = True, strict: bool = False) -> None:
    """Describe the chunks of ``job`` without a shard on Ray; ``save(job, start, ExtractResult)``
    writes each chunk's shard (the front end's :func:`cbir.extraction.job.save_chunk`).

    After a lost node / actor / object (:data:`LOST`) that Ray itself did not recover from, the
    chunks still without a shard are submitted again, up to ``retries`` times; ``job.resubmits``
    counts those runs. ``address`` is only used to connect when Ray is not yet initialised.
    """
    import ray

    if not ray.is_initialized():
        connect(address, workers, cpus_per_worker, device, job.precision)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    for attempt in range(retries + 1):
        todo = job.pending()
        if not todo:
            return
        try:
            _run(ray, job, model, todo, save, device, gpus, workers, cpus_per_worker, batch_size, progress, strict)
            return
        except Exception as exc:
            if attempt == retries or not _lost(exc):
                raise
            job.resubmits += 1
            log.warning("Ray lost part of the run (%s); submitting the %d chunks still missing again",
                        type(exc).__name__, len(job.pending()))


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or the exception it wraps: ``__cause__``, Ray's ``.cause``) is a :data:`LOST` one."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, RowsLost) or any(c.__name__ in LOST for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or getattr(exc, "cause", None)
        seen += 1
    return False


def _run(ray, job, model, todo, save, device, gpus, workers, cpus_per_worker, batch_size, progress, strict):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    rows = [{"i": i, "path": str(job.paths[i]), "has_box": job.bboxes[i] is not None,
             "bbox": [float(v) for v in (job.bboxes[i] or (0, 0, 0, 0))]}
            for start in todo for i in range(start, job.stop(start))]
    on_gpu = device.startswith("cuda")
    if workers is None:
        workers = gpus if on_gpu else max(1, (int(ray.cluster_resources().get("CPU", 2)) - 1) // cpus_per_worker)
    imsize = job.imsize
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * workers)))
    # decoding: tasks of half a logical CPU (so Ray does not fuse them into the model actors)
    ds = ds.map(_decode_row, fn_kwargs={"imsize": imsize}, num_cpus=0.5)
    ds = ds.map_batches(
        _Describer,
        fn_constructor_args=(model.cpu(), job.scales, device, job.precision, 0 if on_gpu else cpus_per_worker),
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if on_gpu else 0, num_cpus=0 if on_gpu else cpus_per_worker,
    )
    start_of = {i: start for start in todo for i in range(start, job.stop(start))}
    done: dict[int, dict[int, tuple[np.ndarray | None, str]]] = {start: {} for start in todo}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, v, reason in zip(batch["i"], batch["vector"], batch["reason"]):
            start = start_of[int(i)]
            if start not in done:  # a row that came twice (a retried task): its shard is written
                continue
            done[start][int(i)] = (None if reason else v, str(reason))
            if len(done[start]) == job.stop(start) - start:
                _write(job, start, done.pop(start), strict, model.dim, save)
    if done:  # pragma: no cover - Ray lost rows
        raise RowsLost(f"Ray returned no result for {sum(job.stop(s) - s for s in done)} images")


def _write(job, start: int, got: dict[int, tuple[np.ndarray | None, str]], strict: bool, dim: int, save) -> None:
    ok = sorted(i for i, (v, _) in got.items() if v is not None)
    failed = [{"path": str(job.paths[i]), "reason": r} for i, (v, r) in sorted(got.items()) if v is None]
    if strict and failed:
        raise ImageError(failed[0]["path"], failed[0]["reason"])
    from .loop import ExtractResult

    vectors = np.stack([got[i][0] for i in ok]).astype(np.float32) if ok else np.zeros((0, dim), np.float32)
    save(job, start, ExtractResult(vectors=vectors, ok=np.asarray(ok, np.int64) - start, failed=failed))

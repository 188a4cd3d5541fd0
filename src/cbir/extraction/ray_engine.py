"""The folder job on Ray Data: list files -> decode in parallel tasks -> describe in an actor pool.

Same inputs, fingerprint and files as :func:`cbir.extraction.job.extract_to_dir` (the shards of the
sharded store, ``meta.json`` last), so a run can be resumed by either engine and the descriptors
equal the local engine's to float tolerance (the same PIL decoding and resizing, the same
:func:`cbir.extraction.loop.describe`).

- decode: ``Dataset.map`` tasks, one row per image: EXIF-rotated, cropped, shrunk to ``imsize``,
  as uint8 pixels (a failure becomes a row with its reason);
- describe: ``Dataset.map_batches`` over an actor pool of ``workers`` actors, each holding one copy
  of the model (one GPU per actor when the cluster has GPUs, else ``cpus_per_worker`` CPU threads);
- write: the driver collects the results by chunk and writes each chunk's shard as soon as its
  last image is done (one writer; an interrupted run keeps every finished shard).

``address``: None starts a local Ray (``workers`` CPUs); "auto" or "ray://host:10001" or
"host:6379" joins a running cluster (``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others). ``import ray`` happens here only.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..descriptors import Descriptors
from .images import Box, ImageError, load_image, reason_of, resized_pixels
from .job import finish, plan, save_chunk
from .loop import DEFAULT_SCALES, ExtractResult

__all__ = ["extract_to_dir_ray"]


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
        return {"i": np.asarray(batch["i"], np.int64), "vector": out, "reason": np.asarray(batch["reason"], dtype=object)}


def extract_to_dir_ray(
    model,
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
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    strict: bool = False,
) -> Descriptors:
    """:func:`cbir.extraction.job.extract_to_dir` on Ray Data (see the module docstring).

    ``workers``: actors describing images (default: the cluster's GPUs, else its CPUs / ``cpus_per_worker``).
    ``device``: "auto" = a GPU per actor when the cluster has GPUs, else the CPU. ``precision`` as in
    ``extract``, decided on the driver (all actors use the same). ``strict``: ImageError at the end
    of the first chunk holding an unreadable image.
    """
    import ray

    if address is None and not ray.is_initialized():
        # one logical CPU per model actor thread, plus one for the (light) decoding tasks
        ray.init(num_cpus=max(1, (workers or os.cpu_count() or 1) * cpus_per_worker) + 1, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 _system_config={"worker_niceness": 0})  # Ray's default 15 starves the actors on a busy machine
    elif not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    job = plan(model, images, out_dir, ids=ids, bboxes=bboxes, imsize=imsize, scales=scales, dtype=dtype,
               chunk=chunk, device="cpu" if device.startswith("cuda") and not gpus else device,
               precision=precision)
    if job.complete:
        return Descriptors.load(job.out)
    if device.startswith("cuda") and job.precision == "auto":  # pragma: no cover - decided by plan()
        job.precision = "bf16"
    todo = job.pending()
    if todo:
        _run(ray, job, model, todo, device, gpus, workers, cpus_per_worker, batch_size, progress, strict)
    return finish(job, model, extra_meta)


def _run(ray, job, model, todo, device, gpus, workers, cpus_per_worker, batch_size, progress, strict):
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
        _Describer, fn_constructor_args=(model.cpu(), job.scales, device, job.precision, 0 if on_gpu else cpus_per_worker),
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if on_gpu else 0, num_cpus=0 if on_gpu else cpus_per_worker,
    )
    start_of = {i: start for start in todo for i in range(start, job.stop(start))}
    done: dict[int, dict[int, tuple[np.ndarray | None, str]]] = {start: {} for start in todo}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, v, reason in zip(batch["i"], batch["vector"], batch["reason"]):
            start = start_of[int(i)]
            done[start][int(i)] = (None if reason else v, str(reason))
            if len(done[start]) == job.stop(start) - start:
                _write(job, start, done.pop(start), strict, model.dim)
    if done:  # pragma: no cover - Ray lost rows
        raise RuntimeError(f"Ray returned no result for {sum(job.stop(s) - s for s in done)} images")


def _write(job, start: int, got: dict[int, tuple[np.ndarray | None, str]], strict: bool, dim: int) -> None:
    ok = sorted(i for i, (v, _) in got.items() if v is not None)
    failed = [{"path": str(job.paths[i]), "reason": r} for i, (v, r) in sorted(got.items()) if v is None]
    if strict and failed:
        raise ImageError(failed[0]["path"], failed[0]["reason"])
    vectors = np.stack([got[i][0] for i in ok]).astype(np.float32) if ok else np.zeros((0, dim), np.float32)
    save_chunk(job, start, ExtractResult(vectors=vectors, ok=np.asarray(ok, np.int64) - start, failed=failed))

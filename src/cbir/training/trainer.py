"""The training loop: mining every epoch, tuples through a RetrievalNet, one of the three losses.

``train(config)`` runs a whole training from a config (:class:`~cbir.training.config.TrainConfig`,
or the same as plain data; see ``configs/*.yaml``); ``cbir train CONFIG [key=value …]`` is its
command line. :func:`train` is a short loop over named steps:

1. ``_setup``: check that every input exists (all missing ones in one error, before any work),
   build the model, read the training images, clean them (progress bar), hold out the validation
   classes (``validation.split``), initialise a whitening layer, build optimiser, scheduler, loss;
   with ``resume=True`` restore all of it from ``OUT/last.pt``;
2. per epoch: ``_mine`` (describe the queries and a random pool with the current model, one
   positive and ``k`` diverse hard negatives per query, :func:`~cbir.training.data.build_epoch_tuples`),
   ``_train_epoch`` (BN frozen as cirtorch does, GeM ``p`` in its own parameter group, gradient
   accumulation, bf16 autocast on CUDA), ``_validate`` (every ``validation.every`` epochs),
   ``_record`` (history, TensorBoard), ``_save`` (checkpoint, best model, history);
3. stop early after ``validation.patience`` validations without improvement.

With validation, ``OUT/model.pt`` and the returned model are the **best validated epoch**, the
start (epoch 0) included, so fine-tuning never returns a model worse than the one it started from
on the validation data. ``OUT/last.pt`` is always the last epoch (what ``resume`` continues).

Multi-GPU: launched by ``torchrun --nproc_per_node N``, each process trains on every N-th tuple of
the (identically mined) epoch, gradients averaged by DistributedDataParallel; ``batch_tuples`` is
per process, so N processes of ``b`` tuples make the step of one process of ``N·b`` tuples.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..device import resolve_device
from ..fileio import atomic_write_json
from ..report import jsonable
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    numpy_rng_state,
    save_checkpoint,
    set_numpy_rng_state,
)
from .config import (
    DEFAULTS,
    TrainConfig,
    ValidationConfig,
    WhiteningConfig,
    load_config,
    merge_config,
    missing_inputs,
    parse_overrides,
)
from .data import (
    ImageDataset,
    TrainingImages,
    TupleDataset,
    build_epoch_tuples,
    clean_classes,
    load_training_images,
    split_for_validation,
)
from .losses import APLoss, build_loss
from .timing import TimeEstimate, estimate

__all__ = [
    "DEFAULTS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TrainConfig",
    "merge_config",
    "parse_overrides",
    "load_config",
    "freeze_batchnorm",
    "param_groups",
    "lr_factor",
    "embed_images",
    "heldout_benchmark",
    "validate",
    "is_better",
    "kept_epoch_summary",
    "train",
]


# ---------------------------------------------------------------------------------------------
# small pieces


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every batch-norm layer in eval mode (running statistics stay fixed); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def param_groups(model: nn.Module, lr: float, weight_decay: float, pool_lr_mult: float = 10.0,
                 whiten_lr_mult: float = 1.0, freeze: list[str] | tuple[str, ...] = (),
                 train_only: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """Optimiser groups: backbone (lr, weight decay), pooling e.g. GeM p (lr·pool_lr_mult, no
    decay), whitening (lr·whiten_lr_mult). Parameters whose name starts with a ``freeze`` prefix,
    or (when ``train_only`` is given) with none of its prefixes, get ``requires_grad=False`` and no group."""
    groups: dict[str, list] = {"backbone": [], "pooling": [], "whiten": []}
    for name, p in model.named_parameters():
        frozen = any(name.startswith(f) for f in freeze)
        if train_only is not None and not any(name.startswith(t) for t in train_only):
            frozen = True
        if frozen:
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        key = name.split(".", 1)[0]
        groups["pooling" if key == "pooling" else "whiten" if key == "whiten" else "backbone"].append(p)
    out = [{"params": groups["backbone"], "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
           {"params": groups["pooling"], "lr": lr * pool_lr_mult, "weight_decay": 0.0, "name": "pooling"},
           {"params": groups["whiten"], "lr": lr * whiten_lr_mult, "weight_decay": weight_decay, "name": "whiten"}]
    out = [g for g in out if g["params"]]
    if not out:
        raise ValueError("no trainable parameters left (optim.freeze / optim.train_only exclude them all)")
    return out


def lr_factor(schedule: str, epoch: int, epochs: int, gamma: float = 0.99) -> float:
    """Multiplier of the base learning rate in ``epoch`` (0-based): exponential ``γ^e``, cosine
    ``½(1 + cos(π e / E))``, constant 1."""
    if schedule == "exponential":
        return gamma**epoch
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose exponential, cosine or constant")


def is_better(score: float, best: float | None) -> bool:
    """A validation score replaces the best one only if strictly higher (NaN never does)."""
    if score != score:  # NaN
        return False
    return best is None or best != best or score > best


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def embed_images(model: nn.Module, paths: list[Path], indices: np.ndarray, size: int, *, device: torch.device,
                 batch_size: int = 32, workers: int = 0, bf16: bool = True, pooled: bool = False,
                 progress: str | None = None) -> np.ndarray:
    """Descriptors (len(indices), D) float32 of square-resized images, as the training sees them.
    ``pooled=True`` gives the vectors before whitening (``model.pool``); ``progress`` names a
    progress bar (none when None)."""
    was_training = model.training
    model.eval()
    ds = ImageDataset(paths, indices, size, model.mean, model.std)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False)
    it = dl
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(dl, desc=progress, unit="batch", leave=False)
    out = []
    for _, x in it:
        with _autocast(device, bf16):
            v = model.pool(x.to(device)) if pooled else model(x.to(device))
        out.append(v.float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def _init_whitening(model: nn.Module, data: TrainingImages, wc: WhiteningConfig, *, size: int, device, batch_size,
                    workers, bf16, rng: np.random.Generator) -> dict:
    """Learned whitening (Lw from query/positive pairs) or PCA whitening of the pooled training
    descriptors, attached as ``model.whiten`` (an nn.Linear that then trains with the rest)."""
    from ..whitening import learn_lw, learn_pca_whitening

    idx = np.arange(len(data.paths))
    if wc.max_images and len(idx) > wc.max_images:
        idx = np.sort(rng.choice(len(idx), wc.max_images, replace=False))
    x = embed_images(model, data.paths, idx, size, device=device, batch_size=batch_size, workers=workers, bf16=bf16,
                     pooled=True)
    pos = {int(i): r for r, i in enumerate(idx)}
    if wc.init == "lw":
        pairs = [(pos[int(q)], pos[int(p)]) for q, ps in zip(data.queries, data.positives) for p in ps
                 if int(q) in pos and int(p) in pos]
        if not pairs:
            raise ValueError("learned whitening needs matching pairs among the sampled training images")
        w = learn_lw(x, np.asarray(pairs), dim=wc.dim, shrinkage=wc.shrinkage)
    else:
        w = learn_pca_whitening(x, dim=wc.dim, shrinkage=wc.shrinkage)
    lin = w.to_linear().to(device)
    model.set_whitening(lin, f"{wc.init} (learned on {len(idx)} training images, then fine-tuned)")
    return {"whitening": wc.init, "images": int(len(idx)), "dim": int(lin.out_features)}


# ---------------------------------------------------------------------------------------------
# validation


def heldout_benchmark(heldout: TrainingImages):
    """The held-out classes as a benchmark: every image a query against all held-out images,
    positives the other images of its class, itself junk (the Holidays convention)."""
    from ..datasets.base import RetrievalDataset

    names = [str(p) for p in heldout.paths]
    c = heldout.clusters
    gnd = [{"easy": [int(j) for j in np.flatnonzero(c == c[i]) if j != i], "hard": [], "junk": [i], "bbx": None}
           for i in range(len(names))]
    return RetrievalDataset(name="heldout", protocol="revisitop", db_ids=names, db_paths=list(heldout.paths),
                            query_ids=names, query_paths=list(heldout.paths), query_bboxes=[None] * len(names),
                            gnd=gnd, info={"split": "held-out training classes"})


def _gnd_benchmark(vc: ValidationConfig):
    from ..datasets.revisitop import from_gnd_file

    bench = from_gnd_file(vc.gnd, images=vc.images, ext=vc.ext)
    if vc.query_indices is not None:
        qi = list(vc.query_indices)
        bench.query_ids = [bench.query_ids[i] for i in qi]
        bench.query_paths = [bench.query_paths[i] for i in qi]
        bench.query_bboxes = [bench.query_bboxes[i] for i in qi]
        bench.gnd = [bench.gnd[i] for i in qi]
    return bench


def validate(model: nn.Module, bench, vc: ValidationConfig, device: torch.device) -> dict:
    """revisitop mAP (E/M/H, percent) of ``model`` on the benchmark ``bench`` (queries cropped to
    their boxes), described at ``vc.imsize`` × ``vc.scales`` through :mod:`cbir.pipeline`;
    {"mAP": {...}, "mP": {...}}. A network whose descriptors are not finite (diverged) scores NaN,
    which is never the best."""
    from ..pipeline import describe, score

    # the library chain: every image must load (ImageError naming the first that does not)
    q, db = describe(bench, model, imsize=vc.imsize, scales=tuple(vc.scales), device=device)
    if not (np.isfinite(q.vectors).all() and np.isfinite(db.vectors).all()):  # a diverged network
        return {"mAP": {k: float("nan") for k in ("easy", "medium", "hard")}, "mP": {}, "diverged": True}
    res = score(bench, q, db)
    return {"mAP": res["mAP"], "mP": res["mP"]}


# ---------------------------------------------------------------------------------------------
# distributed


def _dist_setup(device_cfg: str) -> tuple[int, int, torch.device, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_cfg, local_rank=local)
    started = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return rank, world, device, started


def _mean_across(x: float, world: int, device: torch.device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


# ---------------------------------------------------------------------------------------------
# the run: state shared by the steps


@dataclass
class _Run:
    cfg: TrainConfig
    model: nn.Module
    data: TrainingImages
    device: torch.device
    rank: int
    world: int
    out: Path
    rng: np.random.Generator
    say: Callable[[str], None]
    progress: bool
    opt: torch.optim.Optimizer | None = None
    sched: Any = None
    loss_fn: nn.Module | None = None
    net: nn.Module | None = None
    bench: Any = None
    writer: Any = None
    history: list[dict] = field(default_factory=list)
    setup: dict = field(default_factory=dict)
    start: int = 0
    best: dict = field(default_factory=lambda: {"epoch": None, "score": None, "stale": 0})
    best_state: dict | None = None
    kept_paths: list[str] | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def size(self) -> int:
        return self.cfg.data.imsize

    def embed(self, idx: np.ndarray, progress: str | None = None, pooled: bool = False) -> np.ndarray:
        return embed_images(self.model, self.data.paths, idx, self.size, device=self.device,
                            batch_size=self.cfg.mining.batch_size, workers=self.cfg.workers, bf16=self.cfg.bf16,
                            pooled=pooled, progress=progress if self.progress and self.main else None)


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _setup(cfg: TrainConfig, model: nn.Module | None, resume: bool, progress: bool,
           say: Callable[[str], None], dist_info: tuple[int, int, torch.device]) -> _Run:
    from ..model import build_model

    rank, world, device = dist_info
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(out / "last.pt") if resume else None
    if model is None:
        m = cfg.model
        model = build_model(m.name, pooling=m.pooling, weights=m.weights or "none", **m.pooling_kw)
    model = model.to(device)
    run = _Run(cfg=cfg, model=model, data=load_training_images(cfg.data.model_dump()), device=device, rank=rank,
               world=world, out=out, rng=np.random.default_rng(cfg.seed), say=say, progress=progress)
    run.setup = {"images": len(run.data.paths), "clusters": run.data.n_clusters, "queries": len(run.data.queries)}
    if cfg.mining.positive != "random" and run.data.evidence is None:  # said before any work (build_epoch_tuples checks too)
        raise ValueError(f"mining.positive={cfg.mining.positive} needs inlier counts in the training data (a tuple "
                         "file written by `cbir mine`, data.kind=sfm); this data has none")
    _select_images(run, ck)
    _prepare_validation(run)
    if ck is not None and ck.get("whiten_shape") is not None:
        o, i = ck["whiten_shape"]
        model.set_whitening(nn.Linear(i, o).to(device), ck.get("whiten_about"))
    elif ck is None and cfg.whitening is not None:
        run.setup.update(_init_whitening(model, run.data, cfg.whitening, size=run.size, device=device,
                                         batch_size=cfg.mining.batch_size, workers=cfg.workers, bf16=cfg.bf16,
                                         rng=run.rng))
    _build_optimiser(run)
    if ck is not None:
        _restore(run, ck)
    run.net = model
    if world > 1:
        run.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if run.main and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard not installed: scalars still go to history.json
            run.writer = None
    return run


def _select_images(run: _Run, ck: dict | None) -> None:
    """Cleaning pass (first run) or the cleaned list of the checkpoint (resume)."""
    cl = run.cfg.data.clean
    if ck is not None and ck.get("kept_paths") is not None:
        keep = set(ck["kept_paths"])
        run.data = run.data.subset([i for i, p in enumerate(run.data.paths) if str(p) in keep])
        run.kept_paths = list(ck["kept_paths"])
    elif cl is not None:
        vecs = run.embed(np.arange(len(run.data.paths)), progress="cleaning")
        full = run.data
        if cl.method == "verify":  # spatial verification against the nearest class-mates (cbir.sfm.clean)
            from .data import clean_by_verification

            store = Path(cl.features or run.out / "clean-features")
            if run.world > 1:  # one writer per feature store: each process its own (same features, same result)
                store = store / f"rank{run.rank}"
            run.data, keep, report = clean_by_verification(full, vecs, store, cl.settings(), workers=cl.workers,
                                                           device="cuda" if run.device.type == "cuda" else "cpu")
            run.setup["cleaning_unverified_classes"] = sorted(report.unverified_classes)
            for line in report.lines():
                run.say(line)
        else:
            run.data, keep = clean_classes(full, vecs, k=cl.k, min_size=cl.min_size, nearest_class=cl.nearest_class)
            run.say(f"cleaning: dropped {int((~keep).sum())} of {len(keep)} images inconsistent with their class")
        run.setup["cleaning_dropped"] = int((~keep).sum())
        run.setup["dropped_paths"] = [str(p) for p, k in zip(full.paths, keep) if not k]
        run.kept_paths = [str(p) for p in run.data.paths]


def _prepare_validation(run: _Run) -> None:
    """The validation benchmark: a revisitop .pkl, or held-out training classes (removed from training)."""
    vc = run.cfg.validation
    if vc is None:
        return
    if vc.split is not None:
        sp = split_for_validation(run.data, vc.split, vc.split_by, np.random.default_rng([run.cfg.seed, 7]))
        run.data, held = sp.train, sp.held
        run.bench = heldout_benchmark(held)
        run.setup["validation"] = {"heldout_classes": held.n_clusters, "heldout_images": len(held.paths),
                                   "train_classes": run.data.n_clusters, "train_images": len(run.data.paths),
                                   "split_by": sp.split_by}
        if sp.note:
            run.setup["validation"]["note"] = sp.note
            run.say(sp.note)
        run.say(f"validation: {len(held.paths)} images of {held.n_clusters} classes held out of training "
                f"(split by {sp.split_by})")
    else:
        run.bench = _gnd_benchmark(vc)


def _build_optimiser(run: _Run) -> None:
    oc = run.cfg.optim
    groups = param_groups(run.model, oc.lr, oc.weight_decay, oc.pool_lr_mult, oc.whiten_lr_mult, oc.freeze,
                          oc.train_only)
    for g in groups:
        g["initial_lr"] = g["lr"]
    if oc.name == "adamw":
        run.opt = torch.optim.AdamW(groups)
    else:
        run.opt = torch.optim.SGD(groups, momentum=oc.momentum)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda e: lr_factor(oc.schedule, e, oc.epochs, oc.gamma))
    lcfg = run.cfg.loss.model_dump()
    run.loss_fn = build_loss(lcfg.pop("name"), **lcfg)


def _restore(run: _Run, ck: dict) -> None:
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    set_numpy_rng_state(run.rng, ck["numpy_rng"])
    torch.set_rng_state(ck["torch_rng"])
    run.history, run.start = list(ck["history"]), int(ck["epoch"])
    run.setup = ck.get("setup", run.setup)
    run.best = dict(ck["best"])
    run.best_state = ck["model"] if run.best["epoch"] == run.start else ck.get("best_model")
    run.say(f"resumed from {run.out / 'last.pt'} after epoch {run.start}")


# ---------------------------------------------------------------------------------------------
# the steps of one epoch


def _mine(run: _Run, epoch: int) -> np.ndarray:
    """This process's share of the epoch's tuples (T, 2 + k), mined with the current model."""
    mc, bt, world = run.cfg.mining, run.cfg.optim.batch_tuples, run.world
    tuples = build_epoch_tuples(run.data, run.embed, n_queries=mc.queries_per_epoch, pool_size=mc.pool_size,
                                n_negatives=mc.negatives, hard_positives=mc.hard_positives, positive=mc.positive,
                                positive_k=mc.positive_k, rng=run.rng)
    steps = len(tuples) // (bt * world)
    if steps == 0:
        raise ValueError(f"{len(tuples)} tuples make no batch of {bt} tuples × {world} processes")
    mine = tuples[: steps * bt * world]
    return mine.reshape(steps, world, bt, -1)[:, run.rank].reshape(steps * bt, -1)


def _tuple_loss(loss_fn: nn.Module, emb: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """emb (B, 2+k, D) -> loss; the AP loss also gets every image's cluster id."""
    q, p, n = emb[:, 0], emb[:, 1], emb[:, 2:]
    if isinstance(loss_fn, APLoss):
        b, k = n.shape[:2]
        c = torch.cat([clusters[:, 0], clusters[:, 1], clusters[:, 2:].reshape(b * k)])
        return loss_fn(q, p, n, clusters=c)
    return loss_fn(q, p, n)


def _train_epoch(run: _Run, epoch: int, tuples: np.ndarray) -> dict[str, Any]:
    """One pass over the tuples: forward, loss, backward, (accumulated) optimiser step."""
    cfg, oc, device = run.cfg, run.cfg.optim, run.device
    bt, acc = oc.batch_tuples, oc.accumulate
    steps = len(tuples) // bt
    ds = TupleDataset(run.data, tuples, run.size, run.model.mean, run.model.std, augment=cfg.data.augment,
                      seed=cfg.seed * 100_003 + epoch)
    dl = torch.utils.data.DataLoader(ds, batch_size=bt, shuffle=False, num_workers=cfg.workers,
                                     pin_memory=device.type == "cuda")
    run.net.train()
    if oc.freeze_bn:
        freeze_batchnorm(run.model)
    run.opt.zero_grad(set_to_none=True)
    losses: list[float] = []
    it = dl
    if run.progress and run.main:
        from tqdm.auto import tqdm

        it = tqdm(dl, desc=f"epoch {epoch + 1}/{oc.epochs}", unit="batch", leave=False)
    for step, (x, clusters) in enumerate(it):
        b, t = x.shape[:2]
        x = x.to(device, non_blocking=True).flatten(0, 1)
        last = (step + 1) % acc == 0 or step + 1 == steps
        sync = nullcontext() if (last or run.world == 1) else run.net.no_sync()
        with sync:
            with _autocast(device, cfg.bf16):
                emb = run.net(x).float().view(b, t, -1)
            loss = _tuple_loss(run.loss_fn, emb, clusters.to(device))
            (loss / acc).backward()
        if last:
            if oc.clip_grad:
                nn.utils.clip_grad_norm_(run.model.parameters(), oc.clip_grad)
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if run.progress and run.main:
            it.set_postfix(loss=f"{losses[-1]:.4f}")
    lrs = [g["lr"] for g in run.opt.param_groups]
    run.sched.step()
    rec: dict[str, Any] = {"epoch": epoch + 1, "loss": _mean_across(float(np.mean(losses)), run.world, device),
                           "lr": lrs, "tuples": int(steps * bt * run.world)}
    p = getattr(run.model.pooling, "p", None)
    if isinstance(p, torch.Tensor):
        rec["gem_p"] = float(p.detach().float().mean())
    return rec


def _validate(run: _Run, rec: dict[str, Any]) -> None:
    """Validation mAP into ``rec["val"]`` when due; keeps the best weights (strictly higher score)."""
    vc = run.cfg.validation
    epoch = rec["epoch"]
    if vc is None or not run.main or (epoch > 0 and epoch % vc.every != 0):
        return
    rec["val"] = validate(run.model, run.bench, vc, run.device)["mAP"]
    score = float(rec["val"][vc.metric])
    if is_better(score, run.best["score"]):
        run.best.update(epoch=epoch, score=score, stale=0)
        run.best_state = _state_dict(run.model)
    else:
        run.best["stale"] = int(run.best["stale"]) + 1
    rec["best_epoch"] = run.best["epoch"]


def _record(run: _Run, rec: dict[str, Any]) -> None:
    run.history.append(rec)
    if rec["epoch"] == 0:
        run.say(f"epoch 0 (before training): val mAP {rec.get('val')}")
    else:
        run.say(f"epoch {rec['epoch']}/{run.cfg.optim.epochs}: "
                + ", ".join(f"{k}={v}" for k, v in rec.items() if k != "epoch"))
    w, e = run.writer, rec["epoch"]
    if w is None:
        return
    for key, tag in (("loss", "train/loss"), ("gem_p", "train/gem_p")):
        if key in rec:
            w.add_scalar(tag, rec[key], e)
    if "lr" in rec:
        w.add_scalar("train/lr", rec["lr"][0], e)
    for k, v in rec.get("val", {}).items():
        w.add_scalar(f"val/mAP_{k}", v, e)
    w.flush()


def _save(run: _Run, epoch: int) -> None:
    """last.pt (checkpoint), model.pt (the best validated weights, or the last without validation), history."""
    if not run.main:
        return
    model = run.model
    w = getattr(model, "whiten", None)
    ckpt = {
        "epoch": epoch,
        "config": run.cfg.to_dict(),
        "model": _state_dict(model),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "numpy_rng": numpy_rng_state(run.rng),
        "torch_rng": torch.get_rng_state(),
        "history": run.history,
        "setup": run.setup,
        "kept_paths": run.kept_paths,
        "best": dict(run.best),
        "best_model": run.best_state if run.best["epoch"] != epoch else None,
        "whiten_shape": None if w is None else [w.out_features, w.in_features],
        "whiten_about": None if w is None else (model.config.get("whitening") or {}).get("about"),
    }
    save_checkpoint(run.out / "last.pt", ckpt)
    if run.cfg.keep_epochs:
        save_checkpoint(run.out / f"epoch_{epoch:03d}.pt", ckpt)
    if run.cfg.validation is None or run.best["epoch"] == epoch:
        _save_model(run)
    atomic_write_json(run.out / "history.json", jsonable({"setup": run.setup, "history": run.history,
                                                          "best": run.best}))


def _save_model(run: _Run) -> None:
    from ..model import save_model

    if hasattr(run.model, "describe"):
        save_model(run.model, run.out / "model.pt")


def _probe_step_seconds(run: _Run, repeats: int = 2) -> float:
    """Seconds of one training step (forward + backward of ``batch_tuples`` tuples, as in
    :func:`_train_epoch`), measured on random tuples of the training images without changing anything:
    eval mode (no BN statistics move), gradients dropped, no optimiser step, its own random numbers.
    The fastest of ``repeats`` (the first one warms up)."""
    cfg, data = run.cfg, run.data
    rng = np.random.default_rng([cfg.seed, 99])
    bt, k = cfg.optim.batch_tuples, min(cfg.mining.negatives, data.n_clusters - 1)
    tuples = []
    for _ in range(bt):
        s = int(rng.integers(len(data.queries)))
        q, cands = int(data.queries[s]), data.positives[s]
        others = np.flatnonzero(data.clusters != data.clusters[q])
        negs = rng.choice(others, size=k, replace=len(others) < k).tolist() if k > 0 else []
        tuples.append([q, int(cands[rng.integers(len(cands))]), *negs])
    ds = TupleDataset(data, np.asarray(tuples), run.size, run.model.mean, run.model.std, augment=cfg.data.augment,
                      seed=cfg.seed * 100_003 + 99_991)
    was_training = run.model.training
    run.model.eval()
    best = float("inf")
    try:
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            items = [ds[i] for i in range(len(ds))]
            x = torch.stack([it[0] for it in items]).to(run.device)
            clusters = torch.stack([it[1] for it in items]).to(run.device)
            b, t = x.shape[:2]
            with _autocast(run.device, cfg.bf16):
                emb = run.model(x.flatten(0, 1)).float().view(b, t, -1)
            loss = _tuple_loss(run.loss_fn, emb, clusters)
            if loss.requires_grad:
                loss.backward()
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            best = min(best, time.perf_counter() - t0)
    finally:
        run.opt.zero_grad(set_to_none=True)
        run.model.train(was_training)
    return best


def _estimate(run: _Run, validation_s: float | None) -> TimeEstimate:
    """The time of the epochs still to run (:func:`cbir.training.timing.estimate`) from a probe of real
    steps, the mining speed and the validation pass (``validation_s`` as timed; None: scaled)."""
    cfg = run.cfg
    n = len(run.data.paths)
    idx = np.arange(min(n, 8))
    rng_state = torch.get_rng_state()  # measuring draws no random number the training would have drawn
    cuda_state = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    try:
        run.embed(idx)  # warm-up
        t0 = time.perf_counter()
        run.embed(idx)
        embed_s = (time.perf_counter() - t0) / max(1, len(idx))
        step_s = _probe_step_seconds(run)
    finally:
        torch.set_rng_state(rng_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, run.device)
    mc, bt = cfg.mining, cfg.optim.batch_tuples
    steps = min(mc.queries_per_epoch, len(run.data.queries)) // (bt * run.world)
    mining_images = min(n, min(mc.queries_per_epoch, len(run.data.queries)) + min(mc.pool_size, n))
    vc = cfg.validation
    measured = validation_s is not None
    if vc is not None and validation_s is None:
        held = len(run.bench.db_paths) + len(run.bench.query_paths) if run.bench is not None else 0
        validation_s = embed_s * held * (vc.imsize / run.size) ** 2 * sum(float(x) ** 2 for x in vc.scales)
    return estimate(epochs=cfg.optim.epochs - run.start, steps_per_epoch=steps, step_s=step_s,
                    mining_images=mining_images, embed_s=embed_s, validation_s=validation_s or 0.0,
                    every=vc.every if vc is not None else None, validation_measured=measured)


def _stop_early(run: _Run) -> bool:
    vc = run.cfg.validation
    stop = float(bool(vc and vc.patience and run.main and run.best["stale"] >= vc.patience))
    return _mean_across(stop, run.world, run.device) > 0


def _finish(run: _Run) -> dict:
    """Load the best validated weights back (when validation chose an earlier epoch)."""
    if run.writer:
        run.writer.close()
    if run.main and run.cfg.validation is not None and run.best_state is not None:
        cur = run.best["epoch"]
        if run.history and cur != run.history[-1]["epoch"]:
            run.model.load_state_dict(run.best_state)
    kept = kept_epoch_summary(run.history, run.best, run.cfg.validation.metric if run.cfg.validation else None)
    if run.main:
        run.say(kept)
    return {"history": run.history, "out": str(run.out), "model": run.model, "setup": run.setup,
            "best": dict(run.best), "kept": kept}


def kept_epoch_summary(history: list[dict], best: dict, metric: str | None) -> str:
    """The best-epoch rule's outcome in plain words, e.g. "kept epoch 0 (the starting model): fine-tuning
    did not improve the held-out photos (medium mAP 71.2 at the start, 70.8 at best after training)" or
    "kept epoch 3 of 5: held-out Medium mAP 71.2 -> 73.0". ``metric`` None: no validation."""
    last = max((int(r["epoch"]) for r in history), default=0)
    if metric is None:
        return f"no validation: kept the last epoch ({last})"
    scores = {int(r["epoch"]): float(r["val"][metric]) for r in history if isinstance(r.get("val"), dict)
              and metric in r["val"]}
    name = metric.capitalize()
    b = best.get("epoch")
    if b is None:
        return f"kept the last epoch ({last}): no validation gave a finite {name} mAP"
    start = scores.get(0)
    trained = [v for e, v in scores.items() if e > 0]
    finite = [v for v in trained if v == v]
    if b == 0:
        if not trained:
            return (f"kept epoch 0 (the starting model): no epoch was trained and validated "
                    f"(held-out {name} mAP {start:.1f})")
        after = (f"{max(finite):.1f} at best after training" if finite
                 else "no finite figure after training: the network diverged")
        return (f"kept epoch 0 (the starting model): fine-tuning did not improve the held-out photos "
                f"({name} mAP {start:.1f} at the start, {after})")
    if start is None or start != start:
        return f"kept epoch {b} of {last}: held-out {name} mAP {scores[b]:.1f} (the start was not validated)"
    return f"kept epoch {b} of {last}: held-out {name} mAP {start:.1f} -> {scores[b]:.1f}"


def train(
    config: TrainConfig | dict,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    estimate_only: bool = False,
) -> dict:
    """Run a training described by ``config`` (a :class:`TrainConfig` or its plain-data form).

    ``model`` replaces ``config.model`` (a RetrievalNet-like module with ``pool``, ``mean``,
    ``std``, ``set_whitening``). Returns {"history": [per-epoch dicts], "out": folder, "model": the
    trained module (unwrapped; the best validated epoch when there is validation), "setup", "best",
    "kept" (the best-epoch rule's outcome in words, :func:`kept_epoch_summary`), "estimate" (the
    time estimate made before the first epoch, :class:`cbir.training.timing.TimeEstimate` as a dict)}.
    Before training, the estimate (measured on a few real steps, the mining speed and the first
    validation pass) goes to ``log`` with the config keys that shorten it; ``estimate_only`` stops
    there (nothing trained; the returned model is the start).
    """
    cfg = TrainConfig.from_dict(config)
    missing = missing_inputs(cfg, resume=resume)
    if model is not None:
        missing = [m for m in missing if not m.startswith("model.weights")]
    if missing:
        raise FileNotFoundError("missing training inputs: " + "; ".join(missing))
    rank, world, device, started = _dist_setup(cfg.device)
    try:
        run = _setup(cfg, model, resume, progress, log or (lambda _msg: None), (rank, world, device))
        vc = cfg.validation
        val_s = None
        if vc is not None and vc.before and run.start == 0:
            rec: dict[str, Any] = {"epoch": 0}
            t0 = time.perf_counter()
            _validate(run, rec)
            val_s = time.perf_counter() - t0
            if run.main:
                _record(run, rec)
                _save_model(run)  # the start is the best so far
        timing = None
        if run.main and run.start < cfg.optim.epochs:
            timing = _estimate(run, val_s)
            run.say(timing.text(cfg))
        if estimate_only:
            return {**_finish(run), "estimate": timing.to_dict() if timing else None}
        for epoch in range(run.start, cfg.optim.epochs):
            t0 = time.time()
            tuples = _mine(run, epoch)
            mine_s = time.time() - t0
            rec = _train_epoch(run, epoch, tuples)
            _validate(run, rec)
            rec.update(mining_s=round(mine_s, 3), epoch_s=round(time.time() - t0, 3))
            _record(run, rec)
            _save(run, epoch + 1)
            if world > 1:
                dist.barrier()
            if _stop_early(run):
                run.say(f"early stop: no better validation in {vc.patience} validations")
                break
        return {**_finish(run), "estimate": timing.to_dict() if timing else None}
    finally:
        if started:
            dist.destroy_process_group()

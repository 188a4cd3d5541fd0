"""The training loop: mining every epoch, tuples through a RetrievalNet, one of the three losses.

``train(config)`` runs a whole training from a plain-data config (see :data:`DEFAULTS` and
``configs/*.yaml``); ``cbir train CONFIG [key=value …]`` is its command line. What it does, per
epoch: describe the query images and a random pool with the current model, mine one positive and
``k`` diverse hard negatives per query (:func:`~cbir.training.data.build_epoch_tuples`), then train
on the tuples with batch-norm statistics frozen (BN layers in eval mode, as cirtorch does), GeM's
``p`` in its own parameter group (learning rate × ``pool_lr_mult``, no weight decay), gradient
accumulation, bf16 autocast on CUDA. Every ``validation.every`` epochs it measures revisitop mAP on
a validation set; after every epoch it writes a checkpoint atomically (``OUT/last.pt``,
format-stamped, with optimiser, scheduler and random states, so ``resume=True`` continues exactly),
the model in the :func:`cbir.model.save_model` format (``OUT/model.pt``) and ``OUT/history.json``.

Multi-GPU: launched by ``torchrun --nproc_per_node N``, each process trains on every N-th tuple of
the (identically mined) epoch, gradients averaged by DistributedDataParallel; ``batch_tuples`` is
per process, so N processes of ``b`` tuples make the step of one process of ``N·b`` tuples.
"""

from __future__ import annotations

import copy
import math
import re
import os
import pickle
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..device import resolve_device
from ..fileio import FormatError, atomic_write_json, atomic_write_with, check_format
from .data import (
    ImageDataset,
    TrainingImages,
    TupleDataset,
    build_epoch_tuples,
    clean_classes,
    load_training_images,
)
from .losses import APLoss, build_loss

__all__ = [
    "DEFAULTS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "merge_config",
    "parse_overrides",
    "load_config",
    "freeze_batchnorm",
    "param_groups",
    "lr_factor",
    "embed_images",
    "train",
]

CHECKPOINT_FORMAT = "cbir-train-checkpoint"
CHECKPOINT_VERSION = 1

DEFAULTS: dict[str, Any] = {
    "model": {"name": "efficientnet_lite0", "pooling": "gem", "weights": "default", "pooling_kw": {"p": 3.0}},
    "data": {"kind": "folder", "root": None, "csv": None, "pkl": None, "split": "train", "layout": "cid",
             "ext": "", "imsize": 224, "augment": False, "clean": None},
    "mining": {"queries_per_epoch": 2000, "pool_size": 20000, "negatives": 5, "hard_positives": False,
               "batch_size": 32},
    "loss": {"name": "contrastive", "margin": 0.75},
    "optim": {"name": "adamw", "lr": 1e-5, "weight_decay": 1e-4, "momentum": 0.9, "pool_lr_mult": 10.0,
              "whiten_lr_mult": 1.0, "schedule": "exponential", "gamma": 0.99, "epochs": 10,
              "batch_tuples": 5, "accumulate": 1, "freeze_bn": True, "freeze": [], "clip_grad": None},
    "whitening": None,
    "validation": None,
    "out": "runs/train",
    "device": "auto",
    "bf16": True,
    "workers": 0,
    "seed": 0,
    "tensorboard": True,
    "keep_epochs": False,
}


# ---------------------------------------------------------------------------------------------
# configuration


def merge_config(base: dict, override: dict) -> dict:
    """Recursive dict merge: ``override`` wins; nested dicts merge key by key (a None base takes the dict)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numbers(x: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` as a string; turn such strings back into floats, recursively."""
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    if isinstance(x, str) and _FLOAT.match(x.strip()):
        return float(x)
    return x


def parse_overrides(items: list[str]) -> dict:
    """``["optim.lr=1e-4", "data.augment=true"]`` -> nested dict; values parsed as YAML scalars/lists."""
    import yaml

    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> dict:
    """DEFAULTS ← the YAML (.yaml/.yml) or TOML (.toml) file ← ``key=value`` overrides; unknown
    top-level keys are an error (they are typos)."""
    cfg: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        text = path.read_text()
        if path.suffix.lower() == ".toml":
            import tomllib

            try:
                cfg = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise FormatError(f"{path}: bad TOML: {exc}") from exc
        else:
            import yaml

            try:
                cfg = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise FormatError(f"{path}: bad YAML: {exc}") from exc
        if not isinstance(cfg, dict):
            raise FormatError(f"{path}: a training config must be a mapping of sections")
    cfg = _numbers(merge_config(cfg, parse_overrides(overrides or [])))
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(DEFAULTS)}")
    return _with_defaults(cfg)


def _with_defaults(cfg: dict) -> dict:
    """Merge onto DEFAULTS; a ``loss`` section that names another loss replaces the default one
    (its parameters differ)."""
    out = merge_config(DEFAULTS, cfg)
    loss = cfg.get("loss") or {}
    if loss.get("name", DEFAULTS["loss"]["name"]) != DEFAULTS["loss"]["name"]:
        out["loss"] = copy.deepcopy(loss)
    return out


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
                 whiten_lr_mult: float = 1.0, freeze: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Optimiser groups: backbone (lr, weight decay), pooling e.g. GeM p (lr·pool_lr_mult, no
    decay), whitening (lr·whiten_lr_mult). Parameters whose name starts with a ``freeze`` prefix
    get ``requires_grad=False`` and no group."""
    groups: dict[str, list] = {"backbone": [], "pooling": [], "whiten": []}
    for name, p in model.named_parameters():
        if any(name.startswith(f) for f in freeze):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        key = name.split(".", 1)[0]
        groups["pooling" if key == "pooling" else "whiten" if key == "whiten" else "backbone"].append(p)
    out = [{"params": groups["backbone"], "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
           {"params": groups["pooling"], "lr": lr * pool_lr_mult, "weight_decay": 0.0, "name": "pooling"},
           {"params": groups["whiten"], "lr": lr * whiten_lr_mult, "weight_decay": weight_decay, "name": "whiten"}]
    return [g for g in out if g["params"]]


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


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def embed_images(model: nn.Module, paths: list[Path], indices: np.ndarray, size: int, *, device: torch.device,
                 batch_size: int = 32, workers: int = 0, bf16: bool = True, pooled: bool = False) -> np.ndarray:
    """Descriptors (len(indices), D) float32 of square-resized images, as the training sees them.
    ``pooled=True`` gives the vectors before whitening (``model.pool``)."""
    was_training = model.training
    model.eval()
    ds = ImageDataset(paths, indices, size, model.mean, model.std)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False)
    out = []
    for _, x in dl:
        with _autocast(device, bf16):
            v = model.pool(x.to(device)) if pooled else model(x.to(device))
        out.append(v.float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def _init_whitening(model: nn.Module, data: TrainingImages, cfg: dict, *, size: int, device, batch_size, workers, bf16,
                    rng: np.random.Generator) -> dict:
    """Learned whitening (Lw from query/positive pairs) or PCA whitening of the pooled training
    descriptors, attached as ``model.whiten`` (an nn.Linear that then trains with the rest)."""
    from ..whitening import learn_lw, learn_pca_whitening

    kind = cfg.get("init", "lw")
    idx = np.arange(len(data.paths))
    if cfg.get("max_images") and len(idx) > int(cfg["max_images"]):
        idx = np.sort(rng.choice(len(idx), int(cfg["max_images"]), replace=False))
    x = embed_images(model, data.paths, idx, size, device=device, batch_size=batch_size, workers=workers, bf16=bf16,
                     pooled=True)
    pos = {int(i): r for r, i in enumerate(idx)}
    if kind == "lw":
        pairs = [(pos[int(q)], pos[int(p)]) for q, ps in zip(data.queries, data.positives) for p in ps
                 if int(q) in pos and int(p) in pos]
        if not pairs:
            raise ValueError("learned whitening needs matching pairs among the sampled training images")
        w = learn_lw(x, np.asarray(pairs), dim=cfg.get("dim"), shrinkage=float(cfg.get("shrinkage", 0.1)))
    elif kind == "pca":
        w = learn_pca_whitening(x, dim=cfg.get("dim"), shrinkage=float(cfg.get("shrinkage", 0.0)))
    else:
        raise ValueError(f"unknown whitening init {kind!r}; choose lw or pca")
    lin = w.to_linear().to(device)
    model.set_whitening(lin, f"{kind} (learned on {len(idx)} training images, then fine-tuned)")
    return {"whitening": kind, "images": int(len(idx)), "dim": int(lin.out_features)}


def validate(model: nn.Module, vcfg: dict, device: torch.device) -> dict:
    """revisitop mAP (E/M/H) of ``model`` on ``vcfg``: ``gnd`` (.pkl), ``images`` folder (``name``
    + ``ext``), ``imsize``, ``scales``; queries cropped to their boxes. ``query_indices``/``db_indices``
    restrict the evaluation (a leave-one-out fold); returns {"mAP": {...}, "mP": {...}}."""
    from ..evaluation import evaluate_revisitop
    from ..extract import extract

    with open(vcfg["gnd"], "rb") as fh:
        gnd = pickle.load(fh)
    root = Path(vcfg["images"])
    ext = vcfg.get("ext", ".jpg")
    qsel = vcfg.get("query_indices") or list(range(len(gnd["qimlist"])))
    kw = dict(imsize=int(vcfg.get("imsize", 512)), scales=tuple(vcfg.get("scales", (1.0,))), progress=False,
              device=device)
    db = extract(model, [root / f"{n}{ext}" for n in gnd["imlist"]], **kw)
    q = extract(model, [root / f"{gnd['qimlist'][i]}{ext}" for i in qsel],
                bboxes=[tuple(gnd["gnd"][i]["bbx"]) for i in qsel], **kw)
    if db.failed or q.failed:
        raise ValueError(f"validation images failed to load: {(db.failed + q.failed)[:3]}")
    scores = q.vectors @ db.vectors.T
    return evaluate_revisitop(scores, [gnd["gnd"][i] for i in qsel])


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
# checkpoints


def _save_checkpoint(path: Path, obj: dict) -> None:
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def _load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FormatError(f"{path} is not a readable checkpoint: {exc}") from exc
    check_format(ck, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,), path, what="cbir training checkpoint")
    return ck


# ---------------------------------------------------------------------------------------------
# the loop


def _tuple_loss(loss_fn: nn.Module, emb: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """emb (B, 2+k, D) -> loss; the AP loss also gets every image's cluster id."""
    q, p, n = emb[:, 0], emb[:, 1], emb[:, 2:]
    if isinstance(loss_fn, APLoss):
        b, k = n.shape[:2]
        c = torch.cat([clusters[:, 0], clusters[:, 1], clusters[:, 2:].reshape(b * k)])
        return loss_fn(q, p, n, clusters=c)
    return loss_fn(q, p, n)


def train(
    config: dict,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run a training described by ``config`` (merged onto :data:`DEFAULTS` by :func:`load_config`).

    ``model`` replaces ``config["model"]`` (a RetrievalNet-like module with ``pool``, ``mean``,
    ``std``, ``set_whitening``). Returns {"history": [per-epoch dicts], "out": folder,
    "model": the trained module (unwrapped)}.
    """
    from ..model import build_model, save_model

    cfg = _with_defaults(config)
    say = log or (lambda _msg: None)
    rank, world, device, started = _dist_setup(cfg["device"])
    main = rank == 0
    out = Path(cfg["out"])
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    oc, mc, dc = cfg["optim"], cfg["mining"], cfg["data"]
    size, bf16, workers = int(dc["imsize"]), bool(cfg["bf16"]), int(cfg["workers"])
    try:
        if model is None:
            m = cfg["model"]
            model = build_model(m["name"], pooling=m.get("pooling", "gem"), weights=m.get("weights", "default"),
                                **(m.get("pooling_kw") or {}))
        model = model.to(device)
        data = load_training_images(dc)
        setup: dict = {"images": len(data.paths), "clusters": data.n_clusters, "queries": len(data.queries)}
        ck = _load_checkpoint(out / "last.pt") if resume else None
        if ck is None and dc.get("clean"):
            cl = dc["clean"] if isinstance(dc["clean"], dict) else {}
            vecs = embed_images(model, data.paths, np.arange(len(data.paths)), size, device=device,
                                batch_size=mc["batch_size"], workers=workers, bf16=bf16)
            full = data
            data, keep = clean_classes(data, vecs, k=float(cl.get("k", 3.0)), min_size=int(cl.get("min_size", 4)),
                                       nearest_class=bool(cl.get("nearest_class", True)))
            setup["cleaning_dropped"] = int((~keep).sum())
            setup["dropped_paths"] = [str(p) for p, k in zip(full.paths, keep) if not k]
            say(f"cleaning: dropped {int((~keep).sum())} of {len(keep)} images inconsistent with their class")
        elif ck is not None and ck.get("kept_paths") is not None:
            kept = set(ck["kept_paths"])
            full = data
            idx = [i for i, p in enumerate(full.paths) if str(p) in kept]
            from .data import from_labels

            data = from_labels([full.paths[i] for i in idx], full.clusters[idx].tolist(), class_names=full.class_names)
        if ck is not None and ck.get("whiten_shape") is not None:
            o, i = ck["whiten_shape"]
            model.set_whitening(nn.Linear(i, o).to(device), ck.get("whiten_about"))
        elif ck is None and cfg.get("whitening"):
            setup.update(_init_whitening(model, data, cfg["whitening"], size=size, device=device,
                                         batch_size=mc["batch_size"], workers=workers, bf16=bf16, rng=rng))
        freeze = list(oc.get("freeze") or [])
        groups = param_groups(model, float(oc["lr"]), float(oc["weight_decay"]), float(oc["pool_lr_mult"]),
                              float(oc["whiten_lr_mult"]), freeze)
        for g in groups:
            g["initial_lr"] = g["lr"]
        if oc["name"] == "adamw":
            opt = torch.optim.AdamW(groups)
        elif oc["name"] == "sgd":
            opt = torch.optim.SGD(groups, momentum=float(oc["momentum"]))
        else:
            raise ValueError(f"unknown optimiser {oc['name']!r}; choose adamw or sgd")
        epochs = int(oc["epochs"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: lr_factor(oc["schedule"], e, epochs, float(oc.get("gamma", 0.99))))
        lcfg = dict(cfg["loss"])
        loss_fn = build_loss(lcfg.pop("name"), **lcfg)
        history: list[dict] = []
        start = 0
        if ck is not None:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            rng.bit_generator.state = ck["numpy_rng"]
            torch.set_rng_state(ck["torch_rng"])
            history, start = list(ck["history"]), int(ck["epoch"])
            setup = ck.get("setup", setup)
            say(f"resumed from {out / 'last.pt'} after epoch {start}")
        net = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        writer = None
        if main and cfg.get("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard not installed: scalars still go to history.json
                writer = None
        vcfg = cfg.get("validation")
        if main and vcfg and vcfg.get("before", True) and start == 0 and not history:
            res = validate(model, vcfg, device)
            history.append({"epoch": 0, "val": res["mAP"]})
            say(f"epoch 0 (before training): val mAP {res['mAP']}")
            if writer:
                for k, v in res["mAP"].items():
                    writer.add_scalar(f"val/mAP_{k}", v, 0)
        bt, acc = int(oc["batch_tuples"]), max(1, int(oc["accumulate"]))
        for epoch in range(start, epochs):
            t0 = time.time()
            embed = lambda idx: embed_images(model, data.paths, idx, size, device=device,  # noqa: E731
                                             batch_size=mc["batch_size"], workers=workers, bf16=bf16)
            tuples = build_epoch_tuples(data, embed, n_queries=int(mc["queries_per_epoch"]),
                                        pool_size=int(mc["pool_size"]), n_negatives=int(mc["negatives"]),
                                        hard_positives=bool(mc["hard_positives"]), rng=rng)
            steps = len(tuples) // (bt * world)
            if steps == 0:
                raise ValueError(f"{len(tuples)} tuples make no batch of {bt} tuples × {world} processes")
            mine_s = time.time() - t0
            mine = tuples[: steps * bt * world]
            mine = mine.reshape(steps, world, bt, -1)[:, rank].reshape(steps * bt, -1)  # this rank's share
            ds = TupleDataset(data, mine, size, model.mean, model.std, augment=bool(dc["augment"]),
                              seed=int(cfg["seed"]) * 100_003 + epoch)
            dl = torch.utils.data.DataLoader(ds, batch_size=bt, shuffle=False, num_workers=workers,
                                             pin_memory=device.type == "cuda")
            net.train()
            if oc.get("freeze_bn", True):
                freeze_batchnorm(model)
            opt.zero_grad(set_to_none=True)
            losses = []
            it = dl
            if progress and main:
                from tqdm.auto import tqdm

                it = tqdm(dl, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
            for step, (x, clusters) in enumerate(it):
                b, t = x.shape[:2]
                x = x.to(device, non_blocking=True).flatten(0, 1)
                last = (step + 1) % acc == 0 or step + 1 == steps
                sync = nullcontext() if (last or world == 1) else net.no_sync()
                with sync:
                    with _autocast(device, bf16):
                        emb = net(x).float().view(b, t, -1)
                    loss = _tuple_loss(loss_fn, emb, clusters.to(device))
                    (loss / acc).backward()
                if last:
                    if oc.get("clip_grad"):
                        nn.utils.clip_grad_norm_(model.parameters(), float(oc["clip_grad"]))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if progress and main:
                    it.set_postfix(loss=f"{losses[-1]:.4f}")
            lrs = [g["lr"] for g in opt.param_groups]
            sched.step()
            rec: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": _mean_across(float(np.mean(losses)), world, device),
                "lr": lrs,
                "tuples": int(steps * bt * world),
                "mining_s": round(mine_s, 3),
                "epoch_s": round(time.time() - t0, 3),
            }
            p = getattr(model.pooling, "p", None)
            if isinstance(p, torch.Tensor):
                rec["gem_p"] = float(p.detach().float().mean())
            if main and vcfg and (epoch + 1) % int(vcfg.get("every", 1)) == 0:
                rec["val"] = validate(model, vcfg, device)["mAP"]
            history.append(rec)
            say(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v}" for k, v in rec.items() if k != "epoch"))
            if writer:
                writer.add_scalar("train/loss", rec["loss"], epoch + 1)
                writer.add_scalar("train/lr", rec["lr"][0], epoch + 1)
                if "gem_p" in rec:
                    writer.add_scalar("train/gem_p", rec["gem_p"], epoch + 1)
                for k, v in rec.get("val", {}).items():
                    writer.add_scalar(f"val/mAP_{k}", v, epoch + 1)
                writer.flush()
            if main:
                w = getattr(model, "whiten", None)
                ckpt = {
                    "format": CHECKPOINT_FORMAT,
                    "format_version": CHECKPOINT_VERSION,
                    "epoch": epoch + 1,
                    "config": cfg,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "setup": setup,
                    "kept_paths": [str(p) for p in data.paths] if dc.get("clean") else None,
                    "whiten_shape": None if w is None else (w.out_features, w.in_features),
                    "whiten_about": None if w is None else (model.config.get("whitening") or {}).get("about"),
                }
                _save_checkpoint(out / "last.pt", ckpt)
                if cfg.get("keep_epochs"):
                    _save_checkpoint(out / f"epoch_{epoch + 1:03d}.pt", ckpt)
                if hasattr(model, "describe"):
                    save_model(model, out / "model.pt")
                atomic_write_json(out / "history.json", {"setup": setup, "history": history})
            if world > 1:
                dist.barrier()
        if writer:
            writer.close()
        return {"history": history, "out": str(out), "model": model, "setup": setup}
    finally:
        if started:
            dist.destroy_process_group()

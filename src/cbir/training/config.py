"""The training config: typed sections with their defaults, file + ``key=value`` overrides, checks.

A config is a YAML (.yaml/.yml) or TOML (.toml) mapping of sections (``model``, ``data``,
``mining``, ``loss``, ``optim``, ``whitening``, ``validation``) and a few top-level keys; every
key not written takes the default declared below. ``key=value`` overrides (dotted keys, values read
as YAML scalars) are merged onto the file before validation. Unknown keys anywhere are errors
(they are typos), and so are values of the wrong type; both name the dotted key.

:func:`missing_inputs` lists every file or folder the config names that does not exist, so that
``cbir train`` reports them all in one line before any work starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..fileio import FormatError

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "CleanConfig",
    "VerifyCleanConfig",
    "MiningConfig",
    "OptimConfig",
    "WhiteningConfig",
    "ValidationConfig",
    "merge_config",
    "parse_overrides",
    "load_config",
    "missing_inputs",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "efficientnet_lite0"
    pooling: str = "gem"
    weights: str | None = "default"
    pooling_kw: dict[str, float | int | bool | str] = Field(default_factory=lambda: {"p": 3.0})


class CleanConfig(_Section):
    """Drop images inconsistent with their class by descriptor distance
    (:func:`cbir.training.mining.class_consistency_mask`): ``method: distance`` (the default)."""

    method: Literal["distance"] = "distance"
    k: float = 3.0
    min_size: int = Field(4, ge=1)
    nearest_class: bool = True


class VerifyCleanConfig(_Section):
    """``method: verify``: keep an image when it verifies (SIFT + RANSAC, >= ``min_inliers``
    inliers) with at least ``min_verified`` of its ``candidates`` nearest class-mates
    (:mod:`cbir.sfm.clean`); a class where fewer than ``min_class_fraction`` of the images verify
    (none included) is kept whole (``on_unverified: keep``) or dropped whole (``drop``), said
    either way. Local features are kept in ``features`` (default OUT/clean-features; reused by a
    rerun)."""

    method: Literal["verify"]
    min_inliers: int = Field(15, ge=1)
    min_verified: int = Field(1, ge=1)
    candidates: int = Field(5, ge=1)
    min_class_fraction: float = Field(0.5, ge=0.0, le=1.0)
    on_unverified: Literal["keep", "drop"] = "keep"
    max_size: int = Field(640, ge=16, le=16384)
    max_features: int = Field(1024, ge=1, le=65536)
    features: str | None = None
    workers: int = Field(1, ge=1)

    def settings(self):
        """The library's :class:`cbir.sfm.clean.VerifyCleanSettings` of this section."""
        from ..local.features import LocalFeatureSettings
        from ..sfm.clean import VerifyCleanSettings

        return VerifyCleanSettings(min_inliers=self.min_inliers, min_verified=self.min_verified,
                                   candidates=self.candidates, min_class_fraction=self.min_class_fraction,
                                   on_unverified=self.on_unverified,
                                   local=LocalFeatureSettings(max_size=self.max_size, max_features=self.max_features))


AnyCleanConfig = Annotated[Union[CleanConfig, VerifyCleanConfig], Field(discriminator="method")]


class DataConfig(_Section):
    kind: Literal["folder", "csv", "sfm"] = "folder"
    root: str | None = None
    csv: str | None = None
    pkl: str | None = None
    split: str = "train"
    layout: Literal["cid", "flat"] = "cid"
    ext: str = ""
    imsize: int = Field(224, gt=0)
    augment: bool = False
    clean: AnyCleanConfig | None = None

    @field_validator("clean", mode="before")
    @classmethod
    def _clean_flag(cls, v: Any) -> Any:
        if v is True:
            return {"method": "distance"}
        if v is False:
            return None
        if isinstance(v, dict) and "method" not in v:
            return {"method": "distance", **v}
        return v


class MiningConfig(_Section):
    """Tuples per epoch. ``positive``: random (default; with ``hard_positives`` the candidate least
    similar under the current model), or for tuple files written by ``cbir mine`` (inlier counts
    per pair) ``inliers_top1`` (the candidate with the most inliers) / ``inliers_topk`` (a random
    one of the ``positive_k`` with the most). Negatives: ``negatives`` hard ones, at most one per
    other cluster (:func:`cbir.training.mining.mine_diverse_negatives`)."""

    queries_per_epoch: int = Field(2000, gt=0)
    pool_size: int = Field(20000, gt=0)
    negatives: int = Field(5, ge=1)
    hard_positives: bool = False
    positive: Literal["random", "inliers_top1", "inliers_topk"] = "random"
    positive_k: int = Field(5, ge=1)
    batch_size: int = Field(32, gt=0)


class ContrastiveConfig(_Section):
    name: Literal["contrastive"] = "contrastive"
    margin: float = 0.75


class TripletConfig(_Section):
    name: Literal["triplet"]
    margin: float = 0.1


class APConfig(_Section):
    name: Literal["ap"]
    nbins: int = Field(25, gt=1)
    smin: float = -1.0
    smax: float = 1.0


LossConfig = Annotated[Union[ContrastiveConfig, TripletConfig, APConfig], Field(discriminator="name")]


class OptimConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = 0.9
    pool_lr_mult: float = 10.0
    whiten_lr_mult: float = 1.0
    schedule: Literal["exponential", "cosine", "constant"] = "exponential"
    gamma: float = 0.99
    epochs: int = Field(10, ge=1)
    batch_tuples: int = Field(5, ge=1)
    accumulate: int = Field(1, ge=1)
    freeze_bn: bool = True
    freeze: list[str] = Field(default_factory=list)
    train_only: list[str] | None = None
    clip_grad: float | None = None


class WhiteningConfig(_Section):
    """A whitening layer initialised from the pooled training descriptors, then fine-tuned."""

    init: Literal["lw", "pca"] = "lw"
    dim: int | None = Field(None, gt=0)
    shrinkage: float = Field(0.1, ge=0, le=1)
    max_images: int | None = Field(None, gt=0)


class ValidationConfig(_Section):
    """Either a revisitop benchmark (``gnd`` + ``images``) or ``split``: a fraction of the training
    classes (``split_by: classes``) or of each class's images (``split_by: images``, for data with
    few classes) held out and never trained on; each held-out image is a query against the other
    held-out images. The returned model is the best validated epoch (epoch 0 = the start included);
    ``patience`` stops after that many validations without improvement of ``metric``."""

    gnd: str | None = None
    images: str | None = None
    ext: str = ".jpg"
    imsize: int = Field(512, gt=0)
    scales: list[float] = Field(default_factory=lambda: [1.0])
    split: float | None = Field(None, gt=0, lt=1)
    split_by: Literal["classes", "images"] = "classes"
    every: int = Field(1, ge=1)
    before: bool = True
    metric: Literal["easy", "medium", "hard"] = "medium"
    patience: int | None = Field(None, ge=1)
    query_indices: list[int] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ValidationConfig":
        if (self.gnd is None) == (self.split is None):
            raise ValueError("needs either gnd (+ images) or split (a fraction of the training classes), not both")
        return self


class TrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    loss: LossConfig = Field(default_factory=ContrastiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    whitening: WhiteningConfig | None = None
    validation: ValidationConfig | None = None
    out: str = "runs/train"
    device: str = "auto"
    bf16: bool = True
    workers: int = Field(0, ge=0)
    seed: int = 0
    tensorboard: bool = True
    keep_epochs: bool = False

    @field_validator("loss", mode="before")
    @classmethod
    def _default_loss_name(cls, v: Any) -> Any:
        if isinstance(v, dict) and "name" not in v:
            return {"name": "contrastive", **v}
        return v

    @classmethod
    def from_dict(cls, cfg: dict | "TrainConfig") -> "TrainConfig":
        """Validate a plain-data config; errors become one ValueError naming each dotted key."""
        if isinstance(cfg, TrainConfig):
            return cfg
        try:
            return cls.model_validate(cfg)
        except ValidationError as exc:
            raise ValueError(_explain(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


DEFAULTS: dict[str, Any] = TrainConfig().to_dict()


def _explain(exc: ValidationError) -> str:
    """One line per problem: ``config: unknown config keys ['optim.lrr']`` / ``optim.lr: ...``."""
    unknown, other = [], []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("contrastive", "triplet", "ap", "distance", "verify")))
        if e["type"] == "extra_forbidden":
            unknown.append(loc)
        else:
            other.append(f"{loc or 'config'}: {e['msg']} (got {e.get('input')!r})")
    parts = []
    if unknown:
        parts.append(f"unknown config keys {unknown} (see `cbir train CONFIG --print-config` for the known ones)")
    parts.extend(other)
    return "bad training config: " + "; ".join(parts)


def merge_config(base: dict, override: dict) -> dict:
    """Recursive dict merge: ``override`` wins; nested dicts merge key by key (a None base takes the dict)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


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


def read_config_file(path: str | os.PathLike[str]) -> dict:
    """The mapping in a YAML or TOML config file (FileNotFoundError / FormatError naming it)."""
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
    return cfg


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults ← the YAML/TOML file ← ``key=value`` overrides, validated (keys and types)."""
    cfg = read_config_file(path) if path is not None else {}
    return TrainConfig.from_dict(merge_config(cfg, parse_overrides(overrides or [])))


def missing_inputs(cfg: TrainConfig, *, resume: bool = False) -> list[str]:
    """Every input the config names that is not there, as ``"key: path (what)"`` strings."""
    out: list[str] = []

    def need(key: str, value: str | None, kind: str, what: str) -> None:
        if value is None:
            out.append(f"{key}: not set ({what})")
            return
        p = Path(value)
        ok = p.is_dir() if kind == "dir" else p.is_file()
        if not ok:
            out.append(f"{key}: {value} ({what}{' is a folder' if kind == 'file' and p.is_dir() else ' not found'})")

    d = cfg.data
    if d.kind == "folder":
        need("data.root", d.root, "dir", "folder of class sub-folders")
    elif d.kind == "csv":
        need("data.csv", d.csv, "file", "CSV of image,label")
        if d.root is not None:
            need("data.root", d.root, "dir", "image folder")
    else:
        need("data.pkl", d.pkl, "file", "SfM training db .pkl")
        need("data.root", d.root, "dir", "SfM image folder")
    w = cfg.model.weights
    if w is not None and w not in ("default", "imagenet", "hub", "none"):
        need("model.weights", w, "file", "weights file")
    v = cfg.validation
    if v is not None and v.gnd is not None:
        need("validation.gnd", v.gnd, "file", "ground-truth .pkl")
        need("validation.images", v.images or str(Path(v.gnd).parent / "jpg"), "dir", "validation images")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        out.append(f"out: {cfg.out} (is a file, not a folder)")
    if resume:
        need("--resume", str(Path(cfg.out) / "last.pt"), "file", "checkpoint to resume from")
    return out

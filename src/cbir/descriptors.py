"""``Descriptors``: the one currency between stages.

On disk, a folder with ``descriptors.npy`` (N x D, row i for image ``ids[i]``) and ``meta.json``
(``ids``, ``failed``, the settings that made the vectors, and a format stamp). Both are written
atomically; ``meta.json`` last, so a folder with a readable ``meta.json`` whose row count matches the
array is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import FormatError, atomic_save_npy, atomic_write_json, check_format, read_json
from .linalg import l2_normalize  # noqa: F401  (re-exported; the function lives in cbir.linalg)

FORMAT = "descriptors"
FORMAT_VERSION = 1
ARRAY_NAME = "descriptors.npy"
META_NAME = "meta.json"

# Settings that must agree for two descriptor sets to be comparable.
COMPAT_KEYS = ("model", "pooling", "whitening", "dim")


@dataclass
class Descriptors:
    """ids[i] names row i of ``vectors`` (N x D, float32 or float16)."""

    ids: list[str]
    vectors: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"descriptors must be a 2-D array (N x D), got shape {self.vectors.shape}")
        if len(self.ids) != self.vectors.shape[0]:
            raise ValueError(f"{len(self.ids)} ids for {self.vectors.shape[0]} descriptor rows")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("descriptor ids must be unique")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, names: list[str]) -> np.ndarray:
        """Row index of each name; KeyError naming the first missing one."""
        lookup = {name: i for i, name in enumerate(self.ids)}
        rows = []
        for name in names:
            if name not in lookup:
                raise KeyError(f"image id {name!r} is not among the {len(self.ids)} descriptors")
            rows.append(lookup[name])
        return np.asarray(rows, dtype=np.int64)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out / ARRAY_NAME, self.vectors)
        meta = dict(self.meta)
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            ids=list(self.ids),
            failed=list(self.failed),
            dim=self.dim,
            dtype=str(self.vectors.dtype),
        )
        atomic_write_json(out / META_NAME, meta)

    @classmethod
    def load(cls, out_dir: str | Path, mmap: bool = False) -> "Descriptors":
        out = Path(out_dir)
        meta = read_json(out / META_NAME, what="descriptor metadata")
        check_format(meta, FORMAT, (FORMAT_VERSION,), out / META_NAME)
        array_path = out / ARRAY_NAME
        if not array_path.is_file():
            raise FileNotFoundError(f"descriptor array not found: {array_path}")
        try:
            vectors = np.load(array_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as exc:
            raise FormatError(f"{array_path} is damaged: {exc}") from exc
        ids = meta.pop("ids")
        failed = meta.pop("failed", [])
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise FormatError(
                f"{out}: descriptors.npy has shape {vectors.shape} but meta.json lists {len(ids)} ids"
            )
        return cls(ids=ids, vectors=vectors, meta=meta, failed=failed)


def read_fvecs(path: str | Path) -> np.ndarray:
    """Read the .fvecs layout (each row: int32 dimension d, then d float32) into an (N, d) array."""
    raw = np.fromfile(path, dtype=np.int32)
    if raw.size == 0:
        raise FormatError(f"{path} is empty")
    d = int(raw[0])
    if d <= 0 or raw.size % (d + 1):
        raise FormatError(f"{path} is not a valid .fvecs file (dimension {d}, {raw.size} words)")
    rows = raw.reshape(-1, d + 1)
    if not np.all(rows[:, 0] == d):
        raise FormatError(f"{path}: rows of differing dimension")
    return rows[:, 1:].copy().view(np.float32)

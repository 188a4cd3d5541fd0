"""Benchmarks and the user's own labelled data, all as ``RetrievalDataset`` (see base.py).

``load_dataset(name, data_root)`` knows: ``demo`` (bundled, no data root needed), ``roxford5k``,
``rparis6k`` (revisitop), ``oxford5k``, ``paris6k`` (original protocol), ``gldv2`` (retrieval),
``holidays`` (INRIA Holidays, its official rule; see holidays.py).
The revisitop 1M distractor list is streamed by ``iter_distractors``.
"""

from __future__ import annotations

from pathlib import Path

from .base import RetrievalDataset
from .folder import from_csv, from_folder
from .gldv2 import load_gldv2
from .holidays import holidays_ground_truth, load_holidays
from .original import from_original_gt, load_original, read_original_gt
from .revisitop import count_distractors, find_distractor_list, from_gnd_file, iter_distractors, load_gnd, load_revisitop

DATASETS = ("demo", "roxford5k", "rparis6k", "oxford5k", "paris6k", "gldv2", "holidays")


def demo_root() -> Path:
    """The bundled demo benchmark: ``jpg/`` + ``gnd_demo.pkl`` (revisitop format)."""
    return Path(__file__).resolve().parents[1] / "data" / "demo"


def load_demo() -> RetrievalDataset:
    return from_gnd_file(demo_root() / "gnd_demo.pkl", name="demo")


def load_dataset(name: str, data_root: str | Path | None = None) -> RetrievalDataset:
    """A named benchmark under ``data_root`` (not needed for ``demo``)."""
    if name == "demo":
        return load_demo()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    if data_root is None:
        raise ValueError(f"dataset {name} needs --data-root DIR (where `cbir download {name}` put it)")
    if name in ("roxford5k", "rparis6k"):
        return load_revisitop(name, data_root)
    if name in ("oxford5k", "paris6k"):
        return load_original(name, data_root)
    if name == "holidays":
        return load_holidays(data_root)
    root = Path(data_root)
    return load_gldv2(next((b for b in (root / "datasets" / "gldv2", root / "gldv2") if b.is_dir()), root))


__all__ = [
    "DATASETS", "RetrievalDataset", "count_distractors", "demo_root", "find_distractor_list", "from_csv",
    "from_folder", "from_gnd_file", "from_original_gt", "holidays_ground_truth", "load_holidays", "iter_distractors", "load_dataset", "load_demo",
    "load_gldv2", "load_gnd", "load_original", "load_revisitop", "read_original_gt",
]

"""The options of mining verified pairs, shared by ``cbir mine`` and ``cbir adapt`` (declared once).

Global descriptor of the candidates (``--imsize``, ``--scales``, ``--k``), local features and
verification (``--max-size``, ``--max-features``, ``--min-inliers``, ``--bridge-inliers``), the SIFT
processes (``--workers``) and one progress bar per stage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .options import parse_scales

#: schema field -> the flag that sets it (library errors name fields, the CLI names flags)
PAIR_FLAGS = {"k": "--k", "imsize": "--imsize", "min_inliers": "--min-inliers", "bridge_inliers": "--bridge-inliers",
              "scales": "--scales"}


def add_pair_options(global_group: Any, local_group: Any) -> None:
    """``--imsize --scales --k`` into ``global_group``; ``--max-size --max-features --min-inliers
    --bridge-inliers`` into ``local_group`` (the defaults of :class:`cbir.sfm.settings.PairSettings`)."""
    global_group.add_argument("--imsize", type=int, default=None, metavar="PX",
                              help="longest side for the global descriptor (default: the model's, 512 for Lite0)")
    global_group.add_argument("--scales", default=None, metavar="S,S,...", help="scales (default: the model's)")
    global_group.add_argument("--k", type=int, default=10, help="nearest neighbours per photo verified (default: 10)")
    local_group.add_argument("--max-size", type=int, default=640, metavar="PX", help="longest side for SIFT (default: 640)")
    local_group.add_argument("--max-features", type=int, default=1024, metavar="N",
                             help="SIFT features per photo (default: 1024)")
    local_group.add_argument("--min-inliers", type=int, default=15, metavar="N",
                             help="inliers for a verified pair (default: 15)")
    local_group.add_argument("--bridge-inliers", type=int, default=30, metavar="N",
                             help="a single verified pair joining two groups of >= 2 photos must have this many "
                                  "(0: any; default: 30)")


def add_running_options(group: Any, what: str) -> None:
    """``--device --workers --quiet --json`` (``what``: the word for the printed result)."""
    group.add_argument("--device", default="auto", help="auto, cpu, cuda (global model and matching; default: auto)")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="SIFT processes (default: the CPU count, at most 4)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--json", action="store_true", help=f"print the {what} as JSON instead of words")


def pair_settings_from_args(args: argparse.Namespace):
    """The :class:`cbir.sfm.settings.PairSettings` of the options; a bad value is a CLIError naming its flag."""
    from ..local.features import LocalFeatureSettings
    from ..schema import SchemaError
    from ..sfm.settings import PairSettings
    from . import CLIError

    try:
        local = LocalFeatureSettings(max_size=args.max_size, max_features=args.max_features)
    except ValueError as exc:
        raise CLIError(f"--max-size/--max-features: {str(exc).splitlines()[-1].strip()}") from None
    try:
        return PairSettings(model=args.model, pooling=args.pooling, weights=args.weights, imsize=args.imsize,
                            scales=None if args.scales is None else parse_scales(args.scales), k=args.k, local=local,
                            min_inliers=args.min_inliers, bridge_inliers=args.bridge_inliers)
    except SchemaError as exc:
        raise flag_error(exc, PAIR_FLAGS) from None


def flag_error(exc: Any, flags: dict[str, str]):
    """The CLIError of a :class:`cbir.schema.SchemaError`, its first field named by its flag."""
    from . import CLIError

    field, problem = exc.errors[0]
    return CLIError(f"{flags.get(field.split('.')[-1], field)}: {problem}")


def workers_from_args(args: argparse.Namespace) -> int:
    """``--workers`` (default: the CPU count, at most 4); a CLIError below 1."""
    from . import CLIError

    workers = args.workers if args.workers is not None else max(1, min(4, os.cpu_count() or 1))
    if workers < 1:
        raise CLIError(f"--workers must be >= 1, got {workers}")
    return workers


class StageBars:
    """One tqdm bar per stage, on standard error (``labels``: stage -> its name; ``photo_stages``
    count photos, "verify" counts pairs, the others steps)."""

    def __init__(self, quiet: bool, labels: dict[str, str], photo_stages: tuple[str, ...]) -> None:
        self.quiet, self.labels, self.photo_stages = quiet, labels, photo_stages
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            unit = "pair" if stage == "verify" else "photo" if stage in self.photo_stages else "step"
            bar = self.bars[stage] = tqdm(total=total, desc=self.labels.get(stage, stage), file=sys.stderr, unit=unit)
        bar.update(done)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

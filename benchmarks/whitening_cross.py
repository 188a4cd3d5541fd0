"""Learned whitening and tuned re-ranking across sets: learn/tune on one shared set, measure on the other.

    .venv/bin/python benchmarks/whitening_cross.py [--cache DIR] [--json out.json]

Descriptors: EfficientNet-Lite0 (ImageNet) + GeM, 512 px, one scale; rParis6k-250 queries cropped
to their box, Holidays-805 queries are whole images (their box). Both directions:
Holidays-805 -> rParis6k-250 and rParis6k-250 -> Holidays-805. For each:

1. whitening table: none; PCA-w learned on the *learning* set's database vectors; PCA-w learned on
   the target database itself at use time (no labels); Lw learned on the learning set's matching
   pairs (every pair within a query and its positives: Holidays groups, Paris landmarks); output
   dimension 128 / 256 / 512 / all. Shrinkage (and PCA power) are chosen by ``cbir tune``'s
   cross-validated whitening step on the learning set only, never on the target;
2. "what learning buys": raw, the safe defaults (--qe --dba --diffusion), the best PCA-w and the
   best Lw of the learning set's search, and the full recipe ``cbir tune`` chooses on the
   learning set (whitening + re-ranking), all measured on the target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from cbir.datasets import from_gnd_file
from cbir.rerank import Rerank
from cbir.rerank.recipe import Recipe, WhiteningSpec
from cbir.rerank.tune import Grid, LabelledSet, _learn, tune

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = {
    "rparis6k-250": ("data/rparis6k-250/gnd_rparis6k_subset250.pkl", True),
    "holidays-805": ("data/holidays-805/gnd_holidays805.pkl", False),
}
DIMS = (128, 256, 512, None)


def load(name: str, cache: Path | None) -> LabelledSet:
    """The set's (queries, database) descriptors through the extraction cache (``cbir.cache``: shared
    with `cbir evaluate`, `cbir tune`, ...; a Holidays query is its database photo, described once)."""
    from cbir.model import ModelSpec
    from cbir.pipeline import default_cache_dir, describe

    gnd_file, crop = SETS[name]
    ds = from_gnd_file(SHARED / gnd_file, name=name)
    q, db = describe(ds, ModelSpec("efficientnet_lite0", "gem"), imsize=512, scales=(1.0,), crop=crop,
                     cache_dir=cache or default_cache_dir())
    if not crop:  # whole images: each query is the row of the same photo
        row = {n: i for i, n in enumerate(ds.db_ids)}
        assert np.array_equal(q.vectors, db.vectors[[row[n] for n in ds.query_ids]])
    return LabelledSet(name, q.vectors, db.vectors, ds)


def emh(target: LabelledSet, scores: np.ndarray) -> list[float]:
    m = target.dataset.evaluate(scores)["mAP"]
    return [round(float(m[k]), 2) for k in ("easy", "medium", "hard")]


def best_of(trials: list[dict], method: str, fit: str | None = None, min_gain: float = Grid().min_gain) -> dict | None:
    """The learning set's best whitening of ``method`` (over shrinkage, power, dim), with the tie
    rule of ``cbir tune`` (a later candidate must win by ``min_gain``)."""
    best = None
    for t in trials:
        if t["step"] != "whitening" or "objective" not in t or t["whitening"]["method"] != method:
            continue
        if fit is not None and t["whitening"].get("fit") != fit:
            continue
        if best is None or t["objective"] > best["objective"] + min_gain:
            best = t
    return best


def direction(learn: LabelledSet, target: LabelledSet, say) -> dict:
    t0 = time.time()
    recipe, trials = tune([learn], Grid())
    say(f"tuned on {learn.name} in {time.time() - t0:.0f} s: whitening {recipe.spec.label()}, "
        f"re-ranking {recipe.rerank.to_dict()}")
    out: dict = {"learn": learn.name, "target": target.name, "recipe": {"whitening": recipe.spec.to_dict(),
                                                                        "rerank": recipe.rerank.to_dict()},
                 "whitening": {}, "buys": {}}
    raw = Rerank().apply(target.q, target.db)[0]
    out["whitening"]["none"] = emh(target, raw)
    for method, fit in (("pca", "validation"), ("pca", "database"), ("lw", "validation")):
        best = best_of(trials, method, fit)
        if best is None:
            continue
        spec = WhiteningSpec.from_dict(best["whitening"])
        for dim in DIMS:
            s = WhiteningSpec(method, fit, power=spec.power, shrinkage=spec.shrinkage, dim=dim)
            learned = _learn(s, [learn], None) if fit == "validation" else None
            scores = Recipe(s, Rerank(), learned=learned).apply(target.q, target.db)[0]
            label = f"{method} ({'learned on ' + learn.name if fit == 'validation' else 'target database'}), " \
                    f"power {spec.power:g}, shrinkage {spec.shrinkage:g}" if method == "pca" else \
                    f"lw (pairs of {learn.name}), shrinkage {spec.shrinkage:g}"
            out["whitening"][f"{label}, dim {dim or 'all'}"] = emh(target, scores)
    out["buys"]["raw"] = out["whitening"]["none"]
    out["buys"]["safe defaults (--qe --dba --diffusion)"] = emh(target, Rerank(qe=2, dba=5, diffusion={}).apply(target.q, target.db)[0])
    for method, fit, label in (("pca", "validation", "PCA-w (learned on the other set)"),
                               ("pca", "database", "PCA-w (target database, use time)"),
                               ("lw", "validation", "Lw (pairs of the other set)")):
        best = best_of(trials, method, fit)
        if best is not None:
            s = WhiteningSpec.from_dict(best["whitening"])
            learned = _learn(s, [learn], None) if fit == "validation" else None
            out["buys"][f"{label}: {s.label()}"] = emh(target, Recipe(s, Rerank(), learned=learned).apply(target.q, target.db)[0])
    out["buys"]["tuned recipe (whitening + re-ranking)"] = emh(target, recipe.apply(target.q, target.db)[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="extraction cache folder (default: cbir's, $CBIR_CACHE)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sets = {n: load(n, Path(args.cache) if args.cache else None) for n in SETS}
    results = [direction(sets["holidays-805"], sets["rparis6k-250"], say),
               direction(sets["rparis6k-250"], sets["holidays-805"], say)]
    for r in results:
        print(f"\n### learned / tuned on {r['learn']}, measured on {r['target']}\n")
        print("| whitening | Easy | Medium | Hard |\n|---|---|---|---|")
        for k, v in r["whitening"].items():
            print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
        print("\n| what learning buys | Easy | Medium | Hard |\n|---|---|---|---|")
        for k, v in r["buys"].items():
            print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
        print(f"\nrecipe: {json.dumps(r['recipe'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``cbir adapt`` on the shared sets: choose adapt's defaults on ONE set, report them on the other.

    .venv/bin/python benchmarks/adapt.py choose --set holidays-805 --cache DIR [--json out.json]
    .venv/bin/python benchmarks/adapt.py report --set rparis6k-250 --cache DIR [--verify 100]

``choose``: adapt (the library call, as ``cbir adapt`` makes it) on the set's photos with each
candidate of what adapt itself fixes: the positives rule (cluster / verified), the Lw dimension
(256 / 512 / all) and shrinkage (0.1 / 0.5), each with the small re-ranking search (``--fast``;
the full search of the default is run by ``report``); the mining is done once (same pair
settings: the work is read back from the cache). Only then, and only in this script, the set's
ground truth judges each recipe (mAP of Lw alone and of the whole recipe); adapt never reads it.
``report``: ``cbir adapt`` (default settings; ``--db-only``: on links to the database photos
only, the queries left out) then ``cbir evaluate`` raw / ``--recipe
holidays805-lite0`` / ``--recipe ADAPTED`` (/ ``+ --verify K``) on the set, as subprocesses:
the commands of docs/adapt.md. Timings are of a loaded machine unless it was quiet.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = {"holidays-805": ("data/holidays-805/jpg", "data/holidays-805/gnd_holidays805.pkl"),
        "rparis6k-250": ("data/rparis6k-250/jpg", "data/rparis6k-250/gnd_rparis6k_subset250.pkl")}


def _figures(bench, q, db, recipe) -> dict:
    from cbir.rerank.recipe import Recipe

    out = {}
    lw_only = Recipe(spec=recipe.spec, learned=recipe.learned)
    for label, r in (("lw", lw_only), ("recipe", recipe)):
        m = bench.evaluate(r.apply(q, db)[0])["mAP"]
        out[label] = {k: round(float(v), 2) for k, v in m.items() if not np.isnan(v)}
    return out


def choose(args: argparse.Namespace) -> dict:
    from cbir.adapt import AdaptSettings, adapt
    from cbir.pipeline import describe, load_benchmark
    from cbir.model import ModelSpec

    images, gnd = (SHARED / p for p in SETS[args.set])
    rows = []
    bench = None
    for positives, dim, shrink in itertools.product(("cluster", "verified"), (256, 512, None), (0.1, 0.5)):
        s = AdaptSettings(positives=positives, lw_dim=dim, lw_shrinkage=shrink, search="fast")
        t = time.perf_counter()
        recipe, report = adapt(images, s, cache_dir=args.cache, workers=args.workers)
        seconds = time.perf_counter() - t
        if bench is None:  # the labels, read only now, by this script
            bench = load_benchmark(str(gnd), images=str(images), n_queries=10**9)
            q, db = describe(bench, ModelSpec("efficientnet_lite0", "gem"), cache_dir=args.cache, progress=False)
            q, db = q.vectors, db.vectors
        row = {"positives": positives, "lw_dim": dim, "lw_shrinkage": shrink, "pseudo_gt": report.pseudo_gt,
               "rerank": {k: v for k, v in report.rerank.items() if v is not None and k != "whiten"},
               "mAP": _figures(bench, q, db, recipe), "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"set": args.set, "rows": rows}


def _run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def database_folder(images: Path, gnd: Path, where: Path) -> Path:
    """A folder of links to the database photos of ``gnd`` only (the queries left out): what a
    user adapting to their own collection has. The benchmark script reads the ground truth to
    list them; adapt then sees the links only."""
    from cbir.datasets.revisitop import load_plain_pickle

    names = load_plain_pickle(gnd)["imlist"]
    where.mkdir(parents=True, exist_ok=True)
    for n in names:
        link = where / (n if n.endswith(".jpg") else f"{n}.jpg")
        if not link.exists():
            link.symlink_to(images / link.name)
    return where


def report(args: argparse.Namespace) -> dict:
    images, gnd = (SHARED / p for p in SETS[args.set])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.set + (".db-only" if args.db_only else "")
    recipe = out / f"{tag}.adapt.recipe.json"
    folder = database_folder(images, gnd, out / f"{args.set}-database") if args.db_only else images
    cbir = [sys.executable, "-m", "cbir"]
    t = time.perf_counter()
    printed = _run(cbir + ["adapt", str(folder), "--out", str(recipe), "--cache", args.cache, "--quiet",
                           "--workers", str(args.workers), "--json"])
    doc = {"set": args.set, "adapted_folder": str(folder), "adapt": json.loads(printed), "adapt_seconds": round(time.perf_counter() - t, 1),
           "evaluate": {}}
    runs = [("raw", []), ("holidays805-lite0", ["--recipe", "holidays805-lite0"]), ("adapt", ["--recipe", str(recipe)])]
    if args.verify:
        runs += [("holidays805-lite0 + verify", ["--recipe", "holidays805-lite0", "--verify", str(args.verify)]),
                 ("adapt + verify", ["--recipe", str(recipe), "--verify", str(args.verify)])]
    for label, extra in runs:
        js = out / f"{tag}.{label.replace(' ', '').replace('+', '_')}.json"
        t = time.perf_counter()
        _run(cbir + ["evaluate", "--gnd", str(gnd), "--images", str(images), "--cache-dir", args.cache, "--quiet",
                     "--json", str(js), *extra])
        res = json.loads(js.read_text())
        doc["evaluate"][label] = {"mAP": res.get("mAP"), "seconds": round(time.perf_counter() - t, 1)}
        print(label, json.dumps(res.get("mAP")), flush=True)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("choose", "report"))
    p.add_argument("--set", choices=sorted(SETS), required=True)
    p.add_argument("--cache", required=True, help="extraction cache (the mining work is kept there too)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--verify", type=int, default=0, help="report: also --verify K on top of each recipe")
    p.add_argument("--db-only", action="store_true",
                   help="report: adapt on the database photos only (links), not the query photos too")
    p.add_argument("--out", default="adapt-bench", help="report: folder for the recipes and results")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"load average {os.getloadavg()}", flush=True)
    doc = choose(args) if args.what == "choose" else report(args)
    doc["load_average_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

"""The mission's pooling comparison: E/M/H mAP on rparis6k-250 for every pooling, one command.

    .venv/bin/python benchmarks/pooling_table.py [--data ../shared/data/rparis6k-250] [--imsize 512]

Same backbone (EfficientNet-Lite0, offline ImageNet weights) and size for all; queries cropped to
their box. The backbone runs once per image and scale; every pooling (cbir.pooling's registry:
SPoC, MAC, GeM, R-MAC, CroW, BoW) is applied to the same feature maps, exactly as
``RetrievalNet.pool`` (pooling + L2) and ``cbir.extract`` (scales combined by the pooling's
generalized mean, then L2) do. Single scale = 1; multi-scale = 1, 1/sqrt(2), 1/2.
BoW's codebook (k-means, k=1024 by default) is fitted on local features of the database images
at scale 1 (300 random positions from each of up to 200 images, as ``cbir.extract.fit_bow``).
Prints a markdown table; ``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cbir.fileio import atomic_write_json  # noqa: E402
from cbir.model import build_model  # noqa: E402
from cbir.pipeline import describe_poolings, load_benchmark, score  # noqa: E402
from cbir.pooling import build_pooling  # noqa: E402

METHODS = ("spoc", "mac", "gem", "rmac", "crow", "bow")
MULTI = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "rparis6k-250"))
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--imsize", type=int, default=512)
    ap.add_argument("--bow-k", type=int, default=1024)
    ap.add_argument("--json", default=None, help="also write the table as JSON")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    data = Path(args.data)
    gnd = next(data.glob("gnd_*.pkl"), None)
    if gnd is None:
        print(f"no gnd_*.pkl in {data}", file=sys.stderr)
        return 2
    ds = load_benchmark(gnd)
    model = build_model(args.model, pooling="gem")
    poolings = {name: build_pooling(name, **({"k": args.bow_k, "channels": model.channels} if name == "bow" else {}))
                for name in METHODS}
    t0 = time.perf_counter()
    described = describe_poolings(ds, args.model, poolings, imsize=args.imsize,
                                  scale_sets={"single": (1.0,), "multi": MULTI},
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    t_maps = time.perf_counter() - t0  # backbone pass and poolings together

    rows, record = [], {"dataset": ds.name, "model": args.model, "imsize": args.imsize, "scales_multi": list(MULTI),
                        "n_db": len(ds.db_ids), "n_queries": len(ds.query_ids), "results": {}}
    for name in METHODS:
        res = {}
        for label in ("single", "multi"):
            q, db = described[name][label]
            res[label] = {k: round(v, 2) for k, v in score(ds, q, db)["mAP"].items()}
        record["results"][name] = {"params": poolings[name].params(), **res}
        s, m = res["single"], res["multi"]
        rows.append(f"| {name} | {s['easy']:.2f} | {s['medium']:.2f} | {s['hard']:.2f} "
                    f"| {m['easy']:.2f} | {m['medium']:.2f} | {m['hard']:.2f} |")
    record["seconds_backbone"] = round(t_maps, 1)
    record["seconds_total"] = round(time.perf_counter() - t0, 1)

    print(f"E/M/H mAP (%) on {ds.name} ({len(ds.db_ids)} db, {len(ds.query_ids)} cropped queries), "
          f"{args.model}, {args.imsize} px; multi-scale = 1, 1/sqrt2, 1/2")
    print()
    print("| pooling | single E | single M | single H | multi E | multi M | multi H |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(f"(description {t_maps:.0f} s, total {record['seconds_total']:.0f} s on this machine)")
    if args.json:
        atomic_write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cbir.datasets import from_gnd_file  # noqa: E402
from cbir.evaluation import evaluate_revisitop  # noqa: E402
from cbir.extract import combine_scales, image_tensor, load_image  # noqa: E402
from cbir.fileio import atomic_write_json  # noqa: E402
from cbir.model import build_model  # noqa: E402
from cbir.pooling import bow_hard, bow_idf, build_pooling, fit_codebook, local_features  # noqa: E402

METHODS = ("spoc", "mac", "gem", "rmac", "crow", "bow")
MULTI = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def feature_maps(model, paths, boxes, imsize, scales, what="images"):
    """Per image, the backbone maps at each scale (float16 to keep memory small)."""
    out = []
    with torch.inference_mode():
        for i, (path, box) in enumerate(zip(paths, boxes)):
            if i % 25 == 0:
                print(f"{what}: {i}/{len(paths)}", file=sys.stderr, flush=True)
            x = image_tensor(load_image(path, box), imsize, model.mean, model.std)[None]
            maps = []
            for s in scales:
                xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                       antialias=True)
                maps.append(model.features(xs).half())
            out.append(maps)
    return out


def fit_bow_from_maps(pool, maps, seed=0, sample=200, per_image=300):
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(maps), size=min(sample, len(maps)), replace=False).tolist())
    feats = []
    for i in pick:
        loc = local_features(maps[i][0].float())[0].numpy()
        take = rng.choice(loc.shape[0], size=min(per_image, loc.shape[0]), replace=False)
        feats.append(loc[take])
    codebook = fit_codebook(np.concatenate(feats), pool.k, seed=seed)
    hist = np.stack([bow_hard(maps[i][0].float(), torch.from_numpy(codebook))[0].numpy() for i in pick])
    pool.set_codebook(codebook, bow_idf(hist))


def pooled(pool, maps, n_scales):
    """(N, D) descriptors: per scale pooling + L2, scales combined by the pooling's mean, L2."""
    rows = []
    with torch.inference_mode():
        for per_image in maps:
            vs = torch.stack([F.normalize(pool(m.float()).float(), dim=-1) for m in per_image[:n_scales]])
            v = vs[0] if n_scales == 1 else combine_scales(vs, pool.multiscale_p())
            rows.append(v[0].numpy())
    return np.stack(rows).astype(np.float32)


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
    ds = from_gnd_file(gnd)
    model = build_model(args.model, pooling="gem")
    t0 = time.perf_counter()
    db_maps = feature_maps(model, ds.db_paths, [None] * len(ds.db_paths), args.imsize, MULTI, "database")
    q_maps = feature_maps(model, ds.query_paths, ds.query_bboxes, args.imsize, MULTI, "queries")
    t_maps = time.perf_counter() - t0

    rows, record = [], {"dataset": ds.name, "model": args.model, "imsize": args.imsize, "scales_multi": list(MULTI),
                        "n_db": len(ds.db_ids), "n_queries": len(ds.query_ids), "results": {}}
    for name in METHODS:
        kw = {"k": args.bow_k, "channels": model.channels} if name == "bow" else {}
        pool = build_pooling(name, **kw).eval()
        print(f"pooling: {name}", file=sys.stderr, flush=True)
        if name == "bow":
            fit_bow_from_maps(pool, db_maps)
        res = {}
        for label, n_scales in (("single", 1), ("multi", len(MULTI))):
            db = pooled(pool, db_maps, n_scales)
            q = pooled(pool, q_maps, n_scales)
            r = evaluate_revisitop(q @ db.T, ds.gnd)
            res[label] = {k: round(v, 2) for k, v in r["mAP"].items()}
        record["results"][name] = {"params": pool.params(), **res}
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
    print(f"(backbone {t_maps:.0f} s, total {record['seconds_total']:.0f} s on this machine)")
    if args.json:
        atomic_write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Image size x scales sweep that chose each backbone's default resolution (cbir.backbones.RESOLUTION).

    .venv/bin/python benchmarks/resolution_sweep.py --model efficientnet_lite0 \
        --sets rparis6k-250 holidays-805 --sizes 384 512 640 768 1024 --json sweep.json

For every set, image size S and scale s the backbone runs once (``cbir.extract.extract`` with
``scales=(s,)``; descriptors cached under ``--cache``); each scale set is then combined exactly as
``extract`` does it (generalized mean with GeM's p, then L2), so a row equals what
``cbir evaluate --imsize S --scales ...`` gives. Queries are cropped to their box. Medium mAP is
printed per set (Holidays-805: Medium = the Holidays mAP, query left out of its own ranking).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cbir.datasets import from_gnd_file  # noqa: E402
from cbir.evaluation import evaluate_revisitop  # noqa: E402
from cbir.extract import combine_scales, extract  # noqa: E402
from cbir.model import build_model  # noqa: E402

SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))
GND = {"rparis6k-250": "rparis6k-250/gnd_rparis6k_subset250.pkl", "holidays-805": "holidays-805/gnd_holidays805.pkl"}
R2 = math.sqrt(2.0)
SCALE_SETS = {"1": (1.0,), "1,0.707,0.5": (1.0, 1 / R2, 0.5), "1.414,1,0.707": (R2, 1.0, 1 / R2)}


def per_scale(model, ds, size: int, s: float, cache: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(query, database) single-scale pooled descriptors at size S, scale s (cached), and seconds."""
    f = cache / f"{ds.name}-{model.config['model']}-{size}-{s:.4f}.npz"
    if f.is_file():
        z = np.load(f)
        return z["q"], z["db"], float(z["seconds"])
    t0 = time.perf_counter()
    db = extract(model, ds.db_paths, imsize=size, scales=(s,), progress=False, strict=True, device="cpu")
    q = extract(model, ds.query_paths, imsize=size, scales=(s,), bboxes=ds.query_bboxes, progress=False,
                strict=True, device="cpu")
    sec = time.perf_counter() - t0
    np.savez(f, q=q.vectors, db=db.vectors, seconds=sec)
    return q.vectors, db.vectors, sec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--sets", nargs="+", default=list(GND))
    ap.add_argument("--sizes", nargs="+", type=int, default=[384, 512, 640, 768, 1024])
    ap.add_argument("--cache", default="/tmp/cbir-resolution-sweep")
    ap.add_argument("--json")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, pooling="gem")
    p = model.multiscale_p()
    rows = []
    for name in args.sets:
        ds = from_gnd_file(SHARED / "data" / GND[name], name=name)
        biggest = max(max(__import__("PIL.Image", fromlist=["Image"]).open(x).size) for x in ds.db_paths)
        for size in args.sizes:
            if size > biggest and size != min(s for s in args.sizes if s >= biggest):
                continue  # no image is shrunk: same as the smallest such size
            for label, scales in SCALE_SETS.items():
                if size >= 1024 and max(scales) > 1:
                    continue
                parts = [per_scale(model, ds, size, s, cache) for s in scales]
                sec = sum(x[2] for x in parts)
                if len(scales) == 1:
                    q, db = parts[0][0], parts[0][1]
                else:
                    q = combine_scales(torch.from_numpy(np.stack([x[0] for x in parts])), p).numpy()
                    db = combine_scales(torch.from_numpy(np.stack([x[1] for x in parts])), p).numpy()
                res = evaluate_revisitop(q @ db.T, ds.gnd)["mAP"]
                row = {"set": name, "imsize": size, "scales": label, "easy": res["easy"], "medium": res["medium"],
                       "hard": res["hard"], "seconds": round(sec, 1), "images": len(ds.db_paths) + len(ds.query_paths)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

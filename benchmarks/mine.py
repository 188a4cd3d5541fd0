"""``cbir mine`` on the shared photos: time per stage, and what the mined clusters hold.

    .venv/bin/python benchmarks/mine.py                        # holidays-805 + rparis6k-250 (1055 photos)
    .venv/bin/python benchmarks/mine.py --photos 250 --sets rparis6k-250
    .venv/bin/python benchmarks/mine.py --json mine.json --workers 2

The photos are linked (symlinks) into a temporary folder ``holidays/<id>.jpg``, ``paris/<name>.jpg``
and mined by the command itself (``cbir mine FOLDER --out OUT --workers W --json``, default settings:
Lite0 + GeM at 512 px x 3 scales through the extraction cache, k = 10, SIFT 640 px / 1024 features,
homography RANSAC, 15 inliers, bridges need 30, pycolmap mapping of clusters of >= 3 photos). The
goal (issue 17): 1000 photos in < 30 min on 2 cores; the load average before and after is printed
because a loaded machine stretches every stage.

After mining, and only for this report, the labels the miner never reads judge its output: a
Holidays photo's group is its id // 100 (the dataset's rule), a Paris photo's landmark the word in
its name (paris_<landmark>_NNNNNN: coarse, e.g. "defense" holds several buildings). Reported:
the precision of the verified pairs (both photos of one group/landmark), cluster purity (photos in
their cluster's majority label), clusters that mix labels, and the same for the weak-bridge rule
switched off or set higher (clusters recomputed from the stored inlier counts: no re-verification).
The extraction cache is ``$CBIR_CACHE`` (or ~/.cache/cbir): a second run describes nothing; use
``--cache DIR`` for a fresh one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = {"holidays-805": ("data/holidays-805/jpg", "holidays"), "rparis6k-250": ("data/rparis6k-250/jpg", "paris")}


def link_photos(folder: Path, sets: list[str], limit: int | None) -> int:
    n = 0
    for name in sets:
        src, sub = SETS[name]
        files = sorted((SHARED / src).glob("*.jpg"))
        if not files:
            raise SystemExit(f"no photos in {SHARED / src} (set CBIR_SHARED)")
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            if limit is not None and n >= limit:
                return n
            (folder / sub / f.name).symlink_to(f)
            n += 1
    return n


def label(name: str) -> str:
    """The judge's label of a photo name (never seen by the miner)."""
    sub, file = name.split("/", 1)
    if sub == "holidays":
        return f"h{int(Path(file).stem) // 100}"
    return "p-" + file.split("_")[1]


def judge(out: Path, names: list[str]) -> dict:
    from cbir.fileio import load_stamped_npz
    from cbir.sfm.graph import cluster_graph

    cands, _ = load_stamped_npz(out / "pairs" / "candidates.npz", "cbir-mine-candidates", (1,))
    graph, _ = load_stamped_npz(out / "pairs" / "graph.npz", "cbir-mine-graph", (1,))
    pairs, inliers = cands["pairs"], graph["inliers"]
    lab = np.array([label(n) for n in names])
    same = lab[pairs[:, 0]] == lab[pairs[:, 1]]
    res: dict = {}
    for t in (15, 20, 30):
        v = inliers >= t
        res[f"verified@{t}"] = {"pairs": int(v.sum()), "same_label": int((v & same).sum()),
                                "precision": round(float((v & same).sum() / max(1, v.sum())), 4)}
    res["candidates_same_label"] = int(same.sum())
    for bridge in (0, 30, 50):
        clusters, cut = cluster_graph(len(names), pairs, inliers, 15, bridge)
        ids = [c for c in np.unique(clusters) if c >= 0]
        majority = sum(Counter(lab[clusters == c]).most_common(1)[0][1] for c in ids)
        members = int((clusters >= 0).sum())
        mixed = [sorted(Counter(lab[clusters == c]).items(), key=lambda t: -t[1])[:4] for c in ids
                 if len(set(lab[clusters == c])) > 1]
        res[f"bridge_inliers={bridge}"] = {
            "clusters": len(ids), "clustered_photos": members, "cut": int(len(cut)),
            "purity": round(majority / max(1, members), 4), "mixed_clusters": len(mixed),
            "mixed_examples": [[(k, int(v)) for k, v in m] for m in mixed[:3]],
            # a label spread over several clusters: its clusters are each other's (false) negatives
            "labels_split": int(sum(1 for x in set(lab[clusters >= 0])
                                    if len(set(clusters[(lab == x) & (clusters >= 0)])) > 1)),
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="holidays-805,rparis6k-250")
    ap.add_argument("--photos", type=int, default=None, help="at most N photos (default: all of the sets)")
    ap.add_argument("--out", type=Path, default=None, help="mining output folder (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="extraction cache folder (default: $CBIR_CACHE)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("extra", nargs="*", help="more `cbir mine` options, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbir-mine-bench-") as tmp:
        folder = Path(tmp) / "photos"
        n = link_photos(folder, args.sets.split(","), args.photos)
        out = args.out or Path(tmp) / "out"
        env = dict(os.environ)
        if args.cache is not None:
            env["CBIR_CACHE"] = str(args.cache)
        cmd = [sys.executable, "-m", "cbir", "mine", str(folder), "--out", str(out), "--workers", str(args.workers),
               "--json", *args.extra]
        load0 = os.getloadavg()
        print(f"{n} photos; load average before: {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}", file=sys.stderr)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
        if r.returncode != 0:
            raise SystemExit(f"cbir mine failed ({r.returncode})")
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
        quality = judge(out, names)
    report = {"photos": n, "wall_seconds": round(wall, 1), "goal_seconds": 1800, "met": wall < 1800,
              "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in load1],
              "cpus": os.cpu_count(), "seconds": summary["seconds"],
              "summary": {k: v for k, v in summary.items() if k not in ("settings", "seconds", "failed_photos")},
              "judged": quality}
    print(f"cbir mine, {n} photos: {wall:.0f} s wall ({'<' if wall < 1800 else '>='} 30 min), load "
          f"{load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} CPUs")
    print("  per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()))
    s = summary
    print(f"  {s['candidate_pairs']} candidate pairs, {s['verified_pairs']} verified, {s['clusters']} clusters "
          f"({s['clustered_photos']} photos), {s['models']} 3D models, {s['registered_photos']} photos registered")
    for k, v in quality.items():
        print(f"  {k}: {json.dumps(v)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

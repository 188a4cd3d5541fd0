"""Spatial verification (--verify) through the real paths: its cost per query, and what it does to mAP.

    .venv/bin/python benchmarks/verify_cost.py search   [--cache DIR] [--k 100] [--queries 12]
    .venv/bin/python benchmarks/verify_cost.py evaluate [--cache DIR] [--k 100] [--sets rparis6k-250 holidays-805]
    .venv/bin/python benchmarks/verify_cost.py all      [--json out.json]

``search``: ``cbir index build rparis6k-250/jpg --verify K`` (the default model: Lite0 + GeM, 512 px,
3 scales; the index keeps every photo's SIFT in INDEX/local), then ``cbir search INDEX --image Q
--bbox B`` for each of the 12 cropped rparis6k-250 queries (then the database photos, up to
``--queries``), in this process through ``cbir.cli.main`` (each call loads the index and the query
network, as a command does; process start-up and imports are not counted, the first call (cold:
torch's import for the matcher) is reported apart), once with the index's verification and once
with ``--verify 0``. Per query, from the search's own record (``re-ranking: {"verify": ...}``):
the query's SIFT (``query_seconds``), reading the candidates' features (``feature_seconds``),
matching + RANSAC of the top K (``seconds``); and the wall time of the whole search both ways.
Medians over the warm queries.

``evaluate``: ``cbir evaluate --gnd SET`` with the default model, four ways: raw, ``--verify K``,
``--recipe holidays805-lite0``, ``--recipe holidays805-lite0 --verify K`` (E / M / H mAP; Holidays:
its mAP = Medium), the verification cost per query in ``cbir evaluate`` (matching + RANSAC), and,
for Holidays (whose queries are database photos), how many queries met their own photo in their
top K (counted as the query itself, never as a verified expansion: ``same_image``).

Global descriptors and local features go through the caches under ``--cache`` (default
``$CBIR_CACHE`` or cbir's), so a second run describes and extracts nothing. Times are wall-clock on
whatever machine runs it: the load average is printed beside each figure; on a shared machine they
are only indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = {"rparis6k-250": "data/rparis6k-250/gnd_rparis6k_subset250.pkl",
        "holidays-805": "data/holidays-805/gnd_holidays805.pkl"}
RECIPE = "holidays805-lite0"


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def cli(*argv: Any) -> tuple[int, str, str, float]:
    """``cbir.cli.main`` in this process -> (exit code, stdout, stderr, seconds)."""
    from cbir.cli import main

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0


def applied_of(err: str) -> dict:
    m = re.search(r"^re-ranking: (\{.*\})$", err, re.M)
    return json.loads(m.group(1)) if m else {}


def cmd_search(args: argparse.Namespace) -> dict:
    from cbir.pipeline import load_benchmark

    bench = load_benchmark(SHARED / SETS["rparis6k-250"])
    ix = Path(args.workdir) / f"rparis250-verify{args.k}.index"
    log(f"[{load()}] building {ix} (descriptors + SIFT of {len(bench.db_paths)} photos) ...")
    t0 = time.perf_counter()
    photos = Path(bench.db_paths[0]).parent
    if not (ix / "manifest.json").is_file():
        rc, out, err, _ = cli("index", "build", photos, "--out", ix, "--verify", args.k)
        if rc:
            raise SystemExit(err)
    build = time.perf_counter() - t0
    queries = [(p, b) for p, b in zip(bench.query_paths, bench.query_bboxes)]
    queries += [(p, None) for p in bench.db_paths][: max(0, args.queries - len(queries))]
    queries = queries[: args.queries]
    rows = []
    for i, (path, box) in enumerate(queries):
        extra = ["--bbox", ",".join(f"{v:g}" for v in box)] if box is not None else []
        res = {}
        for mode, flags in (("verify", []), ("plain", ["--verify", "0"])):
            rc, out, err, dt = cli("search", ix, "--image", path, *extra, "--top", "20", "--json",
                                   Path(args.workdir) / "hits.json", *flags)
            if rc:
                raise SystemExit(err)
            res[mode] = {"wall": dt, "applied": applied_of(err)}
        v = res["verify"]["applied"].get("verify", {})
        rows.append({"query": Path(path).name, "cropped": box is not None, "wall_verify": res["verify"]["wall"],
                     "wall_plain": res["plain"]["wall"], "query_sift": v.get("query_seconds"),
                     "features_read": v.get("feature_seconds"), "match_ransac": v.get("seconds"),
                     "pairs": v.get("pairs"), "verified": v.get("verified"), "load": os.getloadavg()[0]})
        log(f"[{load()}] {rows[-1]['query']}: search {res['plain']['wall']:.2f} s -> {res['verify']['wall']:.2f} s "
            f"with --verify {args.k} (query SIFT {v.get('query_seconds', 0):.2f} s, matching + RANSAC "
            f"{v.get('seconds', 0):.2f} s for {v.get('pairs')} pairs, {v.get('verified')} verified)")
    warm = rows[1:] if len(rows) > 1 else rows

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in warm))

    summary = {"k": args.k, "queries": len(warm), "build_seconds": round(build, 1),
               "cold_first_query": {k: rows[0][k] for k in ("wall_verify", "wall_plain", "match_ransac")},
               "median": {k: round(med(k), 3) for k in ("wall_plain", "wall_verify", "query_sift", "features_read",
                                                        "match_ransac")},
               "median_pairs": med("pairs"), "rows": rows}
    m = summary["median"]
    summary["median"]["verification_cost"] = round(m["wall_verify"] - m["wall_plain"], 3)
    log(f"cbir search, --verify {args.k}, median of {len(warm)} warm queries: {m['wall_plain']:.2f} s -> "
        f"{m['wall_verify']:.2f} s (+{summary['median']['verification_cost']:.2f} s: query SIFT {m['query_sift']:.2f} s, "
        f"matching + RANSAC {m['match_ransac']:.2f} s, features read {m['features_read']:.3f} s); "
        f"cold first query {rows[0]['wall_verify']:.2f} s; {load()}")
    return summary


def cmd_evaluate(args: argparse.Namespace) -> dict:
    out: dict = {}
    configs = {"raw": [], f"--verify {args.k}": ["--verify", args.k], f"--recipe {RECIPE}": ["--recipe", RECIPE],
               f"--recipe {RECIPE} --verify {args.k}": ["--recipe", RECIPE, "--verify", args.k]}
    for name in args.sets:
        gnd = SHARED / SETS[name]
        out[name] = {}
        for label, flags in configs.items():
            js = Path(args.workdir) / f"{name}-{abs(hash(label))}.json"
            log(f"[{load()}] cbir evaluate --gnd {gnd.name} {' '.join(map(str, flags))} ...")
            rc, stdout, err, dt = cli("evaluate", "--gnd", gnd, "--json", js, "--quiet", *flags)
            if rc:
                raise SystemExit(err)
            rec = json.loads(js.read_text())
            row = {"mAP": {k: (round(v, 2) if v is not None else None) for k, v in rec["mAP"].items()},
                   "seconds": round(dt, 1), "load": os.getloadavg()[0]}
            if "verification" in rec:
                ver, v = rec["verification"], rec["rerank"]["verify"]
                row["verification"] = {"ms_per_query_matching_ransac": round(1000 * ver["verify_seconds_per_query"]),
                                       "ms_per_pair": ver.get("ms_per_pair"), "pairs": ver["pairs"],
                                       "verified_per_query": round(v["verified"], 2),
                                       "queries_verified": v["queries_verified"], "same_image": v["same_image"],
                                       "local_features": ver.get("local_features")}
            out[name][label] = row
            log(f"[{load()}]   {name} {label}: {row['mAP']} ({dt:.0f} s)"
                + (f"; {row['verification']['ms_per_query_matching_ransac']} ms/query matching + RANSAC, "
                   f"{row['verification']['verified_per_query']} verified/query, own photo met "
                   f"{row['verification']['same_image']}x" if "verification" in row else ""))
    return out


def table(res: dict) -> str:
    lines = ["| set | setting | Easy | Medium | Hard | verification (ms/query) |", "|---|---|---|---|---|---|"]
    for name, rows in res.get("evaluate", {}).items():
        for label, row in rows.items():
            m = row["mAP"]
            ver = row.get("verification", {}).get("ms_per_query_matching_ransac", "")
            lines.append(f"| {name} | {label} | {m.get('easy')} | {m.get('medium')} | {m.get('hard')} | {ver} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("search", "evaluate", "all"))
    ap.add_argument("--cache", help="cbir's cache folder (descriptors + local features; default $CBIR_CACHE)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--workdir", help="where the index and results go (default: a temporary folder)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    if args.cache:
        os.environ["CBIR_CACHE"] = str(Path(args.cache).resolve())
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cbir-verify-cost-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}}
    if args.what in ("search", "all"):
        res["search"] = cmd_search(args)
    if args.what in ("evaluate", "all"):
        res["evaluate"] = cmd_evaluate(args)
        print(table(res))
    res["machine"]["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "search"} | (
        {"search": {k: v for k, v in res["search"].items() if k != "rows"}} if "search" in res else {}), indent=2))


if __name__ == "__main__":
    main()

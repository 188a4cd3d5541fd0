"""Spatial verification re-ranking, cross-set: choose on one shared set, report on the other.

    .venv/bin/python benchmarks/verify_rerank.py extract  [--cache DIR] [--workers 2]
    .venv/bin/python benchmarks/verify_rerank.py inliers  [--cache DIR] [--features 512,1024,2048]
    .venv/bin/python benchmarks/verify_rerank.py pairs    [--cache DIR]      # pair precision / recall
    .venv/bin/python benchmarks/verify_rerank.py table    [--cache DIR] [--json out.json]

Sets: rparis6k-250 (revisitop E / M / H, queries cropped to their box) and holidays-805 (Holidays
mAP = Medium; whole-image queries that are database photos, left out of their own ranking by the
gnd's junk). Global descriptors: ``cbir.pipeline.describe`` with the default model (Lite0 + GeM,
512 px, 3 scales), cached under ``CACHE/descriptors``.

Local features (``extract``): SIFT through pycolmap at 1024 px, ``first_octave`` -1 (or 0 with
``--first-octave 0``, for every stage), up to 4096 descriptors, RootSIFT (plain SIFT with
``--l2``), every database photo (and the cropped queries of rparis6k-250) once, in a
:class:`cbir.local.store.LocalFeatureStore` under ``CACHE/local/<set>/<settings key>``. Fewer
features are the *coarsest* ``n`` of those (exactly what ``extract_local`` keeps with
``max_features=n``: COLMAP lists its DoG levels from fine to coarse), so one extraction serves
every ``max_features``.

``inliers``: for every query, the union of the top-100 of the raw ranking and of the ranking with
the shipped recipe (holidays805-lite0) is verified against the query with each ``max_features``
and each RANSAC model (homography, fundamental, COLMAP two-view), inlier counts cached in
``CACHE/inliers/<set>-<n>.npz``.

``pairs``: precision / recall of "inliers >= t" over the top-100 pairs of the raw ranking that the
ground truth judges (positives: easy + hard; negatives: not positive and not junk).

``table``: mAP of raw / + spatial verification (top K reordered by a combination rule) / +
verified query expansion / + the default re-ranking (``Rerank(qe=2, dba=5, diffusion={})``) /
the recipe as base; the settings are chosen on one set (best mean of Medium and Hard, or the
Holidays mAP) and applied to the other. Stage A chooses the number of features, the RANSAC
model and ``min_inliers`` (15 to 30: pairs with fewer than 15 tentative matches are never tried)
by "recipe -> verify 100 -> verified expansion -> the recipe's re-ranking"; stage B the order rule
and the expansion (K 50 / 100) for each base: raw, raw -> expansion -> defaults, recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = {
    "rparis6k-250": ("data/rparis6k-250/gnd_rparis6k_subset250.pkl", True),
    "holidays-805": ("data/holidays-805/gnd_holidays805.pkl", False),
}
FEATURES = (512, 1024, 2048)
MODELS = ("homography", "fundamental", "two_view")
TOP = 100


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def bench(name: str):
    from cbir.pipeline import load_benchmark

    return load_benchmark(SHARED / SETS[name][0])


FIRST_OCTAVE = -1  # --first-octave
ROOT = True  # --l2: plain (L2-normalised) SIFT instead of RootSIFT


def store_settings():
    from cbir.local.features import LocalFeatureSettings

    return LocalFeatureSettings(max_size=1024, max_features=4096, first_octave=FIRST_OCTAVE, root=ROOT)


def store_of(cache: Path, name: str, settings=None):
    from cbir.local.store import LocalFeatureStore

    settings = settings or store_settings()
    return LocalFeatureStore(cache / "local" / name / settings.key(), settings)


def inliers_file(cache: Path, name: str, n: int) -> Path:
    suffix = ("" if FIRST_OCTAVE == -1 else f"-fo{FIRST_OCTAVE}") + ("" if ROOT else "-l2")
    return cache / "inliers" / f"{name}-{n}{suffix}.npz"


def query_key(name: str, b, i: int) -> str:
    """Store key of query i: a database photo's key (whole-image queries) or its cropped copy."""
    return f"query:{b.query_ids[i]}" if SETS[name][1] else b.query_ids[i]


def cmd_extract(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from cbir.local.store import extract_to_store

    for name in args.sets:
        b = bench(name)
        st = store_of(args.cache, name)
        paths, keys, boxes = list(b.db_paths), list(b.db_ids), [None] * len(b.db_ids)
        if SETS[name][1]:
            paths += list(b.query_paths)
            keys += [query_key(name, b, i) for i in range(len(b.query_ids))]
            boxes += list(b.query_bboxes)
        t0 = time.perf_counter()
        with tqdm(total=len(keys), desc=f"{name} SIFT", file=sys.stderr) as bar:
            res = extract_to_store(paths, keys, None, st, bboxes=boxes, progress=bar.update,
                                   workers=args.workers, shard_size=128, device="cpu")
        dt = time.perf_counter() - t0
        log(f"{name}: {res['extracted']} extracted, {res['skipped']} already there, failed {res['failed']}, "
            f"{dt:.0f} s ({res['extracted'] / max(dt, 1e-9):.2f} img/s, {args.workers} workers)")


def global_descriptors(cache: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    from cbir.model import ModelSpec
    from cbir.pipeline import describe

    q, db = describe(bench(name), ModelSpec("efficientnet_lite0", "gem"), cache_dir=cache / "descriptors")
    return np.asarray(q.vectors, np.float32), np.asarray(db.vectors, np.float32)


def defaults():
    from cbir.rerank.options import Rerank

    return Rerank(qe=2, dba=5, diffusion={})


def base_rankings(cache: Path, name: str) -> dict[str, np.ndarray]:
    """{"raw", "defaults", "recipe"}: scores (nq, n) of the three bases."""
    from cbir.rerank.recipe import Recipe

    q, db = global_descriptors(cache, name)
    raw = q @ db.T
    dflt, _ = defaults().apply(q, db)
    recipe, _ = Recipe.load("holidays805-lite0").apply(q, db)
    return {"raw": raw, "defaults": dflt, "recipe": recipe}


def candidate_scores(name: str, b, scores: np.ndarray) -> np.ndarray:
    """Scores with the query itself out of the candidates (Holidays: its junk is the query itself)."""
    if SETS[name][1]:
        return scores
    s = np.array(scores, dtype=np.float64)
    for i, g in enumerate(b.gnd):
        s[i, list(g.get("junk", []))] = -np.inf
    return s


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def truncate(f, n: int):
    """The coarsest n features (= extract_local with max_features=n, same other settings)."""
    from cbir.local.features import LocalFeatures

    if len(f) <= n:
        return f
    return LocalFeatures(f.keypoints[-n:].copy(), f.descriptors[-n:].copy(), f.size, f.scale)


def cmd_inliers(args: argparse.Namespace) -> None:
    from cbir.local.matching import match_many
    from cbir.local.verify import VerifySettings, geometric_check

    for name in args.sets:
        b = bench(name)
        st = store_of(args.cache, name)
        ranks = base_rankings(args.cache, name)
        nq = len(b.query_ids)
        tops = [top_k(candidate_scores(name, b, s), TOP) for s in ranks.values()]
        cand = [sorted(set(np.concatenate([t[i] for t in tops]).tolist())) for i in range(nq)]
        db_keys = list(b.db_ids)
        for n in args.features:
            out = inliers_file(args.cache, name, n)
            if out.exists():
                log(f"{out} exists")
                continue
            counts = {m: np.full((nq, len(b.db_ids)), -1, dtype=np.int32) for m in MODELS}
            putative = np.full((nq, len(b.db_ids)), -1, dtype=np.int32)
            t_match = t_ransac = 0.0
            t0 = time.perf_counter()
            for i in range(nq):
                qf = truncate(st.get(query_key(name, b, i)), n)
                cf = [truncate(st.get(db_keys[j]), n) for j in cand[i]]
                t = time.perf_counter()
                ms = match_many(qf, cf, device="cpu")
                t_match += time.perf_counter() - t
                t = time.perf_counter()
                for m in MODELS:
                    vs = VerifySettings(model=m)
                    for j, c, mm in zip(cand[i], cf, ms):
                        counts[m][i, j] = geometric_check(qf, c, mm, vs).inliers
                t_ransac += time.perf_counter() - t
                putative[i, cand[i]] = [len(mm) for mm in ms]
                if i % 20 == 0:
                    log(f"{name} n={n}: query {i}/{nq}, {time.perf_counter() - t0:.0f} s")
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, putative=putative, **counts)
            log(f"{name} n={n}: {sum(len(c) for c in cand)} pairs, matching {t_match:.1f} s, "
                f"RANSAC (3 models) {t_ransac:.1f} s")


def load_inliers(cache: Path, name: str, n: int) -> dict[str, np.ndarray]:
    z = np.load(inliers_file(cache, name, n))
    return {k: z[k] for k in z.files}


def judged_pairs(name: str, b, base: np.ndarray, k: int = TOP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query rows, db rows, is positive) of the top-k pairs of ``base`` the ground truth judges."""
    top = top_k(candidate_scores(name, b, base), k)
    qs, ds, pos = [], [], []
    for i, g in enumerate(b.gnd):
        positive = set(g.get("easy", [])) | set(g.get("hard", []))
        junk = set(g.get("junk", []))
        for j in top[i]:
            if j in junk:
                continue
            qs.append(i)
            ds.append(int(j))
            pos.append(j in positive)
    return np.asarray(qs), np.asarray(ds), np.asarray(pos)


def cmd_pairs(args: argparse.Namespace) -> dict:
    """Precision / recall of "inliers >= t" on judged top-100 pairs of the raw ranking."""
    out: dict[str, Any] = {}
    for name in args.sets:
        b = bench(name)
        raw = base_rankings(args.cache, name)["raw"]
        qs, ds, pos = judged_pairs(name, b, raw)
        out[name] = {"pairs": int(len(pos)), "positives": int(pos.sum()), "rows": []}
        print(f"\n{name}: {len(pos)} judged pairs in the raw top-{TOP}, {int(pos.sum())} positive")
        print(f"{'features':>8} {'model':>12} {'t':>3} {'precision':>9} {'recall':>7} {'verified':>8}")
        for n in args.features:
            inl = load_inliers(args.cache, name, n)
            for m in MODELS:
                c = inl[m][qs, ds]
                assert (c >= 0).all()
                for t in (8, 10, 12, 15, 20, 25, 30):
                    v = c >= t
                    prec = 100.0 * (v & pos).sum() / max(1, v.sum())
                    rec = 100.0 * (v & pos).sum() / max(1, pos.sum())
                    out[name]["rows"].append({"features": n, "model": m, "t": t, "precision": prec,
                                              "recall": rec, "verified": int(v.sum())})
                    print(f"{n:>8} {m:>12} {t:>3} {prec:9.2f} {rec:7.2f} {int(v.sum()):>8}")
    return out


def objective(name: str, res: dict) -> float:
    m = res["mAP"]
    return (m["medium"] + m["hard"]) / 2 if SETS[name][1] else m["medium"]


def figures(name: str, res: dict) -> str:
    m = res["mAP"]
    return f"{m['easy']:.2f} / {m['medium']:.2f} / {m['hard']:.2f}" if SETS[name][1] else f"{m['medium']:.2f}"


class Evaluator:
    """Everything one set needs to score a verification variant quickly."""

    def __init__(self, cache: Path, name: str):
        from cbir.rerank.recipe import Recipe

        self.name = name
        self.b = bench(name)
        self.q, self.db = global_descriptors(cache, name)
        self.recipe = Recipe.load("holidays805-lite0")
        w = self.recipe.whitening_for(self.db)
        self.spaces = {"raw": (self.q, self.db), "recipe": (w.apply(self.q), w.apply(self.db))}
        self.post = {"raw": None, "defaults": defaults(), "recipe": self.recipe.rerank}
        self.bases = base_rankings(cache, name)
        self.cache = cache
        self._inl: dict[int, dict[str, np.ndarray]] = {}

    def inliers(self, n: int, model: str) -> np.ndarray:
        if n not in self._inl:
            self._inl[n] = load_inliers(self.cache, self.name, n)
        return self._inl[n][model]

    def score(self, scores: np.ndarray) -> dict:
        return self.b.evaluate(scores)

    def run(self, base: str, n: int, model: str, params, post: str | None) -> dict:
        """base ranking -> verify its top K -> (expansion -> re-ranking ``post``) -> order."""
        from cbir.rerank.verify import apply_order, expand_queries

        space = "recipe" if base == "recipe" else "raw"
        q, db = self.spaces[space]
        scores = self.bases[base]
        top = top_k(candidate_scores(self.name, self.b, scores), params.k)
        inl = np.take_along_axis(self.inliers(n, model), top, axis=1)
        if (inl < 0).any():
            raise RuntimeError(f"{self.name}: pairs of the {base} top-{params.k} were not verified")
        if params.expand:
            q2 = expand_queries(q, db, top, inl, params)
            rr = self.post[post] if post else None
            scores = q2 @ db.T if rr is None else rr.apply(q2, db)[0]
        return self.score(apply_order(scores, top, inl, params))


def cmd_table(args: argparse.Namespace) -> dict:
    from cbir.rerank.verify import VerifyParams

    ev = {name: Evaluator(args.cache, name) for name in SETS}
    report: dict[str, Any] = {"stage_a": {}, "stage_b": {}, "cross": {}}
    # reference rows (no verification)
    ref = {name: {base: e.score(e.bases[base]) for base in e.bases} for name, e in ev.items()}
    for name in SETS:
        print(f"{name}: raw {figures(name, ref[name]['raw'])}; defaults {figures(name, ref[name]['defaults'])}; "
              f"recipe {figures(name, ref[name]['recipe'])}")
    chosen: dict[str, dict[str, Any]] = {}
    for tune in SETS:
        e = ev[tune]
        # stage A: features, model, threshold by "recipe -> verify 100 -> verified expansion -> the
        # recipe's re-ranking" (what `--recipe holidays805-lite0 --verify 100` is judged on)
        best_a = None
        for n in args.features:
            for m in MODELS:
                for t in (15, 20, 25, 30):
                    p = VerifyParams(k=TOP, min_inliers=t, order="none", expand=True)
                    obj = objective(tune, e.run("recipe", n, m, p, "recipe"))
                    report["stage_a"].setdefault(tune, []).append({"features": n, "model": m, "t": t, "objective": obj})
                    if best_a is None or obj > best_a[0] + 1e-9:
                        best_a = (obj, n, m, t)
        _, n, m, t = best_a
        print(f"tuned on {tune}: stage A chose {n} features, {m}, min_inliers {t} (objective {best_a[0]:.2f})")
        # stage B: order rule and expansion, per base (raw -> + defaults after; recipe -> its own re-ranking)
        grid = []
        for k in (50, 100):
            for order, weight in (("none", 0.0), ("first", 0.0), ("inliers", 0.0), ("add", 0.05), ("add", 0.1),
                                  ("add", 0.2)):
                for expand, ew, emax in ((False, "one", 0), (True, "one", 0), (True, "inliers", 0), (True, "one", 10)):
                    if order == "none" and not expand:
                        continue
                    grid.append(VerifyParams(k=k, min_inliers=t, order=order, weight=weight or 0.1, expand=expand,
                                             expand_weight=ew, expand_max=emax))
        chosen[tune] = {"features": n, "model": m, "min_inliers": t}
        for base, post in (("raw", None), ("raw", "defaults"), ("recipe", "recipe")):
            best_b = None
            for p in grid:
                if not p.expand and post is not None:
                    continue  # without expansion the re-ranking after is the base's own ("defaults" base)
                obj = objective(tune, e.run(base, n, m, p, post))
                report["stage_b"].setdefault(tune, []).append({"base": base, "post": post, **p.model_dump(),
                                                               "objective": obj})
                if best_b is None or obj > best_b[0] + 1e-9:
                    best_b = (obj, p)
            chosen[tune][f"{base}+{post}"] = best_b[1]
            print(f"  {base} -> {post}: {best_b[1]} (objective {best_b[0]:.2f})")
    # cross-set report: chosen on `tune`, measured on `target`
    for tune in SETS:
        for target in SETS:
            e, c = ev[target], chosen[tune]
            n, m, t = c["features"], c["model"], c["min_inliers"]
            rows = [("raw", ref[target]["raw"]), ("defaults (qe 2, dba 5, diffusion)", ref[target]["defaults"]),
                    ("recipe holidays805-lite0", ref[target]["recipe"])]
            for k in (50, 100):
                first = VerifyParams(k=k, min_inliers=t, order="first", expand=False)
                rows.append((f"raw + verify {k} (verified first)", e.run("raw", n, m, first, None)))
                rows.append((f"defaults + verify {k} (verified first)", e.run("defaults", n, m, first, None)))
                rows.append((f"recipe + verify {k} (verified first)", e.run("recipe", n, m, first, None)))
                exp = VerifyParams(k=k, min_inliers=t, order="none", expand=True)
                rows.append((f"raw + verify {k} + expansion", e.run("raw", n, m, exp, None)))
                rows.append((f"raw + verify {k} + expansion + defaults", e.run("raw", n, m, exp, "defaults")))
                rows.append((f"recipe + verify {k} + expansion + recipe re-ranking", e.run("recipe", n, m, exp, "recipe")))
            for key in ("raw+None", "raw+defaults", "recipe+recipe"):
                p = c[key]
                base, post = key.split("+")
                rows.append((f"chosen for {key}: {p}", e.run(base, n, m, p, None if post == "None" else post)))
            report["cross"][f"{tune}->{target}"] = [(label, res["mAP"]) for label, res in rows]
            print(f"\nchosen on {tune} ({n} features, {m}, >= {t} inliers), measured on {target}:")
            for label, res in rows:
                print(f"  {figures(target, res):>24}  {label}")
    report["chosen"] = {k: {kk: (vv.model_dump() if hasattr(vv, "model_dump") else vv) for kk, vv in v.items()}
                        for k, v in chosen.items()}
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("extract", "inliers", "pairs", "table"))
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("CBIR_BENCH_CACHE", "/tmp/cbir-verify-cache")))
    p.add_argument("--sets", nargs="+", default=list(SETS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--features", type=lambda s: [int(v) for v in s.split(",")], default=list(FEATURES))
    p.add_argument("--first-octave", type=int, default=-1, choices=(-1, 0),
                   help="SIFT's first octave of the extraction compared (-1: COLMAP's default)")
    p.add_argument("--l2", action="store_true", help="plain SIFT (L2-normalised) instead of RootSIFT")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    global FIRST_OCTAVE, ROOT
    FIRST_OCTAVE, ROOT = args.first_octave, not args.l2
    out = {"extract": cmd_extract, "inliers": cmd_inliers, "pairs": cmd_pairs, "table": cmd_table}[args.stage](args)
    if args.json and out is not None:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

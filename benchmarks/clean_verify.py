"""Cleaning a small labelled folder: by descriptor distance vs by spatial verification (issue 17.4).

    .venv/bin/python benchmarks/clean_verify.py [--per-class 6] [--json out.json]

A user's folder of 3 landmarks x ``--per-class`` photos of rparis6k-250 (the first photos of
eiffel, louvre and moulinrouge by name) with wrong photos injected (``INJECTED``: photos of other
landmarks filed under a class). Each method says which photos it drops:

- distance (``data.clean: {k: 3}``, :func:`cbir.training.data.clean_classes`): Lite0 + GeM
  descriptors at 64 px and at 320 px (one scale, whole images), the README's cleaning rule;
- verification (``data.clean: {method: verify}``, :func:`cbir.sfm.clean.clean_by_verification`):
  SIFT 640 px / 1024 features, homography RANSAC, kept with >= 15 inliers with >= 1 of its 5
  nearest class-mates (the 320 px descriptors only rank the class-mates; with 6 photos a class it
  checks them all), a class where nothing verifies kept whole.

Reported: the injected photos dropped (want all) and the genuine photos dropped (want none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("CBIR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
LANDMARKS = ("eiffel", "louvre", "moulinrouge")
#: (class it is filed under, photo of another landmark)
INJECTED = (("eiffel", "paris_defense_000056"), ("louvre", "paris_invalides_000072"),
            ("moulinrouge", "paris_eiffel_000266"))


def build(folder: Path, per_class: int) -> tuple[list[Path], list[str], set[str]]:
    src = SHARED / "data" / "rparis6k-250" / "jpg"
    paths, labels, wrong = [], [], set()
    for lm in LANDMARKS:
        (folder / lm).mkdir(parents=True)
        for f in sorted(src.glob(f"paris_{lm}_*.jpg"))[:per_class]:
            (folder / lm / f.name).symlink_to(f)
            paths.append(folder / lm / f.name)
            labels.append(lm)
    for lm, name in INJECTED:
        link = folder / lm / f"{name}.jpg"
        link.symlink_to(src / f"{name}.jpg")
        paths.append(link)
        labels.append(lm)
        wrong.add(str(link))
    return paths, labels, wrong


def describe(paths: list[Path], imsize: int) -> np.ndarray:
    from cbir.extract import extract
    from cbir.model import build_model

    return extract(build_model("efficientnet_lite0", pooling="gem"), paths, imsize=imsize, scales=(1.0,),
                   progress=False).vectors


def verdict(paths: list[Path], keep: np.ndarray, wrong: set[str]) -> dict:
    dropped = [str(p) for p, k in zip(paths, keep) if not k]
    return {"dropped": len(dropped), "injected_dropped": sum(d in wrong for d in dropped),
            "genuine_dropped": sum(d not in wrong for d in dropped),
            "files": [f"{Path(d).parent.name}/{Path(d).name}" for d in dropped]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from cbir.sfm.clean import VerifyCleanSettings, clean_by_verification
    from cbir.training.data import clean_classes, from_labels

    out: dict = {"landmarks": list(LANDMARKS), "per_class": args.per_class, "injected": [list(x) for x in INJECTED]}
    with tempfile.TemporaryDirectory(prefix="cbir-clean-") as tmp:
        paths, labels, wrong = build(Path(tmp) / "photos", args.per_class)
        out["photos"] = len(paths)
        data = from_labels(paths, labels)
        vecs = {}
        for size in (64, 320):
            vecs[size] = describe(paths, size)
            _, keep = clean_classes(data, vecs[size], k=3.0, min_size=4)
            out[f"distance@{size}px"] = verdict(paths, keep, wrong)
        t0 = time.perf_counter()
        rep = clean_by_verification(paths, labels, vecs[320], Path(tmp) / "feats", VerifyCleanSettings(), device="cpu")
        out["verify"] = verdict(paths, rep.keep, wrong) | {
            "seconds": round(time.perf_counter() - t0, 1), "pairs": rep.pairs, "verified_pairs": rep.verified_pairs,
            "unverified_classes": rep.unverified_classes, "report": rep.lines()}
    for k in ("distance@64px", "distance@320px", "verify"):
        v = out[k]
        print(f"{k}: dropped {v['dropped']} of {out['photos']} ({v['injected_dropped']} of {len(INJECTED)} injected, "
              f"{v['genuine_dropped']} genuine): {', '.join(v['files'])}")
    print("\n".join(out["verify"]["report"]), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

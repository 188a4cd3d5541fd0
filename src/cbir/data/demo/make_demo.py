"""Rebuild this bundled demo set from ../shared/data/rparis6k-250 (developers only; not imported).

One query per landmark (5), and for each its first 4 easy, first 2 hard and first junk image of
the revisitop ground truth (filled up to 7 with other photos of the same landmark, which are
negatives for that query): 5 queries + 35 database photos. Photos are downscaled to <= 512 px
(JPEG quality 85); the query boxes are scaled with them; indices are remapped to the new imlist.

    python src/cbir/data/demo/make_demo.py ../shared/data/rparis6k-250
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

from PIL import Image

QUERIES = ["paris_defense_000056", "paris_eiffel_000266", "paris_invalides_000072",
           "paris_louvre_000081", "paris_moulinrouge_000868"]
MAX_SIDE, QUALITY, PER_LANDMARK = 512, 85, 7


def landmark(name: str) -> str:
    return name.split("_")[1]


def main(src: Path, dst: Path) -> None:
    from cbir.datasets.revisitop import load_gnd  # the restricted unpickler: a .pkl cannot run code

    g = load_gnd(src / "gnd_rparis6k_subset250.pkl")
    im = g["imlist"]
    qrow = {n: i for i, n in enumerate(g["qimlist"])}
    chosen: list[int] = []
    for q in QUERIES:
        e = g["gnd"][qrow[q]]
        pick = e["easy"][:4] + e["hard"][:2] + e["junk"][:1]
        labelled = set(e["easy"]) | set(e["hard"]) | set(e["junk"])
        others = [i for i in range(len(im)) if landmark(im[i]) == landmark(q) and i not in labelled]
        pick += others[: max(0, PER_LANDMARK - len(pick))]
        chosen += [i for i in pick if i not in chosen]
    new = {old: k for k, old in enumerate(chosen)}
    imlist = [im[i] for i in chosen]
    gnd = []
    (dst / "jpg").mkdir(parents=True, exist_ok=True)
    scale = {}
    for name in imlist + QUERIES:
        with Image.open(src / "jpg" / f"{name}.jpg") as img:
            img = img.convert("RGB")
            s = min(1.0, MAX_SIDE / max(img.size))
            scale[name] = s
            if s < 1.0:
                img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
            img.save(dst / "jpg" / f"{name}.jpg", quality=QUALITY, optimize=True)
    for q in QUERIES:
        e = g["gnd"][qrow[q]]
        gnd.append({
            "bbx": [round(v * scale[q], 1) for v in e["bbx"]],
            "easy": [new[i] for i in e["easy"] if i in new],
            "hard": [new[i] for i in e["hard"] if i in new],
            "junk": [new[i] for i in e["junk"] if i in new],
        })
    with open(dst / "gnd_demo.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": QUERIES, "gnd": gnd}, fh, protocol=2)
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(dst)}"
             for p in sorted(dst.rglob("*")) if p.is_file() and p.suffix in (".jpg", ".pkl")]
    (dst / "MANIFEST.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)

"""The README's commands as a user runs them, timed end to end on a folder of photos.

Each command is a fresh process (the ``cbir`` entry point beside this Python, else ``python -m
cbir``), run one after the other on the same folder, with a fresh, private cache (``CBIR_CACHE`` and
``XDG_CACHE_HOME`` point into a temporary folder: the user's own cache is never read or written) and
without the thread limits a test run sets (``OMP_NUM_THREADS`` and friends are removed, as in a
user's shell):

  cbir extract PHOTOS --out feats/
  cbir index build --features feats/ --out photos.index
  cbir search photos.index --image Q --top 20          (x 10 queries: each, and the median)
  cbir index add photos.index more/                     (10 photos not in the folder)
  cbir evaluate --dataset holidays --data-root PHOTOS   (--folder: --gnd FILE --images PHOTOS)
  cbir tune --val gnd.pkl PHOTOS --out my.recipe.json

Default folder: the first 200 photos (sorted ids) of ``$CBIR_SHARED/data/holidays-805/jpg``,
symlinked into a temporary folder, with their Holidays ground truth (``gnd.pkl``, revisitop format,
for ``tune``); ``index add`` adds the next 10. ``--folder DIR`` times your own photos instead
(``--gnd FILE``: its ground truth for evaluate and tune, which are skipped without it). Prints a
table (command, wall seconds, notes), the date, the machine and its load average
(``os.getloadavg()``) before and after.

  python benchmarks/user_paths.py                  # 200 Holidays photos (30-60 min on a loaded 2-core CPU)
  python benchmarks/user_paths.py --quick          # 40 photos, 5 searches
  python benchmarks/user_paths.py --folder ~/photos --gnd ~/photos_gnd.pkl --json user_paths.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def cbir_command() -> list[str]:
    """The user's ``cbir``: the entry point installed beside this Python, else ``python -m cbir``."""
    script = Path(sys.executable).parent / "cbir"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [sys.executable, "-m", "cbir"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    mem = ""
    if Path("/proc/meminfo").exists():
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GB"
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}{mem}, Python {platform.python_version()}"


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def holidays_subset(n: int, extra: int, work: Path) -> tuple[Path, Path, Path]:
    """(photos folder, more-photos folder, gnd.pkl): the first ``n`` Holidays-805 photos (symlinks),
    the next ``extra``, and the revisitop ground truth of the ``n`` (queries with a positive)."""
    src = SHARED / "data" / "holidays-805"
    files = sorted((src / "jpg").glob("*.jpg"))
    if len(files) < n + extra:
        raise SystemExit(f"need {n + extra} photos in {src / 'jpg'} (set CBIR_SHARED, or give --folder)")
    photos, more = work / "photos", work / "more"
    photos.mkdir()
    more.mkdir()
    for f in files[:n]:
        (photos / f.name).symlink_to(f.resolve())
    for f in files[n:n + extra]:
        (more / f.name).symlink_to(f.resolve())
    # the shipped ground truth (Holidays' rule, revisitop format) restricted to these n photos
    sys.path.insert(0, str(REPO / "src"))
    from cbir.datasets.revisitop import load_plain_pickle

    full = load_plain_pickle(src / "gnd_holidays805.pkl")
    keep = {name: i for i, name in enumerate(f.stem for f in files[:n])}
    old = {i: keep.get(name) for i, name in enumerate(full["imlist"])}
    gnd = {"imlist": list(keep), "qimlist": [], "gnd": []}
    for name, g in zip(full["qimlist"], full["gnd"]):
        easy = [old[i] for i in g["easy"] if old[i] is not None]
        if name in keep and easy:
            gnd["qimlist"].append(name)
            junk = [old[i] for i in g["junk"] if old[i] is not None]
            gnd["gnd"].append({**g, "easy": easy, "hard": [], "junk": junk})
    path = work / "gnd.pkl"
    path.write_bytes(pickle.dumps(gnd))
    return photos, more, path


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - t, p.returncode, p.stdout, p.stderr


def last_line(text: str, word: str = "") -> str:
    """The last non-empty line of ``text`` (the last one holding ``word`` when given), spaces squeezed."""
    lines = [" ".join(ln.split()) for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    picked = [ln for ln in lines if word in ln] or lines
    return picked[-1] if picked else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", help="your photos (default: 200 Holidays-805 photos)")
    ap.add_argument("--gnd", help="with --folder: its revisitop ground truth .pkl (evaluate, tune)")
    ap.add_argument("--photos", type=int, default=200, help="Holidays photos to use (default: 200)")
    ap.add_argument("--searches", type=int, default=10, help="cbir search calls (default: 10)")
    ap.add_argument("--quick", action="store_true", help="40 photos and 5 searches")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args()
    if args.quick:
        args.photos, args.searches = 40, 5

    # a `timeout` or kill ends the running command too (subprocess.run kills its child on the way out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="cbir-user-paths-"))
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(CBIR_CACHE=str(work / "cache" / "cbir"), XDG_CACHE_HOME=str(work / "cache"))
    cbir = cbir_command()
    rows: list[dict] = []
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = loadavg()
    try:
        if args.folder:
            photos, gnd = Path(args.folder).resolve(), Path(args.gnd).resolve() if args.gnd else None
            files = sorted(p for p in photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            more = None
        else:
            photos, more, gnd = holidays_subset(args.photos, 10, work)
            files = sorted(photos.iterdir())
        queries = files[:: max(1, len(files) // args.searches)][: args.searches]

        def step(label: str, argv: list[str], note: str = "", word: str = "") -> bool:
            dt, rc, out, err = run([*cbir, *argv], env, work)
            what = last_line(out, word) or last_line(err)
            if rc != 0:
                what = f"exit {rc}: {last_line(err) or last_line(out)}"
            rows.append({"command": label, "seconds": round(dt, 2), "exit": rc,
                         "notes": (note + "; " if note else "") + what})
            print(f"  {label}: {dt:.1f} s (exit {rc})", file=sys.stderr, flush=True)
            return rc == 0

        print(f"{len(files)} photos in {photos}; work folder {work}; {' '.join(cbir)}", file=sys.stderr)
        step("cbir extract PHOTOS --out feats/", ["extract", str(photos), "--out", "feats", "--quiet"],
             f"{len(files)} photos, default model and settings")
        step("cbir index build --features feats/ --out photos.index",
             ["index", "build", "--features", "feats", "--out", "photos.index"])
        times = []
        for q in queries:
            dt, rc, out, err = run([*cbir, "search", "photos.index", "--image", str(q), "--top", "20"], env, work)
            times.append(dt if rc == 0 else float("nan"))
            print(f"  search {q.name}: {dt:.1f} s (exit {rc})", file=sys.stderr, flush=True)
            if rc != 0:
                rows.append({"command": f"cbir search --image {q.name}", "seconds": round(dt, 2), "exit": rc,
                             "notes": f"exit {rc}: {last_line(err)}"})
        ok = [t for t in times if t == t]
        rows.append({"command": f"cbir search photos.index --image Q --top 20 (x{len(times)}, median)",
                     "seconds": round(statistics.median(ok), 2) if ok else float("nan"),
                     "exit": 0 if len(ok) == len(times) else 1,
                     "each": [round(t, 2) for t in times],
                     "notes": "each: " + " ".join(f"{t:.1f}" for t in times)})
        if more is not None:
            step("cbir index add photos.index more/", ["index", "add", "photos.index", str(more)],
                 f"{len(list(more.iterdir()))} photos not in the folder")
        if not args.folder:
            step("cbir evaluate --dataset holidays --data-root PHOTOS",
                 ["evaluate", "--dataset", "holidays", "--data-root", str(photos), "--quiet"], "Holidays rule",
                 word="Medium")
        elif gnd is not None:
            step("cbir evaluate --gnd GND --images PHOTOS",
                 ["evaluate", "--gnd", str(gnd), "--images", str(photos), "--quiet"],
                 word="Medium")
        if gnd is not None:
            step("cbir tune --val gnd.pkl PHOTOS --out my.recipe.json",
                 ["tune", "--val", str(gnd), str(photos), "--out", "my.recipe.json"], word="recipe")
        else:
            rows.append({"command": "cbir evaluate / cbir tune", "seconds": float("nan"), "exit": 0,
                         "notes": "skipped: no ground truth (give --gnd)"})
    finally:
        load_after = loadavg()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{started:%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"load average (1 / 5 / 15 min) before: {load_before}, after: {load_after}")
    print(f"cbir: {' '.join(cbir)}; fresh cache; thread variables unset\n")
    width = max(len(r["command"]) for r in rows)
    print(f"| {'command'.ljust(width)} | wall s | notes |")
    print(f"|{'-' * (width + 2)}|-------:|-------|")
    for r in rows:
        secs = f"{r['seconds']:6.1f}" if r["seconds"] == r["seconds"] else "     -"
        print(f"| {r['command'].ljust(width)} | {secs} | {r['notes']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": started.isoformat(), "machine": machine(),
                                               "load_before": load_before, "load_after": load_after,
                                               "cbir": cbir, "rows": rows}, indent=1))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

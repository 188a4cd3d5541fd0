"""`cbir search INDEX --image Q` end to end, timed from outside as a user runs it.

Builds (or reuses) an index of a photo folder with `cbir index build` (default: the 250 photos of
../shared/data/rparis6k-250, the default model and settings), then runs `cbir search` as a
subprocess ``--runs`` times (default 10) for each query encoder, alternating them so that load
from other processes hits both alike: ``auto`` (the index's network exported for ONNX Runtime:
no torch import) and ``torch`` (``--encoder torch``: the network rebuilt with torch/timm, as
before). Prints each run's wall time, the median per encoder, their ratio, whether any torch module
was imported by the fast path, and the load average before and after (a loaded machine inflates
every figure: compare the two encoders of the same run).

  python benchmarks/search_cli.py                              # rparis6k-250, 10 runs per encoder
  python benchmarks/search_cli.py --index /tmp/paris.index     # reuse (or make) the index here
  python benchmarks/search_cli.py --folder photos/ --runs 5 --encoders auto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))


def cbir(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cbir", *args], env=env, capture_output=True, text=True,
                          check=check)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=SHARED / "data" / "rparis6k-250" / "jpg")
    ap.add_argument("--index", type=Path, default=None, help="index folder (made when absent; default: a temp dir)")
    ap.add_argument("--query", type=Path, default=None, help="query image (default: the folder's first photo)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--encoders", default="auto,torch", help="comma-separated: auto, onnxruntime, torch")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not args.folder.is_dir():
        print(f"no photo folder {args.folder} (set CBIR_SHARED or --folder)", file=sys.stderr)
        return 2
    photos = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    query = args.query or photos[0]
    index = args.index or Path(tempfile.mkdtemp(prefix="cbir-search-bench-")) / "photos.index"
    print(f"load average before: {load()}  ({os.cpu_count()} CPUs)")
    if not (index / "manifest.json").is_file():
        t = time.perf_counter()
        res = cbir("index", "build", str(args.folder), "--out", str(index))
        print(f"built {index} in {time.perf_counter() - t:.1f} s: {res.stdout.strip()}")
        print("\n".join(ln for ln in res.stderr.splitlines() if "query network" in ln))
    info = json.loads(cbir("index", "info", str(index), "--json").stdout)
    print(f"index: {info.get('count')} images, {info.get('dim')}-d, {info.get('settings', {}).get('model')}, "
          f"query-model.npz: {'yes' if (index / 'query-model.npz').is_file() else 'no (made on first search)'}")
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    for enc in encoders:  # a first call of each (disk cache warm; an older index gets its export here)
        cbir("search", str(index), "--image", str(query), "--top", "5", "--encoder", enc)
    times: dict[str, list[float]] = {e: [] for e in encoders}
    for _ in range(args.runs):
        for enc in encoders:
            t = time.perf_counter()
            cbir("search", str(index), "--image", str(query), "--top", "5", "--encoder", enc)
            times[enc].append(time.perf_counter() - t)
    probe = cbir("search", str(index), "--image", str(query), "--top", "1", "--json", "-")  # result shape check
    assert json.loads(probe.stdout)[0]["path"], probe.stdout
    torch_free = subprocess.run(
        [sys.executable, "-c", "import sys; "
         "from cbir.cli import main; main(sys.argv[1:]); "
         "print('TORCH' if any(m.split('.')[0] in ('torch', 'timm', 'torchvision') for m in sys.modules) else 'NO-TORCH')",
         "search", str(index), "--image", str(query), "--top", "1"],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")), capture_output=True, text=True).stdout.split()[-1]
    print(f"load average after: {load()}")
    out = {"index": str(index), "count": info.get("count"), "query": str(query), "runs": args.runs,
           "load_after": load(), "fast_path_imports_torch": torch_free != "NO-TORCH"}
    for enc in encoders:
        med = statistics.median(times[enc])
        out[enc] = {"median_s": round(med, 3), "each_s": [round(t, 3) for t in times[enc]]}
        print(f"cbir search --encoder {enc:11s} median {med:6.3f} s   each: "
              + " ".join(f"{t:.2f}" for t in times[enc]))
    if "auto" in times and "torch" in times:
        ratio = statistics.median(times["torch"]) / statistics.median(times["auto"])
        out["torch_over_auto"] = round(ratio, 2)
        print(f"torch path / fast path: {ratio:.2f}x; fast path imports torch: {out['fast_path_imports_torch']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

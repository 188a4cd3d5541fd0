"""Ray extraction scaling: the same images through ``cbir extract --engine ray`` with 1 then 2 model
actors on a local Ray, against the local engine, in one process (so load from other processes hits
all alike; repeat with ``--rounds``). Reports wall time per run (actor start included) and images/s.

  python benchmarks/extract_ray.py                      # 16 demo photos, 512 px, 3 scales, Lite0 + GeM
  python benchmarks/extract_ray.py --images 38 --imsize 1024 --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cbir.extract import extract_to_dir  # noqa: E402
from cbir.extraction.ray_engine import extract_to_dir_ray  # noqa: E402
from cbir.model import build_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(REPO / "src" / "cbir" / "data" / "demo" / "jpg"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--imsize", type=int, default=512)
    ap.add_argument("--scales", default="1,0.7071,0.5")
    ap.add_argument("--workers", default="1,2", help="actor counts to time (default: 1,2)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    import ray

    files = sorted(Path(args.folder).glob("*.jpg"))[: args.images]
    scales = tuple(float(s) for s in args.scales.split(","))
    counts = [int(w) for w in args.workers.split(",")]
    model = build_model("efficientnet_lite0", pooling="gem")
    ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"worker_niceness": 0})
    kw = dict(imsize=args.imsize, scales=scales, progress=False, precision="fp32", chunk=8)
    tmp = Path(tempfile.mkdtemp(prefix="cbir-ray-bench-"))
    print(f"{len(files)} images, imsize {args.imsize}, scales {scales}, local Ray with {max(counts) + 1} CPUs")
    try:
        t = time.perf_counter()
        ref = extract_to_dir(model, files, tmp / "local", workers=0, **kw)
        print(f"local engine: {time.perf_counter() - t:.1f} s, {len(files) / (time.perf_counter() - t):.2f} img/s")
        for r in range(args.rounds):
            for n in counts:
                out = tmp / f"ray{n}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                got = extract_to_dir_ray(model, files, out, workers=n, **kw)
                dt = time.perf_counter() - t
                diff = float(np.abs(np.asarray(got.vectors) - np.asarray(ref.vectors)).max())
                print(f"round {r + 1}: ray, {n} actor(s): {dt:.1f} s, {len(files) / dt:.2f} img/s "
                      f"(max |diff| to local {diff:.1e})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

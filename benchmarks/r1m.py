"""rOxford + 1M distractors in bounded memory: wall time and peak RSS of the chunked evaluation.

Data (synthetic distractors, real queries and database; FOR TIMING AND MEMORY ONLY):
- queries and database: the real Oxford5k descriptors of ../shared/data/oxford5k-fc7-128d (Caffe
  fc7, PCA-128, full images: no query crop), the 70 rOxford queries and 4993 database images in
  the order of gnd_roxford5k.pkl, L2-normalised, lifted to D dimensions by a fixed random map with
  orthonormal columns (x -> Q x, Q (D x 128), QᵀQ = I: inner products and so the 5k mAP unchanged);
- distractors: each one a random mixture of 3 real database vectors (Dirichlet(1) weights) plus
  isotropic Gaussian noise of norm ~0.5 in all D dimensions, L2-normalised, stored as float16.
  They are NOT real images: the +1M mAP printed is not comparable to published +1M figures.

The distractors are written block by block (never all in memory), in a child process, as a
`cbir extract`-style descriptor folder (descriptors.npy float16 + meta.json with 1M ids); then a
second child process evaluates: ``cbir.topk.chunked_topk`` over [the 4993 real
rows, then the memory-mapped distractors] -> top-K rows -> revisitop E/M/H mAP
(``cbir.evaluation.evaluate_revisitop`` on the top-K ranks: positives beyond K count as missed).
The child's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is reported, and its wall
time for the search and for the mAP. The evaluation runs twice: first with the file evicted from
the page cache (``posix_fadvise(DONTNEED)``: read from disk, "cold"), then again ("warm").
A third child runs the user's command end to end, in-process, cold cache, and reports its peak RSS:
``cbir evaluate --gnd gnd_roxford5k.pkl --features <5k+70 rows> --distractors <folder> --top-k K``.

    python benchmarks/r1m.py --dim 2048                       # CPU, 1M x 2048 (4 GB file in /tmp)
    python benchmarks/r1m.py --dim 512 --n 1000000 --json r1m_512.json
    python benchmarks/r1m.py --dim 2048 --device cuda         # GPU: fp16 matmul + torch.topk per block

The folders are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

N_MIX = 3
NOISE_NORM = 0.5


def shared_dir() -> Path:
    return Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))


def real_data(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(queries (70, dim), database (4993, dim), gnd): real fc7-128d rows lifted to dim."""
    from cbir.datasets.revisitop import load_gnd
    from cbir.descriptors import l2_normalize, read_fvecs

    data = shared_dir() / "data"
    x = read_fvecs(data / "oxford5k-fc7-128d" / "oxford_features.fvecs")
    names = (data / "oxford5k-fc7-128d" / "row_order_sorted_names.txt").read_text().split()
    row = {n: i for i, n in enumerate(names)}
    g = load_gnd(data / "revisitop" / "gnd_roxford5k.pkl")
    q = l2_normalize(x[[row[n] for n in g["qimlist"]]])
    db = l2_normalize(x[[row[n] for n in g["imlist"]]])
    if dim < x.shape[1]:
        raise SystemExit(f"--dim must be at least {x.shape[1]}")
    rng = np.random.default_rng(seed)
    lift, _ = np.linalg.qr(rng.standard_normal((dim, x.shape[1])))  # (dim, 128), orthonormal columns
    lift = lift.astype(np.float32)
    return l2_normalize(q @ lift.T), l2_normalize(db @ lift.T), g["gnd"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------------------------
# child 1: make the distractor file
# --------------------------------------------------------------------------------------------


def make(args) -> dict:
    import torch

    _, db, _ = real_data(args.dim, args.seed)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    base = torch.from_numpy(db).to(dev)
    folder = Path(args.file)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "descriptors.npy"
    tmp = path.with_name(path.name + ".part")
    t = time.perf_counter()
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                  "shape": (args.n, args.dim)})
        for s in range(0, args.n, args.block):
            m = min(args.block, args.n - s)
            pick = torch.randint(0, base.shape[0], (m, N_MIX), generator=gen, device=dev)
            w = -torch.log(torch.rand((m, N_MIX), generator=gen, device=dev).clamp_min(1e-12))
            w = w / w.sum(1, keepdim=True)  # Dirichlet(1, 1, 1)
            x = (w[:, :, None] * base[pick]).sum(1)
            x = x / x.norm(dim=1, keepdim=True)
            x += (NOISE_NORM / args.dim ** 0.5) * torch.randn((m, args.dim), generator=gen, device=dev)
            x = x / x.norm(dim=1, keepdim=True)
            fh.write(x.half().cpu().numpy().tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    write_meta(folder, args.n, args.dim)
    return {"make_s": round(time.perf_counter() - t, 2), "file_gb": round(path.stat().st_size / 1e9, 3),
            "make_peak_rss_mb": round(peak_rss_mb(), 1)}


def write_meta(folder: Path, n: int, dim: int) -> None:
    """meta.json of a `cbir extract` descriptor folder (format stamp, ids), so that the folder is
    a :class:`cbir.descriptors.Descriptors` for every consumer (``cbir evaluate --distractors``)."""
    from cbir import descriptors as d
    from cbir.fileio import atomic_write_json

    atomic_write_json(folder / d.META_NAME, {
        "format": d.FORMAT, "format_version": d.FORMAT_VERSION, "ids": [f"distractor_{i:07d}" for i in range(n)],
        "failed": [], "dim": dim, "dtype": "float16", "model": "synthetic (benchmarks/r1m.py)"})


def write_features(folder: Path, dim: int, seed: int) -> tuple[Path, Path]:
    """The 4993 + 70 real rows (lifted to dim) as a descriptor folder named by image, and the gnd."""
    from cbir.datasets.revisitop import load_gnd
    from cbir.descriptors import Descriptors

    q, db, _ = real_data(dim, seed)
    gpath = shared_dir() / "data" / "revisitop" / "gnd_roxford5k.pkl"
    g = load_gnd(gpath)
    out = folder.with_name(folder.name + "_features")
    Descriptors(ids=list(g["imlist"]) + list(g["qimlist"]), vectors=np.concatenate([db, q]),
                meta={"model": "fc7-128d lifted (benchmarks/r1m.py)"}).save(out)
    return out, gpath


# --------------------------------------------------------------------------------------------
# child 2: evaluate
# --------------------------------------------------------------------------------------------


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evaluate(args) -> dict:
    from cbir.evaluation import evaluate_revisitop
    from cbir.topk import chunked_topk, default_chunk_rows

    q, db, gnd = real_data(args.dim, args.seed)
    rss_data = peak_rss_mb()
    from cbir.descriptors import Descriptors

    dis = Descriptors.load(args.file, mmap=True).vectors  # memory-mapped
    chunk = args.chunk_rows or default_chunk_rows(args.dim)
    out: dict = {"chunk_rows": chunk, "top_k": args.top_k, "n_distractors": int(dis.shape[0]),
                 "rss_after_loading_5k_mb": round(rss_data, 1)}

    def blocks():
        yield 0, db
        for s in range(0, dis.shape[0], chunk):
            yield db.shape[0] + s, dis[s:s + chunk]

    if args.device.startswith("cuda"):
        import torch

        torch.zeros(1, device=args.device)  # CUDA context outside the timings
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for label in ("cold", "warm"):
        if label == "cold":
            evict(Path(args.file) / "descriptors.npy")
        t = time.perf_counter()
        _, rows = chunked_topk(q, blocks(), args.top_k, device=args.device)
        search = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate_revisitop(rows, gnd)
        map_s = time.perf_counter() - t
        runs.append({"cache": label, "search_s": round(search, 3), "map_s": round(map_s, 3),
                     "mAP": {k: round(v, 2) for k, v in res["mAP"].items()}})
    out["runs"] = runs
    out["loadavg_after"] = [round(v, 1) for v in os.getloadavg()]
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    base = evaluate_revisitop(q @ db.T, gnd)  # the 5k database alone, full ranking
    out["mAP_5k_full"] = {k: round(v, 2) for k, v in base["mAP"].items()}
    if args.device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["resident"] = resident_gpu(q, db, dis, args)
    return out


def resident_gpu(q, db, dis, args) -> dict:
    """The whole database uploaded once to the GPU in fp16, then one top-K (timing of the search alone)."""
    import torch

    from cbir.index.exact import exact_topk

    dev = torch.device(args.device)
    n = db.shape[0] + dis.shape[0]
    x = torch.empty((n, args.dim), dtype=torch.float16, device=dev)
    x[: db.shape[0]] = torch.from_numpy(db).to(dev).half()
    step = 1 << 17
    t = time.perf_counter()
    for s in range(0, dis.shape[0], step):
        x[db.shape[0] + s: db.shape[0] + s + step] = torch.from_numpy(np.ascontiguousarray(dis[s:s + step])).to(dev)
    torch.cuda.synchronize()
    upload = time.perf_counter() - t
    exact_topk(q, x, args.top_k)  # warm-up
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        exact_topk(q, x, args.top_k)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del x
    torch.cuda.empty_cache()
    return {"upload_s": round(upload, 2), "search_70q_ms_median": round(1000 * float(np.median(times)), 2)}


def cli_eval(args) -> dict:
    """`cbir evaluate --features F --distractors DIR --top-k K` in this process; its peak RSS."""
    from cbir.cli import main as cbir_main

    feats, gpath = write_features(Path(args.file), args.dim, args.seed)
    argv = ["evaluate", "--gnd", str(gpath), "--features", str(feats), "--distractors", args.file,
            "--top-k", str(args.top_k), "--json", str(Path(args.file).with_name("cli_result.json"))]
    if args.device.startswith("cuda"):
        argv += ["--device", args.device]
    evict(Path(args.file) / "descriptors.npy")
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    rc = cbir_main(argv)
    wall = time.perf_counter() - t
    res = json.loads(Path(args.file).with_name("cli_result.json").read_text())
    return {"cli": {"command": "cbir " + " ".join(argv), "exit": rc, "wall_s": round(wall, 2),
                    "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_mb": round(rss0, 1),
                    "mAP": {k: round(v, 2) for k, v in res["mAP"].items()}}}


# --------------------------------------------------------------------------------------------


def child(mode: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", "--dim", str(args.dim), "--n", str(args.n), "--file", args.file,
           "--top-k", str(args.top_k), "--device", args.device, "--seed", str(args.seed), "--block", str(args.block)]
    if args.chunk_rows:
        cmd += ["--chunk-rows", str(args.chunk_rows)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n", type=int, default=1_000_000, help="distractors (default 1,000,000)")
    ap.add_argument("--top-k", type=int, default=1000, help="ranks kept per query (default 1000)")
    ap.add_argument("--chunk-rows", type=int, default=None, help="database rows per block (default ~64 MiB float32)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (fp16 scoring)")
    ap.add_argument("--file", default=None,
                    help="distractor descriptor folder (default /tmp/cbir_r1m_<n>x<dim>; descriptors.npy + meta.json)")
    ap.add_argument("--keep", action="store_true", help="keep the distractor folder (reused by the next run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=16384, help="rows generated per write (default 16384)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cli-eval", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-cli", action="store_true", help="skip the end-to-end `cbir evaluate` run")
    args = ap.parse_args(argv)
    if args.file is None:
        args.file = f"/tmp/cbir_r1m_{args.n}x{args.dim}"
    if args.make or args.eval or args.cli_eval:
        fn = make if args.make else evaluate if args.eval else cli_eval
        print(json.dumps(fn(args)))
        return 0

    import shutil

    free = shutil.disk_usage(Path(args.file).resolve().parent).free
    need = 2 * args.n * args.dim
    if free < need * 1.2:
        raise SystemExit(f"{Path(args.file).parent} has {free / 1e9:.1f} GB free; the file needs {need / 1e9:.1f} GB")
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
              "loadavg_at_start": [round(v, 1) for v in os.getloadavg()],
              "cpus": os.cpu_count(), "python": platform.python_version(), "dim": args.dim, "n": args.n,
              "device": args.device, "data": "real fc7-128d Oxford queries/db lifted to dim; synthetic distractors "
              f"(mixtures of {N_MIX} real vectors + noise {NOISE_NORM}, L2, fp16)", "file": args.file}
    print(f"r1m: {args.n:,} x {args.dim} fp16 distractors ({need / 1e9:.1f} GB) -> {args.file}", flush=True)
    try:
        if not (Path(args.file) / "meta.json").is_file():
            record.update(child("make", args))
            print(f"  made in {record['make_s']} s (peak RSS {record['make_peak_rss_mb']} MB)", flush=True)
        record.update(child("eval", args))
        if not args.no_cli:
            record.update(child("cli-eval", args))
    finally:
        if not args.keep:
            shutil.rmtree(args.file, ignore_errors=True)
            shutil.rmtree(args.file + "_features", ignore_errors=True)
            Path(args.file).with_name("cli_result.json").unlink(missing_ok=True)
    for r in record["runs"]:
        print(f"  {r['cache']:<4}: top-{args.top_k} search {r['search_s']:7.2f} s, mAP {r['map_s']:.2f} s; "
              f"E/M/H {r['mAP']['easy']:.2f} / {r['mAP']['medium']:.2f} / {r['mAP']['hard']:.2f}", flush=True)
    m5 = record["mAP_5k_full"]
    print(f"  5k alone (full ranking): E/M/H {m5['easy']:.2f} / {m5['medium']:.2f} / {m5['hard']:.2f}")
    print(f"  peak RSS of the evaluating process: {record['peak_rss_mb']:.0f} MB "
          f"(after loading the 5k data: {record['rss_after_loading_5k_mb']:.0f} MB)")
    if "cli" in record:
        c = record["cli"]
        print(f"  end to end: {c['command']}\n    exit {c['exit']}, {c['wall_s']} s (cold cache), peak RSS "
              f"{c['peak_rss_mb']:.0f} MB; E/M/H {c['mAP']['easy']:.2f} / {c['mAP']['medium']:.2f} / {c['mAP']['hard']:.2f}")
    if "gpu" in record:
        print(f"  GPU {record['gpu']}: peak GPU memory {record['gpu_peak_mem_mb']} MB; resident fp16 database: "
              f"upload {record['resident']['upload_s']} s, 70-query top-{args.top_k} "
              f"{record['resident']['search_70q_ms_median']} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

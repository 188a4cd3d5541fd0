"""Ray extraction scaling: the same images through ``extract_to_dir(engine="ray")`` (= ``cbir extract
--engine ray``) against the local engine, in one process (so load from other processes hits all
alike; repeat with ``--rounds``). Reports wall time per run (Ray's start and the actors' model
loading included), images/s and the largest difference to the local engine's descriptors.

Two modes:

- default: one local Ray (``ray.init(num_cpus=...)``), 1 then 2 model actors;
- ``--nodes 1,2,3``: for each count, a cluster simulated on this machine with
  ``ray.cluster_utils.Cluster`` (a head node without CPUs for the driver, plus N worker nodes with
  their own raylet and object store, ``--cpus-per-node`` logical CPUs each), one model actor per
  node; ``--kill`` adds a run on ``--kill-nodes`` nodes where one node holding a model actor is
  killed (SIGKILL of its raylet, object store and workers) once a third of the shards are written:
  it reports whether the job finished, each shard was written once and the descriptors equal
  the local engine's, Ray's actor restarts and the front end's resubmissions.

  python benchmarks/extract_ray.py                      # 16 demo photos, 512 px, 3 scales, Lite0 + GeM
  python benchmarks/extract_ray.py --images 38 --imsize 1024 --rounds 2
  python benchmarks/extract_ray.py --folder ../shared/data/holidays-805/jpg --images 96 --nodes 1,2,3 --kill
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cbir.extract import extract_to_dir  # noqa: E402
from cbir.model import build_model  # noqa: E402


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def describers(state) -> list[dict]:
    return [a for a in state.actors().values() if "_Describer" in a.get("ActorClassName", "")]


def run_on_cluster(model, n: int, files, ref, out: Path, kw: dict, cpus: int, kill: bool, label: str) -> None:
    """One extraction on a simulated cluster of ``n`` worker nodes (optionally killing one)."""
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    from cbir.extraction import job as jobmod

    t0 = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "_system_config": {"worker_niceness": 0}})
    nodes = [c.add_node(num_cpus=cpus) for _ in range(n)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    up = time.perf_counter() - t0
    real, written, killed = jobmod.save_chunk, [], []
    n_shards = -(-len(files) // kw["chunk"])

    def save(job, start, res):
        out_ = real(job, start, res)
        written.append((start, time.perf_counter()))
        if kill and not killed and len(written) >= max(1, n_shards // 3):
            hosts = {a["Address"]["NodeID"] for a in describers(state) if a["State"] == "ALIVE"}
            victim = next((v for v in nodes if v.node_id in hosts), None)
            if victim is not None:
                c.remove_node(victim, allow_graceful=False)
                killed.append(time.perf_counter())
        return out_

    jobmod.save_chunk = save  # the shard writer of both engines
    jobs: list = []
    load0 = load()
    try:
        t = time.perf_counter()
        got = extract_to_dir(model, files, out, engine="ray", ray_workers=n, on_plan=jobs.append, **kw)
        dt = time.perf_counter() - t
        places = {a["Address"]["NodeID"] for a in describers(state)}
        restarts = sum(a["NumRestarts"] for a in describers(state))
    finally:
        jobmod.save_chunk = real
        ray.shutdown()
        c.shutdown()
    diff = float(np.abs(np.asarray(got.vectors) - np.asarray(ref.vectors)).max())
    starts = [s for s, _ in written]
    what = f"{n} node(s) x {cpus} CPUs, {n} actor(s) on {len(places)} node(s)"
    print(f"{label}cluster, {what}: {dt:.1f} s ({up:.1f} s to start the cluster, not counted), "
          f"{len(files) / dt:.2f} img/s, max |diff| to local {diff:.1e}, load {load0} -> {load()}", flush=True)
    if kill:
        after = sum(tt > killed[0] for _, tt in written) if killed else 0
        what = f"a node with a model actor killed after {len(written) - after} of {n_shards} shards" if killed \
            else "NO NODE KILLED"
        print(f"  kill: {what}; "
              f"finished with {len(got)} images, ids = local: {got.ids == ref.ids}, shards written {len(starts)} "
              f"(distinct {len(set(starts))} of {n_shards}), Ray actor restarts {restarts}, "
              f"front-end resubmissions {jobs[0].resubmits if jobs else '?'}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(REPO / "src" / "cbir" / "data" / "demo" / "jpg"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--imsize", type=int, default=512)
    ap.add_argument("--scales", default="1,0.7071,0.5")
    ap.add_argument("--chunk", type=int, default=8, help="inputs per shard (default: 8)")
    ap.add_argument("--workers", default="1,2", help="local Ray mode: actor counts to time (default: 1,2)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nodes", default=None, help="cluster mode: worker-node counts to time, e.g. 1,2,3")
    ap.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per worker node (default: 2)")
    ap.add_argument("--kill", action="store_true", help="cluster mode: add a run where a working node is killed")
    ap.add_argument("--kill-nodes", type=int, default=3, help="nodes of the kill run (default: 3)")
    args = ap.parse_args()

    files = sorted(p for p in Path(args.folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[: args.images]
    scales = tuple(float(s) for s in args.scales.split(","))
    model = build_model("efficientnet_lite0", pooling="gem")
    kw = dict(imsize=args.imsize, scales=scales, progress=False, precision="fp32", chunk=args.chunk)
    tmp = Path(tempfile.mkdtemp(prefix="cbir-ray-bench-"))
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, load {load()}")
    print(f"{len(files)} images from {args.folder}, imsize {args.imsize}, scales {scales}, chunk {args.chunk}, "
          f"Lite0 + GeM, fp32", flush=True)
    try:
        t = time.perf_counter()
        ref = extract_to_dir(model, files, tmp / "local", workers=0, **kw)
        dt = time.perf_counter() - t
        print(f"local engine: {dt:.1f} s, {len(files) / dt:.2f} img/s, load {load()}", flush=True)
        if args.nodes:
            for r in range(args.rounds):
                for n in (int(x) for x in args.nodes.split(",")):
                    shutil.rmtree(tmp / "ray", ignore_errors=True)
                    run_on_cluster(model, n, files, ref, tmp / "ray", kw, args.cpus_per_node, kill=False,
                                   label=f"round {r + 1}: ")
            if args.kill:
                shutil.rmtree(tmp / "ray", ignore_errors=True)
                run_on_cluster(model, args.kill_nodes, files, ref, tmp / "ray", kw, args.cpus_per_node, kill=True,
                               label="kill run: ")
            return 0
        import ray

        counts = [int(w) for w in args.workers.split(",")]
        ray.init(address="local", num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False,
                 _system_config={"worker_niceness": 0})
        print(f"local Ray with {max(counts) + 1} CPUs")
        try:
            for r in range(args.rounds):
                for n in counts:
                    out = tmp / f"ray{n}"
                    shutil.rmtree(out, ignore_errors=True)
                    t = time.perf_counter()
                    got = extract_to_dir(model, files, out, engine="ray", ray_workers=n, **kw)
                    dt = time.perf_counter() - t
                    diff = float(np.abs(np.asarray(got.vectors) - np.asarray(ref.vectors)).max())
                    print(f"round {r + 1}: ray, {n} actor(s): {dt:.1f} s, {len(files) / dt:.2f} img/s "
                          f"(max |diff| to local {diff:.1e}), load {load()}", flush=True)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`cbir extract --engine ray` on a Ray cluster of three nodes started on this machine
(``ray.cluster_utils.Cluster``, as Ray's own tests do: a head node and two worker nodes, each with its
own raylet and object store), and one worker node killed in the middle of the extraction.

The job must finish, every shard be written exactly once (nothing lost, nothing doubled), and the
descriptors equal the local engine's. The head has no CPU (the driver only), so every decoding task
and model actor runs on a worker node; each worker node has 3 logical CPUs so that, after the kill,
the survivor holds both model actors (Ray restarts the dead one there: Ray Data's actors have
``max_restarts=-1``) and still has room for the decoding tasks. The node is killed (SIGKILL of its
raylet, object store and workers) as soon as a model actor on it is alive, i.e. while it describes
its first batches. 6 demo photos at 256 px x 3 scales (so the work outlasts the kill), chunks of 2,
batches of 1.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"


@pytest.fixture()
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"worker_niceness": 0}})  # Ray's default niceness 15 starves the actors under load
    workers = [c.add_node(num_cpus=3) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


def _describer_nodes() -> set[str]:
    """Node ids of the live model actors (Ray Data's ``MapWorker(MapBatches(_Describer))``)."""
    from ray._private import state

    return {a["Address"]["NodeID"] for a in state.actors().values()
            if a["State"] == "ALIVE" and "_Describer" in a.get("ActorClassName", "")}


def _describer_restarts() -> int:
    from ray._private import state

    return sum(a["NumRestarts"] for a in state.actors().values() if "_Describer" in a.get("ActorClassName", ""))


def test_worker_node_killed_mid_extraction(cluster, tmp_path, monkeypatch, capsys):
    from cbir.cli import main
    from cbir.descriptors import Descriptors
    from cbir.extraction import job as jobmod

    c, workers = cluster
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(DEMO.glob("*.jpg"))[:6]:
        (folder / p.name).symlink_to(p)
    common = ["--imsize", "256", "--precision", "fp32", "--chunk", "2", "--quiet"]

    real, written, killed = jobmod.save_chunk, [], []
    monkeypatch.setattr(jobmod, "save_chunk",
                        lambda job, start, res: (written.append((start, time.monotonic())), real(job, start, res))[1])
    done = threading.Event()

    def kill_a_working_node() -> None:
        while not done.is_set():
            hosts = _describer_nodes() if ray.is_initialized() else set()  # (the CLI connects the driver)
            victim = next((n for n in workers if n.node_id in hosts), None)
            if victim is not None:
                c.remove_node(victim, allow_graceful=False)  # raylet, object store and workers: SIGKILL
                killed.append((victim, time.monotonic()))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_working_node, daemon=True)
    killer.start()
    try:
        assert main(["extract", str(folder), "--out", str(tmp_path / "ray"), "--engine", "ray", "--address", c.address,
                     "--ray-workers", "2", "--batch-size", "1", *common]) == 0
    finally:
        done.set()
        killer.join(30)
    assert len(killed) == 1 and not killed[0][0].any_processes_alive()
    assert any(t > killed[0][1] for _, t in written)  # killed in the middle: shards were still to come
    assert sorted(s for s, _ in written) == [0, 2, 4]  # every shard once: nothing lost, nothing doubled
    assert _describer_restarts() >= 1  # Ray restarted the killed node's model actor on the survivor
    assert "resuming" not in capsys.readouterr().err
    monkeypatch.setattr(jobmod, "save_chunk", real)
    assert main(["extract", str(folder), "--out", str(tmp_path / "local"), *common]) == 0
    got, local = Descriptors.load(tmp_path / "ray"), Descriptors.load(tmp_path / "local")
    assert got.ids == local.ids and len(set(got.ids)) == 6 and got.failed == local.failed == []
    np.testing.assert_allclose(np.asarray(got.vectors), np.asarray(local.vectors), atol=1e-5)
    assert got.meta["job"] == local.meta["job"]

"""Two-process DistributedDataParallel training on the CPU (gloo), against one process.

Two ranks of 2 tuples per step must make exactly the steps of one process of 4 tuples: both ranks
end with identical weights, equal to the single-process run's, and the same mean loss.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cbir.training.trainer import train

from test_trainer import base_cfg, make_class_images, tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    res = train(cfg, model=tiny_model())
    torch.save({"state": res["model"].state_dict(), "history": res["history"]}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path):
    images = make_class_images(tmp_path / "img")
    single_cfg = base_cfg(images, tmp_path / "single", name="sgd", lr=0.05, epochs=2, batch_tuples=4)
    single = train(single_cfg, model=tiny_model())

    ddp_cfg = base_cfg(images, tmp_path / "ddp", name="sgd", lr=0.05, epochs=2, batch_tuples=2)
    mp.spawn(_worker, args=(2, _free_port(), ddp_cfg, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    ref = single["model"].state_dict()
    trained = tiny_model().state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in ref.items())  # training moved the weights
    for k, v in ref.items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # ranks identical
        # and equal to one process of twice the batch (up to the order of float sums)
        assert torch.allclose(r0["state"][k], v, atol=1e-5), (k, (r0["state"][k] - v).abs().max())
    for a, b in zip(r0["history"], single["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # only rank 0 wrote the checkpoint
    assert (tmp_path / "ddp" / "last.pt").is_file()

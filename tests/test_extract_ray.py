"""`cbir extract --engine ray`: a local Ray of 2 CPU workers gives the ids and descriptors of the
local engine (float tolerance) and resumes after a run killed in the middle; the front end submits
the missing chunks again after a lost node (and only then). Several machines: test_extract_ray_cluster.py.

One module, one Ray session (Ray's start is slow); 6 demo photos at 64 px, chunks of 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
KW = dict(imsize=64, scales=(1.0, 0.5), chunk=2, progress=False, precision="fp32")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"worker_niceness": 0})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from cbir.extract import extract_to_dir
    from cbir.model import build_model

    tmp = tmp_path_factory.mktemp("ray")
    images = sorted(DEMO.glob("*.jpg"))[:5]
    broken = tmp / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    images = images[:2] + [broken] + images[2:]
    boxes = [None, (10, 10, 60, 11), None, None, None, None]  # a crop 1 px high: still described
    model = build_model("efficientnet_lite0", pooling="gem")
    local = extract_to_dir(model, images, tmp / "local", bboxes=boxes, workers=0, **KW)
    return model, images, boxes, local, tmp


def test_ray_equals_local_and_resumes(local_ray, case, monkeypatch):
    from cbir.descriptors import Descriptors
    from cbir.extract import extract_to_dir
    from cbir.extraction import job as jobmod

    model, images, boxes, local, tmp = case
    assert len(local) == 5 and [f["id"] for f in local.failed] == ["broken"]
    real, written = jobmod.save_chunk, []  # the shard writer of both engines

    def killed_after_two(job, start, res):
        if len(written) == 2:
            raise KeyboardInterrupt  # the driver dies after two shards
        written.append(start)
        return real(job, start, res)

    monkeypatch.setattr(jobmod, "save_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract_to_dir(model, images, tmp / "ray", bboxes=boxes, engine="ray", ray_workers=2, **KW)
    assert not (tmp / "ray" / "meta.json").exists() and len(written) == 2
    monkeypatch.setattr(jobmod, "save_chunk", lambda job, start, res: (written.append(start), real(job, start, res))[1])
    out = extract_to_dir(model, images, tmp / "ray", bboxes=boxes, engine="ray", ray_workers=2, **KW)
    assert sorted(written[2:]) == sorted({0, 2, 4} - set(written[:2]))  # only the missing shard was described
    assert out.ids == local.ids and out.failed == local.failed
    np.testing.assert_allclose(np.asarray(out.vectors), np.asarray(local.vectors), atol=1e-5)
    assert Descriptors.load(tmp / "ray").meta["job"] == local.meta["job"]  # same job: either engine resumes it


def test_cli_engine_ray(local_ray, case, tmp_path, capsys):
    from cbir.cli import main
    from cbir.descriptors import Descriptors

    _, images, _, _, _ = case
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    common = ["--imsize", "64", "--scales", "1", "--precision", "fp32", "--chunk", "2", "--quiet"]
    assert main(["extract", str(folder), "--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-workers", "2",
                 *common]) == 0
    assert main(["extract", str(folder), "--out", str(tmp_path / "local"), *common]) == 0
    ray_out, local = Descriptors.load(tmp_path / "ray"), Descriptors.load(tmp_path / "local")
    assert ray_out.ids == local.ids and len(ray_out.failed) == len(local.failed) == 1  # the broken file
    np.testing.assert_allclose(np.asarray(ray_out.vectors), np.asarray(local.vectors), atol=1e-5)
    # the local engine finds the Ray engine's folder complete (same job): nothing to describe
    assert main(["extract", str(folder), "--out", str(tmp_path / "ray"), *common]) == 0
    assert "already complete" in capsys.readouterr().out


def test_front_end_resubmits_only_missing_chunks_after_a_lost_node(local_ray, case, monkeypatch):
    """The second layer of fault tolerance (ray_engine.run): a run that dies of a lost node after one
    shard is submitted again with the chunks still missing, once each, and gives the local result."""
    from cbir.extract import extract, extract_to_dir
    from cbir.extraction import ray_engine
    from cbir.extraction.job import save_chunk

    model, images, boxes, local, tmp = case
    real_run, calls = ray_engine._run, []

    def node_dies_after_one_shard(ray_, job, model_, todo, *rest):
        calls.append(list(todo))
        if len(calls) == 1:  # the first chunk is described and written, then the run loses its node
            s = todo[0]
            save_chunk(job, s, extract(model_, job.paths[s:job.stop(s)], bboxes=job.bboxes[s:job.stop(s)],
                                       imsize=job.imsize, scales=job.scales, progress=False, precision="fp32"))
            raise RuntimeError("the Ray Data run failed") from ray.exceptions.NodeDiedError("node 1 died")
        return real_run(ray_, job, model_, todo, *rest)

    monkeypatch.setattr(ray_engine, "_run", node_dies_after_one_shard)
    jobs = []
    out = extract_to_dir(model, images, tmp / "resubmit", bboxes=boxes, engine="ray", ray_workers=2,
                         on_plan=jobs.append, **KW)
    assert calls == [[0, 2, 4], [2, 4]] and jobs[0].resubmits == 1
    assert out.ids == local.ids and out.failed == local.failed
    np.testing.assert_allclose(np.asarray(out.vectors), np.asarray(local.vectors), atol=1e-5)


def test_front_end_does_not_resubmit_a_bug_and_gives_up_after_retries(local_ray, case, monkeypatch, tmp_path):
    from cbir.extract import extract_to_dir
    from cbir.extraction import ray_engine

    model, images, boxes, _, _ = case
    calls = []

    def bug(*a):
        calls.append(1)
        raise ValueError("a bug, not a lost node")

    monkeypatch.setattr(ray_engine, "_run", bug)
    with pytest.raises(ValueError, match="a bug"):
        extract_to_dir(model, images, tmp_path / "a", engine="ray", ray_workers=2, **KW)
    assert len(calls) == 1  # raised at once

    def always_lost(*a):
        calls.append(1)
        raise ray.exceptions.NodeDiedError("gone")

    calls.clear()
    monkeypatch.setattr(ray_engine, "_run", always_lost)
    with pytest.raises(ray.exceptions.NodeDiedError):
        extract_to_dir(model, images, tmp_path / "b", engine="ray", ray_workers=2, retries=2, **KW)
    assert len(calls) == 3  # the first run and two resubmissions
    assert not (tmp_path / "b" / "meta.json").exists()


def test_engine_options_are_checked_before_any_work(case, tmp_path):
    from cbir.extract import extract_to_dir

    model, images, _, _, _ = case
    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        extract_to_dir(model, images, tmp_path / "x", engine="spark", **KW)
    with pytest.raises(ValueError, match="backend='onnxruntime'"):
        extract_to_dir(model, images, tmp_path / "x", engine="ray", backend="onnxruntime", **KW)
    with pytest.raises(ValueError, match="decode='cuda'"):
        extract_to_dir(model, images, tmp_path / "x", engine="ray", decode="cuda", **KW)
    assert not (tmp_path / "x").exists()

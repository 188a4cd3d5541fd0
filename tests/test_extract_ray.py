"""`cbir extract --engine ray`: a local Ray of 2 CPU workers gives the ids and descriptors of the
local engine (float tolerance) and resumes after a run killed in the middle.

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
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
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
    from cbir.extraction import ray_engine

    model, images, boxes, local, tmp = case
    assert len(local) == 5 and [f["id"] for f in local.failed] == ["broken"]
    real, written = ray_engine.save_chunk, []

    def killed_after_two(job, start, res):
        if len(written) == 2:
            raise KeyboardInterrupt  # the driver dies after two shards
        written.append(start)
        return real(job, start, res)

    monkeypatch.setattr(ray_engine, "save_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        ray_engine.extract_to_dir_ray(model, images, tmp / "ray", bboxes=boxes, workers=2, **KW)
    assert not (tmp / "ray" / "meta.json").exists() and len(written) == 2
    monkeypatch.setattr(ray_engine, "save_chunk", lambda job, start, res: (written.append(start), real(job, start, res))[1])
    out = ray_engine.extract_to_dir_ray(model, images, tmp / "ray", bboxes=boxes, workers=2, **KW)
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

"""`cbir extract` / `cbir models` end to end (in process): ids, failures, strict, BoW codebook, help."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.cli import main
from cbir.collection import collect_images
from cbir.model import parse_pooling
from cbir.descriptors import Descriptors


@pytest.fixture()
def photo_dir(tmp_path, rparis250) -> Path:
    """3 real photos (shrunk to 128 px) in a folder with a sub-folder, plus a corrupt and an empty file."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    names = ["paris_eiffel_000000", "paris_louvre_000004", "paris_invalides_000002"]
    for name, dest in zip(names, [root, root, root / "sub"]):
        im = Image.open(rparis250 / "jpg" / f"{name}.jpg")
        im.thumbnail((128, 128))
        im.save(dest / f"{name}.jpg")
    (root / "broken.jpg").write_bytes((root / f"{names[0]}.jpg").read_bytes()[:400])
    (root / "empty.png").write_bytes(b"")
    (root / ".hidden.jpg").write_bytes(b"x")
    return root


def test_round_trip_with_failures(photo_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    rc = main(["extract", str(photo_dir), "--out", str(out), "--imsize", "96", "--scales", "1,0.5", "--quiet"])
    assert rc == 0
    desc = Descriptors.load(out)
    assert desc.ids == ["paris_eiffel_000000", "paris_louvre_000004", "sub/paris_invalides_000002"]
    assert desc.vectors.shape == (3, 1280) and desc.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc.vectors, axis=1), 1.0, atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"] == "efficientnet_lite0" and meta["pooling"] == "gem" and meta["scales"] == [1.0, 0.5]
    failed = {Path(f["path"]).name: f["reason"] for f in meta["failed"]}
    assert set(failed) == {"broken.jpg", "empty.png"} and failed["empty.png"] == "empty file"
    text = capsys.readouterr()
    assert "3 images described" in text.out and "2 failed" in text.out and "broken.jpg" in text.err


def test_strict_stops_with_clear_error(photo_dir, tmp_path, capsys):
    rc = main(["extract", str(photo_dir), "--out", str(tmp_path / "f"), "--imsize", "64", "--scales", "1",
               "--strict", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cbir extract: error:" in err and ("broken.jpg" in err or "empty.png" in err)


def test_files_by_name_and_float16(photo_dir, tmp_path):
    out = tmp_path / "f16"
    files = [str(photo_dir / "sub" / "paris_invalides_000002.jpg"), str(photo_dir / "paris_eiffel_000000.jpg")]
    assert main(["extract", *files, "--out", str(out), "--imsize", "64", "--scales", "1", "--dtype", "float16",
                 "--quiet"]) == 0
    desc = Descriptors.load(out)
    assert desc.ids == ["paris_invalides_000002", "paris_eiffel_000000"] and desc.vectors.dtype == np.float16


def test_bow_fits_and_reuses_a_codebook(photo_dir, tmp_path):
    out, cb = tmp_path / "bow", tmp_path / "cb.npz"
    args = ["extract", str(photo_dir), "--out", str(out), "--imsize", "128", "--scales", "1",
            "--pooling", "bow:k=4", "--codebook", str(cb), "--quiet"]
    assert main(args) == 0 and cb.is_file()
    first = Descriptors.load(out)
    assert first.vectors.shape == (3, 4) and first.meta["pooling_params"] == {"k": 4, "soft": False}
    stamp = cb.stat().st_mtime_ns
    out2 = tmp_path / "bow2"
    assert main([*args[:3], str(out2), *args[4:]]) == 0
    assert cb.stat().st_mtime_ns == stamp  # reused, not refitted
    np.testing.assert_allclose(Descriptors.load(out2).vectors, first.vectors, atol=1e-6)


def test_collect_images_ids_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "x.png").write_bytes(b"2")
    with pytest.raises(Exception, match="same id 'x'"):
        collect_images([str(tmp_path / "a")])
    with pytest.raises(FileNotFoundError, match="no such file"):
        collect_images([str(tmp_path / "nope")])
    (tmp_path / "a" / "x.png").unlink()
    (tmp_path / "a" / "out").mkdir()
    (tmp_path / "a" / "out" / "descriptors.npy").write_bytes(b"")
    found = collect_images([str(tmp_path / "a")], exclude=tmp_path / "a" / "out")
    assert found.ids == ["x"] and found.files == [tmp_path / "a" / "x.jpg"]


def test_parse_pooling():
    assert parse_pooling("gem") == ("gem", {})
    assert parse_pooling("gem:p=4,per_channel=true") == ("gem", {"p": 4, "per_channel": True})
    assert parse_pooling("regional:base=gem,overlap=0.4") == ("regional", {"base": "gem", "overlap": 0.4})
    with pytest.raises(Exception, match="key=value"):
        parse_pooling("gem:4")


def test_models_lists_offline_lite0_and_poolings(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "efficientnet_lite0" in l)
    assert line.lstrip().startswith("*") and "offline" in line
    for name in ("spoc", "mac", "gem", "rmac", "crow", "bow"):
        assert f"   {name} " in out
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "efficientnet_lite0" and r["offline"] for r in data["backbones"])


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "cbir extract photos/ --out feats/" in out and "--strict" in out


def test_resume_says_where_it_continues(photo_dir, tmp_path, capsys, monkeypatch):
    """An interrupted `cbir extract` run again says "resuming at N of M" (N = inputs in kept shards)."""
    from cbir.extraction import job as jobmod

    out = tmp_path / "feats"
    args = ["extract", str(photo_dir), "--out", str(out), "--imsize", "64", "--scales", "1", "--chunk", "2", "--quiet"]
    real, saved = jobmod.save_chunk, []

    def interrupted_at_second_shard(job, start, res):
        if saved:
            raise KeyboardInterrupt
        saved.append(start)
        return real(job, start, res)

    monkeypatch.setattr(jobmod, "save_chunk", interrupted_at_second_shard)
    assert main(args) == 130  # Ctrl-C after the first shard (inputs 0..1 of 5)
    assert "resuming" not in capsys.readouterr().err
    monkeypatch.setattr(jobmod, "save_chunk", real)
    assert main(args) == 0
    text = capsys.readouterr()
    assert "resuming at 2 of 5 images" in text.err and "3 images described" in text.out  # and 2 failed
    assert Descriptors.load(out).ids == ["paris_eiffel_000000", "paris_louvre_000004", "sub/paris_invalides_000002"]
    assert main(args) == 0
    text = capsys.readouterr()
    assert "already complete" in text.out and "resuming" not in text.err

"""``cbir mine`` end to end on demo photos and warped copies (cbir.sfm.mine, cbir.sfm.verified, cli/mine).

Real photos of two landmarks (bundled demo) and copies of them warped by known homographies: a
photo and its copies verify (hundreds of inliers), photos of different landmarks do not, so
clusters form and never mix landmarks. Runs in seconds: global descriptors at 128 px, SIFT at 384 px.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.datasets.revisitop import load_plain_pickle
from cbir.sfm.mine import mine
from cbir.sfm.settings import MineSettings, PairSettings
from cbir.sfm.state import SettingsChanged
from cbir.training.data import load_sfm

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
PHOTOS = ["paris_louvre_000081", "paris_louvre_000019", "paris_louvre_000232",
          "paris_eiffel_000005", "paris_eiffel_000041", "paris_eiffel_000128"]
WARPS = [np.array([[0.85, 0.12, 30.0], [-0.08, 0.9, 25.0], [2e-4, 1e-4, 1.0]]),
         np.array([[1.05, -0.1, -10.0], [0.06, 0.95, 12.0], [-1e-4, 2e-4, 1.0]])]
CLI_OPTS = ["--imsize", "128", "--scales", "1", "--k", "3", "--max-size", "384", "--max-features", "600",
            "--device", "cpu", "--workers", "1", "--val-fraction", "0.4"]


def _warp(im: Image.Image, h: np.ndarray) -> Image.Image:
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return im.transform(im.size, Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), Image.Resampling.BICUBIC)


def make_folder(root: Path) -> Path:
    """6 demo photos (2 landmarks) in sub-folders, one warped copy of each, two of the first."""
    for i, name in enumerate(PHOTOS):
        landmark = name.split("_")[1]
        im = Image.open(DEMO / f"{name}.jpg").convert("RGB")
        d = root / landmark
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{name}.jpg", quality=92)
        for w in range(2 if i == 0 else 1):
            _warp(im, WARPS[w]).save(d / f"{name}_w{w}.jpg", quality=92)
    (root / "notes.txt").write_text("not a photo")
    return root


def settings() -> MineSettings:
    from cbir.local.features import LocalFeatureSettings

    return MineSettings(pairs=PairSettings(imsize=128, scales=(1.0,), k=3,
                                           local=LocalFeatureSettings(max_size=384, max_features=600)),
                        val_fraction=0.4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("mine") / "photos")


@pytest.fixture(scope="module")
def mined(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("mined") / "out"
    os.environ["CBIR_CACHE"] = str(out.parent / "cache")
    try:
        summary = mine(photos, out, settings(), device="cpu")
    finally:
        os.environ.pop("CBIR_CACHE", None)
    return out, summary


def test_clusters_form_and_never_mix_landmarks(mined):
    out, s = mined
    assert s["photos"] == 13 and s["other_files"] == 1 and s["failed"] == 0
    tuples = load_plain_pickle(out / "tuples.pkl")
    cids = tuples["train"]["cids"] + tuples["val"]["cids"]
    clusters = tuples["train"]["cluster"] + tuples["val"]["cluster"]
    by_cluster: dict[int, set[str]] = {}
    for cid, c in zip(cids, clusters):
        by_cluster.setdefault(c, set()).add(cid.split("/")[0])
    assert all(len(v) == 1 for v in by_cluster.values())  # one landmark per cluster
    # every photo and its warped copies are verified and clustered together
    where = dict(zip(cids, clusters))
    for name in PHOTOS:
        landmark = name.split("_")[1]
        copies = [f"{landmark}/{name}_w{w}.jpg" for w in range(2 if name == PHOTOS[0] else 1)]
        assert all(where[c] == where[f"{landmark}/{name}.jpg"] for c in copies)
    assert s["clusters"] >= 2 and s["verified_pairs"] >= 7 and s["clustered_photos"] == len(cids)
    assert s["train"]["clusters"] >= 2 and s["val"]["clusters"] >= 2  # whole clusters held out
    assert not set(tuples["train"]["cids"]) & set(tuples["val"]["cids"])
    # the 3-photo cluster was given to the mapper (planar warps of one photo may or may not reconstruct)
    assert s["reconstructed_clusters"] >= 1 and (out / "reconstruct").is_dir()
    assert set(s["seconds"]) >= {"describe", "features", "verify", "graph", "tuples"}


def test_tuples_load_for_training_with_their_evidence(mined, photos):
    out, _ = mined
    data = load_sfm(out / "tuples.pkl", photos, layout="flat")
    assert all(p.is_file() for p in data.paths)
    for ps, ev in zip(data.positives, data.evidence):
        assert len(ps) == len(ev) and ((ev[:, 0] >= 15) | (ev[:, 1] >= 15)).all()
    val = load_sfm(out / "tuples.pkl", photos, split="val", layout="flat")
    assert not {str(p) for p in val.paths} & {str(p) for p in data.paths}
    from cbir.datasets.revisitop import from_gnd_file

    bench = from_gnd_file(out / "val_gnd.pkl", images=photos, ext="")
    assert [str(p) for p in bench.db_paths] == [str(p) for p in val.paths]


def test_the_shipped_config_trains_on_mined_tuples_as_written(mined, photos, tmp_path, capsys):
    """``cbir train configs/mined_sfm.yaml`` with the paths docs/mining.md gives (only sizes shrunk for
    speed): it reads the tuples and the val split, trains, validates on the mined val clusters and keeps
    the best epoch (the start included), saying which."""
    from cbir.cli import main

    out, _ = mined
    config = Path(__file__).resolve().parents[1] / "configs" / "mined_sfm.yaml"
    run = tmp_path / "run"
    code = main(["train", str(config), f"data.pkl={out / 'tuples.pkl'}", f"data.root={photos}",
                 f"validation.gnd={out / 'val_gnd.pkl'}", f"validation.images={photos}", f"out={run}",
                 "data.imsize=96", "validation.imsize=96", "mining.queries_per_epoch=4", "mining.negatives=1",
                 "optim.epochs=1", "optim.batch_tuples=2", "device=cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["best"]["epoch"] in (0, 1) and summary["setup"]["queries"] == 8
    assert f"kept epoch {summary['best']['epoch']}" in captured.out + captured.err
    assert (run / "model.pt").is_file() and (run / "last.pt").is_file()
    history = json.loads((run / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history if "val" in h][:2] == [0, 1]


def test_verified_pairs_library_call(mined, photos):
    from cbir.sfm.verified import verified_pairs

    out, s = mined
    names = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    vp = verified_pairs([photos / n for n in names], settings().pairs, out / "pairs", keys=names)  # done: read back
    assert vp.keys == names and vp.ok.all() and len(vp.verified) == s["verified_pairs"]
    a, b = names.index("louvre/paris_louvre_000081.jpg"), names.index("louvre/paris_louvre_000081_w0.jpg")
    p = int(np.flatnonzero((vp.pairs[:, 0] == a) & (vp.pairs[:, 1] == b))[0])
    assert vp.inliers[p] >= 100 and vp.clusters[a] == vp.clusters[b] >= 0
    m = vp.matches(p)
    assert m.shape == (vp.inliers[p], 2)
    from cbir.local.store import LocalFeatureStore

    st = LocalFeatureStore(vp.store)
    fa, fb = st.get(names[a]), st.get(names[b])
    # the correspondences obey the homography the copy was made with (within RANSAC's threshold)
    pa, pb = fa.xy[m[:, 0]], fb.xy[m[:, 1]]
    proj = np.c_[pa, np.ones(len(pa))] @ WARPS[0].T
    err = np.linalg.norm(proj[:, :2] / proj[:, 2:] - pb, axis=1)
    assert np.median(err) < 3.0
    # unrelated landmarks never verify
    lv = [i for i, n in enumerate(names) if n.startswith("louvre")]
    for p in np.flatnonzero(vp.inliers >= 15):
        assert (vp.pairs[p, 0] in lv) == (vp.pairs[p, 1] in lv)


def test_rerun_changes_nothing_and_other_settings_are_refused(mined, photos, monkeypatch):
    out, s = mined
    monkeypatch.setenv("CBIR_CACHE", str(out.parent / "cache"))
    before = (out / "tuples.pkl").read_bytes()
    again = mine(photos, out, settings(), device="cpu")
    assert (out / "tuples.pkl").read_bytes() == before
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in s.items() if k != "seconds"}
    other = settings().model_copy(update={"seed": 5})
    with pytest.raises(SettingsChanged, match="other settings seed") as err:
        mine(photos, out, other, device="cpu")
    assert "\n" not in str(err.value) and "--restart" in str(err.value)


# every stamped array file ``mine`` reads back from OUT on a rerun: (path, its format stamp, meta)
CRAFTED = [("pairs/global.npz", "cbir-mine-global", {}),
           ("pairs/candidates.npz", "cbir-mine-candidates", {"k": 3}),
           ("pairs/verify/000000.npz", "cbir-mine-verify", {"first": 0, "stop": 1}),
           ("pairs/graph.npz", "cbir-mine-graph", {})]


@pytest.mark.parametrize("rel, kind, meta", CRAFTED, ids=[c[0].rsplit("/", 1)[1] for c in CRAFTED])
def test_a_crafted_work_file_runs_no_code(mined, photos, tmp_path, monkeypatch, rel, kind, meta):
    """A finished work file replaced by a well-stamped .npz holding a pickled object (its __reduce__
    would create a marker file) is refused in one line naming the file, running nothing."""
    import io
    import shutil

    from cbir.fileio import FormatError

    out, _ = mined
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert (copy / rel).is_file()
    marker = tmp_path / "PWNED"

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = np.array([Touch()], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps({"format": kind, "format_version": 1, **meta})),
             vectors=evil, ok=evil, pairs=evil, similarity=evil, inliers=evil, offsets=np.zeros(2, np.int64),
             matches=np.zeros((0, 2)), clusters=evil, cut=evil)
    (copy / rel).write_bytes(buf.getvalue())
    # the control: the same bytes, read with pickles allowed, do run code
    with np.load(io.BytesIO(buf.getvalue()), allow_pickle=True) as z:
        z["inliers"]
    assert marker.exists()
    marker.unlink()
    (copy / "tuples.pkl").unlink()  # so the rerun has work to do and reads the stages back
    (copy / "summary.json").unlink()
    monkeypatch.setenv("CBIR_CACHE", str(out.parent / "cache"))
    with pytest.raises(FormatError) as err:
        mine(photos, copy, settings(), device="cpu")
    assert rel.rsplit("/", 1)[1] in str(err.value) and "\n" not in str(err.value) and not marker.exists()


# ---------------------------------------------------------------------------------------------
# the command line, and kill -9


def _cli(photos: Path, out: Path, *extra: str, env: dict | None = None, chunks: bool = False):
    """``python -m cbir mine`` as a subprocess (``chunks``: tiny chunk sizes, so a kill lands mid-stage)."""
    code = ("import sys, cbir.sfm.verified as v\n"
            + ("v.DESCRIBE_CHUNK, v.FEATURE_SHARD, v.VERIFY_CHUNK = 3, 2, 4\n" if chunks else "")
            + "from cbir.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", code, "mine", str(photos), "--out", str(out), *CLI_OPTS, *extra]
    return cmd, {**os.environ, **(env or {})}


def test_cli_prints_the_summary_and_refuses_in_one_line(mined, photos, tmp_path, monkeypatch, capsys):
    """The command on a finished folder (nothing left to do: it reads the work back) prints the summary;
    other settings: one line, exit 2. (It runs end to end in the kill test below.)"""
    import shutil

    from cbir.cli import main

    out = tmp_path / "o"
    shutil.copytree(mined[0], out)
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    assert main(["mine", str(photos), "--out", str(out), *CLI_OPTS, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "photos: 13" in printed and "3D models:" in printed and "tuples: train" in printed
    assert main(["mine", str(photos), "--out", str(out), *CLI_OPTS, "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified_pairs"] == mined[1]["verified_pairs"]
    assert main(["mine", str(photos), "--out", str(out), *CLI_OPTS, "--k", "4"]) == 2
    err = capsys.readouterr().err
    assert "pairs.k" in err and "--restart" in err and len(err.strip().splitlines()) == 1
    assert main(["mine", str(photos), "--out", str(out), "--k", "0"]) == 2
    assert "--k: must be an integer in [1, 1000] (got 0)" in capsys.readouterr().err


# after the global descriptors, mid-features (2nd shard of 2 photos), mid-verification, mid-SfM
MILESTONES = ("pairs/global.npz", "pairs/local/shards/00000001.json", "pairs/verify/000001.npz", "reconstruct")


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_gives_the_same_result(mined, photos, tmp_path):
    """``cbir mine`` killed with SIGKILL as soon as each milestone file appears (mid-features,
    mid-verification, mid-reconstruction; tiny chunks), then run to the end: the same tuples (bytes)
    and summary (times aside) as the uninterrupted run of the fixture (default chunk sizes)."""
    ref = mined[0]
    out = tmp_path / "killed"
    cmd, env = _cli(photos, out, "--quiet", env={"CBIR_CACHE": str(tmp_path / "cache")}, chunks=True)
    kills = 0
    for milestone in MILESTONES:
        if (out / milestone).exists():
            continue
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not (out / milestone).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3  # of 4 (a milestone already passed when the previous kill landed is skipped)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (out / "tuples.pkl").read_bytes() == (ref / "tuples.pkl").read_bytes()
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    for s in (a, b):
        s.pop("seconds"), s.pop("out")
    assert a == b
    assert pickle.loads((out / "tuples.pkl").read_bytes())["train"]["cids"]


def test_changed_photos_are_refused_and_restart_starts_over(tmp_path, monkeypatch):
    """The verified-pair stage is stamped with the photos: one changed photo -> one-line refusal;
    restart=True empties the folder and redoes the work."""
    from cbir.sfm.verified import verified_pairs

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "p"
    folder.mkdir()
    for i, name in enumerate(PHOTOS[:2]):
        Image.open(DEMO / f"{name}.jpg").convert("RGB").save(folder / f"{i}.jpg")
        _warp(Image.open(DEMO / f"{name}.jpg").convert("RGB"), WARPS[0]).save(folder / f"{i}w.jpg")
    paths = sorted(folder.glob("*.jpg"))
    ps = settings().pairs
    vp = verified_pairs(paths, ps, tmp_path / "w", keys=[p.name for p in paths], device="cpu")
    assert sorted(vp.pairs[vp.verified].tolist()) == [[0, 1], [2, 3]]  # each photo with its copy
    Image.open(DEMO / f"{PHOTOS[3]}.jpg").convert("RGB").save(folder / "1w.jpg")  # a different photo now
    with pytest.raises(SettingsChanged, match="other photos") as err:
        verified_pairs(paths, ps, tmp_path / "w", keys=[p.name for p in paths], device="cpu")
    assert "\n" not in str(err.value)
    vp2 = verified_pairs(paths, ps, tmp_path / "w", keys=[p.name for p in paths], device="cpu", restart=True)
    assert sorted(vp2.pairs[vp2.verified].tolist()) == [[0, 1]]

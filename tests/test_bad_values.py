"""Bad values on the command line and in files (issue 19, "Bad values pass silently or crash").

Each case goes through ``cbir.cli.main`` as a user would: it must return 2, print exactly one line
on stderr that names the file and the field (or the flag), and write nothing (no --json result, no
index folder). Files are tampered the way the review did: NaN and strings in a recipe, a NaN row in
an index with its checksums redone, deeply nested JSON, int8 / empty / too narrow shards, a
manifest generation pointing outside the index folder, a damaged graph.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.descriptors import Descriptors, l2_normalize

DIM = 16
N = 40


def _vectors(n: int = N, d: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(5, d)))
    return l2_normalize(centers[np.arange(n) % 5] + 0.2 * rng.normal(size=(n, d))).astype(np.float32)


def _features(folder: Path, vectors: np.ndarray | None = None, shard_size: int | None = 16) -> Path:
    """A `cbir extract`-like folder: ids img000.., their paths recorded, sharded."""
    vectors = _vectors() if vectors is None else vectors
    ids = [f"img{i:03d}" for i in range(len(vectors))]
    meta = {"model": "efficientnet_lite0", "pooling": "gem", "imsize": 512, "scales": [1.0],
            "paths": {i: f"/photos/{i}.jpg" for i in ids}}
    Descriptors(ids=ids, vectors=vectors, meta=meta).save(folder, shard_size=shard_size)
    return folder


@pytest.fixture
def index(tmp_path) -> Path:
    out = tmp_path / "ix"
    assert main(["index", "build", "--features", str(_features(tmp_path / "feats")), "--out", str(out)]) == 0
    return out


def _run(args: list[str], capsys) -> str:
    """Run the CLI, expect exit 2 and one line on stderr; return that line."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _redo_checksums(ix: Path) -> None:
    """Tamper like the review: recompute the sizes and sha256 of the manifest after changing a file."""
    man = json.loads((ix / "manifest.json").read_text())
    gen = ix / man["generation"]
    for name in man["files"]:
        data = (gen / name).read_bytes()
        man["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ix / "manifest.json").write_text(json.dumps(man))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------- options on the command line


@pytest.mark.parametrize("opts, flag", [
    (["--qe", "2", "--alpha-qe", "nan"], "--alpha-qe"),
    (["--dba", "2", "--dba-alpha", "inf"], "--dba-alpha"),
    (["--qe", "-1"], "--qe"),
    (["--dba", "100000"], "--dba"),
    (["--diffusion", "--diffusion-alpha", "nan"], "--diffusion-alpha"),
    (["--diffusion", "--diffusion-gamma=-inf"], "--diffusion-gamma"),
    (["--alpha-qe", "3"], "--alpha-qe"),
    (["--diffusion-k", "5"], "--diffusion-k"),
])
def test_bad_rerank_flags_are_one_line_naming_the_flag(index, tmp_path, capsys, opts, flag):
    out = tmp_path / "hits.json"
    line = _run(["search", index, "--id", "0", "--json", out, *opts], capsys)
    assert line.startswith("cbir search: error: " + flag), line
    assert not out.exists()


def test_the_same_values_in_the_library_name_fields(tmp_path):
    from cbir.rerank import Rerank
    from cbir.schema import SchemaError

    with pytest.raises(SchemaError, match=r"^Rerank: alpha_qe: must be a finite number in \[0, 100\] \(got NaN\)$"):
        Rerank(qe=2, alpha_qe=float("nan"))
    with pytest.raises(SchemaError, match=r"^Rerank: dba_alpha: .*\(got Infinity\)$"):
        Rerank(dba=2, dba_alpha=float("inf"))
    with pytest.raises(SchemaError, match=r"^Rerank: diffusion.alpha: must be a finite number in \[0, 1\)"):
        Rerank(diffusion={"alpha": float("nan")})
    # True: every diffusion parameter by the database size (documented)
    assert Rerank(diffusion=True).diffusion_for(400).k == 20 and Rerank(diffusion=True) == Rerank(diffusion={})


# ----------------------------------------------------------------------------- recipes


def _recipe(path: Path, **changes) -> Path:
    doc = {"format": "recipe", "format_version": 1,
           "whitening": {"method": "pca", "fit": "database", "power": 0.5, "shrinkage": 0.1, "dim": None},
           "rerank": {"whiten": None, "dba": 2, "dba_alpha": 3.0, "qe": 1, "alpha_qe": 3.0,
                      "diffusion": {"kq": 3, "alpha": 0.8}}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc[section][field] = value
        else:
            doc[section] = value
    path.write_text(json.dumps(doc))  # Python's json writes NaN for float("nan"), as a tampered file would
    return path


@pytest.mark.parametrize("changes, field", [
    ({"rerank__alpha_qe": float("nan")}, "rerank.alpha_qe"),
    ({"rerank__qe": "abc"}, "rerank.qe"),
    ({"rerank__qe": 2.5}, "rerank.qe"),
    ({"rerank__dba": True}, "rerank.dba"),
    ({"rerank__dba": 1e18}, "rerank.dba"),
    ({"rerank__dba": 10 ** 18}, "rerank.dba"),
    ({"whitening__power": "x"}, "whitening.power"),
    ({"whitening__dim": 1e30}, "whitening.dim"),
    ({"whitening": "pca"}, "whitening"),
    ({"whitening__file": "../../etc/w.npz"}, "whitening.file"),
    ({"rerank__diffusion": "abc"}, "rerank.diffusion"),
    ({"rerank__qe_k": 2}, "rerank.qe_k"),  # a typo
    ({"tuned_on": [{"value": float("inf")}]}, "tuned_on.0"),
])
def test_bad_recipe_values_name_the_file_and_field(index, tmp_path, capsys, changes, field):
    recipe = _recipe(tmp_path / "r.json", **changes)
    out = tmp_path / "hits.json"
    line = _run(["search", index, "--id", "0", "--recipe", recipe, "--json", out], capsys)
    assert f"recipe {recipe}: {field}" in line, line
    assert not out.exists()


def test_bad_recipe_refused_by_serve_and_index_build(index, tmp_path, capsys):
    recipe = _recipe(tmp_path / "r.json", rerank__alpha_qe=float("nan"))
    line = _run(["serve", index, "--recipe", recipe, "--port", "0", "--no-preload"], capsys)
    assert "rerank.alpha_qe" in line
    out = tmp_path / "new.index"
    line = _run(["index", "build", "--features", tmp_path / "feats", "--out", out, "--recipe", recipe], capsys)
    assert "rerank.alpha_qe" in line and not out.exists()


def test_bad_recipe_in_evaluate_writes_nothing(tmp_path, capsys):
    recipe = _recipe(tmp_path / "r.json", rerank__qe=2.5)
    out = tmp_path / "res.json"
    line = _run(["evaluate", "--dataset", "demo", "--recipe", recipe, "--json", out, "--quiet"], capsys)
    assert "rerank.qe: must be an integer in [0, 10000] (got 2.5)" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- index files


def test_nan_row_in_an_index_never_outranks(index, tmp_path, capsys):
    man = json.loads((index / "manifest.json").read_text())
    vec_file = index / man["generation"] / "vectors.npy"
    v = np.load(vec_file)
    v[7] = np.nan
    np.save(vec_file, v)
    _redo_checksums(index)
    out = tmp_path / "hits.json"
    line = _run(["search", index, "--id", "0", "--json", out], capsys)
    assert "NaN or infinite" in line and "image ids 7" in line and "vectors.npy" in line
    assert not out.exists()


@pytest.mark.parametrize("where", ["manifest", "recipe", "meta"])
def test_deeply_nested_json_is_one_line(index, tmp_path, capsys, where):
    deep = _nested(100_000)  # json.loads alone would raise RecursionError
    if where == "manifest":
        (index / "manifest.json").write_text(deep)
        line = _run(["search", index, "--id", "0"], capsys)
    elif where == "recipe":
        (tmp_path / "r.json").write_text(deep)
        line = _run(["search", index, "--id", "0", "--recipe", tmp_path / "r.json"], capsys)
    else:
        feats = _features(tmp_path / "f2")
        (feats / "meta.json").write_text(deep)
        line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
        assert not (tmp_path / "o").exists()
    assert "nested 100000 levels deep" in line


@pytest.mark.parametrize("generation", ["/tmp", "..", "../other", "g000001-abcdef/../../x"])
def test_manifest_generation_stays_inside_the_index(index, tmp_path, capsys, generation):
    other = tmp_path / "other"
    other.mkdir()
    man = json.loads((index / "manifest.json").read_text())
    man["generation"] = generation
    (index / "manifest.json").write_text(json.dumps(man))
    line = _run(["search", index, "--id", "0"], capsys)
    assert "manifest.json: generation: must name a generation folder inside the index folder" in line


def test_damaged_graph_id_blames_the_graph_not_the_query(tmp_path, capsys):
    out = tmp_path / "gx"
    assert main(["index", "build", "--features", str(_features(tmp_path / "feats")), "--out", str(out),
                 "--graph", "5"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    gfile = out / man["generation"] / "graph_ids.npy"
    g = np.load(gfile)
    g[3, 1] = 987654
    np.save(gfile, g)
    _redo_checksums(out)
    line = _run(["search", out, "--id", "0", "--diffusion"], capsys)
    assert "graph_ids.npy" in line and "987654" in line and "not in the index" in line
    assert "query" not in line


# ----------------------------------------------------------------------------- descriptor folders


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def test_meta_shards_null(tmp_path, capsys):
    feats = _features(tmp_path / "f")
    (feats / "meta.json").write_text(json.dumps({**_meta(feats), "shards": None}))
    line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
    assert line.endswith(f"{feats / 'meta.json'}: shards: must be a list (got null) (format_version 2 lists its "
                         "shards in meta.json)"), line
    assert not (tmp_path / "o").exists()


def test_shard_entry_without_a_name(tmp_path, capsys):
    feats = _features(tmp_path / "f")
    meta = _meta(feats)
    del meta["shards"][1]["name"]
    (feats / "meta.json").write_text(json.dumps(meta))
    line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
    assert line.endswith(f"descriptor metadata {feats / 'meta.json'}: shards.1.name: is missing"), line


def test_empty_shard_file(tmp_path, capsys):
    feats = _features(tmp_path / "f")
    (feats / "shards" / "000000000016.npy").write_bytes(b"")
    line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
    assert "000000000016.npy is empty" in line
    assert not (tmp_path / "o").exists()


def test_int8_shard_is_refused(tmp_path, capsys):
    feats = _features(tmp_path / "f")
    shard = feats / "shards" / "000000000000.npy"
    np.save(shard, (np.load(shard) * 100).astype(np.int8))
    line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
    assert "000000000000.npy: descriptors are float32 or float16, this array is int8" in line
    assert not (tmp_path / "o").exists()


def test_shard_narrower_than_its_meta(tmp_path, capsys):
    """A shard 512 wide where meta.json says 1280 (here: 16 wide where it says 24)."""
    feats = _features(tmp_path / "f")
    (feats / "meta.json").write_text(json.dumps({**_meta(feats), "dim": 24}))
    line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
    assert "is 16 wide but meta.json says dim 24" in line
    assert not (tmp_path / "o").exists()


def test_rows_far_from_unit_norm_and_nan_rows_are_named(tmp_path, capsys):
    v = _vectors()
    v[5] *= 1000  # would come first for every query
    feats = _features(tmp_path / "f", v)
    line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
    assert "an L2 norm far from 1: 'img005' (norm 1e+03)" in line
    assert not (tmp_path / "o").exists()
    v = _vectors()
    v[9, 3] = np.nan
    feats = _features(tmp_path / "g", v)
    line = _run(["index", "build", "--features", feats, "--out", tmp_path / "o"], capsys)
    assert "NaN or infinite values: 'img009'" in line
    assert not (tmp_path / "o").exists()


def test_single_file_descriptors_checked_too(tmp_path):
    from cbir.fileio import FormatError

    v = _vectors()
    v[2] = np.inf
    Descriptors(ids=[f"i{k}" for k in range(N)], vectors=v).save(tmp_path / "d")
    with pytest.raises(FormatError, match=r"NaN or infinite values \(ids 'i2'\)"):
        Descriptors.load(tmp_path / "d")
    assert Descriptors.load(tmp_path / "d", check_finite=False).vectors.shape == (N, DIM)


def test_files_written_by_this_cbir_load_back(tmp_path):
    """The formats keep reading what cbir writes (both descriptor layouts, an index, a recipe)."""
    from cbir.index import Index
    from cbir.rerank.recipe import Recipe

    feats = _features(tmp_path / "s")
    single = _features(tmp_path / "one", shard_size=None)
    a, b = Descriptors.load(feats), Descriptors.load(single)
    np.testing.assert_array_equal(np.asarray(a.vectors), b.vectors)
    assert a.meta["paths"] == b.meta["paths"]
    assert main(["index", "build", "--features", str(feats), "--out", str(tmp_path / "ix")]) == 0
    assert len(Index.load(tmp_path / "ix")) == N
    assert Recipe.load("holidays805-lite0").rerank.qe == 1

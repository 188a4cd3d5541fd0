"""Fuzzing every loader of a JSON file with random documents and random mutations of valid ones.

The loaders: a recipe (``Recipe.load``), an index manifest (``Index.load``), a descriptor folder's
``meta.json`` and a shard's ``.json`` (``Descriptors.load``), a whitening file's meta
(``Whitening.load``), and the training config (``TrainConfig.from_dict``). Each document must
either load or raise the user errors the CLI reports as one line (``ValueError`` and its
subclasses ``FormatError`` / ``SchemaError``, ``FileNotFoundError``) with a one-line message:
never a TypeError, AttributeError, RecursionError, EOFError... (the tracebacks of issue 19).
Mutations replace a value anywhere in a valid document (NaN, infinities, huge integers, strings,
nested objects), delete a key or add an unknown one, so they reach every field of every schema.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbir.descriptors import Descriptors, l2_normalize
from cbir.fileio import json_depth

#: A few seconds per loader in the suite (fixed examples); CBIR_FUZZ_EXAMPLES=2000 for a long random hunt.
_LONG = int(os.environ.get("CBIR_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_LONG or 60, deadline=None, derandomize=not _LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats() | st.text(max_size=6) | st.sampled_from(["..", "/etc", "pca", "g000001-abcdef", "float16"]))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)


def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) inside a JSON document, the root included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutations(draw, valid: dict):
    """A copy of ``valid`` with one change: a value replaced, a key deleted, or an unknown key added."""
    doc = copy.deepcopy(valid)
    path = draw(st.sampled_from(list(_paths(doc))))
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if not path:
        return draw(json_values) if kind == "replace" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "delete" and isinstance(parent, dict):
        del parent[last]
    elif kind == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=6)) + "_x"] = draw(json_values)
    else:
        parent[last] = draw(json_values)
    return doc


def _write(path: Path, doc) -> None:
    path.write_text(json.dumps(doc))  # NaN / Infinity written as Python's json does (as a tampered file)


def _refuses_in_one_line(load) -> None:
    try:
        load()
    except (ValueError, FileNotFoundError) as exc:  # FormatError, SchemaError are ValueErrors
        text = str(exc).strip()
        assert text and "\n" not in text, repr(text)


# ----------------------------------------------------------------------------- json_depth


def _depth(doc) -> int:
    if isinstance(doc, dict):
        return 1 + max((_depth(v) for v in doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max((_depth(v) for v in doc), default=0)
    return 0


@SETTINGS
@given(st.recursive(scalars | st.text(alphabet='[]{}"\\ab', max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), c, max_size=3),
                    max_leaves=30))
def test_json_depth_equals_the_parsed_depth(doc):
    """Brackets, quotes and backslashes inside strings and keys never count."""
    assert json_depth(json.dumps(doc).encode()) == _depth(doc)


# ----------------------------------------------------------------------------- recipe


VALID_RECIPE = {
    "format": "recipe", "format_version": 1,
    "whitening": {"method": "pca", "fit": "database", "power": 0.5, "shrinkage": 0.1, "dim": 64},
    "rerank": {"whiten": None, "dba": 2, "dba_alpha": 3.0, "qe": 1, "alpha_qe": 3.0,
               "diffusion": {"kq": 3, "alpha": 0.8, "sim_weight": 0.0}},
    "tuned_on": [{"name": "holidays805", "n_db": 805, "n_queries": 295, "protocol": "revisitop"}],
    "objective": {"value": 82.9, "what": "mean", "trials": 142},
    "descriptors": {"model": "efficientnet_lite0", "scales": [1.0]},
}


@SETTINGS
@given(st.one_of(mutations(VALID_RECIPE), json_values))
def test_recipe_loader(tmp_path, doc):
    from cbir.rerank.recipe import Recipe

    _write(tmp_path / "r.json", doc)
    _refuses_in_one_line(lambda: Recipe.load(tmp_path / "r.json").apply(np.eye(3, 8, dtype=np.float32),
                                                                        np.eye(8, dtype=np.float32)))


# ----------------------------------------------------------------------------- index manifest


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory) -> tuple[Path, dict]:
    from cbir.index import Index

    root = tmp_path_factory.mktemp("fuzz") / "ix"
    rng = np.random.default_rng(0)
    idx = Index(8)
    idx.add(l2_normalize(rng.normal(size=(12, 8))).astype(np.float32), [f"/p/{i}.jpg" for i in range(12)])
    idx.build_graph(3)
    idx.save(root)
    return root, json.loads((root / "manifest.json").read_text())


@SETTINGS
@given(data=st.data())
def test_index_manifest_loader(saved_index, data):
    from cbir.index import Index

    root, valid = saved_index
    doc = data.draw(st.one_of(mutations(valid), json_values))
    try:
        _write(root / "manifest.json", doc)
        _refuses_in_one_line(lambda: Index.load(root).search_vectors(np.eye(1, 8, dtype=np.float32), 3))
    finally:
        _write(root / "manifest.json", valid)


# ----------------------------------------------------------------------------- descriptor meta and shard meta


@pytest.fixture(scope="module")
def descriptor_folder(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("fuzzd") / "feats"
    rng = np.random.default_rng(1)
    ids = [f"img{i}" for i in range(10)]
    Descriptors(ids=ids, vectors=l2_normalize(rng.normal(size=(10, 8))).astype(np.float32),
                meta={"model": "m", "imsize": 512, "scales": [1.0], "paths": {i: f"/p/{i}.jpg" for i in ids}}
                ).save(root, shard_size=4)
    return root, json.loads((root / "meta.json").read_text()), json.loads((root / "shards" / "000000000004.json").read_text())


@SETTINGS
@given(data=st.data())
def test_descriptor_meta_loader(descriptor_folder, data):
    root, valid, _ = descriptor_folder
    doc = data.draw(st.one_of(mutations(valid), json_values))
    try:
        _write(root / "meta.json", doc)
        _refuses_in_one_line(lambda: Descriptors.load(root, mmap=False))
    finally:
        _write(root / "meta.json", valid)


@SETTINGS
@given(data=st.data())
def test_shard_meta_loader(descriptor_folder, data):
    root, _, valid = descriptor_folder
    doc = data.draw(st.one_of(mutations(valid), json_values))
    shard = root / "shards" / "000000000004.json"
    try:
        _write(shard, doc)
        _refuses_in_one_line(lambda: Descriptors.load(root, mmap=False))
    finally:
        _write(shard, valid)


def test_single_file_descriptor_meta_loader(tmp_path):
    """The v1 layout (ids in meta.json), through a few fixed mutations of every key."""
    rng = np.random.default_rng(2)
    Descriptors(ids=["a", "b", "c"], vectors=l2_normalize(rng.normal(size=(3, 4))).astype(np.float16)).save(tmp_path)
    valid = json.loads((tmp_path / "meta.json").read_text())
    for key in valid:
        for bad in (None, float("nan"), "x", [1], {"a": 1}, 10 ** 30, True):
            _write(tmp_path / "meta.json", {**valid, key: bad})
            _refuses_in_one_line(lambda: Descriptors.load(tmp_path))


# ----------------------------------------------------------------------------- whitening meta


VALID_WHITENING_META = {"format": "whitening", "format_version": 1, "method": "pca", "power": 0.5, "dim": 4,
                        "shrinkage": 0.5, "n_learn": 20, "notes": ["a note"], "in_dim": 4, "out_dim": 4,
                        "features": "feats/", "source_model": "efficientnet_lite0"}


@SETTINGS
@given(st.one_of(mutations(VALID_WHITENING_META), json_values))
def test_whitening_meta_loader(tmp_path, doc):
    from cbir.whitening import Whitening

    np.savez(tmp_path / "w.npz", meta=np.array(json.dumps(doc)), mean=np.zeros(4), proj=np.eye(4))
    _refuses_in_one_line(lambda: Whitening.load(tmp_path / "w.npz").apply(np.ones((2, 4), np.float32)))


# ----------------------------------------------------------------------------- training config


@SETTINGS
@given(data=st.data())
def test_training_config_loader(data):
    from cbir.training.config import DEFAULTS, TrainConfig

    doc = data.draw(st.one_of(mutations(DEFAULTS), json_values))
    _refuses_in_one_line(lambda: TrainConfig.from_dict(doc))

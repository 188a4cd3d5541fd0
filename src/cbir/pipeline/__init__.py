"""The library chain: benchmark -> descriptors -> whitening/re-ranking -> scores.

    from cbir.pipeline import load_benchmark, describe, score, evaluate
    from cbir.model import ModelSpec
    from cbir.rerank import Rerank

    bench = load_benchmark("demo")                       # or a .pkl, a gt folder, a labelled folder
    q, db = describe(bench, ModelSpec("efficientnet_lite0", "gem"), cache_dir="~/.cache/cbir")
    for qe in (0, 1, 2, 5):                              # described once, scored four times
        print(score(bench, q, db, Rerank(qe=qe))["mAP"])
    res = evaluate("demo", ModelSpec(), rerank=Rerank(qe=2))   # the whole chain in one call

Modules: ``benchmark`` (loading, query selection, default sizes), ``cache`` (where descriptors are
kept, the key), ``describing`` (describe, lookup, describe_poolings, distractors), ``scoring``
(score, evaluate), ``searching`` (a saved index with re-ranking), ``verifying`` (a benchmark's local
features through their cache, and the verifier of spatial verification: ``Rerank(verify=...)``).

Stage objects: ``Benchmark`` (a :class:`cbir.datasets.RetrievalDataset`: image lists, crop boxes,
ground truth, protocol) -> two :class:`cbir.descriptors.Descriptors` (queries cropped to their
box, database) -> a result dict (``mAP``, ``mP``, ``kappas``, ``applied`` re-ranking).

The extraction cache: ``describe(..., cache_dir=DIR)`` reads each image's descriptor from the
per-image store of its (model, weights, settings) key under ``DIR`` and describes only the others,
once each (a whole-image query that is also a database photo runs once); see
:mod:`cbir.pipeline.cache` and :mod:`cbir.cache`. An in-memory ``RetrievalNet`` is never cached
(its weights may change between calls, e.g. during training).

Errors are ordinary exceptions (ValueError, FileNotFoundError, cbir.fileio.FormatError, ...);
nothing here prints or exits.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names -> the module that defines them; imported on first use (PEP 562), so that importing
# ``cbir.pipeline.benchmark`` (the CLI's defaults) does not pull in the re-ranking or the model.
_WHERE = {
    "Benchmark": "benchmark", "DEFAULT_IMSIZE": "benchmark", "DEFAULT_SCALES": "benchmark",
    "DEFAULT_SCALES_TEXT": "benchmark", "extraction_defaults": "benchmark", "load_benchmark": "benchmark",
    "select_queries": "benchmark",
    "DescriptorCache": "cache", "default_cache_dir": "cache",
    "describe": "describing", "describe_poolings": "describing", "lookup": "describing",
    "with_distractors": "describing",
    "evaluate": "scoring", "score": "scoring",
    "find_image": "searching", "search_index": "searching",
    "benchmark_local_features": "verifying", "benchmark_verifier": "verifying",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

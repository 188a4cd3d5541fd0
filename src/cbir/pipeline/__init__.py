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
(score, evaluate), ``searching`` (a saved index with re-ranking).

Stage objects: ``Benchmark`` (a :class:`cbir.datasets.RetrievalDataset`: image lists, crop boxes,
ground truth, protocol) -> two :class:`cbir.descriptors.Descriptors` (queries cropped to their
box, database) -> a result dict (``mAP``, ``mP``, ``kappas``, ``applied`` re-ranking).

The extraction cache: ``describe(..., cache_dir=DIR)`` keeps the descriptors of a benchmark under
``DIR/<key>/{queries,database}`` where ``key`` hashes the model (a model or weights file by its
sha256), the pooling and its parameters, the extraction settings (image size, scales, precision,
device, crop), the image list (path, size and modification time of every file, crop boxes) and the
package's source code. Any change gives another key; a hit reads the saved descriptors and runs no network. An in-memory
``RetrievalNet`` is never cached (its weights may change between calls, e.g. during training).

Errors are ordinary exceptions (ValueError, FileNotFoundError, cbir.fileio.FormatError, ...);
nothing here prints or exits.
"""

from __future__ import annotations

from .benchmark import (
    DEFAULT_IMSIZE, DEFAULT_SCALES, DEFAULT_SCALES_TEXT, Benchmark, extraction_defaults, load_benchmark, select_queries,
)
from .cache import cache_key, code_version, default_cache_dir
from .describing import describe, describe_poolings, lookup, with_distractors
from .scoring import evaluate, score
from .searching import find_image, search_index

__all__ = [
    "Benchmark", "DEFAULT_IMSIZE", "DEFAULT_SCALES", "DEFAULT_SCALES_TEXT", "cache_key", "code_version",
    "default_cache_dir", "describe", "describe_poolings", "evaluate", "extraction_defaults", "find_image",
    "load_benchmark", "lookup", "score", "search_index", "select_queries", "with_distractors",
]

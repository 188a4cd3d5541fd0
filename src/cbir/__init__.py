"""cbir: deep-learning instance image retrieval, as a library.

``import cbir`` is the API: the names below are what a user composes, each typed and documented
where it is defined, and imported on first use (``import cbir`` itself loads neither torch nor
faiss, so ``cbir --help`` stays fast). The stages, in the order a collection goes through them:

- model: `ModelSpec` (settings: backbone, pooling, weights), `build_model`, `load_model`,
  `save_model`, `RetrievalNet`
- descriptors: `describe` (a folder, files, or a benchmark), `describe_images`, `extract` (a network
  and image paths; ``cbir.extract`` is also the module of the extraction names), `extract_to_dir`
  (a resumable, sharded folder), `Descriptors`
- whitening: `Whitening`, `learn_pca_whitening`, `learn_lw`
- re-ranking: `Rerank` (QE, DBA, diffusion, spatial verification: one checked settings object),
  `DiffusionParams`, `VerifyParams`, `Recipe` (a tuned whitening + `Rerank`; shipped ones by name,
  `bundled_recipes`)
- search: `build_index`, `Index`, `Hit`, `open_for_write`, `search_index`
- benchmarks: `load_benchmark`, `Benchmark`, `score`, `evaluate`, `demo_root`
- local features: `extract_local`, `LocalFeatures`, `LocalFeatureSettings`, `LocalFeatureStore`,
  `verify` (match + RANSAC, one pair), `VerifySettings`
- mining and adaptation: `mine`, `MineSettings` (``cbir mine``), ``adapt`` (the
  adaptation package, in installations that have it)
- errors: `FormatError`, `SchemaError`, `ImageError`; `default_cache_dir`

A collection described, indexed, searched with a shipped recipe, and the demo benchmark evaluated:

```python
import cbir

spec = cbir.ModelSpec("efficientnet_lite0", "gem")            # backbone + pooling (weights ship with cbir)
cache = cbir.default_cache_dir()                               # each photo described once, then read back
photos = cbir.describe(cbir.demo_root() / "jpg", spec, scales=[1], cache_dir=cache)  # a folder -> Descriptors
index = cbir.build_index(photos)                               # exact search; index.save("demo.index") keeps it
recipe = cbir.Recipe.load("holidays805-lite0")                 # shipped: whitening + re-ranking tuned on Holidays
hits, applied = cbir.search_index(index, photos.vectors[0], k=5, rerank=recipe)
print([h.path.split("/")[-1] for h in hits])                   # the photo itself first, then its matches
result = cbir.evaluate("demo", spec, rerank=recipe, cache_dir=cache)   # 5 queries, revisitop E / M / H
print(result["mAP"])                                           # about easy 100, medium 97.6, hard 87.6
```

docs/architecture.md maps the stages to their modules; docs/api.md is this page's guide.
"""

from __future__ import annotations

import importlib as _importlib
from pathlib import Path as _Path
from typing import TYPE_CHECKING

# public name -> (module, attribute); attribute None: the module itself
_WHERE: dict[str, tuple[str, str | None]] = {
    # model
    "ModelSpec": ("cbir.model", "ModelSpec"),
    "RetrievalNet": ("cbir.model", "RetrievalNet"),
    "build_model": ("cbir.model", "build_model"),
    "load_model": ("cbir.model", "load_model"),
    "save_model": ("cbir.model", "save_model"),
    # descriptors
    "describe": ("cbir.api", "describe"),
    "describe_images": ("cbir.api", "describe_images"),
    "extract": ("cbir.extract", None),  # a callable module: cbir.extract(net, paths) = cbir.extract.extract
    "extract_to_dir": ("cbir.extraction.job", "extract_to_dir"),
    "Descriptors": ("cbir.descriptors", "Descriptors"),
    # whitening
    "Whitening": ("cbir.whitening", "Whitening"),
    "learn_pca_whitening": ("cbir.whitening", "learn_pca_whitening"),
    "learn_lw": ("cbir.whitening", "learn_lw"),
    # re-ranking
    "Rerank": ("cbir.rerank.compose", "Rerank"),
    "DiffusionParams": ("cbir.rerank.diffusion", "DiffusionParams"),
    "VerifyParams": ("cbir.rerank.verify", "VerifyParams"),
    "Recipe": ("cbir.rerank.recipe", "Recipe"),
    "bundled_recipes": ("cbir.rerank.recipe", "bundled_recipes"),
    # search
    "build_index": ("cbir.api", "build_index"),
    "Index": ("cbir.index.index", "Index"),
    "Hit": ("cbir.index.index", "Hit"),
    "open_for_write": ("cbir.index.writer", "open_for_write"),
    "search_index": ("cbir.pipeline.searching", "search_index"),
    # benchmarks
    "Benchmark": ("cbir.datasets.base", "RetrievalDataset"),
    "load_benchmark": ("cbir.pipeline.benchmark", "load_benchmark"),
    "score": ("cbir.pipeline.scoring", "score"),
    "evaluate": ("cbir.pipeline.scoring", "evaluate"),
    "demo_root": ("cbir.datasets", "demo_root"),
    # local features
    "extract_local": ("cbir.local.features", "extract_local"),
    "LocalFeatures": ("cbir.local.features", "LocalFeatures"),
    "LocalFeatureSettings": ("cbir.local.features", "LocalFeatureSettings"),
    "LocalFeatureStore": ("cbir.local.store", "LocalFeatureStore"),
    "verify": ("cbir.local.verify", "verify"),
    "VerifySettings": ("cbir.local.verify", "VerifySettings"),
    # mining, adaptation
    "mine": ("cbir.sfm.mine", "mine"),
    "MineSettings": ("cbir.sfm.settings", "MineSettings"),
    "adapt": ("cbir.adapt", None),
    # errors, places
    "FormatError": ("cbir.fileio", "FormatError"),
    "SchemaError": ("cbir.schema", "SchemaError"),
    "ImageError": ("cbir.extraction.images", "ImageError"),
    "default_cache_dir": ("cbir.cache.digest", "default_cache_dir"),
}

_HERE = _Path(__file__).resolve().parent


def _installed(module: str) -> bool:
    """Whether a cbir submodule exists in this installation, without importing it (``cbir.adapt``
    arrives with its own branch)."""
    rel = _Path(*module.split(".")[1:])
    return (_HERE / rel).with_suffix(".py").is_file() or (_HERE / rel / "__init__.py").is_file()


#: The public names (those whose module is installed), sorted.
__all__ = sorted(name for name, (module, _) in _WHERE.items() if _installed(module))


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (PEP 562); ``__version__`` from the
    installed package's metadata (the lookup scans every installed distribution: ~0.1-0.2 s that
    `cbir search` does not pay)."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("cbir")  # the installed package's metadata (pyproject.toml)
        except PackageNotFoundError:  # run from a source tree that was never installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    if name not in _WHERE:
        raise AttributeError(f"module 'cbir' has no attribute {name!r}")
    module, attr = _WHERE[name]
    if not _installed(module):
        raise AttributeError(f"cbir.{name} is not part of this installation ({module} is missing)")
    mod = _importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # found directly next time (a submodule has bound itself already)
    return value


def __dir__() -> list[str]:
    """The public names and the module's own dunders (not the helpers of this file)."""
    return sorted(set(__all__) | {"__version__"} | {n for n in globals() if n.startswith("__")})


if TYPE_CHECKING:  # what static checkers and editors see; nothing of it runs
    from . import adapt as adapt, extract as extract
    from .api import build_index, describe, describe_images
    from .cache.digest import default_cache_dir
    from .datasets import demo_root
    from .datasets.base import RetrievalDataset as Benchmark
    from .descriptors import Descriptors
    from .extraction.images import ImageError
    from .extraction.job import extract_to_dir
    from .fileio import FormatError
    from .index.index import Hit, Index
    from .index.writer import open_for_write
    from .local.features import LocalFeatures, LocalFeatureSettings, extract_local
    from .local.store import LocalFeatureStore
    from .local.verify import VerifySettings, verify
    from .model import ModelSpec, RetrievalNet, build_model, load_model, save_model
    from .pipeline.benchmark import load_benchmark
    from .pipeline.scoring import evaluate, score
    from .pipeline.searching import search_index
    from .rerank.compose import Rerank
    from .rerank.diffusion import DiffusionParams
    from .rerank.recipe import Recipe, bundled_recipes
    from .rerank.verify import VerifyParams
    from .schema import SchemaError
    from .sfm.mine import mine
    from .sfm.settings import MineSettings
    from .whitening import Whitening, learn_lw, learn_pca_whitening

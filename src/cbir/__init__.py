"""cbir: deep-learning instance image retrieval.

Pipeline: images -> backbones -> pooling -> (whitening) -> Descriptors -> index -> rerank -> evaluation
(``cbir.pipeline`` runs the chain; docs/architecture.md maps the stages).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cbir")  # the installed package's metadata (pyproject.toml)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

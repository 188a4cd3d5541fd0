"""Online post-processing of a ranking: query expansion (AQE, alpha-QE, DBA) and diffusion.

- :mod:`cbir.rerank.knn`       top-k of a score matrix, faiss k-nearest-neighbour search
- :mod:`cbir.rerank.qe`        average / alpha-weighted query expansion, database-side augmentation
- :mod:`cbir.rerank.diffusion` kNN affinity graph, diffusion by conjugate gradient (Iscen et al.
  CVPR'17), truncated and offline forms (Yang et al. AAAI'19)
- :mod:`cbir.rerank.compose`   ``Rerank`` (one checked settings object) and ``rerank()`` composing the steps
- :mod:`cbir.rerank.recipe`    a tuned whitening + Rerank saved as a versioned file; :mod:`cbir.rerank.tune` the search

The command-line options that fill a ``Rerank`` live in ``cbir.cli.rerank_options`` (argparse stays in ``cli/``).
"""

from .knn import knn_search, topk
from .qe import alpha_qe, average_qe, dba
from .diffusion import (
    DiffusionOptions,
    DiffusionParams,
    OfflineDiffusion,
    diffusion_scores,
    knn_graph,
    normalize_graph,
)
from .compose import ALPHA, DBA_K, QE_K, Rerank, rerank

__all__ = [
    "alpha_qe",
    "average_qe",
    "dba",
    "topk",
    "knn_search",
    "DiffusionOptions",
    "DiffusionParams",
    "OfflineDiffusion",
    "diffusion_scores",
    "knn_graph",
    "normalize_graph",
    "ALPHA",
    "DBA_K",
    "QE_K",
    "Rerank",
    "rerank",
]

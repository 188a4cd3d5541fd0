"""Online post-processing of a ranking: query expansion (AQE, alpha-QE, DBA) and diffusion.

- :mod:`cbir.rerank.knn`       top-k of a score matrix, faiss k-nearest-neighbour search
- :mod:`cbir.rerank.qe`        average / alpha-weighted query expansion, database-side augmentation
- :mod:`cbir.rerank.diffusion` kNN affinity graph, diffusion by conjugate gradient (Iscen et al.
  CVPR'17), truncated and offline forms (Yang et al. AAAI'19)
- :mod:`cbir.rerank.compose`   ``Rerank`` (one settings object) and ``rerank()`` composing the steps
- :mod:`cbir.rerank.recipe`    a tuned whitening + Rerank saved as a versioned file; :mod:`cbir.rerank.tune` the search
- :mod:`cbir.rerank.options`   the ``--whiten/--qe/--alpha-qe/--dba/--diffusion`` options shared by
  ``cbir evaluate`` and ``cbir search`` and the function composing them
"""

from .knn import knn_search, topk
from .qe import alpha_qe, average_qe, dba
from .diffusion import (
    DiffusionParams,
    OfflineDiffusion,
    diffusion_scores,
    knn_graph,
    normalize_graph,
)
from .options import add_arguments, rerank, rerank_from_args

__all__ = [
    "alpha_qe",
    "average_qe",
    "dba",
    "topk",
    "knn_search",
    "DiffusionParams",
    "OfflineDiffusion",
    "diffusion_scores",
    "knn_graph",
    "normalize_graph",
    "add_arguments",
    "rerank",
    "rerank_from_args",
]

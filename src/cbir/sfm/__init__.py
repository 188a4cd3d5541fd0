"""Mining training data from unlabelled photos (the classical half of the method, Radenović et al.,
TPAMI'18 "Fine-tuning CNN image retrieval with no human annotation"), and cleaning labelled data by
spatial verification.

- :mod:`cbir.sfm.settings`    ``PairSettings``, ``MineSettings`` (strict schemas, stored with the run)
- :mod:`cbir.sfm.pairs`       candidate pairs: each photo's k nearest neighbours by global descriptor
- :mod:`cbir.sfm.graph`       the verified-pair graph, its clusters, weak bridges cut
- :mod:`cbir.sfm.verified`    ``verified_pairs(paths, settings, work_dir) -> VerifiedPairs`` (resumable)
- :mod:`cbir.sfm.reconstruct` COLMAP database + pycolmap incremental mapping per cluster, shared 3D points
- :mod:`cbir.sfm.tuples`      the retrieval-SfM tuple file with inlier counts and shared 3D points
- :mod:`cbir.sfm.mine`        ``mine(folder, out, settings)``: the whole of ``cbir mine``
- :mod:`cbir.sfm.clean`       ``clean_by_verification``: drop photos that verify with no class-mate

Importing this package is light (torch, pycolmap, networkx are imported where used).
"""

from .settings import MineSettings, PairSettings

__all__ = ["MineSettings", "PairSettings"]

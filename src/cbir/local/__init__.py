"""Local features and geometric verification (the classical half of the method), through pycolmap.

- :mod:`cbir.local.features` SIFT / RootSIFT of one image (``LocalFeatureSettings``, ``LocalFeatures``,
  ``extract_local``)
- :mod:`cbir.local.store`    ``LocalFeatureStore``: the features of a collection (sharded, resumable,
  atomic, versioned, memory-mapped) and ``extract_to_store``
- :mod:`cbir.local.verify`   matching (ratio test + cross check) and geometric verification (inlier
  counts), one pair, one query against its candidates, or a list of pairs

pycolmap is imported inside the functions: importing this package stays light.
"""

from .features import LocalFeatures, LocalFeatureSettings, extract_local

__all__ = ["LocalFeatures", "LocalFeatureSettings", "extract_local"]

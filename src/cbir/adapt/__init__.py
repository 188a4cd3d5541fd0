"""``cbir adapt``: a recipe (learned whitening + re-ranking) for a collection nobody labelled.

- :mod:`cbir.adapt.settings` ``AdaptSettings`` (strict schema: mining, positives, Lw, search)
- :mod:`cbir.adapt.pseudo`   pseudo ground truth from verified pairs, cluster folds, matching pairs
- :mod:`cbir.adapt.work`     where the mining work is kept (under the cache folder)
- :mod:`cbir.adapt.run`      ``adapt(folder, settings) -> (Recipe, AdaptReport)``

Importing this package is light (numpy only; torch, pycolmap are imported where used).
"""

from .run import AdaptReport, TooFewPairs, adapt
from .settings import AdaptSettings

__all__ = ["adapt", "AdaptSettings", "AdaptReport", "TooFewPairs"]

"""Model names without torch: a backbone name or a model file, the ``--pooling NAME:k=v`` text and
the poolings' descriptions (:data:`POOLING_HELP`).

Kept apart from :mod:`cbir.model` (which imports torch, timm and torchvision) so that the command
line and the extraction cache's key (:mod:`cbir.cache.identity`) read them in a process that
imports torch only if a network must run; :mod:`cbir.model` re-exports both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["is_model_file", "parse_pooling", "POOLING_HELP", "pooling_option_help"]

#: Every pooling of :data:`cbir.pooling.POOLINGS` (same names, same order) with its parameters, in words:
#: ``cbir models`` lists them and ``--pooling``'s help is made from them (:func:`pooling_option_help`).
POOLING_HELP: dict[str, str] = {
    "spoc": "sum/average pooling (Babenko & Lempitsky 2015)",
    "mac": "max pooling (Tolias et al. 2016)",
    "gem": "generalized mean, learnable p (Radenović et al. 2018): p=3; one p per channel: per_channel=1",
    "rmac": "regional MAC over L=3 scales, ~40% overlap (Tolias et al. 2016)",
    "regional": "R-MAC regions with any base pooling: base=gem|spoc|crow|..., levels=3",
    "crow": "cross-dimensional weighting, a=2 b=2 (Kalantidis et al. 2016)",
    "bow": "bag of visual words over local conv features: k=1024 k-means words, tf-idf; soft=1: differentiable",
}


def pooling_option_help(default: str = "gem") -> str:
    """The help text of ``--pooling``: the form and the names of :data:`POOLING_HELP`."""
    return (f"pooling and its parameters, NAME[:key=value,...], e.g. gem:p=4: {', '.join(POOLING_HELP)} "
            f"(`cbir models` says what each is and takes; default: {default})")


# "A backbone name or a model file": the one place that tells them apart


def is_model_file(name: str | os.PathLike[str]) -> bool:
    """True when ``name`` means a model file saved by cbir (an existing file, or a .pt/.pth name)
    rather than a backbone name such as ``resnet50``."""
    path = Path(name)
    return path.suffix in (".pt", ".pth") or path.is_file()


def parse_pooling(text: str) -> tuple[str, dict[str, Any]]:
    """``"gem:p=4,per_channel=1"`` -> ``("gem", {"p": 4, "per_channel": 1})``; values become
    bool (true/false/yes/no/on/off), int or float where they read as one. ValueError when malformed."""
    name, _, rest = str(text).partition(":")
    kw: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"pooling parameters must be key=value, got {item!r} in {text!r}")
        kw[key.strip()] = _value(value.strip())
    if not name.strip():
        raise ValueError(f"no pooling name in {text!r}")
    return name.strip().lower(), kw


def _value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v

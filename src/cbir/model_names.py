"""Model names without torch: a backbone name or a model file, and the ``--pooling NAME:k=v`` text.

Kept apart from :mod:`cbir.model` (which imports torch, timm and torchvision) so that the command
line and the extraction cache's key (:mod:`cbir.cache.identity`) read them in a process that
imports torch only if a network must run; :mod:`cbir.model` re-exports both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["is_model_file", "parse_pooling"]


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

"""Inference backends for ``net.pool`` (backbone + pooling + L2) in the extraction loop.

- ``"torch"``: eager PyTorch (under the loop's autocast), the default everywhere.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["BACKENDS", "pool_function"]

BACKENDS = ("torch",)


def pool_function(model, dev: torch.device, backend: str, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B,3,H,W) -> (B,D) pooled, L2-normalised descriptors computed by ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return model.pool

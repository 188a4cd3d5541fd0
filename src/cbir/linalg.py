"""Small vector math shared by every stage (no file formats, no I/O)."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm ``x / max(||x||_2, eps)`` (zero rows stay zero).

    Shape (N, D) -> (N, D) float32 (any leading shape: the last axis is normalised).
    """
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)

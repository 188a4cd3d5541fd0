"""Global pooling of a feature map X (B, C, H, W) into one vector per image (B, C) or (B, K).

Pure functions first (the math, one formula each), thin ``nn.Module`` wrappers after, and a name
registry: ``build_pooling("gem", p=3.0)``. Outputs are *not* L2-normalised here; RetrievalNet does
that at the stage boundary.

References: SPoC (Babenko & Lempitsky, ICCV'15), MAC/R-MAC (Tolias, Sicre & Jégou, ICLR'16),
GeM (Radenović, Tolias & Chum, TPAMI'18), CroW (Kalantidis, Mellina & Osindero, ECCVW'16),
BoW of CNN features (Mohedano et al., ICMR'16; soft assignment as in NetVLAD/NetBoW).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model_names import POOLING_HELP  # noqa: F401 (re-exported: one text per pooling, torch-free for the CLI)

__all__ = [
    "spoc", "mac", "gem", "rmac_regions", "regional", "rmac", "crow_spatial_weights",
    "crow_channel_weights", "crow", "local_features", "bow_hard", "bow_soft", "fit_codebook",
    "Pooling", "SPoC", "MAC", "GeM", "RMAC", "Regional", "CroW", "BoW", "POOLINGS", "POOLING_HELP", "build_pooling",
    "bow_idf",
]


# --------------------------------------------------------------------------------------------
# Pure functions


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooling (as a mean): f_c = 1/(HW) Σ_ij X_cij.  (B,C,H,W) -> (B,C)."""
    return x.mean(dim=(-2, -1))


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: f_c = max_ij X_cij.  (B,C,H,W) -> (B,C)."""
    return x.amax(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalized mean: f_c = (1/(HW) Σ_ij max(X_cij, eps)^p_c)^(1/p_c).  (B,C,H,W) -> (B,C).

    ``p`` is a scalar or a per-channel (C,) tensor; p=1 is SPoC (on positive maps), p -> ∞ is MAC.
    """
    p = torch.as_tensor(p, dtype=x.dtype, device=x.device)
    pc = p.reshape(-1, 1, 1) if p.ndim else p
    pooled = x.clamp(min=eps).pow(pc).mean(dim=(-2, -1))
    return pooled.pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (Tolias et al.) of an h×w map as (top, left, height, width), level 1 first.

    Level l has square regions of side s_l = 2·min(h,w)/(l+1) (level 1: the largest square), laid
    uniformly on an l × (l+m−1) grid (more along the longer side); m ≥ 0 is chosen once so that
    consecutive level-1 regions along the longer side overlap by as close to ``overlap`` as possible.
    """
    short, long_ = min(h, w), max(h, w)
    if short < 1:
        raise ValueError(f"empty feature map {h}x{w}")
    best_m, best_err = 0, abs(1.0 - overlap) if long_ > short else 0.0
    if long_ > short:
        best_err = math.inf
        for m in range(1, 7):
            step = (long_ - short) / m  # m+1 regions of side `short`
            err = abs((short - step) / short - overlap)
            if err < best_err:
                best_m, best_err = m, err
    regions: list[tuple[int, int, int, int]] = []
    for level in range(1, levels + 1):
        side = max(1, int(round(2.0 * short / (level + 1))))
        n_short, n_long = level, level + best_m
        starts_short = np.linspace(0, short - side, n_short) if n_short > 1 else np.array([(short - side) / 2])
        starts_long = np.linspace(0, long_ - side, n_long) if n_long > 1 else np.array([(long_ - side) / 2])
        for a in np.round(starts_short).astype(int):
            for b in np.round(starts_long).astype(int):
                top, left = (int(b), int(a)) if h > w else (int(a), int(b))
                regions.append((top, left, side, side))
    return regions


def regional(
    x: torch.Tensor,
    regions: list[tuple[int, int, int, int]],
    base: Callable[[torch.Tensor], torch.Tensor] = mac,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Regional pooling: Σ_r base(X[r]) / ||base(X[r])||₂ over the given regions.  (B,C,H,W) -> (B,C)."""
    out = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for top, left, rh, rw in regions:
        v = base(x[..., top:top + rh, left:left + rw])
        out = out + v / v.norm(dim=-1, keepdim=True).clamp(min=eps)
    return out


def rmac(x: torch.Tensor, levels: int = 3, overlap: float = 0.4) -> torch.Tensor:
    """R-MAC: sum of L2-normalised MAC vectors of the ``rmac_regions`` of X.  (B,C,H,W) -> (B,C)."""
    return regional(x, rmac_regions(x.shape[-2], x.shape[-1], levels, overlap), mac)


def crow_spatial_weights(x: torch.Tensor, a: float = 2.0, b: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """CroW spatial weights: S = Σ_c X_c;  S'_ij = (S_ij / (Σ_mn S_mn^a)^(1/a))^(1/b).  (B,C,H,W) -> (B,H,W)."""
    s = x.sum(dim=1)
    norm = s.pow(a).sum(dim=(-2, -1), keepdim=True).pow(1.0 / a)
    return (s / norm.clamp(min=eps)).pow(1.0 / b)


def crow_channel_weights(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """CroW channel weights: Q_k = fraction of positions with X_k > 0;
    Ω_k = log((K·eps + Σ_h Q_h) / (eps + Q_k)).  (B,K,H,W) -> (B,K)."""
    q = (x > 0).to(x.dtype).mean(dim=(-2, -1))
    k = x.shape[1]
    return torch.log((k * eps + q.sum(dim=1, keepdim=True)) / (eps + q))


def crow(x: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """CroW: f_k = Ω_k · Σ_ij S'_ij X_kij (maps are clamped at 0 first).  (B,C,H,W) -> (B,C)."""
    x = x.clamp(min=0)
    s = crow_spatial_weights(x, a, b)
    return (x * s.unsqueeze(1)).sum(dim=(-2, -1)) * crow_channel_weights(x)


def local_features(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The H·W local descriptors of a map, each L2-normalised.  (B,C,H,W) -> (B,H·W,C)."""
    f = x.flatten(2).transpose(1, 2)
    return f / f.norm(dim=-1, keepdim=True).clamp(min=eps)


def bow_hard(x: torch.Tensor, codebook: torch.Tensor, idf: torch.Tensor | None = None) -> torch.Tensor:
    """Hard-assignment BoW: tf_k = #{local features whose nearest centroid is k} / (H·W), times idf_k.
    (B,C,H,W), codebook (K,C), idf (K,) -> (B,K)."""
    f = local_features(x)
    d = torch.cdist(f, codebook.to(f.dtype).unsqueeze(0).expand(f.shape[0], -1, -1))
    words = d.argmin(dim=-1)  # (B, HW)
    tf = F.one_hot(words, codebook.shape[0]).to(x.dtype).mean(dim=1)
    return tf * idf.to(tf.dtype) if idf is not None else tf


def bow_soft(x: torch.Tensor, codebook: torch.Tensor, idf: torch.Tensor | None = None, temperature: float = 0.05) -> torch.Tensor:
    """Differentiable BoW: tf_k = mean_ij softmax_k(−||f_ij − c_k||² / T), times idf_k.
    (B,C,H,W), codebook (K,C), idf (K,) -> (B,K). As T -> 0 it tends to ``bow_hard``."""
    f = local_features(x)
    d2 = torch.cdist(f, codebook.to(f.dtype).unsqueeze(0).expand(f.shape[0], -1, -1)).pow(2)
    tf = torch.softmax(-d2 / temperature, dim=-1).mean(dim=1)
    return tf * idf.to(tf.dtype) if idf is not None else tf


def bow_idf(histograms: np.ndarray) -> np.ndarray:
    """idf_k = log(N / (1 + n_k)) with n_k the number of the N images using word k.  (N,K) -> (K,)."""
    n = histograms.shape[0]
    used = (histograms > 0).sum(axis=0)
    return np.log(n / (1.0 + used)).clip(min=0.0).astype(np.float32)


def fit_codebook(local: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> np.ndarray:
    """k-means (faiss) centroids of L2-normalised local features (M, C) -> (k, C) float32."""
    import faiss

    local = np.ascontiguousarray(local, dtype=np.float32)
    if local.shape[0] < k:
        raise ValueError(f"need at least k={k} local features to fit a codebook, got {local.shape[0]}")
    km = faiss.Kmeans(local.shape[1], k, niter=iters, seed=seed, verbose=False)
    km.train(local)
    return np.asarray(km.centroids, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Modules


class Pooling(nn.Module):
    name = ""

    def params(self) -> dict:
        """Plain-data parameters (for meta.json and to rebuild with ``build_pooling``)."""
        return {}

    def multiscale_p(self) -> float:
        """The exponent of the generalized mean that combines scales (GeM: its p; else 1)."""
        return 1.0


class SPoC(Pooling):
    name = "spoc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


class MAC(Pooling):
    name = "mac"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class GeM(Pooling):
    """GeM with a learnable p: scalar (``channels=None``) or one p per channel."""

    name = "gem"

    def __init__(self, p: float = 3.0, channels: int | None = None, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        init = torch.full((channels,) if channels else (1,), float(p))
        self.p = nn.Parameter(init, requires_grad=learnable)
        self.per_channel = channels is not None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p if self.per_channel else self.p[0], self.eps)

    def params(self) -> dict:
        out: dict = {"p": round(float(self.p.detach().mean()), 4)}
        if self.per_channel:
            out["channels"] = int(self.p.numel())
        return out

    def multiscale_p(self) -> float:
        return float(self.p.detach().mean())


class Regional(Pooling):
    """Regional pooling over R-MAC regions with any base pooling (``base``: a registry name)."""

    name = "regional"

    def __init__(self, base: str = "mac", levels: int = 3, overlap: float = 0.4, **base_kw):
        super().__init__()
        self.base = build_pooling(base, **base_kw)
        self.levels, self.overlap = levels, overlap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return regional(x, rmac_regions(x.shape[-2], x.shape[-1], self.levels, self.overlap), self.base)

    def params(self) -> dict:
        return {"base": self.base.name, "levels": self.levels, "overlap": self.overlap, **self.base.params()}


class RMAC(Pooling):
    name = "rmac"

    def __init__(self, levels: int = 3, overlap: float = 0.4):
        super().__init__()
        self.levels, self.overlap = levels, overlap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmac(x, self.levels, self.overlap)

    def params(self) -> dict:
        return {"levels": self.levels, "overlap": self.overlap}


class CroW(Pooling):
    name = "crow"

    def __init__(self, a: float = 2.0, b: float = 2.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crow(x, self.a, self.b)

    def params(self) -> dict:
        return {"a": self.a, "b": self.b}


class BoW(Pooling):
    """Bag of visual words over local conv features; ``codebook`` (K,C) and ``idf`` (K,) buffers.

    ``soft=True`` uses the differentiable soft assignment (``temperature``). Until a codebook is
    set (``set_codebook``) the module refuses to run.
    """

    name = "bow"

    def __init__(self, k: int = 1024, channels: int | None = None, soft: bool = False, temperature: float = 0.05):
        super().__init__()
        self.k, self.soft, self.temperature = int(k), bool(soft), float(temperature)
        c = channels or 1
        self.register_buffer("codebook", torch.zeros(self.k, c))
        self.register_buffer("idf", torch.ones(self.k))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def set_codebook(self, codebook: torch.Tensor | np.ndarray, idf: torch.Tensor | np.ndarray | None = None) -> None:
        cb = torch.as_tensor(np.asarray(codebook), dtype=torch.float32)
        if cb.ndim != 2 or cb.shape[0] != self.k:
            raise ValueError(f"codebook must be ({self.k}, C), got {tuple(cb.shape)}")
        self.codebook = cb.to(self.codebook.device)
        self.idf = (torch.ones(self.k) if idf is None else torch.as_tensor(np.asarray(idf), dtype=torch.float32)).to(cb.device)
        self.fitted = torch.ones((), dtype=torch.bool)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # accept any codebook width
        key = prefix + "codebook"
        if key in state_dict:
            self.codebook = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("BoW pooling has no codebook yet: fit one (cbir extract fits it, or --codebook FILE)")
        if x.shape[1] != self.codebook.shape[1]:
            raise ValueError(f"BoW codebook has {self.codebook.shape[1]} dims, feature map has {x.shape[1]} channels")
        if self.soft:
            return bow_soft(x, self.codebook, self.idf, self.temperature)
        return bow_hard(x, self.codebook, self.idf)

    def params(self) -> dict:
        return {"k": self.k, "soft": self.soft, **({"temperature": self.temperature} if self.soft else {})}


POOLINGS: dict[str, type[Pooling]] = {
    "spoc": SPoC,
    "mac": MAC,
    "gem": GeM,
    "rmac": RMAC,
    "regional": Regional,
    "crow": CroW,
    "bow": BoW,
}

def build_pooling(name: str, **kw) -> Pooling:
    """Pooling module by registry name with its keyword parameters."""
    key = name.lower()
    if key not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}")
    try:
        return POOLINGS[key](**kw)
    except TypeError as exc:
        raise ValueError(f"bad parameters for pooling {name!r}: {exc}") from exc

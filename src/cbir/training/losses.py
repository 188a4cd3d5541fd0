"""Metric-learning losses for retrieval descriptors: contrastive, triplet, listwise average precision.

All descriptors are expected L2-normalised, so ``‖a − b‖² = 2 − 2·aᵀb``. Each loss is a small pure
function over tensors; the ``nn.Module`` classes at the end only hold the hyper-parameters.

* Contrastive (Radenović, Tolias, Chum, "Fine-tuning CNN image retrieval with no human
  annotation", TPAMI 2018): a positive pair costs ``½‖a−p‖²``, a negative pair
  ``½·max(0, m − ‖a−n‖)²``.
* Triplet (Schroff et al. 2015 / Gordo et al. 2017, on squared distances):
  ``max(0, ‖a−p‖² − ‖a−n‖² + m)``.
* Listwise AP (Revaud, Almazán, Rezende, de Souza, "Learning with Average Precision: Training
  Image Retrieval with a Listwise Loss", ICCV 2019): similarities are softly binned into ``M`` bins
  with triangular kernels; AP is computed from the binned precision and incremental recall, and the
  loss is ``1 − mAP`` over the batch's queries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "contrastive_pair_losses",
    "contrastive_loss",
    "triplet_loss",
    "soft_bin_assign",
    "binned_average_precision",
    "ap_loss",
    "average_precision",
    "ContrastiveLoss",
    "TripletLoss",
    "APLoss",
    "build_loss",
]


def _check_tuple_shapes(q: Tensor, p: Tensor, n: Tensor) -> None:
    if q.ndim != 2 or p.shape != q.shape:
        raise ValueError(f"anchors and positives must both be (B, D); got {tuple(q.shape)} and {tuple(p.shape)}")
    if n.ndim != 3 or n.shape[0] != q.shape[0] or n.shape[2] != q.shape[1]:
        raise ValueError(f"negatives must be (B, K, D) = ({q.shape[0]}, K, {q.shape[1]}); got {tuple(n.shape)}")


def contrastive_pair_losses(a: Tensor, b: Tensor, positive: Tensor, margin: float) -> Tensor:
    """Per-pair contrastive cost. a, b: (N, D); positive: (N,) bool -> (N,).

    ``½‖a−b‖²`` where ``positive`` else ``½·max(0, margin − ‖a−b‖)²`` (Radenović et al. 2018).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pairs must be two (N, D) tensors of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    d = (a - b).norm(dim=1)
    pos = positive.to(torch.bool)
    return torch.where(pos, 0.5 * d.pow(2), 0.5 * (margin - d).clamp(min=0).pow(2))


def contrastive_loss(q: Tensor, p: Tensor, n: Tensor, margin: float = 0.75) -> Tensor:
    """Contrastive loss of a batch of tuples: mean over tuples of the tuple's summed pair costs.

    q, p: (B, D) anchors and positives; n: (B, K, D) negatives. Each tuple contributes
    ``½‖q−p‖² + Σ_k ½·max(0, margin − ‖q−n_k‖)²`` (as one cirtorch tuple); the result is the
    mean over the B tuples (a scalar).
    """
    _check_tuple_shapes(q, p, n)
    pos = 0.5 * (q - p).pow(2).sum(dim=1)
    dn = (q.unsqueeze(1) - n).norm(dim=2)
    neg = 0.5 * (margin - dn).clamp(min=0).pow(2)
    return (pos + neg.sum(dim=1)).mean()


def triplet_loss(q: Tensor, p: Tensor, n: Tensor, margin: float = 0.1) -> Tensor:
    """Triplet loss on squared distances, mean over the B·K triplets (q, p, n_k).

    q, p: (B, D); n: (B, K, D). ``max(0, ‖q−p‖² − ‖q−n_k‖² + margin)``.
    """
    _check_tuple_shapes(q, p, n)
    dp = (q - p).pow(2).sum(dim=1, keepdim=True)  # (B, 1)
    dn = (q.unsqueeze(1) - n).pow(2).sum(dim=2)  # (B, K)
    return (dp - dn + margin).clamp(min=0).mean()


def soft_bin_assign(scores: Tensor, nbins: int, smin: float = -1.0, smax: float = 1.0) -> Tensor:
    """Triangular-kernel soft assignment of scores to ``nbins`` bins, highest bin first.

    scores: (...,) -> (..., M). Bin centres ``b_m = smax − (m−1)·Δ``, ``Δ = (smax−smin)/(M−1)``;
    ``δ(s, m) = max(0, 1 − |s − b_m|/Δ)`` (Revaud et al. 2019, eq. 4). Scores are clamped to
    [smin, smax], so every score's weights sum to 1.
    """
    if nbins < 2:
        raise ValueError(f"nbins must be >= 2, got {nbins}")
    if not smax > smin:
        raise ValueError(f"need smax > smin, got [{smin}, {smax}]")
    delta = (smax - smin) / (nbins - 1)
    centres = torch.linspace(smax, smin, nbins, device=scores.device, dtype=scores.dtype)
    s = scores.clamp(smin, smax).unsqueeze(-1)
    return (1 - (s - centres).abs() / delta).clamp(min=0)


def binned_average_precision(
    scores: Tensor, labels: Tensor, nbins: int = 25, smin: float = -1.0, smax: float = 1.0
) -> Tensor:
    """Differentiable histogram AP of each query (Revaud et al. 2019, eq. 5–7).

    scores: (Q, N) similarities of each query to N items; labels: (Q, N), 1 for relevant items.
    ``P_m = Σ_{m'≤m} δ(S,m')ᵀY / Σ_{m'≤m} δ(S,m')ᵀ1``, ``r_m = δ(S,m)ᵀY / N⁺``,
    ``AP = Σ_m P_m·r_m``. Returns (Q,); a query with no relevant item gets NaN.
    """
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores and labels must both be (Q, N); got {tuple(scores.shape)} and {tuple(labels.shape)}")
    y = labels.to(scores.dtype)
    delta = soft_bin_assign(scores, nbins, smin, smax)  # (Q, N, M)
    pos_per_bin = (delta * y.unsqueeze(-1)).sum(dim=1)  # (Q, M)
    all_per_bin = delta.sum(dim=1)  # (Q, M)
    cum_pos = pos_per_bin.cumsum(dim=1)
    cum_all = all_per_bin.cumsum(dim=1)
    precision = cum_pos / cum_all.clamp(min=1e-12)
    npos = y.sum(dim=1, keepdim=True)
    recall_inc = pos_per_bin / npos  # NaN row when npos == 0
    return (precision * recall_inc).sum(dim=1)


def ap_loss(scores: Tensor, labels: Tensor, nbins: int = 25, smin: float = -1.0, smax: float = 1.0) -> Tensor:
    """Listwise AP loss ``1 − mean_q AP_q`` over the queries that have at least one relevant item.

    scores, labels: (Q, N). Raises if no query has a relevant item.
    """
    ap = binned_average_precision(scores, labels, nbins, smin, smax)
    valid = labels.sum(dim=1) > 0
    if not bool(valid.any()):
        raise ValueError("AP loss: no query in the batch has a relevant item")
    return 1 - ap[valid].mean()


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Exact (non-interpolated) AP of each query, for reference: mean over relevant items of the
    precision at their rank in the list sorted by decreasing score. scores, labels: (Q, N) -> (Q,)."""
    order = scores.argsort(dim=1, descending=True)
    y = labels.to(torch.float64).gather(1, order)
    ranks = torch.arange(1, y.shape[1] + 1, dtype=torch.float64, device=y.device)
    prec = y.cumsum(dim=1) / ranks
    return (prec * y).sum(dim=1) / y.sum(dim=1)


class ContrastiveLoss(nn.Module):
    """Thin wrapper of :func:`contrastive_loss` (forward(q, p, n))."""

    def __init__(self, margin: float = 0.75) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, q: Tensor, p: Tensor, n: Tensor) -> Tensor:
        return contrastive_loss(q, p, n, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class TripletLoss(nn.Module):
    """Thin wrapper of :func:`triplet_loss` (forward(q, p, n))."""

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, q: Tensor, p: Tensor, n: Tensor) -> Tensor:
        return triplet_loss(q, p, n, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class APLoss(nn.Module):
    """Listwise AP loss over a batch of tuples.

    forward(q, p, n) ranks, for each anchor, every other descriptor of the batch (all anchors,
    positives and negatives except itself) and labels as relevant the items of the anchor's own
    cluster, which the caller passes as ``clusters`` (one id per row of ``cat([q, p, n…])``);
    without it, only the anchor's own positive is relevant. ``forward_scores(scores, labels)`` is
    the plain listwise form.
    """

    def __init__(self, nbins: int = 25, smin: float = -1.0, smax: float = 1.0) -> None:
        super().__init__()
        self.nbins, self.smin, self.smax = int(nbins), float(smin), float(smax)

    def forward_scores(self, scores: Tensor, labels: Tensor) -> Tensor:
        return ap_loss(scores, labels, self.nbins, self.smin, self.smax)

    def forward(self, q: Tensor, p: Tensor, n: Tensor, clusters: Tensor | None = None) -> Tensor:
        _check_tuple_shapes(q, p, n)
        b, k, _ = n.shape
        allx = torch.cat([q, p, n.reshape(b * k, -1)], dim=0)  # rows: B anchors, B positives, B·K negatives
        if clusters is None:
            # Each tuple its own cluster for its anchor and positive; negatives unique.
            clusters = torch.cat(
                [torch.arange(b), torch.arange(b), b + torch.arange(b * k)]
            ).to(q.device)
        if clusters.shape != (allx.shape[0],):
            raise ValueError(f"clusters must be ({allx.shape[0]},), got {tuple(clusters.shape)}")
        scores = q @ allx.T  # (B, 2B + BK)
        labels = clusters[:b].unsqueeze(1) == clusters.unsqueeze(0)
        not_self = torch.ones_like(labels)
        not_self[torch.arange(b), torch.arange(b)] = False
        # drop self-similarity columns: mask them out by building each row without its anchor
        scores = scores[not_self].reshape(b, -1)
        labels = labels[not_self].reshape(b, -1)
        return ap_loss(scores, labels, self.nbins, self.smin, self.smax)

    def extra_repr(self) -> str:
        return f"nbins={self.nbins}, range=[{self.smin}, {self.smax}]"


def build_loss(name: str, **kwargs: float) -> nn.Module:
    """Loss module by name: "contrastive" (margin), "triplet" (margin), "ap" (nbins, smin, smax)."""
    table = {"contrastive": ContrastiveLoss, "triplet": TripletLoss, "ap": APLoss}
    if name not in table:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(table)}")
    return table[name](**kwargs)

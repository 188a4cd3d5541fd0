"""The re-ranking options shared by ``cbir evaluate`` and ``cbir search``, and their composition.

Order (the standard one, Radenovic et al. TPAMI'18 / Iscen et al. CVPR'17):
``whiten -> DBA -> search -> alpha-QE / average QE -> diffusion``.

Callers::

    from cbir.rerank.options import add_arguments, rerank_from_args
    add_arguments(parser)                       # in register()
    scores, applied = rerank_from_args(args, q, db)   # in the handler; applied -> JSON
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..linalg import l2_normalize
from .diffusion import DiffusionParams, diffusion_scores, knn_graph
from .qe import alpha_qe, dba

_DEF = DiffusionParams()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the re-ranking options (group "re-ranking") to an argparse parser."""
    g = parser.add_argument_group(
        "re-ranking", "applied in this order: whiten -> DBA -> search -> QE -> diffusion"
    )
    g.add_argument("--whiten", metavar="FILE", default=None,
                   help="apply a whitening learned by `cbir whiten` to queries and database (then L2)")
    g.add_argument("--dba", metavar="K", type=int, default=0,
                   help="database-side augmentation: each database vector -> weighted mean of its top-K (incl. itself)")
    g.add_argument("--dba-alpha", metavar="A", type=float, default=None,
                   help="DBA weights s^A (default: the --alpha-qe value, else 0 = plain mean)")
    g.add_argument("--qe", metavar="K", type=int, default=0,
                   help="query expansion over the top-K results (average QE, or alpha-QE with --alpha-qe)")
    g.add_argument("--alpha-qe", metavar="A", type=float, default=None,
                   help="alpha-weighted QE: neighbour weights s^A, query weight 1 (typical A=3; 0 = average QE)")
    g.add_argument("--diffusion", action="store_true",
                   help="re-rank by diffusion on the database kNN graph (Iscen et al. CVPR'17)")
    g.add_argument("--diffusion-k", metavar="K", type=int, default=_DEF.k,
                   help=f"neighbours per node in the graph (default {_DEF.k})")
    g.add_argument("--diffusion-kq", metavar="K", type=int, default=_DEF.kq,
                   help=f"neighbours of the query in the start vector (default {_DEF.kq})")
    g.add_argument("--diffusion-gamma", metavar="G", type=float, default=_DEF.gamma,
                   help=f"similarity exponent (default {_DEF.gamma:g})")
    g.add_argument("--diffusion-alpha", metavar="A", type=float, default=_DEF.alpha,
                   help=f"diffusion weight in [0,1) (default {_DEF.alpha:g})")
    g.add_argument("--diffusion-trunc", metavar="R", type=int, default=_DEF.trunc,
                   help=f"diffuse on each query's top-R region when the database is larger (0 = whole graph; default {_DEF.trunc})")


def rerank(
    q: np.ndarray,
    db: np.ndarray,
    *,
    whitening: Any = None,
    dba_k: int = 0,
    dba_alpha: float = 0.0,
    qe_k: int = 0,
    qe_alpha: float = 0.0,
    diffusion: DiffusionParams | None = None,
) -> tuple[np.ndarray, dict]:
    """Compose the re-rankings; q (nq, D), db (n, D) -> (scores (nq, n) float32, applied dict).

    ``whitening``: a :class:`cbir.whitening.Whitening` or None. Higher score = better.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    db = np.ascontiguousarray(db, dtype=np.float32)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"queries {q.shape} and database {db.shape} must be 2-D with the same dimension")
    if min(dba_k, qe_k) < 0:
        raise ValueError("--qe and --dba must be >= 0")
    applied: dict[str, Any] = {}
    if whitening is not None:
        q, db = whitening.apply(q), whitening.apply(db)
        applied["whiten"] = {k: v for k, v in whitening.meta.items() if isinstance(v, (int, float, str))}
        applied["whiten"]["out_dim"] = whitening.out_dim
    else:
        q, db = l2_normalize(q), l2_normalize(db)
    if dba_k > 1:
        db = dba(db, dba_k, alpha=dba_alpha)
        applied["dba"] = {"k": int(dba_k), "alpha": float(dba_alpha)}
    scores = q @ db.T
    if qe_k > 0:
        q = alpha_qe(q, db, qe_k, alpha=qe_alpha, scores=scores)
        scores = q @ db.T
        applied["qe"] = {"k": int(qe_k), "alpha": float(qe_alpha), "kind": "alpha-qe" if qe_alpha else "average"}
    if diffusion is not None:
        graph = knn_graph(db, k=diffusion.k, gamma=diffusion.gamma, mutual=diffusion.mutual)
        scores = diffusion_scores(q, db, diffusion, graph=graph, sim=scores)
        applied["diffusion"] = diffusion.to_dict() | {"truncated": 0 < diffusion.trunc < db.shape[0]}
    return np.ascontiguousarray(scores, dtype=np.float32), applied


@dataclass(frozen=True)
class Rerank:
    """One settings object for the post-search stage: whiten -> DBA -> search -> QE -> diffusion.

    ``whiten``: path of a whitening file (``cbir whiten``) or None; ``qe``/``dba``: K (0 = off);
    ``alpha_qe``/``dba_alpha``: weights s^A (None = average / the alpha_qe value);
    ``diffusion``: :class:`DiffusionParams` or None. ``apply(q, db)`` -> (scores, applied).
    """

    whiten: str | None = None
    dba: int = 0
    dba_alpha: float | None = None
    qe: int = 0
    alpha_qe: float | None = None
    diffusion: DiffusionParams | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Rerank":
        """The settings given by the options of :func:`add_arguments` (missing ones: off)."""
        diffusion = None
        if getattr(args, "diffusion", False):
            diffusion = DiffusionParams(
                k=getattr(args, "diffusion_k", _DEF.k),
                kq=getattr(args, "diffusion_kq", _DEF.kq),
                gamma=getattr(args, "diffusion_gamma", _DEF.gamma),
                alpha=getattr(args, "diffusion_alpha", _DEF.alpha),
                trunc=getattr(args, "diffusion_trunc", _DEF.trunc),
            )
        return cls(
            whiten=getattr(args, "whiten", None) or None,
            dba=int(getattr(args, "dba", 0) or 0),
            dba_alpha=getattr(args, "dba_alpha", None),
            qe=int(getattr(args, "qe", 0) or 0),
            alpha_qe=getattr(args, "alpha_qe", None),
            diffusion=diffusion,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``Rerank.from_dict(r.to_dict()) == r``."""
        d = asdict(self)
        d["diffusion"] = None if self.diffusion is None else self.diffusion.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rerank":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown re-ranking settings: {sorted(unknown)}")
        d = dict(d)
        if d.get("diffusion") is not None:
            d["diffusion"] = DiffusionParams(**d["diffusion"])
        return cls(**d)

    def apply(self, q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, dict]:
        """q (nq, D), db (n, D) -> (scores (nq, n) float32, applied JSON-ready dict)."""
        if self.alpha_qe is not None and self.qe == 0:
            raise ValueError("--alpha-qe needs --qe K (the number of neighbours to expand with)")
        whitening = None
        if self.whiten:
            from ..whitening import Whitening

            whitening = Whitening.load(self.whiten)
        dba_alpha = self.dba_alpha
        if dba_alpha is None:
            dba_alpha = self.alpha_qe or 0.0
        scores, applied = rerank(
            q,
            db,
            whitening=whitening,
            dba_k=self.dba,
            dba_alpha=float(dba_alpha),
            qe_k=self.qe,
            qe_alpha=float(self.alpha_qe or 0.0),
            diffusion=self.diffusion,
        )
        if whitening is not None:
            applied["whiten"]["file"] = str(Path(self.whiten))
        return scores, applied


def rerank_from_args(args: argparse.Namespace, q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, dict]:
    """Apply the options added by :func:`add_arguments`; q (nq, D), db (n, D) -> (scores, applied).

    Missing attributes fall back to "off", so any namespace works. ``applied`` is JSON-ready and
    empty when nothing was applied (scores are then the plain inner products of L2-normalised rows).
    """
    return Rerank.from_args(args).apply(q, db)

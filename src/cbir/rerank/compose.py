"""The composition of the re-rankings and its one settings object :class:`Rerank`.

Order (the standard one, Radenovic et al. TPAMI'18 / Iscen et al. CVPR'17):
``whiten -> DBA -> search -> alpha-QE / average QE -> diffusion``. The command-line options that
fill a :class:`Rerank` are in :mod:`cbir.rerank.options`; a tuned whitening + Rerank is a
:class:`cbir.rerank.recipe.Recipe`.
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

#: ``--qe`` without K: alpha-QE over the top-2 (alpha 3); ``--dba`` without K: DBA over the top-5.
QE_K = 2
DBA_K = 5
ALPHA = 3.0


_DIFF_ARGS = {"k": "diffusion_k", "kq": "diffusion_kq", "gamma": "diffusion_gamma", "alpha": "diffusion_alpha",
              "trunc": "diffusion_trunc", "sim_weight": "diffusion_sim_weight"}


def whitening_record(whitening: Any, file: str | None = None) -> dict[str, Any]:
    """What ``applied["whiten"]`` records of a :class:`cbir.whitening.Whitening`: its plain meta
    values, ``out_dim``, and the ``file`` it was read from when given."""
    rec = {k: v for k, v in whitening.meta.items() if isinstance(v, (int, float, str))}
    rec["out_dim"] = whitening.out_dim
    if file is not None:
        rec["file"] = file
    return rec


def rerank(
    q: np.ndarray,
    db: np.ndarray,
    *,
    whitening: Any = None,
    dba_k: int = 0,
    dba_alpha: float = 0.0,
    qe_k: int = 0,
    qe_alpha: float = 0.0,
    diffusion: DiffusionParams | dict | None = None,
) -> tuple[np.ndarray, dict]:
    """Compose the re-rankings; q (nq, D), db (n, D) -> (scores (nq, n) float32, applied dict).

    ``whitening``: a :class:`cbir.whitening.Whitening` or None. ``diffusion``: the parameters, or
    a dict of the given ones (the rest: :meth:`DiffusionParams.for_database` of the database
    size). Higher score = better.
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
        applied["whiten"] = whitening_record(whitening)
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
        if isinstance(diffusion, dict):
            diffusion = DiffusionParams.for_database(db.shape[0], **diffusion)
        graph = knn_graph(db, k=diffusion.k, gamma=diffusion.gamma, mutual=diffusion.mutual)
        scores = diffusion_scores(q, db, diffusion, graph=graph, sim=scores)
        applied["diffusion"] = diffusion.to_dict() | {"truncated": 0 < diffusion.trunc < db.shape[0]}
    return np.ascontiguousarray(scores, dtype=np.float32), applied


@dataclass(frozen=True)
class Rerank:
    """One settings object for the post-search stage: whiten -> DBA -> search -> QE -> diffusion.

    ``whiten``: path of a whitening file (``cbir whiten``) or None; ``qe``/``dba``: K (0 = off);
    ``alpha_qe``/``dba_alpha``: weights s^A (None = 3 / the alpha_qe value, else 3);
    ``diffusion``: None (off), :class:`DiffusionParams`, or a dict of the given parameters (the
    others follow the database size, :meth:`DiffusionParams.for_database`).
    ``apply(q, db)`` -> (scores, applied).
    """

    whiten: str | None = None
    dba: int = 0
    dba_alpha: float | None = None
    qe: int = 0
    alpha_qe: float | None = None
    diffusion: DiffusionParams | dict | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Rerank":
        """The settings given by the options of :func:`add_arguments` (missing ones: off)."""
        diffusion = None
        if getattr(args, "diffusion", False):
            diffusion = {key: getattr(args, name) for key, name in _DIFF_ARGS.items()
                         if getattr(args, name, None) is not None}
        return cls(
            whiten=getattr(args, "whiten", None) or None,
            dba=int(getattr(args, "dba", 0) or 0),
            dba_alpha=getattr(args, "dba_alpha", None),
            qe=int(getattr(args, "qe", 0) or 0),
            alpha_qe=getattr(args, "alpha_qe", None),
            diffusion=diffusion,
        )

    def is_off(self) -> bool:
        """True when nothing is applied (plain inner products of L2-normalised rows)."""
        return not (self.whiten or self.dba > 1 or self.qe > 0 or self.diffusion is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``Rerank.from_dict(r.to_dict()) == r``."""
        return asdict(self)  # DiffusionParams and dicts alike become plain dicts

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rerank":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown re-ranking settings: {sorted(unknown)}")
        d = dict(d)
        diff = d.get("diffusion")
        if diff is not None:
            unknown = set(diff) - {f.name for f in fields(DiffusionParams)}
            if unknown:
                raise ValueError(f"unknown diffusion settings: {sorted(unknown)}")
            # all parameters given: fixed; some: the rest follow the database size
            full = set(diff) == {f.name for f in fields(DiffusionParams)}
            d["diffusion"] = DiffusionParams(**diff) if full else dict(diff)
        return cls(**d)

    def check(self) -> None:
        """ValueError for settings that cannot be applied (an αQE weight without QE)."""
        if self.alpha_qe is not None and self.qe == 0:
            raise ValueError("--alpha-qe needs --qe K (the number of neighbours to expand with)")

    def apply(self, q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, dict]:
        """q (nq, D), db (n, D) -> (scores (nq, n) float32, applied JSON-ready dict)."""
        self.check()
        whitening = None
        if self.whiten:
            from ..whitening import Whitening

            whitening = Whitening.load(self.whiten)
        alpha = ALPHA if self.alpha_qe is None else float(self.alpha_qe)
        dba_alpha = alpha if self.dba_alpha is None else float(self.dba_alpha)
        scores, applied = rerank(
            q,
            db,
            whitening=whitening,
            dba_k=self.dba,
            dba_alpha=float(dba_alpha),
            qe_k=self.qe,
            qe_alpha=alpha,
            diffusion=self.diffusion,
        )
        if whitening is not None:
            applied["whiten"]["file"] = str(Path(self.whiten))
        return scores, applied

"""The composition of the re-rankings and its one settings object :class:`Rerank`.

Order (the standard one, Radenovic et al. TPAMI'18 / Iscen et al. CVPR'17):
``whiten -> DBA -> search -> alpha-QE / average QE -> diffusion``. :class:`Rerank` is a checked
schema (:mod:`cbir.schema`) whose errors name its fields; the command-line options that fill one
are in ``cbir.cli.rerank_options`` (which names the flags instead); a tuned whitening + Rerank is
a :class:`cbir.rerank.recipe.Recipe`.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from pydantic import ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..linalg import l2_normalize
from ..schema import MAX_EXPONENT, MAX_NEIGHBOURS, Float, Int, Schema, Str, show
from .diffusion import DiffusionOptions, DiffusionParams, diffusion_scores, knn_graph
from .qe import alpha_qe, dba

#: ``--qe`` without K: alpha-QE over the top-2 (alpha 3); ``--dba`` without K: DBA over the top-5.
QE_K = 2
DBA_K = 5
ALPHA = 3.0


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
    diffusion: DiffusionParams | DiffusionOptions | dict | None = None,
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
        raise ValueError(f"qe_k and dba_k must be >= 0, got qe_k={qe_k}, dba_k={dba_k}")
    for name, value in (("dba_alpha", dba_alpha), ("qe_alpha", qe_alpha)):
        if not (math.isfinite(value) and 0.0 <= value <= MAX_EXPONENT):
            raise ValueError(f"{name} must be a finite number in [0, {MAX_EXPONENT:g}], got {value}")
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
            diffusion = DiffusionOptions(**diffusion)
        if isinstance(diffusion, DiffusionOptions):
            diffusion = diffusion.resolve(db.shape[0])
        graph = knn_graph(db, k=diffusion.k, gamma=diffusion.gamma, mutual=diffusion.mutual)
        scores = diffusion_scores(q, db, diffusion, graph=graph, sim=scores)
        applied["diffusion"] = diffusion.to_dict() | {"truncated": 0 < diffusion.trunc < db.shape[0]}
    return np.ascontiguousarray(scores, dtype=np.float32), applied


class Rerank(Schema):
    """One settings object for the post-search stage: whiten -> DBA -> search -> QE -> diffusion.

    ``whiten``: path of a whitening file (``cbir whiten``) or None; ``qe``/``dba``: K in
    [0, MAX_NEIGHBOURS] (0 = off; DBA needs K >= 2 to change anything); ``alpha_qe``/``dba_alpha``:
    weights s^A in [0, 100] (None = 3 / the alpha_qe value, else 3; ``alpha_qe`` needs ``qe`` > 0);
    ``diffusion``: None or False (off), True (every parameter by the database size,
    :meth:`DiffusionParams.for_database`), a :class:`DiffusionParams` (all fixed), or a dict /
    :class:`DiffusionOptions` of the given parameters (the others by the database size). Every
    field is checked when the object is made (:class:`cbir.schema.SchemaError` naming the field:
    ``Rerank: qe: must be an integer in [0, 10000] (got 2.5)``). ``apply(q, db)`` -> (scores, applied).
    """

    whiten: Str | None = None
    dba: Int(ge=0, le=MAX_NEIGHBOURS) = 0
    dba_alpha: Float(ge=0.0, le=MAX_EXPONENT) | None = None
    qe: Int(ge=0, le=MAX_NEIGHBOURS) = 0
    alpha_qe: Float(ge=0.0, le=MAX_EXPONENT) | None = None
    diffusion: DiffusionOptions | None = None

    @field_validator("whiten", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return str(v) if isinstance(v, PurePath) else v

    @field_validator("alpha_qe")
    @classmethod
    def _alpha_needs_qe(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("qe", 1) == 0:
            raise PydanticCustomError("cbir", "alpha_qe needs qe > 0 (the number of neighbours to expand with)")
        return v

    @field_validator("diffusion", mode="before")
    @classmethod
    def _diffusion(cls, v: Any) -> Any:
        if v is True:
            return DiffusionOptions()
        if v is False:
            return None
        if isinstance(v, DiffusionParams):
            return DiffusionOptions(**v.model_dump())
        if v is not None and not isinstance(v, (dict, DiffusionOptions)):
            raise PydanticCustomError("cbir", "must be true, an object of diffusion parameters, or null (got {got})",
                                      {"got": show(v)})
        return v

    def is_off(self) -> bool:
        """True when nothing is applied (plain inner products of L2-normalised rows)."""
        return not (self.whiten or self.dba > 1 or self.qe > 0 or self.diffusion is not None)

    def diffusion_for(self, n: int) -> DiffusionParams | None:
        """The diffusion parameters for a database of n items (None: no diffusion)."""
        return None if self.diffusion is None else self.diffusion.resolve(n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (diffusion: only the given parameters); ``Rerank.from_dict(r.to_dict()) == r``."""
        d = self.model_dump(mode="json", exclude={"diffusion"})
        d["diffusion"] = None if self.diffusion is None else self.diffusion.given()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "re-ranking settings") -> "Rerank":
        """The settings of a JSON object (SchemaError naming ``where`` and the field)."""
        return cls.parse(d, where)

    def check(self) -> None:
        """Kept for callers: every check now runs when the object is made."""

    def apply(self, q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, dict]:
        """q (nq, D), db (n, D) -> (scores (nq, n) float32, applied JSON-ready dict)."""
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
            diffusion=self.diffusion_for(np.shape(db)[0]),
        )
        if whitening is not None:
            applied["whiten"]["file"] = str(Path(self.whiten))
        return scores, applied

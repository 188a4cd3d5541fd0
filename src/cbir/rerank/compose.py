"""The composition of the re-rankings and its one settings object :class:`Rerank`.

Order (the standard one, Radenovic et al. TPAMI'18 / Iscen et al. CVPR'17, with spatial
verification where Philbin et al. CVPR'07 and Chum et al. ICCV'07 put it)::

    whiten -> DBA -> search -> spatial verification of each query's top K
           -> verified query expansion -> alpha-QE / average QE -> diffusion -> verified images first

1. ``whiten`` (a :class:`cbir.whitening.Whitening`, or a recipe's), then L2;
2. ``DBA``: every database vector replaced by the weighted mean of its neighbours;
3. ``search``: s = q db^T;
4. **spatial verification** (``verify``, a :class:`cbir.rerank.verify.VerifyParams`): the top
   ``k`` of each row of s are given to the *verifier*, a callable ``(query row, candidate
   database rows (K,)) -> inlier counts (K,)`` that the caller supplies (the local features and
   RANSAC live outside this pure library: :mod:`cbir.local.verifier`); a candidate with
   ``n >= min_inliers`` is *verified*. A count of :data:`SAME_IMAGE` (-1) marks the query's own
   photo (its local features are identical to the query's: the same image, e.g. a Holidays
   query, which is also a database photo): it is ordered as verified but never expands the query;
5. **verified query expansion** (``verify.expand``): q' = l2(q + sum of the verified images' rows)
   (:func:`cbir.rerank.verify.expand_queries`), and s = q' db^T: the verified photos are the seeds
   of what follows;
6. ``QE`` (alpha-weighted, or average with alpha 0) on q';
7. ``diffusion`` from q' (its kq neighbours, verified photos among them);
8. **verified first** (``verify.order``, :func:`cbir.rerank.verify.apply_order`): the verified
   images of step 4 move up by the rule (``first``: before every other image, in the order of
   the final scores), so that expansion and diffusion cannot push a verified match back down.

:class:`Rerank` is a checked schema (:mod:`cbir.schema`) whose errors name its fields; the
command-line options that fill one are in ``cbir.cli.rerank_options`` (which names the flags
instead); a tuned whitening + Rerank is a :class:`cbir.rerank.recipe.Recipe`. ``Rerank.apply``
without a verifier when ``verify`` is set is a ValueError ("verify needs local features: ...").
"""

from __future__ import annotations

import math
from pathlib import Path, PurePath
from typing import Any, Callable

import numpy as np
from pydantic import ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..linalg import l2_normalize
from ..schema import MAX_EXPONENT, MAX_NEIGHBOURS, Float, Int, Schema, Str, show
from .diffusion import DiffusionOptions, DiffusionParams, diffusion_scores, knn_graph
from .knn import topk
from .qe import alpha_qe, dba
from .verify import VerifyParams, apply_order, expand_queries, verified_mask

#: ``--qe`` without K: alpha-QE over the top-2 (alpha 3); ``--dba`` without K: DBA over the top-5.
QE_K = 2
DBA_K = 5
ALPHA = 3.0
#: The inlier count a verifier returns for a candidate that is the query's own photo (module doc).
SAME_IMAGE = -1
#: ``verifier(query row, candidate database rows (K,) int64) -> inlier counts (K,) int``.
Verifier = Callable[[int, np.ndarray], np.ndarray]
#: The message of ``Rerank.apply`` with ``verify`` set and no verifier.
NEEDS_VERIFIER = ("verify needs local features: pass a verifier (cbir.pipeline.score and `cbir evaluate` "
                  "build one from the benchmark's images, `cbir search` from the index's local features)")


def verify_top(scores: np.ndarray, k: int, verifier: Verifier) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: the top ``k`` of each row of ``scores`` (nq, n) and their inlier counts ->
    (top (nq, K) int64 database rows, inliers (nq, K) int64), K = min(k, n)."""
    _, top = topk(scores, k)
    inliers = np.zeros(top.shape, dtype=np.int64)
    for i in range(top.shape[0]):
        counts = np.asarray(verifier(i, top[i]), dtype=np.int64).reshape(-1)
        if counts.shape != (top.shape[1],):
            raise ValueError(f"the verifier returned {counts.shape[0]} inlier counts for {top.shape[1]} candidates")
        inliers[i] = counts
    return top, inliers


def for_order(inliers: np.ndarray) -> np.ndarray:
    """Inlier counts as the ordering rules see them: :data:`SAME_IMAGE` becomes a count above every
    other (the query's own photo: verified, with the most inliers)."""
    n = np.asarray(inliers, dtype=np.int64)
    if not (n == SAME_IMAGE).any():
        return n
    return np.where(n == SAME_IMAGE, max(int(n.max(initial=0)), 0) + 10**6, n)


def order_verified(scores: np.ndarray, top: np.ndarray, inliers: np.ndarray, params: VerifyParams) -> np.ndarray:
    """Step 8: rows of ``scores`` (nq, n) with the verified images of ``top`` / ``inliers`` (nq, K)
    moved up by ``params.order`` (:func:`cbir.rerank.verify.apply_order`); with "first" and
    "inliers" the query's own photo (:data:`SAME_IMAGE`) then moves above them all (one more span
    of the row). Returns float64 (nq, n); "none" returns the scores unchanged."""
    s = np.asarray(scores, dtype=np.float64)
    if params.order == "none":
        return s
    out = apply_order(s, top, for_order(inliers), params)
    same = np.asarray(inliers) == SAME_IMAGE
    if params.order in ("first", "inliers") and same.any():
        span = out.max(axis=1) - out.min(axis=1) + 1.0
        rows = np.arange(out.shape[0])[:, None]
        out[rows, top] += span[:, None] * same
    return out


def verify_record(params: VerifyParams, inliers: np.ndarray) -> dict[str, Any]:
    """``applied["verify"]``: the parameters, and per query the mean number of verified images
    (``verified``), of queries with at least one (``queries_verified``), of own photos met (``same_image``)."""
    n = np.asarray(inliers)
    v = verified_mask(n, params.min_inliers)
    return params.to_dict() | {"verified": float(v.sum(axis=1).mean()) if n.size else 0.0,
                               "queries_verified": int(v.any(axis=1).sum()) if n.size else 0,
                               "same_image": int((n == SAME_IMAGE).sum())}


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
    verify: VerifyParams | None = None,
    verifier: Verifier | None = None,
) -> tuple[np.ndarray, dict]:
    """Compose the re-rankings (module doc); q (nq, D), db (n, D) -> (scores (nq, n) float32, applied dict).

    ``whitening``: a :class:`cbir.whitening.Whitening` or None. ``diffusion``: the parameters, or
    a dict of the given ones (the rest: :meth:`DiffusionParams.for_database` of the database
    size). ``verify`` + ``verifier``: spatial verification of each query's top ``verify.k``
    (steps 4, 5 and 8; ``verifier(i, rows)`` gets database rows of this ``db``). Higher score = better.
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
    if verify is not None and verifier is None:
        raise ValueError(NEEDS_VERIFIER)
    scores = q @ db.T
    top = inliers = None
    if verify is not None:
        top, inliers = verify_top(scores, verify.k, verifier)
        applied["verify"] = verify_record(verify, inliers)
        if verify.expand:
            q = expand_queries(q, db, top, inliers, verify)  # SAME_IMAGE (-1) < min_inliers: never a seed
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
    if verify is not None and verify.order != "none":
        scores = order_verified(scores, top, inliers, verify)
    return np.ascontiguousarray(scores, dtype=np.float32), applied


class Rerank(Schema):
    """One settings object for the post-search stage: whiten -> DBA -> search -> verification ->
    verified expansion -> QE -> diffusion -> verified first (module doc).

    ``whiten``: path of a whitening file (``cbir whiten``) or None; ``qe``/``dba``: K in
    [0, MAX_NEIGHBOURS] (0 = off; DBA needs K >= 2 to change anything); ``alpha_qe``/``dba_alpha``:
    weights s^A in [0, 100] (None = 3 / the alpha_qe value, else 3; ``alpha_qe`` needs ``qe`` > 0);
    ``diffusion``: None or False (off), True (every parameter by the database size,
    :meth:`DiffusionParams.for_database`), a :class:`DiffusionParams` (all fixed), or a dict /
    :class:`DiffusionOptions` of the given parameters (the others by the database size). Every
    field is checked when the object is made (:class:`cbir.schema.SchemaError` naming the field:
    ``Rerank: qe: must be an integer in [0, 10000] (got 2.5)``). ``verify``: None (off) or the
    spatial verification of each query's top K (a :class:`cbir.rerank.verify.VerifyParams` or a
    dict of its fields). ``apply(q, db, verifier=None)`` -> (scores, applied).
    """

    whiten: Str | None = None
    dba: Int(ge=0, le=MAX_NEIGHBOURS) = 0
    dba_alpha: Float(ge=0.0, le=MAX_EXPONENT) | None = None
    qe: Int(ge=0, le=MAX_NEIGHBOURS) = 0
    alpha_qe: Float(ge=0.0, le=MAX_EXPONENT) | None = None
    diffusion: DiffusionOptions | None = None
    verify: VerifyParams | None = None

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

    @field_validator("verify", mode="before")
    @classmethod
    def _verify(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (dict, VerifyParams)):
            raise PydanticCustomError("cbir", "must be an object of verification parameters, or null (got {got})",
                                      {"got": show(v)})
        return v

    def is_off(self) -> bool:
        """True when nothing is applied (plain inner products of L2-normalised rows)."""
        return not (self.whiten or self.dba > 1 or self.qe > 0 or self.diffusion is not None
                    or self.verify is not None)

    def with_verify(self, verify: VerifyParams | None) -> "Rerank":
        """The same settings with ``verify`` replaced (None: verification off)."""
        return Rerank(**{**{f: getattr(self, f) for f in type(self).model_fields}, "verify": verify})

    def diffusion_for(self, n: int) -> DiffusionParams | None:
        """The diffusion parameters for a database of n items (None: no diffusion)."""
        return None if self.diffusion is None else self.diffusion.resolve(n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (diffusion: only the given parameters); ``Rerank.from_dict(r.to_dict()) == r``."""
        d = self.model_dump(mode="json", exclude={"diffusion", "verify"})
        d["diffusion"] = None if self.diffusion is None else self.diffusion.given()
        if self.verify is not None:  # left out when off: a file without it reads as before
            d["verify"] = self.verify.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "re-ranking settings") -> "Rerank":
        """The settings of a JSON object (SchemaError naming ``where`` and the field)."""
        return cls.parse(d, where)

    def check(self) -> None:
        """Kept for callers: every check now runs when the object is made."""

    def apply(self, q: np.ndarray, db: np.ndarray, verifier: Verifier | None = None) -> tuple[np.ndarray, dict]:
        """q (nq, D), db (n, D) -> (scores (nq, n) float32, applied JSON-ready dict). ``verifier``:
        the inlier counts of step 4 (needed when ``verify`` is set; ValueError otherwise)."""
        if self.verify is not None and verifier is None:
            raise ValueError(NEEDS_VERIFIER)
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
            verify=self.verify,
            verifier=verifier,
        )
        if whitening is not None:
            applied["whiten"]["file"] = str(Path(self.whiten))
        return scores, applied

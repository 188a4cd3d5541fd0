"""PCA whitening and learned whitening (Lw), as arrays and as ``torch.nn.Linear``.

A whitening is an affine map ``x_hat = P (x - mu)`` followed by L2 normalisation, with ``mu`` (D,)
and ``P`` (d, D), d <= D (the ``x_hat = P^T (x - mu)`` of the papers with P stored transposed).

- PCA whitening (Jegou & Chum ECCV'12; power variant as in Radenovic et al. TPAMI'18 Sec. 4.2):
  ``C = (1 - s) Cov(X) + s tr(Cov(X))/D I`` (shrinkage s), ``C = U diag(lambda) U^T``,
  ``P = diag(lambda^(-power/2)) U^T`` over the top-d eigenvectors: power 1 makes the learning
  set's covariance the identity, 0.5 half-whitens, 0 is a rotation (PCA) only.
- Learned whitening, "Lw" (Radenovic et al. TPAMI'18, Sec. 3.3, after Mikolajczyk & Matas
  ICCV'07): from matching pairs (i, j): ``mu`` = mean of the pair members,
  ``C_S = 1/|P| sum (x_i - x_j)(x_i - x_j)^T`` (intra-pair difference covariance),
  ``C_S = L L^T`` (Cholesky), ``P1 = L^-1`` (so ``P1 C_S P1^T = I``: intra-pair differences
  whitened), then PCA of the projected members ``P1 (x - mu)`` with eigenvectors V (descending),
  ``P = V_d^T P1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .fileio import FormatError, load_stamped_npz, save_stamped_npz
from .linalg import l2_normalize
from .schema import MAX_DIM, MAX_ROWS, Float, Int, Schema, Str

FORMAT = "whitening"
FORMAT_VERSION = 1

# Shrinkage used when the learning set is small for its dimension (``shrinkage="auto"``): with fewer
# than ENOUGH_PER_DIM vectors per dimension the covariance's small eigenvalues are noise, and full
# whitening (power 1) blows them up. Chosen by measurement (docs/models.md, Lite0 GeM 1280-D): among
# shrinkage 0 / Ledoit-Wolf / 0.5 and kept dimension all / N-1 / N/2 / N/4 / 64, learning on the
# 238 rparis6k-250 vectors and testing on holidays-805, 0.5 at full dimension was best (81.26 vs
# raw 79.62, vs 80.73 unshrunk); checked the other way (805 Holidays vectors -> rparis6k-250): 92.08
# vs raw 91.78, vs 87.97 unshrunk. Reducing the dimension instead lowered both. Learned on the very
# vectors it is applied to with N < D, no setting measured helps (rparis6k-250 in-domain: raw 91.78,
# shrinkage 0 / 0.5 / 0.95: 42.17 / 49.65 / 73.41): that case is warned about.
AUTO_SHRINKAGE = 0.5
ENOUGH_PER_DIM = 10
#: Largest eigenvalue power of a PCA whitening (1 = full whitening; above 1 over-whitens).
MAX_POWER = 2.0
# The power of ``power="auto"`` (the default of ``cbir whiten``): AUTO_POWER scaled down by the
# data support, AUTO_POWER * min(1, N / (ENOUGH_PER_DIM * D)). Measured (2026-12-06, Lite0 GeM
# 512 px, 1 scale, Medium mAP, whitening learned on the very vectors it is then applied to, the
# `cbir whiten` -> `evaluate --whiten` path): rparis6k-250 (250 vectors, 1280-D; raw 86.63) power
# 1 / 0.5 / 0.25 / 0.1 / 0.02 / 0: 45.48 / 78.27 / 83.51 / 85.55 / 86.35 / 86.54 (shrinkage 0.5;
# neither shrinkage up to 0.9 nor a kept dimension of 128 or 64 rescued power 1 or 0.5); Oxford5k
# fc7-128d (5063 vectors, 128-D, 40 per dimension; raw 21.13) power 1 / 0.5: 19.76 / 21.38. So
# half-whitening where the data support it, and next to a rotation where they do not.
AUTO_POWER = 0.5


def auto_power(n: int, d: int) -> float:
    """Default eigenvalue power for ``n`` learning vectors of dimension ``d`` (``power="auto"``):
    ``AUTO_POWER * min(1, n / (ENOUGH_PER_DIM * d))``."""
    return AUTO_POWER * min(1.0, n / (ENOUGH_PER_DIM * d))


class WhiteningMeta(Schema):
    """The ``meta`` of a whitening file (format ``whitening`` v1; the stamp is checked apart): what
    learned it (``method``, ``power``, ``dim``, ``shrinkage``, ``n_learn`` vectors / ``n_pairs``
    pairs, ``notes``), its ``in_dim`` / ``out_dim`` (checked against the arrays) and, from
    ``cbir whiten``, the ``features`` folder and ``source_model``. Unknown keys are refused."""

    method: Literal["pca", "lw"] | None = None
    power: Float(ge=0.0, le=MAX_POWER) | None = None
    dim: Int(ge=1, le=MAX_DIM) | None = None
    shrinkage: Float(ge=0.0, le=1.0) | None = None
    n_learn: Int(ge=0, le=MAX_ROWS) | None = None
    n_pairs: Int(ge=0, le=MAX_ROWS) | None = None
    notes: list[Str] = []
    in_dim: Int(ge=1, le=MAX_DIM) | None = None
    out_dim: Int(ge=1, le=MAX_DIM) | None = None
    features: Str | None = None
    source_model: Str | None = None


def auto_shrinkage(n: int, d: int) -> float:
    """Default covariance shrinkage for ``n`` learning vectors (or pairs) of dimension ``d``:
    AUTO_SHRINKAGE when ``n < ENOUGH_PER_DIM * d``, else 0."""
    return AUTO_SHRINKAGE if n < ENOUGH_PER_DIM * d else 0.0


def _resolve_shrinkage(shrinkage: float | str | None, n: int, d: int, what: str,
                       power: float = 1.0) -> tuple[float, list[str]]:
    """(shrinkage, notes): ``"auto"``/None -> auto_shrinkage; notes say what was done and why."""
    notes: list[str] = []
    if shrinkage in (None, "auto"):
        value = auto_shrinkage(n, d)
        if value:
            notes.append(f"{n} {what} for {d} dimensions (fewer than {ENOUGH_PER_DIM} per dimension): covariance "
                         f"shrunk towards tr(C)/D I by {value:g} (shrinkage=auto)")
    else:
        value = float(shrinkage)
        if not (np.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"shrinkage must be in [0, 1] or 'auto', got {shrinkage}")
        if value == 0.0 and n <= d:
            notes.append(f"warning: {n} {what} for {d} dimensions and no shrinkage: the covariance is singular "
                         f"and full whitening amplifies noise (use shrinkage=auto)")
    if n <= d and power > 0.1:
        notes.append(f"warning: fewer {what} ({n}) than dimensions ({d}): do not apply this whitening to the same "
                     f"vectors it was learned from (it makes them nearly equidistant: rparis6k-250, 238 vectors, "
                     f"Medium 91.78 -> 49.65 even with shrinkage 0.5); learn it on another, larger set")
    return value, notes


@dataclass
class Whitening:
    """``x -> l2(P (x - mu))``; ``mean`` (D,), ``proj`` (d, D) float64; ``meta`` describes it."""

    mean: np.ndarray
    proj: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        self.proj = np.asarray(self.proj, dtype=np.float64)
        if self.proj.ndim != 2 or self.proj.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"whitening projection must be (d, {self.mean.shape[0]}), got shape {self.proj.shape}"
            )

    @property
    def in_dim(self) -> int:
        return int(self.proj.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.proj.shape[0])

    def apply(self, x: np.ndarray, normalize: bool = True) -> np.ndarray:
        """(N, D) -> (N, d) float32: ``P (x - mu)``, L2-normalised unless ``normalize=False``."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"whitening expects vectors of dimension {self.in_dim}, got shape {x.shape}")
        y = (x.astype(np.float64) - self.mean) @ self.proj.T
        return l2_normalize(y) if normalize else y.astype(np.float32)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """Inverse of the un-normalised map: ``x = P^-1 y + mu`` (only when no dimension was dropped)."""
        if self.out_dim != self.in_dim:
            raise ValueError(f"whitening to {self.out_dim} of {self.in_dim} dimensions is not invertible")
        return np.linalg.solve(self.proj, np.asarray(y, dtype=np.float64).T).T + self.mean

    def to_linear(self):
        """``torch.nn.Linear(D, d)`` with weight P and bias ``-P mu`` (trainable; L2 is the caller's)."""
        import torch

        lin = torch.nn.Linear(self.in_dim, self.out_dim, bias=True)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(self.proj))
            lin.bias.copy_(torch.from_numpy(-self.proj @ self.mean))
        return lin

    @classmethod
    def from_linear(cls, lin, meta: dict[str, Any] | None = None) -> "Whitening":
        """Inverse of :meth:`to_linear` (e.g. after end-to-end training); mu solves ``P mu = -b``."""
        w = lin.weight.detach().double().cpu().numpy()
        b = lin.bias.detach().double().cpu().numpy() if lin.bias is not None else np.zeros(w.shape[0])
        mean = np.linalg.lstsq(w, -b, rcond=None)[0]
        return cls(mean=mean, proj=w, meta=dict(meta or {}))

    def save(self, path: str | Path) -> None:
        """Atomic ``.npz`` with ``mean``, ``proj`` and a JSON ``meta`` (format stamp included)."""
        meta = dict(self.meta, in_dim=self.in_dim, out_dim=self.out_dim)
        save_stamped_npz(path, {"mean": self.mean, "proj": self.proj}, meta, FORMAT, FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | Path) -> "Whitening":
        """Read a whitening file, checked: its meta against :class:`WhiteningMeta`, ``mean`` (D,) and
        ``proj`` (d, D) finite floats whose sizes match ``in_dim`` / ``out_dim`` (FormatError naming it)."""
        arrays, meta = load_stamped_npz(path, FORMAT, (FORMAT_VERSION,), "cbir whitening")
        if "mean" not in arrays or "proj" not in arrays:
            raise FormatError(f"{path} is not a readable cbir whitening file (mean/proj missing)")
        doc = WhiteningMeta.parse(meta, f"whitening {path}")
        mean, proj = arrays["mean"], arrays["proj"]
        for name, arr, ndim in (("mean", mean, 1), ("proj", proj, 2)):
            if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.floating):
                raise FormatError(f"whitening {path}: {name} must be a {ndim}-D float array, got {arr.dtype.name} {arr.shape}")
            if not np.isfinite(arr).all():
                raise FormatError(f"whitening {path}: {name} holds NaN or infinite values (damaged)")
        if proj.shape[1] != mean.shape[0] or not 1 <= proj.shape[0] <= proj.shape[1]:
            raise FormatError(f"whitening {path}: proj {proj.shape} does not fit mean {mean.shape}")
        if (doc.in_dim, doc.out_dim) != (None, None) and (doc.in_dim, doc.out_dim) != (proj.shape[1], proj.shape[0]):
            raise FormatError(f"whitening {path}: in_dim/out_dim {doc.in_dim}/{doc.out_dim} but proj is {proj.shape}")
        for key in ("in_dim", "out_dim"):
            meta.pop(key, None)
        return cls(mean=mean, proj=proj, meta=meta)


def _check_x(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"whitening needs a 2-D learning set with >= 2 rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the whitening's learning vectors hold NaN or infinite values")
    return x


def _check_dim(dim: int | None, d: int) -> int:
    if dim is None or dim == 0:
        return d
    if not 1 <= dim <= d:
        raise ValueError(f"whitening output dimension must be in [1, {d}], got {dim}")
    return int(dim)


def _eig_desc(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues descending -> (lambda (D,), U (D, D))."""
    lam, u = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(lam)[::-1]
    return lam[order], u[:, order]


def learn_pca_whitening(
    x: np.ndarray, power: float | str = 1.0, dim: int | None = None, shrinkage: float | str = "auto", eps: float = 1e-12
) -> Whitening:
    """PCA whitening of the rows of x (N, D) -> Whitening (mean (D,), proj (dim, D)).

    ``proj = diag(lambda_i^(-power/2)) U_dim^T`` with lambda, U the eigenvalues/vectors (descending)
    of ``(1 - shrinkage) Cov(x) + shrinkage tr(Cov)/D I``; eigenvalues below ``eps * lambda_max`` are
    raised to it (rank-deficient learning sets). ``shrinkage="auto"``: ``auto_shrinkage(N, D)``;
    ``power="auto"``: :func:`auto_power` (what the data support; the default of ``cbir whiten``).
    ``meta["notes"]`` says what was done when the learning set is small for its dimension.
    """
    x = _check_x(x)
    n, d = x.shape
    dim = _check_dim(dim, d)
    power_notes = []
    if isinstance(power, str):
        if power != "auto":
            raise ValueError(f"whitening power must be a number in [0, {MAX_POWER:g}] or 'auto', got {power!r}")
        power = auto_power(n, d)
        if power < AUTO_POWER:
            power_notes.append(f"power=auto: {power:.3g} ({n} vectors for {d} dimensions support only a partial "
                               f"whitening: {AUTO_POWER:g} x {n}/{ENOUGH_PER_DIM * d}; full whitening learned on "
                               f"250 rparis6k-250 vectors and applied to them lowered Medium 86.6 -> 45.5)")
    if not (np.isfinite(power) and 0.0 <= power <= MAX_POWER):
        raise ValueError(f"whitening power must be a finite number in [0, {MAX_POWER:g}], got {power}")
    shrinkage, notes = _resolve_shrinkage(shrinkage, n, d, "vectors", power)
    notes = power_notes + notes
    mu = x.mean(axis=0)
    xc = x - mu
    c = xc.T @ xc / n
    if shrinkage:
        c = (1 - shrinkage) * c + shrinkage * np.trace(c) / d * np.eye(d)
    lam, u = _eig_desc(c)
    lam = np.maximum(lam, eps * max(lam[0], eps))
    proj = (lam[:dim] ** (-power / 2))[:, None] * u[:, :dim].T
    meta = {"method": "pca", "power": float(power), "dim": dim, "shrinkage": float(shrinkage), "n_learn": n,
            "notes": notes}
    return Whitening(mean=mu, proj=proj, meta=meta)


def learn_lw(
    x: np.ndarray, pairs: np.ndarray, dim: int | None = None, shrinkage: float | str = "auto", eps: float = 1e-9
) -> Whitening:
    """Learned whitening from matching pairs (Radenovic et al. TPAMI'18) -> Whitening (dim, D).

    x (N, D); pairs (M, 2) row indices of matching images. ``shrinkage`` regularises ``C_S``
    towards ``tr(C_S)/D I`` (needed when M < D); a tiny ``eps tr(C_S)/D`` ridge keeps the
    Cholesky factorisation defined. ``shrinkage="auto"``: ``auto_shrinkage(M, D)`` (M pairs).
    """
    x = _check_x(x)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError(f"pairs must be an (M, 2) array of row indices, got shape {pairs.shape}")
    if pairs.min() < 0 or pairs.max() >= x.shape[0]:
        raise ValueError(f"pair indices must be in [0, {x.shape[0]}), got range [{pairs.min()}, {pairs.max()}]")
    n, d = x.shape
    dim = _check_dim(dim, d)
    members = np.unique(pairs.ravel())
    mu = x[members].mean(axis=0)
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    cs = diff.T @ diff / len(pairs)
    scale = np.trace(cs) / d
    shrinkage, notes = _resolve_shrinkage(shrinkage, len(pairs), d, "pairs")
    if shrinkage:
        cs = (1 - shrinkage) * cs + shrinkage * scale * np.eye(d)
    cs = cs + eps * max(scale, 1e-300) * np.eye(d)
    chol = np.linalg.cholesky(cs)  # cs = L L^T
    p1 = np.linalg.solve(chol, np.eye(d))  # L^-1
    z = (x[members] - mu) @ p1.T
    _, v = _eig_desc(z.T @ z / len(members))
    proj = v[:, :dim].T @ p1
    meta = {"method": "lw", "dim": dim, "shrinkage": float(shrinkage), "n_pairs": int(len(pairs)), "n_learn": int(len(members)),
            "notes": notes}
    return Whitening(mean=mu, proj=proj, meta=meta)

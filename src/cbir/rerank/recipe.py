"""A recipe: the whitening and the re-ranking chosen by ``cbir tune``, as one versioned file.

``recipe.json`` (atomic, format stamp ``recipe`` v1)::

    {"whitening": {"method": "none"}                                  # or
                  {"method": "pca", "fit": "database", "power": P, "shrinkage": S, "dim": D}
                  {"method": "pca"|"lw", "fit": "validation", "file": "NAME.whiten.npz",
                   "sha256": ..., ...},
     "rerank": Rerank.to_dict(),            # whiten is always null here
     "tuned_on": [...], "objective": ..., "descriptors": {...}}

Whitening that transfers across collections: ``fit: "database"`` is a *rule* (PCA-whiten the
database it is applied to, learned at use time from its own vectors, no labels), ``fit:
"validation"`` a learned projection (PCA or Lw from the validation sets' vectors / matching
pairs) stored beside the JSON in a :class:`cbir.whitening.Whitening` file whose sha256 the JSON
records. Diffusion parameters that are left out of ``rerank.diffusion`` follow the database size
(:meth:`cbir.rerank.diffusion.DiffusionParams.for_database`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import FormatError, atomic_write_json, check_format, read_json, sha256_file
from ..whitening import Whitening, learn_pca_whitening
from .compose import Rerank

#: Recipes shipped with cbir, loadable by name (``--recipe holidays805-lite0``).
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "recipes"
#: Where ``cbir index build --recipe`` keeps a copy, inside the index folder.
INDEX_RECIPE = "recipe.json"
FORMAT = "recipe"
FORMAT_VERSION = 1
WHITENING_METHODS = ("none", "pca", "lw")


@dataclass(frozen=True)
class WhiteningSpec:
    """How to whiten: ``method`` none/pca/lw; ``fit`` "database" (PCA learned at use time on the
    database vectors) or "validation" (a projection learned by ``cbir tune``, in ``learned``);
    ``power``/``shrinkage``/``dim`` as :func:`cbir.whitening.learn_pca_whitening` (dim None = all)."""

    method: str = "none"
    fit: str = "database"
    power: float = 1.0
    shrinkage: float = 0.0
    dim: int | None = None

    def __post_init__(self) -> None:
        if self.method not in WHITENING_METHODS:
            raise ValueError(f"unknown whitening method {self.method!r} (known: {', '.join(WHITENING_METHODS)})")
        if self.fit not in ("database", "validation"):
            raise ValueError(f"whitening fit must be 'database' or 'validation', got {self.fit!r}")
        if self.method == "lw" and self.fit != "validation":
            raise ValueError("Lw needs matching pairs: it can only be learned on the validation sets")

    def label(self) -> str:
        if self.method == "none":
            return "none"
        dim = "all" if self.dim is None else str(self.dim)
        extra = f", power {self.power:g}" if self.method == "pca" else ""
        return f"{self.method} on {self.fit}{extra}, shrinkage {self.shrinkage:g}, dim {dim}"

    def to_dict(self) -> dict[str, Any]:
        if self.method == "none":
            return {"method": "none"}
        return {"method": self.method, "fit": self.fit, "power": self.power, "shrinkage": self.shrinkage,
                "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WhiteningSpec":
        keys = {"method", "fit", "power", "shrinkage", "dim"}
        return cls(**{k: v for k, v in d.items() if k in keys})


def fit_database_whitening(spec: WhiteningSpec, db: np.ndarray) -> Whitening:
    """The PCA whitening of ``spec`` learned on the database rows db (n, D) (no labels)."""
    dim = None if spec.dim is None else min(int(spec.dim), db.shape[1])
    return learn_pca_whitening(db, power=spec.power, dim=dim, shrinkage=spec.shrinkage)


@dataclass
class Recipe:
    """Whitening (``spec`` + the ``learned`` projection when fit on validation) and re-ranking."""

    spec: WhiteningSpec = field(default_factory=WhiteningSpec)
    rerank: Rerank = field(default_factory=Rerank)
    learned: Whitening | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rerank.whiten:
            raise ValueError("a recipe carries its own whitening; its Rerank must have whiten=None")
        if self.spec.method != "none" and self.spec.fit == "validation" and self.learned is None:
            raise ValueError("a whitening fit on the validation sets needs its learned projection")

    def whitening_for(self, db: np.ndarray) -> Whitening | None:
        """The whitening to apply to this database (learned now when the spec is a rule)."""
        if self.spec.method == "none":
            return None
        if self.spec.fit == "validation":
            return self.learned
        return fit_database_whitening(self.spec, np.asarray(db, dtype=np.float32))

    def apply(self, q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, dict]:
        """q (nq, D), db (n, D) -> (scores (nq, n) float32, applied JSON-ready dict)."""
        w = self.whitening_for(db)
        if w is not None:
            if w.in_dim != q.shape[1]:
                raise ValueError(f"the recipe's whitening expects {w.in_dim}-D descriptors, got {q.shape[1]}-D "
                                 "(tuned with another model?)")
            q, db = w.apply(q), w.apply(db)
        scores, applied = self.rerank.apply(q, db)
        return scores, {"recipe": {"whitening": self.spec.to_dict(), "source": self.meta.get("file")}, **applied}

    def save(self, path: str | Path) -> None:
        """Write ``path`` (JSON) and, for a learned whitening, ``<stem>.whiten.npz`` beside it."""
        path = Path(path)
        whitening: dict[str, Any] = self.spec.to_dict()
        if self.learned is not None and self.spec.method != "none" and self.spec.fit == "validation":
            side = path.with_name(path.stem + ".whiten.npz")
            self.learned.save(side)
            whitening.update(file=side.name, sha256=sha256_file(side))
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "whitening": whitening,
               "rerank": self.rerank.to_dict(), **{k: v for k, v in self.meta.items() if k != "file"}}
        atomic_write_json(path, doc)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe file, or the name of one shipped with cbir (``bundled_recipes()``)."""
        path = Path(path)
        if not path.is_file() and path.name == str(path) and (BUNDLED / f"{path.name}.recipe.json").is_file():
            path = BUNDLED / f"{path.name}.recipe.json"
        if not path.is_file():
            known = ", ".join(bundled_recipes()) or "none"
            raise FileNotFoundError(f"recipe not found: {path} (recipes shipped with cbir: {known})")
        doc = read_json(path, what="recipe")
        check_format(doc, FORMAT, (FORMAT_VERSION,), path)
        try:
            spec = WhiteningSpec.from_dict(doc.get("whitening") or {"method": "none"})
            rerank = Rerank.from_dict(doc.get("rerank") or {})
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{path}: bad recipe: {exc}") from exc
        learned = None
        wdoc = doc.get("whitening") or {}
        if spec.method != "none" and spec.fit == "validation":
            if "file" not in wdoc:
                raise FormatError(f"{path}: the learned whitening file is not named")
            side = path.parent / Path(str(wdoc["file"])).name
            if not side.is_file():
                raise FileNotFoundError(f"whitening file of recipe {path} not found: {side}")
            if wdoc.get("sha256") and sha256_file(side) != wdoc["sha256"]:
                raise FormatError(f"{side} does not match the sha256 recorded in {path}")
            learned = Whitening.load(side)
        meta = {k: v for k, v in doc.items() if k not in ("format", "format_version", "whitening", "rerank")}
        meta["file"] = str(path)
        return cls(spec=spec, rerank=rerank, learned=learned, meta=meta)


def recipe_for_index(index_path: str | Path, given: str | None = None) -> "Recipe | None":
    """The recipe a search of the index at ``index_path`` uses: ``given`` (a file; "none" = no
    recipe), else the copy ``INDEX/recipe.json`` kept by ``cbir index build --recipe``, else None."""
    if given is not None:
        return None if given.lower() == "none" else Recipe.load(given)
    kept = Path(index_path) / INDEX_RECIPE
    return Recipe.load(kept) if kept.is_file() else None


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with cbir (``data/recipes/NAME.recipe.json``)."""
    return sorted(p.name.removesuffix(".recipe.json") for p in BUNDLED.glob("*.recipe.json"))

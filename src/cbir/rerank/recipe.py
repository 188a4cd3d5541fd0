"""A recipe: the whitening and the re-ranking chosen by ``cbir tune``, as one versioned file.

``recipe.json`` (atomic, format stamp ``recipe`` v1, or v2 when it holds ``rerank.verify``)::

    {"whitening": {"method": "none"}                                  # or
                  {"method": "pca", "fit": "database", "power": P, "shrinkage": S, "dim": D}
                  {"method": "pca"|"lw", "fit": "validation", "file": "NAME.whiten.npz",
                   "sha256": ..., ...},
     "rerank": Rerank.to_dict(),            # whiten is always null here; v2: + "verify": {k, min_inliers, ...}
     "tuned_on": [...], "objective": ..., "descriptors": {...}}

Whitening that transfers across collections: ``fit: "database"`` is a *rule* (PCA-whiten the
database it is applied to, learned at use time from its own vectors, no labels), ``fit:
"validation"`` a learned projection (PCA or Lw from the validation sets' vectors / matching
pairs) stored beside the JSON in a :class:`cbir.whitening.Whitening` file whose sha256 the JSON
records. Diffusion parameters that are left out of ``rerank.diffusion`` follow the database size
(:meth:`cbir.rerank.diffusion.DiffusionParams.for_database`).

Versions: v2 adds ``rerank.verify`` (spatial verification of the top K, a
:class:`cbir.rerank.verify.VerifyParams`); a recipe without it is written as v1, so that older
cbir versions still read it; both are read. Verification is applied after the recipe's whitening
(the expansion with verified images happens in the whitened space) and needs local features
(``Recipe.apply(q, db, verifier)``).

The file's schema is :class:`RecipeFile` (every number finite and in range, exact types, unknown
keys refused, the whitening ``file`` a plain name beside the recipe); a violation is one line
naming the file and the field (``recipe x.json: rerank.qe: must be an integer in [0, 10000] (got 2.5)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..fileio import FormatError, atomic_write_json, sha256_file
from ..schema import MAX_DIM, FileName, Float, Int, JsonObject, Schema, Sha256, load_schema, show
from ..whitening import MAX_POWER, Whitening, learn_pca_whitening
from .compose import Rerank

#: Recipes shipped with cbir, loadable by name (``--recipe holidays805-lite0``).
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "recipes"
#: Where ``cbir index build --recipe`` keeps a copy, inside the index folder.
INDEX_RECIPE = "recipe.json"
FORMAT = "recipe"
FORMAT_VERSION = 2
#: Versions read; v1 = v2 without ``rerank.verify`` (what is written when verification is off).
READ_VERSIONS = (1, 2)
WHITENING_METHODS = ("none", "pca", "lw")


class WhiteningSpec(Schema):
    """How to whiten: ``method`` none/pca/lw; ``fit`` "database" (PCA learned at use time on the
    database vectors) or "validation" (a projection learned by ``cbir tune``, in ``learned``);
    ``power`` in [0, 2], ``shrinkage`` in [0, 1], ``dim`` in [1, MAX_DIM] as
    :func:`cbir.whitening.learn_pca_whitening` (dim None = all). Positional arguments follow
    that order: ``WhiteningSpec("pca", "database", power=0.5)``."""

    positional_fields: ClassVar[tuple[str, ...]] = ("method", "fit", "power", "shrinkage", "dim")

    method: Literal["none", "pca", "lw"] = "none"
    fit: Literal["database", "validation"] = "database"
    power: Float(ge=0.0, le=MAX_POWER) = 1.0
    shrinkage: Float(ge=0.0, le=1.0) = 0.0
    dim: Int(ge=1, le=MAX_DIM) | None = None

    @field_validator("fit")
    @classmethod
    def _lw_needs_pairs(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("method") == "lw" and v != "validation":
            raise PydanticCustomError("cbir", "Lw needs matching pairs: it can only be learned on the validation "
                                      "sets (fit 'validation', got {got})", {"got": show(v)})
        return v

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
    def from_dict(cls, d: Any, where: str = "whitening spec") -> "WhiteningSpec":
        return cls.parse(d, where)


class RecipeWhitening(WhiteningSpec):
    """The ``whitening`` object of a recipe file: a :class:`WhiteningSpec`, and for a projection
    learned on the validation sets the ``file`` beside the recipe (a plain name) and its ``sha256``."""

    file: FileName | None = None
    sha256: Sha256 | None = None

    def spec(self) -> WhiteningSpec:
        return WhiteningSpec(**self.model_dump(exclude={"file", "sha256"}))


class RecipeFile(Schema):
    """``recipe.json``, format ``recipe`` v1 or v2 (module doc). ``whitening`` / ``rerank`` null or left
    out: none / no re-ranking; ``tuned_on``, ``objective``, ``descriptors``: what ``cbir tune``
    records (informational, plain JSON). Unknown keys are refused; ``rerank.verify`` needs v2."""

    format: Literal["recipe"]
    format_version: Literal[1, 2]
    whitening: RecipeWhitening | None = None
    rerank: Rerank | None = None
    tuned_on: list[JsonObject] | None = None
    objective: JsonObject | None = None
    descriptors: JsonObject | None = None

    @field_validator("rerank")
    @classmethod
    def _no_whiten_path(cls, v: Rerank | None, info: ValidationInfo) -> Rerank | None:
        if v is not None and v.whiten:
            raise PydanticCustomError("cbir", "whiten must be null: a recipe carries its own whitening "
                                      "(the \"whitening\" object)")
        if v is not None and v.verify is not None and info.data.get("format_version") == 1:
            raise PydanticCustomError("cbir", "verify needs format_version 2 (a recipe v1 has no verification)")
        return v


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

    @property
    def verify(self):
        """The recipe's spatial verification (a :class:`cbir.rerank.verify.VerifyParams`) or None."""
        return self.rerank.verify

    def with_verify(self, verify: Any) -> "Recipe":
        """The same recipe with its verification replaced (None: off); the whitening is shared."""
        return Recipe(spec=self.spec, rerank=self.rerank.with_verify(verify), learned=self.learned,
                      meta=dict(self.meta))

    def apply(self, q: np.ndarray, db: np.ndarray, verifier: Any = None) -> tuple[np.ndarray, dict]:
        """q (nq, D), db (n, D) -> (scores (nq, n) float32, applied JSON-ready dict); ``verifier``
        as :meth:`cbir.rerank.compose.Rerank.apply` (verification runs in the whitened space)."""
        if self.rerank.verify is not None and verifier is None:
            from .compose import NEEDS_VERIFIER

            raise ValueError(NEEDS_VERIFIER)
        w = self.whitening_for(db)
        if w is not None:
            if w.in_dim != q.shape[1]:
                raise ValueError(f"the recipe's whitening expects {w.in_dim}-D descriptors, got {q.shape[1]}-D "
                                 "(tuned with another model?)")
            q, db = w.apply(q), w.apply(db)
        scores, applied = self.rerank.apply(q, db, verifier)
        return scores, {"recipe": {"whitening": self.spec.to_dict(), "source": self.meta.get("file")}, **applied}

    def save(self, path: str | Path) -> None:
        """Write ``path`` (JSON) and, for a learned whitening, ``<stem>.whiten.npz`` beside it.

        The document is checked against :class:`RecipeFile` first (nothing is written when it
        would not load back: an unknown meta key, a NaN objective)."""
        path = Path(path)
        whitening: dict[str, Any] = self.spec.to_dict()
        side = None
        if self.learned is not None and self.spec.method != "none" and self.spec.fit == "validation":
            side = path.with_name(path.stem + ".whiten.npz")
        version = FORMAT_VERSION if self.rerank.verify is not None else 1  # v1 readers keep reading the rest
        doc = {"format": FORMAT, "format_version": version, "whitening": whitening,
               "rerank": self.rerank.to_dict(), **{k: v for k, v in self.meta.items() if k != "file"}}
        RecipeFile.parse({**doc, "whitening": {**whitening, **({"file": side.name} if side else {})}},
                         f"recipe {path}")
        if side is not None:
            self.learned.save(side)
            whitening.update(file=side.name, sha256=sha256_file(side))
        atomic_write_json(path, doc)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe file, or the name of one shipped with cbir (``bundled_recipes()``); every field is
        checked (:class:`RecipeFile`; :class:`cbir.schema.SchemaError` naming the file and the field)."""
        path = Path(path)
        if not path.is_file() and path.name == str(path) and (BUNDLED / f"{path.name}.recipe.json").is_file():
            path = BUNDLED / f"{path.name}.recipe.json"
        if not path.is_file():
            known = ", ".join(bundled_recipes()) or "none"
            raise FileNotFoundError(f"recipe not found: {path} (recipes shipped with cbir: {known})")
        doc = load_schema(path, RecipeFile, "recipe", FORMAT, READ_VERSIONS)
        wdoc = doc.whitening or RecipeWhitening()
        spec = wdoc.spec()
        learned = None
        if spec.method != "none" and spec.fit == "validation":
            if wdoc.file is None:
                raise FormatError(f"recipe {path}: whitening.file: is missing (the learned whitening file)")
            side = path.parent / wdoc.file
            if not side.is_file():
                raise FileNotFoundError(f"whitening file of recipe {path} not found: {side}")
            if wdoc.sha256 and sha256_file(side) != wdoc.sha256:
                raise FormatError(f"{side} does not match the sha256 recorded in {path}")
            learned = Whitening.load(side)
        meta = doc.model_dump(include={"tuned_on", "objective", "descriptors"}, exclude_none=True)
        meta["file"] = str(path)
        return cls(spec=spec, rerank=doc.rerank or Rerank(), learned=learned, meta=meta)


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

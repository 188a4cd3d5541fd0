"""The re-ranking options shared by ``cbir evaluate``, ``cbir search`` (``--recipe``, ``--whiten``,
``--qe``, ``--dba``, ``--diffusion*``, ``--verify*``) and what they ask for: a
:class:`cbir.rerank.compose.Rerank` or a :class:`cbir.rerank.recipe.Recipe`.

``--verify K`` (spatial verification of each query's top K) also goes with ``--recipe``: it
replaces the recipe's own verification (``--verify 0``: none, not even the recipe's or the index's).

The library's errors name :class:`~cbir.rerank.compose.Rerank`'s fields (``qe``, ``alpha_qe``,
``diffusion.alpha``); :func:`settings_from_args` says them with this command line's flags
(``--qe``, ``--alpha-qe``, ``--diffusion-alpha``).

Callers::

    from .rerank_options import add_arguments, settings_from_args
    add_arguments(parser)                                   # in register()
    scores, applied = settings_from_args(args).apply(q, db)  # in the handler; applied -> JSON
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..rerank.compose import ALPHA, DBA_K, QE_K, Rerank
from ..rerank.diffusion import DiffusionParams
from ..rerank.recipe import Recipe, recipe_for_index
from ..rerank.verify import VerifyParams
from ..schema import SchemaError
from . import CLIError

__all__ = ["FLAGS", "add_arguments", "rerank_from_args", "settings_from_args"]

_DEF = DiffusionParams()
_VER = VerifyParams()

#: Rerank field -> the option that sets it.
FLAGS = {"whiten": "--whiten", "dba": "--dba", "dba_alpha": "--dba-alpha", "qe": "--qe", "alpha_qe": "--alpha-qe",
         "diffusion": "--diffusion", "diffusion.k": "--diffusion-k", "diffusion.kq": "--diffusion-kq",
         "diffusion.gamma": "--diffusion-gamma", "diffusion.alpha": "--diffusion-alpha",
         "diffusion.trunc": "--diffusion-trunc", "diffusion.sim_weight": "--diffusion-sim-weight",
         "verify": "--verify", "verify.k": "--verify", "verify.min_inliers": "--min-inliers",
         "verify.order": "--verify-order", "verify.expand": "--no-verified-expansion",
         "verify.expand_max": "--expand-max", "verify.weight": "--verify-weight"}
#: VerifyParams field -> argparse dest of its option (besides k = --verify).
_VERIFY_ARGS = {"min_inliers": "min_inliers", "order": "verify_order", "expand_max": "expand_max",
                "weight": "verify_weight"}
_DIFF_ARGS = {"k": "diffusion_k", "kq": "diffusion_kq", "gamma": "diffusion_gamma", "alpha": "diffusion_alpha",
              "trunc": "diffusion_trunc", "sim_weight": "diffusion_sim_weight"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the re-ranking options (group "re-ranking") to an argparse parser.

    Every default is one that did not lower Medium mAP on our three real sets (docs/rerank.md).
    """
    g = parser.add_argument_group(
        "re-ranking",
        "applied in this order: whiten -> DBA -> search -> QE -> diffusion; every default is safe "
        "(it did not lower mAP on our real sets, docs/rerank.md)",
    )
    g.add_argument("--recipe", metavar="FILE", default=None,
                   help="apply a whitening + re-ranking recipe written by `cbir tune` instead of the options below ('none': not even the recipe an index was built with)")
    g.add_argument("--whiten", metavar="FILE", default=None,
                   help="apply a whitening learned by `cbir whiten` to queries and database (then L2)")
    g.add_argument("--dba", metavar="K", type=int, nargs="?", const=DBA_K, default=0,
                   help=f"database-side augmentation: each database vector -> weighted mean of its top-K (incl. itself); K defaults to {DBA_K}")
    g.add_argument("--dba-alpha", metavar="A", type=float, default=None,
                   help=f"DBA weights s^A (default: the --alpha-qe value, else {ALPHA:g}; 0 = plain mean)")
    g.add_argument("--qe", metavar="K", type=int, nargs="?", const=QE_K, default=0,
                   help=f"alpha-weighted query expansion over the top-K results; K defaults to {QE_K}")
    g.add_argument("--alpha-qe", metavar="A", type=float, default=None,
                   help=f"QE weights s^A, query weight 1 (default {ALPHA:g}; 0 = average QE)")
    g.add_argument("--diffusion", action="store_true",
                   help="re-rank by diffusion on the database kNN graph (Iscen et al. CVPR'17), safe defaults")
    g.add_argument("--diffusion-k", metavar="K", type=int, default=None,
                   help=f"neighbours per node in the graph (default min({_DEF.k}, max(2, n // 10)) for n database images)")
    g.add_argument("--diffusion-kq", metavar="K", type=int, default=None,
                   help=f"neighbours of the query in the start vector (default {_DEF.kq})")
    g.add_argument("--diffusion-gamma", metavar="G", type=float, default=None,
                   help=f"similarity exponent (default {_DEF.gamma:g})")
    g.add_argument("--diffusion-alpha", metavar="A", type=float, default=None,
                   help=f"diffusion weight in [0,1) (default {_DEF.alpha:g}; the paper's 0.99 walks too far on our sets)")
    g.add_argument("--diffusion-trunc", metavar="R", type=int, default=None,
                   help="diffuse on each query's top-R region (0 = whole graph; default 0 up to 100,000 images, 10,000 above)")
    g.add_argument("--diffusion-sim-weight", metavar="B", type=float, default=None,
                   help=f"final score f/max(f) + B s^gamma (0 = pure diffusion ranking; default {_DEF.sim_weight:g})")
    add_verify_arguments(parser)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """The spatial-verification options (group "spatial verification"): ``--verify [K]`` and its rules."""
    v = parser.add_argument_group(
        "spatial verification",
        "SIFT features (pycolmap) of each query and of its top K are matched and checked by RANSAC; "
        "images with enough inliers expand the query before QE/diffusion and are ranked first")
    v.add_argument("--verify", metavar="K", type=int, nargs="?", const=_VER.k, default=None,
                   help=f"verify each query's top K geometrically (K defaults to {_VER.k}; 0 = off, even when "
                        "a recipe or the index says otherwise)")
    v.add_argument("--min-inliers", metavar="N", type=int, default=None,
                   help=f"inliers that make an image verified (default {_VER.min_inliers})")
    v.add_argument("--verify-order", metavar="RULE", default=None,
                   help=f"how verified images move up: first (before all others), inliers (first, by inlier "
                        f"count), add (a bounded bonus), none (default {_VER.order})")
    v.add_argument("--verify-weight", metavar="W", type=float, default=None,
                   help=f"the largest bonus of --verify-order add (default {_VER.weight:g})")
    v.add_argument("--no-verified-expansion", action="store_true",
                   help="do not add the verified images to the query before QE/diffusion")
    v.add_argument("--expand-max", metavar="N", type=int, default=None,
                   help="expand with at most N verified images, the most inliers first (default 0 = all)")


def verify_of_args(args: argparse.Namespace) -> tuple[bool, VerifyParams | None]:
    """(given, params) of the verification options: ``given`` False when ``--verify`` is absent
    (the recipe's or the index's setting applies), params None for ``--verify 0``. CLIError naming
    the flag for a bad value, or for a rule option without ``--verify``."""
    k = getattr(args, "verify", None)
    rules = {f: getattr(args, dest) for f, dest in _VERIFY_ARGS.items() if getattr(args, dest, None) is not None}
    if getattr(args, "no_verified_expansion", False):
        rules["expand"] = False
    if k is None:
        if rules:
            raise CLIError(f"{FLAGS['verify.' + next(iter(rules))]} needs --verify K")
        return False, None
    if k == 0:
        return True, None
    try:
        return True, VerifyParams(k=k, **rules)
    except SchemaError as exc:
        raise flag_error(SchemaError(exc.where, [(f"verify.{f}", m) for f, m in exc.errors])) from None


def flag_error(exc: SchemaError) -> CLIError:
    """A Rerank SchemaError said with the flags: ``--qe: must be an integer in [0, 10000] (got -1)``."""
    import re

    names = re.compile(r"(?<![\w.-])(" + "|".join(sorted(map(re.escape, FLAGS), key=len, reverse=True)) + r")(?![\w-])")
    parts = []
    for field, problem in exc.errors:
        flag = FLAGS.get(field, field)
        problem = names.sub(lambda m: FLAGS[m.group(1)], problem)  # field names inside the text
        parts.append(problem if problem.startswith(flag + " ") else f"{flag}: {problem}")
    return CLIError("; ".join(parts) or str(exc))


def rerank_of_args(args: argparse.Namespace) -> Rerank:
    """The :class:`Rerank` of the options of :func:`add_arguments` (missing ones: off); CLIError
    naming the flag for a bad value (``--alpha-qe nan``, ``--qe -1``, ``--diffusion-alpha 1``)."""
    diffusion = None
    if getattr(args, "diffusion", False):
        diffusion = {key: getattr(args, name) for key, name in _DIFF_ARGS.items()
                     if getattr(args, name, None) is not None}
    else:
        given = [FLAGS[f"diffusion.{key}"] for key, name in _DIFF_ARGS.items() if getattr(args, name, None) is not None]
        if given:
            raise CLIError(f"{given[0]} needs --diffusion")
    _, verify = verify_of_args(args)
    try:
        return Rerank(whiten=getattr(args, "whiten", None) or None, dba=int(getattr(args, "dba", 0) or 0),
                      dba_alpha=getattr(args, "dba_alpha", None), qe=int(getattr(args, "qe", 0) or 0),
                      alpha_qe=getattr(args, "alpha_qe", None), diffusion=diffusion, verify=verify)
    except SchemaError as exc:
        raise flag_error(exc) from None


def _rerank_given(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "whiten", None) or getattr(args, "qe", 0) or getattr(args, "dba", 0)
                or getattr(args, "diffusion", False) or getattr(args, "alpha_qe", None) is not None
                or getattr(args, "dba_alpha", None) is not None)


def settings_from_args(args: argparse.Namespace, index: str | Path | None = None) -> Rerank | Recipe:
    """What the options of :func:`add_arguments` ask for: a :class:`Rerank`, or the
    :class:`cbir.rerank.recipe.Recipe` of ``--recipe FILE`` (which excludes the other options but
    ``--verify*``, which replace the recipe's verification). Both have ``apply(q, db[, verifier])
    -> (scores, applied)``. ``index``: an index folder whose kept recipe (``cbir index build
    --recipe``) applies when no option is given (``--recipe none``: none), and whose verification
    setting (``cbir index build --verify K``: INDEX/verify.json) applies unless ``--verify`` is
    given or the recipe has its own."""
    recipe = getattr(args, "recipe", None)
    if recipe and recipe.lower() != "none" and _rerank_given(args):
        raise CLIError("--recipe replaces --whiten/--dba/--qe/--diffusion: give one or the other")
    given, verify = verify_of_args(args)
    settings = rerank_of_args(args)
    found = None
    if recipe and recipe.lower() == "none":
        found = None
    elif recipe or (index is not None and settings.with_verify(None).is_off()):
        found = recipe_for_index(index or ".", recipe)
    out: Rerank | Recipe = settings if found is None else found
    if given:
        return out.with_verify(verify)
    if index is not None and out.verify is None:
        from ..index.local import load_verify

        kept = load_verify(index)
        if kept is not None:
            return out.with_verify(kept)
    return out


def rerank_from_args(args: argparse.Namespace, q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, dict]:
    """Apply the options added by :func:`add_arguments`; q (nq, D), db (n, D) -> (scores, applied).

    Missing attributes fall back to "off", so any namespace works. ``applied`` is JSON-ready and
    empty when nothing was applied (scores are then the plain inner products of L2-normalised rows).
    ``--recipe FILE`` applies a :class:`cbir.rerank.recipe.Recipe` and excludes the other options.
    """
    return settings_from_args(args).apply(q, db)

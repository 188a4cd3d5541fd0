"""How results are shown: a text table, a top-10 picture per query, JSON-ready dicts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

class MissingDependency(RuntimeError):
    """An optional dependency (an extra of the package) is not installed."""


PROTO_LABEL = {"easy": "Easy", "medium": "Medium", "hard": "Hard", "all": "all"}


def _fmt(v: float) -> str:
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"


def format_table(res: dict) -> str:
    """The result of cbir.pipeline.score as a text table: one row per protocol, mAP then mP@k."""
    kappas = res["kappas"]
    head = f"{'protocol':<9} {'mAP':>6}  " + "  ".join(f"{'mP@' + str(k):>6}" for k in kappas)
    lines = [head, "-" * len(head)]
    for proto, value in res["mAP"].items():
        mp = res["mP"][proto]
        lines.append(f"{PROTO_LABEL.get(proto, proto):<9} {_fmt(value)}  " + "  ".join(_fmt(mp[k]) for k in kappas))
    if "recall" in res:
        lines.append("recall@k  " + "  ".join(f"@{k}: {_fmt(v).strip()}" for k, v in res["recall"].items()))
    if "mAP@100" in res:
        lines.append(f"mAP@100   {_fmt(res['mAP@100'])}")
    return "\n".join(lines)


def plot_top10(path: str | Path, ds, scores: np.ndarray, max_queries: int = 20) -> int:
    """PNG grid: per query, the (cropped) query then its top-10 framed green (positive), red
    (negative) or grey (junk); revisitop datasets use the Medium protocol. Returns #queries drawn."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependency("--plot needs matplotlib: pip install 'cbir[plot]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluation import rank_from_scores, revisitop_protocols
    from .extract import load_image
    from .fileio import atomic_write_with

    gnd = revisitop_protocols(ds.gnd)["medium"] if ds.protocol == "revisitop" else ds.gnd
    nq = min(len(ds.query_ids), max_queries)
    ranks = rank_from_scores(scores[:nq], top_k=10)
    fig, axes = plt.subplots(nq, 11, figsize=(22, 2.2 * nq), squeeze=False)
    colours = {"positive": "#1a9641", "negative": "#d7191c", "junk": "#969696"}
    for i in range(nq):
        ok, junk = set(np.asarray(gnd[i]["ok"]).tolist()), set(np.asarray(gnd[i].get("junk", [])).tolist())
        ax = axes[i, 0]
        try:
            ax.imshow(_thumb(load_image(ds.query_paths[i], ds.query_bboxes[i])))
        except ValueError:
            pass
        ax.set_title(f"query {ds.query_ids[i]}"[:30], fontsize=7)
        _frame(ax, "#2b83ba")
        for r in range(10):
            ax = axes[i, r + 1]
            if r >= ranks.shape[1]:
                ax.axis("off")
                continue
            d = int(ranks[i, r])
            kind = "positive" if d in ok else "junk" if d in junk else "negative"
            try:
                ax.imshow(_thumb(load_image(ds.db_paths[d])))
            except ValueError:
                pass
            ax.set_title(f"{r + 1}. {kind}", fontsize=7, color=colours[kind])
            _frame(ax, colours[kind])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))
    plt.close(fig)
    return nq


def _thumb(im):
    im = im.copy()
    im.thumbnail((256, 256))
    return np.asarray(im)


def _frame(ax, colour: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(colour)
        s.set_linewidth(4)


def jsonable(res: dict) -> dict:
    """``res`` with numpy scalars as Python numbers, NaN and ±inf as None and keys as strings (strict JSON)."""
    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (np.floating, np.integer)):
            return fix(v.item())
        return v

    return fix(res)

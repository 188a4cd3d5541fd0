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


def plot_top10(path: str | Path, ds, scores: np.ndarray, max_queries: int = 20, *, verifier: Any = None,
               min_inliers: int | None = None, per_query: int = 3) -> int:
    """PNG grid: per query, the (cropped) query then its top-10 framed green (positive), red
    (negative) or grey (junk); revisitop datasets use the Medium protocol. Returns #queries drawn.

    ``verifier`` (a :class:`cbir.local.verifier.FeatureVerifier` that kept its matches): each
    verified result's title also gives its inlier count, and ``<stem>-matches.png`` beside
    ``path`` shows, per query, its first ``per_query`` verified results of the top 10 beside the
    query with the inlier correspondences drawn as lines (:func:`plot_matches`)."""
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
            n = verifier.count(i, d) if verifier is not None else None
            mark = "" if n is None or n == 0 else (" (itself)" if n < 0 else f" ({n} inl.)")
            ax.set_title(f"{r + 1}. {kind}{mark}", fontsize=7, color=colours[kind])
            _frame(ax, colours[kind])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))
    plt.close(fig)
    if verifier is not None:
        if min_inliers is None:
            from .rerank.verify import VerifyParams

            min_inliers = VerifyParams().min_inliers
        pairs = []
        for i in range(nq):
            rows = [int(d) for d in ranks[i] if (verifier.count(i, int(d)) or 0) >= min_inliers][:per_query]
            if rows:
                pairs.append((i, rows))
        plot_matches(matches_path(path), ds, verifier, pairs)
    return nq


def matches_path(path: str | Path) -> Path:
    """Where :func:`plot_top10` draws the correspondences: ``<stem>-matches.png`` beside ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-matches{path.suffix or '.png'}")


def side_by_side(left, right, height: int = 256) -> tuple[np.ndarray, float, float, int]:
    """Two PIL images scaled to ``height`` and put side by side -> (pixels, scale of left, scale of
    right, x offset of right)."""
    from PIL import Image

    sl, sr = height / left.height, height / right.height
    a = left.resize((max(1, round(left.width * sl)), height))
    b = right.resize((max(1, round(right.width * sr)), height))
    canvas = Image.new("RGB", (a.width + 8 + b.width, height), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + 8, 0))
    return np.asarray(canvas), sl, sr, a.width + 8


def plot_matches(path: str | Path, ds, verifier: Any, rows: list[tuple[int, list[int]]], max_lines: int = 300) -> int:
    """PNG: per (query i, database rows) of ``rows`` a row of panels, each result beside the whole
    query photo with the inlier correspondences of ``verifier`` (``matches(i, row)``: query and
    result pixels) drawn as lines (at most ``max_lines`` each, evenly chosen); no pair: a panel
    that says so. Returns the number of pairs drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .extract import load_image
    from .fileio import atomic_write_with

    cols = max([len(r) for _, r in rows] + [1])
    fig, axes = plt.subplots(max(len(rows), 1), cols, figsize=(7 * cols, 2.6 * max(len(rows), 1)), squeeze=False)
    drawn = 0
    if not rows:
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, "no verified result in the top 10 of these queries", ha="center", va="center")
    for r_i, (i, picks) in enumerate(rows):
        for c in range(cols):
            ax = axes[r_i, c]
            ax.axis("off")
            if c >= len(picks):
                continue
            d = picks[c]
            m = verifier.matches(i, d)
            try:
                left, right = load_image(ds.query_paths[i]), load_image(ds.db_paths[d])
            except ValueError:
                continue
            pixels, sl, sr, dx = side_by_side(left, right)
            ax.imshow(pixels)
            if m is not None and len(m):
                pick = np.linspace(0, len(m) - 1, min(len(m), max_lines)).round().astype(int)
                for x1, y1, x2, y2 in m[pick]:
                    ax.plot([x1 * sl, dx + x2 * sr], [y1 * sl, y2 * sr], "-", color="#ffcc00", linewidth=0.6, alpha=0.8)
            ax.set_title(f"query {ds.query_ids[i]} - {ds.db_ids[d]}: {verifier.count(i, d)} inliers"[:80], fontsize=8)
            drawn += 1
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))
    plt.close(fig)
    return drawn


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

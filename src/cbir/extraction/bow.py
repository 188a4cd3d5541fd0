"""Bag of words: fitting a codebook on a model's local features, and codebook files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..device import resolve_device
from ..fileio import FormatError, atomic_open
from .batching import iter_batches, prepare_model

__all__ = ["fit_bow", "save_codebook", "load_codebook", "CODEBOOK_FORMAT", "CODEBOOK_VERSION"]

CODEBOOK_FORMAT, CODEBOOK_VERSION = "cbir-bow-codebook", 1


def fit_bow(
    model,
    images: Sequence[str | os.PathLike[str]],
    *,
    imsize: int | None = 1024,
    sample: int = 200,
    per_image: int = 300,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Fit ``model``'s BoW codebook (k-means, faiss) on local features of up to ``sample`` images
    (``per_image`` random positions each, scale 1), then idf from the hard histograms of those images.
    Sets it on ``model.pooling`` and returns {"codebook", "idf", "images"}."""
    from ..pooling import bow_hard, bow_idf, fit_codebook, local_features

    pool = model.pooling
    rng = np.random.default_rng(seed)
    paths = [Path(p) for p in images]
    pick = sorted(rng.choice(len(paths), size=min(sample, len(paths)), replace=False).tolist())
    dev = resolve_device(device)
    prepare_model(model, dev, False)
    feats, maps, failed = [], [], []
    with torch.inference_mode():
        for _, x in iter_batches(paths=[paths[i] for i in pick], bboxes=[None] * len(pick), imsize=imsize,
                                 mean=model.mean, std=model.std, batch_size=1, workers=0, failed=failed):
            fmap = model.features(x.to(dev)).float()
            loc = local_features(fmap)[0].cpu().numpy()
            take = rng.choice(loc.shape[0], size=min(per_image, loc.shape[0]), replace=False)
            feats.append(loc[take])
            maps.append(fmap.cpu())
    if not feats:
        raise ValueError("no readable image to fit the BoW codebook on")
    codebook = fit_codebook(np.concatenate(feats), pool.k, seed=seed)
    cb = torch.from_numpy(codebook)
    hist = np.stack([bow_hard(m, cb)[0].numpy() for m in maps])
    idf = bow_idf(hist)
    pool.set_codebook(codebook, idf)
    pool.to(dev)
    return {"codebook": codebook, "idf": idf, "images": len(feats)}


def save_codebook(path: str | os.PathLike[str], codebook: np.ndarray, idf: np.ndarray, about: dict | None = None) -> None:
    """Atomic .npz with the codebook (K,C), idf (K,) and a format stamp."""
    stamp = json.dumps({"format": CODEBOOK_FORMAT, "format_version": CODEBOOK_VERSION, **(about or {})})
    with atomic_open(path, "wb") as fh:
        np.savez(fh, codebook=np.asarray(codebook, np.float32), idf=np.asarray(idf, np.float32),
                 meta=np.array(stamp))


def load_codebook(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(codebook (K,C), idf (K,), stamp) from a file written by :func:`save_codebook`; FormatError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codebook file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            codebook, idf = z["codebook"], z["idf"]
    except Exception as exc:
        raise FormatError(f"{path} is not a cbir BoW codebook ({exc})") from exc
    if meta.get("format") != CODEBOOK_FORMAT or meta.get("format_version") != CODEBOOK_VERSION:
        raise FormatError(f"{path} is not a cbir BoW codebook (format {meta.get('format')!r})")
    return codebook, idf, meta

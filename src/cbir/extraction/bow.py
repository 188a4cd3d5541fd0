"""Bag of words: fitting a codebook on a model's local features, and codebook files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..device import resolve_device
from ..fileio import FormatError, load_stamped_npz, save_stamped_npz
from .batching import iter_batches, prepare_model

__all__ = ["fit_bow", "fit_bow_on_maps", "save_codebook", "load_codebook", "CODEBOOK_FORMAT", "CODEBOOK_VERSION"]

CODEBOOK_FORMAT, CODEBOOK_VERSION = "cbir-bow-codebook", 1


def fit_bow_on_maps(pool, maps: Sequence[torch.Tensor], *, rng: np.random.Generator, per_image: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit the BoW codebook of ``pool`` on feature maps (1, C, h, w): ``per_image`` random local
    features of each map (drawn from ``rng``, in map order), k-means (faiss, ``seed``), then idf from
    the hard histograms of the same maps. Sets them on ``pool``; returns (codebook (K, C), idf (K,))."""
    from ..pooling import bow_hard, bow_idf, fit_codebook, local_features

    feats = []
    for fmap in maps:
        loc = local_features(fmap.float())[0].cpu().numpy()
        take = rng.choice(loc.shape[0], size=min(per_image, loc.shape[0]), replace=False)
        feats.append(loc[take])
    codebook = fit_codebook(np.concatenate(feats), pool.k, seed=seed)
    cb = torch.from_numpy(codebook)
    idf = bow_idf(np.stack([bow_hard(m.float(), cb)[0].numpy() for m in maps]))
    pool.set_codebook(codebook, idf)
    return codebook, idf


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
    pool = model.pooling
    rng = np.random.default_rng(seed)
    paths = [Path(p) for p in images]
    pick = sorted(rng.choice(len(paths), size=min(sample, len(paths)), replace=False).tolist())
    dev = resolve_device(device)
    prepare_model(model, dev, False)
    maps, failed = [], []
    with torch.inference_mode():
        for _, x in iter_batches(paths=[paths[i] for i in pick], bboxes=[None] * len(pick), imsize=imsize,
                                 mean=model.mean, std=model.std, batch_size=1, workers=0, failed=failed):
            maps.append(model.features(x.to(dev)).float().cpu())
    if not maps:
        raise ValueError("no readable image to fit the BoW codebook on")
    codebook, idf = fit_bow_on_maps(pool, maps, rng=rng, per_image=per_image, seed=seed)
    pool.to(dev)
    return {"codebook": codebook, "idf": idf, "images": len(maps)}


def save_codebook(path: str | os.PathLike[str], codebook: np.ndarray, idf: np.ndarray, about: dict | None = None) -> None:
    """Atomic .npz with the codebook (K,C), idf (K,) and a format stamp (:func:`cbir.fileio.save_stamped_npz`)."""
    save_stamped_npz(path, {"codebook": np.asarray(codebook, np.float32), "idf": np.asarray(idf, np.float32)},
                     dict(about or {}), CODEBOOK_FORMAT, CODEBOOK_VERSION)


def load_codebook(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(codebook (K,C), idf (K,), about) from a file written by :func:`save_codebook`;
    FileNotFoundError when missing, FormatError otherwise."""
    arrays, meta = load_stamped_npz(path, CODEBOOK_FORMAT, (CODEBOOK_VERSION,), what="cbir BoW codebook")
    if "codebook" not in arrays or "idf" not in arrays:
        raise FormatError(f"{path} is not a cbir BoW codebook (no codebook/idf arrays)")
    return arrays["codebook"], arrays["idf"], meta

"""What decides the result of ``cbir mine`` (and of :func:`cbir.sfm.verified.verified_pairs`): two
strict schemas, stored in the output folder so that a rerun can tell whether it continues the same
work.

:class:`PairSettings` — the verified-pair stage: the global model (kNN), the candidate count, the
local features, RANSAC, the inlier threshold and the weak-bridge rule of the clustering.
:class:`MineSettings` — that plus the reconstruction (pycolmap incremental mapping) and the tuples
(3D-only positives, held-out clusters).

Defaults are those of the issue's prototype (SIFT at 640 px / 1024 features, 10 nearest neighbours,
15 inliers) and of :class:`cbir.local.verify.VerifySettings`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..local.features import LocalFeatureSettings
from ..local.verify import VerifySettings
from ..schema import Bool, Float, Int, Schema, Str

__all__ = ["PairSettings", "MineSettings", "MINING_LOCAL", "settings_digest", "changed_fields"]

#: Local features for mining: the prototype's 640 px / 1024 features (RootSIFT, COLMAP's octaves).
MINING_LOCAL = LocalFeatureSettings(max_size=640, max_features=1024)


class PairSettings(Schema):
    """The verified-pair stage (:func:`cbir.sfm.verified.verified_pairs`).

    ``model``/``pooling``/``weights``/``imsize``/``scales``: the global descriptor (None: the
    model's defaults, e.g. Lite0 512 px x (1, 0.707, 0.5)); ``k``: each photo's k nearest
    neighbours are its candidate pairs; ``local``, ``verify``: SIFT and RANSAC; a pair is verified
    when its inlier count is >= ``min_inliers``; ``bridge_inliers``: a verified pair that is the
    only link between two groups of >= 2 photos each (a bridge of the graph) joins them only with
    at least that many inliers (0: never cut), see :func:`cbir.sfm.graph.cluster_graph`.
    """

    model: Str = "efficientnet_lite0"
    pooling: Str = "gem"
    weights: Str = "default"
    imsize: Int(ge=16, le=16384) | None = None
    scales: tuple[Float(gt=0.0, le=8.0), ...] | None = None
    k: Int(ge=1, le=1000) = 10
    local: LocalFeatureSettings = Field(default_factory=lambda: MINING_LOCAL)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    min_inliers: Int(ge=1, le=100000) = 15
    bridge_inliers: Int(ge=0, le=100000) = 30

    def resolution(self) -> tuple[int, tuple[float, ...]]:
        """(imsize, scales) the global descriptors are made at: the ones given, else the model's
        defaults (:func:`cbir.backbones.default_resolution`; a model file by its saved configuration)."""
        from ..backbones import default_resolution
        from ..model import ModelSpec, model_file_config

        if self.imsize is not None and self.scales is not None:
            return int(self.imsize), tuple(float(s) for s in self.scales)
        spec = ModelSpec(self.model, self.pooling, self.weights)
        if spec.is_file:
            config = model_file_config(spec.model)
            d_imsize, d_scales = default_resolution(str(config.get("model", "")), config)
        else:
            d_imsize, d_scales = default_resolution(spec.model)
        imsize = int(self.imsize if self.imsize is not None else d_imsize)
        return imsize, tuple(float(s) for s in (self.scales if self.scales is not None else d_scales))


class MineSettings(Schema):
    """``cbir mine``: :class:`PairSettings` and the steps after them.

    ``reconstruct``: run pycolmap's incremental mapping on every cluster of at least
    ``min_model_images`` photos; ``init_min_inliers`` / ``abs_pose_min_inliers``: the mapper's
    thresholds for its first pair and for registering an image (COLMAP's 100 / 30 are made for
    thousands of features; mined pairs of 1024 features rarely reach 100); ``max_seconds``: a time
    cap per cluster (-1: none; a cap makes the result depend on the machine's speed).
    ``min_shared_points``: two photos of a cluster that are not a verified pair are still a
    positive when one 3D model holds at least that many points seen in both. ``val_fraction``:
    clusters held out whole as the ``val`` split (none when fewer than 4 clusters), drawn with ``seed``.
    """

    pairs: PairSettings = Field(default_factory=PairSettings)
    reconstruct: Bool = True
    min_model_images: Int(ge=2, le=100000) = 3
    init_min_inliers: Int(ge=8, le=100000) = 50
    abs_pose_min_inliers: Int(ge=6, le=100000) = 15
    max_seconds: Int(ge=-1, le=10**7) = -1
    min_shared_points: Int(ge=1, le=1000000) = 15
    val_fraction: Float(ge=0.0, lt=1.0) = 0.2
    seed: Int(ge=0, le=2**32 - 1) = 0


def settings_digest(doc: Any) -> str:
    """sha256 of the canonical JSON of ``doc`` (settings, photo lists): :func:`cbir.cache.identity.key_of`."""
    from ..cache.identity import key_of

    return key_of(doc, 64)


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two JSON-ready settings documents."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(all)"]

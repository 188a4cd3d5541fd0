"""Local features: SIFT / RootSIFT keypoints and descriptors of one image through COLMAP (pycolmap).

An image is decoded by :func:`cbir.extraction.images.load_image` (EXIF orientation, RGB; the same
decoder and crop-box rule as the global descriptors), cropped to ``bbox``, converted to grey (PIL
"L": ITU-R 601-2 luma), shrunk so that its longest side is at most ``max_size`` pixels (bicubic,
never enlarged: :func:`cbir.extraction.images.resized_size`) and given to COLMAP's SIFT
(``pycolmap.FeatureExtractor``, CPU or CUDA).

Coordinates: COLMAP puts pixel centres at +0.5 (the top-left corner of the image is (0, 0)), so a
keypoint (x, y) of the shrunk image is ``(x * sx + x1, y * sy + y1)`` in the original image, with
``sx = W_crop / w``, ``sy = H_crop / h`` the shrink factors and (x1, y1) the crop box's corner;
its scale is multiplied by ``sqrt(sx * sy)``; its orientation (radians) is unchanged (the aspect
ratio is kept to within a rounding pixel).

Descriptors are COLMAP's byte form: the 128 floats d (unit L2 norm after COLMAP's normalisation;
RootSIFT = ``L1_ROOT``: d = sqrt(d / |d|_1) (Arandjelovic & Zisserman, CVPR'12), the default) stored
as ``min(255, round(512 d))`` uint8 (COLMAP's ``FeatureDescriptorsToUnsignedByte``), i.e. vectors
of norm ~512 whose inner products are exact in float32. 128 bytes a feature.

``max_features``: COLMAP keeps whole DoG levels from the coarsest down until more than
``max_num_features`` keypoints are kept, and may give a keypoint up to two orientations (each its
own descriptor); :func:`extract_local` then keeps the ``max_features`` coarsest descriptors (the
tail of COLMAP's list, which runs from fine to coarse), so the matching cost per pair is bounded
by ``max_features`` squared.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..extraction.images import Box, ImageError, clip_box, label, load_image, resized_size

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["LocalFeatureSettings", "LocalFeatures", "extract_local", "check_features", "DESCRIPTOR_DIM",
           "DEVICES", "pycolmap_device", "quiet_pycolmap", "to_gray"]

#: Width of a SIFT descriptor.
DESCRIPTOR_DIM = 128
#: Devices the extractor and matcher accept ("auto": CUDA where pycolmap was built with it, else CPU).
DEVICES = ("auto", "cpu", "cuda")
#: Bumped when the way features are computed changes (part of :meth:`LocalFeatureSettings.key`).
ALGORITHM_VERSION = 1


class LocalFeatureSettings(BaseModel):
    """What decides the local features of an image (frozen; ``key()`` names them for caches/stores).

    ``max_size``: longest side (pixels) the image (or its crop) is shrunk to, never enlarged;
    ``max_features``: the most descriptors kept; ``root``: RootSIFT (COLMAP's ``L1_ROOT``) instead
    of L2-normalised SIFT; ``peak_threshold``: COLMAP's DoG peak threshold (lower = more, weaker
    keypoints); ``first_octave``: -1 (COLMAP's default) starts the scale space at twice the image
size (more, finer keypoints), 0 at the image size (about 3 to 4 times faster, and where
``max_features`` would drop the finest levels anyway, nearly the same features); ``upright``: one
orientation (0) per keypoint, for collections with no rotated photos.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["sift"] = "sift"
    max_size: int = Field(1024, ge=16, le=16384)
    max_features: int = Field(1024, ge=1, le=65536)
    root: bool = True
    peak_threshold: float = Field(0.02 / 3, gt=0.0, lt=1.0)
    first_octave: int = Field(-1, ge=-1, le=0)
    upright: bool = False

    def key(self) -> str:
        """A stable name of these settings, e.g. ``sift-1024px-1024-root-6a1f0c2e``: readable fields
        then 8 hex digits of the sha256 of every field (and :data:`ALGORITHM_VERSION`)."""
        from ..cache.identity import key_of

        digest = key_of({**self.model_dump(), "algorithm": ALGORITHM_VERSION}, 8)
        norm = "root" if self.root else "l2"
        return f"{self.kind}-{self.max_size}px-{self.max_features}-{norm}-{digest}"


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """The local features of one image.

    ``keypoints`` (N, 4) float32: x, y (original image pixels, corner-origin: pixel centres at +0.5,
    crop boxes already added), scale (pixels), orientation (radians); ``descriptors`` (N, 128)
    uint8 (COLMAP's byte form, norm ~512); ``size``: (width, height) of the whole decoded image
    (EXIF rotation applied), the frame of the keypoints; ``scale``: original pixels per pixel of
    the shrunk image the features were found in (>= 1; sqrt(sx * sy)), so that a tolerance given
    in extraction pixels (RANSAC's threshold) is ``scale`` times larger in keypoint units.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_features(self.keypoints, self.descriptors, self.size, "local features")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"local features: scale must be a positive number, got {self.scale!r}")

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def xy(self) -> np.ndarray:
        """(N, 2) float64 keypoint positions (what pycolmap's estimators take)."""
        return np.asarray(self.keypoints[:, :2], dtype=np.float64)


def check_features(keypoints: Any, descriptors: Any, size: Any, where: str) -> None:
    """ValueError (one line starting with ``where``) unless keypoints are (N, 4) finite float32,
    descriptors (N, 128) uint8 and size two positive ints."""
    if not isinstance(keypoints, np.ndarray) or keypoints.dtype != np.float32 or keypoints.ndim != 2 \
            or keypoints.shape[1] != 4:
        raise ValueError(f"{where}: keypoints must be an (N, 4) float32 array, got "
                         f"{getattr(keypoints, 'dtype', type(keypoints).__name__)} {getattr(keypoints, 'shape', '')}")
    if not isinstance(descriptors, np.ndarray) or descriptors.dtype != np.uint8 or descriptors.ndim != 2 \
            or descriptors.shape[1] != DESCRIPTOR_DIM:
        raise ValueError(f"{where}: descriptors must be an (N, {DESCRIPTOR_DIM}) uint8 array, got "
                         f"{getattr(descriptors, 'dtype', type(descriptors).__name__)} {getattr(descriptors, 'shape', '')}")
    if keypoints.shape[0] != descriptors.shape[0]:
        raise ValueError(f"{where}: {keypoints.shape[0]} keypoints for {descriptors.shape[0]} descriptors")
    if not np.isfinite(keypoints).all():
        raise ValueError(f"{where}: keypoints hold NaN or infinite values")
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise ValueError(f"{where}: image size must be two positive integers, got {size!r}")


def pycolmap_device(device: str) -> Any:
    """``"auto" | "cpu" | "cuda"`` -> ``pycolmap.Device``; ValueError for CUDA without a CUDA build."""
    import pycolmap

    if device not in DEVICES:
        raise ValueError(f"local-feature device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not pycolmap.has_cuda:
        raise ValueError("device 'cuda' was requested but this pycolmap has no CUDA (use --device cpu)")
    return getattr(pycolmap.Device, device)


def quiet_pycolmap() -> None:
    """Raise COLMAP's log threshold to WARNING (its INFO lines, e.g. "Creating SIFT CPU feature
    extractor", would be printed on every extractor): the library does not print."""
    import pycolmap

    if pycolmap.logging.minloglevel < 1:
        pycolmap.logging.minloglevel = 1


@functools.lru_cache(maxsize=8)
def _extractor(settings: LocalFeatureSettings, device: str) -> Any:
    """One pycolmap SIFT extractor per (settings, device), reused (creating one is cheap, but its
    buffers are not). pycolmap holds the GIL while it extracts, so sharing it across threads is safe."""
    import pycolmap

    quiet_pycolmap()
    opts = pycolmap.FeatureExtractionOptions()
    opts.max_image_size = int(settings.max_size)  # the image is already shrunk: COLMAP does not resize
    opts.num_threads = 1
    sift = opts.sift
    sift.max_num_features = int(settings.max_features)
    sift.peak_threshold = float(settings.peak_threshold)
    sift.upright = bool(settings.upright)
    sift.first_octave = int(settings.first_octave)
    norm = pycolmap.SiftExtractionOptions().normalization.__class__
    sift.normalization = norm.L1_ROOT if settings.root else norm.L2
    dev = pycolmap_device(device)
    opts.use_gpu = device == "cuda" or (device == "auto" and pycolmap.has_cuda)
    return pycolmap.FeatureExtractor.create(opts, dev)


def to_gray(im: "Image.Image", max_size: int) -> tuple[np.ndarray, float, float]:
    """PIL image -> ((h, w) uint8 grey pixels, sx, sy): shrunk (bicubic) so that max(w, h) <= max_size,
    with sx = W / w and sy = H / h the factors that map its coordinates back to ``im``'s."""
    from PIL import Image as PILImage

    gray = im.convert("L")
    size = resized_size(gray.width, gray.height, max_size)
    if size != gray.size:
        gray = gray.resize(size, PILImage.BICUBIC)
    return np.ascontiguousarray(np.asarray(gray, dtype=np.uint8)), im.width / size[0], im.height / size[1]


def extract_local(
    image: "str | os.PathLike[str] | bytes | Image.Image",
    settings: LocalFeatureSettings | None = None,
    bbox: Box | None = None,
    *,
    device: str = "auto",
) -> LocalFeatures:
    """SIFT/RootSIFT features of ``image`` (a path, the file's bytes, or a decoded PIL image), inside
    ``bbox`` (x1, y1, x2, y2 in the image's pixels) when given; keypoints in the whole image's pixels.

    ImageError (one line naming the file) for a missing, empty, damaged or non-image file and for a
    box with no pixel inside the image. An image too small or too flat for any keypoint gives 0 features.
    """
    from PIL import Image as PILImage

    settings = settings or LocalFeatureSettings()
    name = "<PIL image>" if isinstance(image, PILImage.Image) else label(image)
    if isinstance(image, PILImage.Image):
        full = image.convert("RGB")
    else:
        full = load_image(image)
    width, height = full.size
    x1 = y1 = 0
    if bbox is not None:
        x1, y1, x2, y2 = clip_box(name, bbox, width, height)
        full = full.crop((x1, y1, x2, y2))
    extractor = _extractor(settings, device)  # a bad device is the caller's error, not the image's
    pixels, sx, sy = to_gray(full, settings.max_size)
    if min(pixels.shape) < 2:
        return _empty((width, height), float(np.sqrt(sx * sy)))
    try:
        kps, descs = extractor.extract_from_uint8_array(pixels)
    except Exception as exc:  # COLMAP raises RuntimeError/ValueError on images it cannot use
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImageError(name, f"SIFT extraction failed ({first_line})") from exc
    desc = np.ascontiguousarray(descs.data, dtype=np.uint8)
    total = min(len(kps), desc.shape[0])
    n = min(total, settings.max_features)
    if n == 0:
        return _empty((width, height), float(np.sqrt(sx * sy)))
    first = total - n  # COLMAP lists the DoG levels from the finest kept to the coarsest: keep the coarse end
    kp = np.empty((n, 4), dtype=np.float32)
    for i in range(n):
        p = kps[first + i]
        kp[i] = (p.x, p.y, p.compute_scale(), p.compute_orientation())
    kp[:, 0] = kp[:, 0] * sx + x1
    kp[:, 1] = kp[:, 1] * sy + y1
    scale = float(np.sqrt(sx * sy))
    kp[:, 2] *= np.float32(scale)
    return LocalFeatures(keypoints=kp, descriptors=desc[first:total].copy(), size=(int(width), int(height)),
                         scale=scale)


def _empty(size: tuple[int, int], scale: float) -> LocalFeatures:
    return LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, DESCRIPTOR_DIM), np.uint8),
                         (int(size[0]), int(size[1])), scale)

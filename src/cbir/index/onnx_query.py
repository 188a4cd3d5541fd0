"""An index's network kept in a form ONNX Runtime runs, so that a query is described without torch.

``import torch`` alone takes ~1.6 s and building the network (timm) ~2 s more, while describing one
photo takes a fraction of a second: ``cbir search --image`` therefore describes its query with the
network exported to ONNX when the index has it. The file sits in the index folder::

    INDEX/query-model.npz     format "cbir-query-model" v1 (cbir.fileio.save_stamped_npz): the ONNX
                              graph of ``net.pool`` (backbone + pooling + L2; dynamic height and
                              width) as bytes, the whitening head (weight, bias) when there is one,
                              and meta: key, mean/std, the scale exponent p, dims, and the check made
                              when it was exported (cosine to the torch descriptors of real photos)

It is written by ``cbir index build`` (and, for an index made before it existed, on its first
search: atomically, into the index folder or, when that is read-only, the cache folder), and
used only when its ``key`` equals the key of the index's settings (:func:`query_model_key`: the
model's identity with the weights by content, its description, the format and
:data:`cbir.cache.identity.EXTRACTION_VERSION`). An index without it, or with a stale one, works as
before: the query is described by torch (and a new file is exported).

The query itself: decoded, cropped and shrunk by :mod:`cbir.extraction.images` (PIL), normalised,
rescaled and combined over scales by :mod:`cbir.extraction.numpy_path` (the same numbers as the
torch loop, to float rounding), each scale through the ONNX graph, then the head.
Export and check need torch; loading and running need only ``onnxruntime`` and numpy.

(The extraction backends of :mod:`cbir.extraction.backends` export the same ``net.pool`` for
whole-folder extraction; :func:`export_pool_onnx` is the one function both can share.)
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..cache.identity import EXTRACTION_VERSION, key_of, source_identity
from ..extraction import numpy_path as npp
from ..fileio import FormatError, save_stamped_npz

__all__ = ["QUERY_MODEL", "FORMAT", "FORMAT_VERSION", "MIN_COSINE", "QueryModel", "OnnxQueryEncoder",
           "query_model_key", "export_pool_onnx", "build_query_model", "load_query_model", "ensure_query_model",
           "QueryModelCheckFailed"]

QUERY_MODEL = "query-model.npz"
FORMAT = "cbir-query-model"
FORMAT_VERSION = 1
#: The exported network is kept only when its descriptors agree with torch's this closely (cosine).
MIN_COSINE = 0.999
_OPSET = 17
Box = tuple[float, float, float, float]


class QueryModelCheckFailed(ValueError):
    """The exported network's descriptors differ from the torch network's (cosine below MIN_COSINE)."""


def query_model_key(settings: dict[str, Any], digest: Any = None) -> str:
    """The key an index's exported network must carry: its model identity (weights by content),
    the description its descriptors were made with, and the versions of this format and of extraction."""
    described = {k: settings.get(k) for k in ("model", "pooling", "pooling_params", "whitening", "dim")}
    return key_of({"format_version": FORMAT_VERSION, "extraction_version": EXTRACTION_VERSION,
                   "model": source_identity(dict(settings.get("source") or {}), digest), "describe": described})


class QueryModel:
    """An exported network: ONNX bytes, the head (whitening) arrays, and its meta (see module doc).

    Read from a file, the ONNX bytes (megabytes) are read only when a session needs them: a search
    whose machine keeps the optimised graph (:func:`optimized_file`) reads the meta alone.
    """

    def __init__(self, onnx: bytes | None, meta: dict[str, Any], head: dict[str, np.ndarray] | None = None,
                 source: Path | None = None) -> None:
        self._onnx = onnx
        self.meta = dict(meta)
        self.head = dict(head or {})
        self.source = source

    @property
    def key(self) -> str:
        return str(self.meta.get("key", ""))

    @property
    def onnx(self) -> bytes:
        """The ONNX graph (read from :attr:`source` on first use; FormatError when it is damaged)."""
        if self._onnx is None:
            if self.source is None:
                raise FormatError("no ONNX graph")
            try:
                with np.load(self.source, allow_pickle=False) as z:
                    arr = z["onnx"]
            except Exception as exc:
                raise FormatError(f"{self.source}: damaged ONNX graph ({exc})") from exc
            if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.size:
                raise FormatError(f"{self.source}: no ONNX graph")
            data = arr.tobytes()
            import hashlib

            if hashlib.sha256(data).hexdigest() != self.meta.get("onnx_sha256"):
                raise FormatError(f"{self.source}: the ONNX graph does not match its checksum (damaged)")
            self._onnx = data
        return self._onnx

    def save(self, path: str | os.PathLike[str]) -> None:
        import hashlib

        meta = dict(self.meta, onnx_sha256=hashlib.sha256(self.onnx).hexdigest())
        arrays = {"onnx": np.frombuffer(self.onnx, dtype=np.uint8), **self.head}
        save_stamped_npz(path, arrays, meta, FORMAT, FORMAT_VERSION)
        self.meta = meta

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "QueryModel":
        """Read a query-model file's meta and head (the graph on first use); FileNotFoundError /
        FormatError. Never runs code: an .npz read without pickles."""
        from ..fileio import check_format

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cbir query model file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                check_format(meta, FORMAT, (FORMAT_VERSION,), path, "cbir query model")
                if "onnx" not in z.files:
                    raise FormatError(f"{path}: no ONNX graph")
                head = {k: np.asarray(z[k], np.float32) for k in ("whiten_weight", "whiten_bias") if k in z.files}
        except FormatError:
            raise
        except Exception as exc:  # zip / npy / JSON damage
            raise FormatError(f"{path} is not a readable cbir query model: {exc}") from exc
        for name in ("mean", "std", "multiscale_p", "key", "dim", "onnx_sha256"):
            if name not in meta:
                raise FormatError(f"{path}: meta lacks {name!r}")
        meta.pop("format", None)
        meta.pop("format_version", None)
        return cls(None, meta, head, source=path)


# --- export (torch) ---------------------------------------------------------------------------
def export_pool_onnx(net: Any) -> bytes:
    """ONNX bytes of ``net.pool`` (B, 3, H, W) -> (B, D) pooled, L2-normalised (fp32; batch, height and
    width dynamic; opset 17)."""
    import torch

    class _Pool(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.pool(x)

    import warnings

    buf = io.BytesIO()
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks that are constant for this net
            torch.onnx.export(_Pool(net).eval(), (torch.zeros(1, 3, 64, 64),), buf, input_names=["x"],
                              output_names=["v"], opset_version=_OPSET, dynamo=False,
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "v": {0: "b"}})
    finally:
        net.train(was_training)
    return buf.getvalue()


def _head_arrays(net: Any) -> dict[str, np.ndarray]:
    w = getattr(net, "whiten", None)
    if w is None:
        return {}
    out = {"whiten_weight": w.weight.detach().float().cpu().numpy()}
    if getattr(w, "bias", None) is not None:
        out["whiten_bias"] = w.bias.detach().float().cpu().numpy()
    return out


def build_query_model(net: Any, settings: dict[str, Any], check_images: Sequence[Any],
                      check_boxes: Sequence[Box | None] | None = None, digest: Any = None) -> QueryModel:
    """Export ``net`` (the network of an index with ``settings``) and check it: each of
    ``check_images`` (real photos) described by torch (fp32, the index's image size and scales)
    and by the export must agree to cosine >= :data:`MIN_COSINE` (QueryModelCheckFailed otherwise).
    The check's figures are kept in the meta (``check``)."""
    from ..extract import extract

    if getattr(net.pooling, "name", "") == "bow":
        raise ValueError("a BoW pooling is not exported (its assignment is not an ONNX graph here)")
    meta = {"key": query_model_key(settings, digest), "mean": [float(v) for v in net.mean],
            "std": [float(v) for v in net.std], "multiscale_p": float(net.multiscale_p()), "dim": int(net.dim),
            "pooled_dim": int(net.pooled_dim), "opset": _OPSET, "made_by": dict(net.describe()),
            "imsize": settings.get("imsize"), "scales": list(settings.get("scales") or (1.0,))}
    model = QueryModel(export_pool_onnx(net), meta, _head_arrays(net))
    imsize, scales = settings.get("imsize"), tuple(settings.get("scales") or (1.0,))
    images = list(check_images)
    boxes = list(check_boxes) if check_boxes is not None else [None] * len(images)
    if images:
        ref = extract(net, images, bboxes=boxes, imsize=imsize, scales=scales, device="cpu", precision="fp32",
                      batch_size=1, workers=0, progress=False, strict=True).vectors
        enc = OnnxQueryEncoder(model, imsize=imsize, scales=scales)
        got = np.stack([enc.encode(im, b) for im, b in zip(images, boxes)])
        cos = (ref * got).sum(axis=1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
        model.meta["check"] = {"images": len(images), "min_cosine": round(float(cos.min()), 7),
                               "min_required": MIN_COSINE}
        if float(cos.min()) < MIN_COSINE:
            raise QueryModelCheckFailed(f"the exported network describes {len(images)} photos at cosine "
                                        f"{float(cos.min()):.5f} to torch's (needs >= {MIN_COSINE}); not kept")
    return model


# --- running (no torch) -------------------------------------------------------------------------
class OnnxQueryEncoder:
    """Describes query images with a :class:`QueryModel` (ONNX Runtime, CPU); thread-safe."""

    def __init__(self, model: QueryModel, *, imsize: int | None, scales: Sequence[float]) -> None:
        self.model = model
        self.imsize = imsize
        self.scales = npp.check_finite_scales(scales)
        self.mean = tuple(model.meta["mean"])
        self.std = tuple(model.meta["std"])
        self.p = float(model.meta["multiscale_p"])
        self._session = None
        self._lock = threading.Lock()

    @property
    def session(self) -> Any:
        """The ONNX Runtime session. ONNX Runtime's full graph optimisation takes ~0.1-0.3 s per
        start; its result is kept for this machine (:func:`optimized_file`: the key, the ONNX Runtime
        version and the CPU in the name) and later sessions load it with optimisation off."""
        if self._session is None:
            try:
                import onnxruntime as ort
            except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
                raise ValueError("describing queries with the exported network needs onnxruntime") from exc
            self._session = _session(ort, self.model)
        return self._session

    def _pool(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def _head(self, v: np.ndarray) -> np.ndarray:
        w = self.model.head.get("whiten_weight")
        if w is None:
            return v
        out = w @ v
        b = self.model.head.get("whiten_bias")
        return npp.l2(out + b if b is not None else out)

    def encode(self, path: str | os.PathLike[str] | bytes, bbox: Box | None = None) -> np.ndarray:
        """(D,) descriptor of an image file (or its bytes), cropped to ``bbox``; ImageError when unreadable."""
        from ..extraction.images import load_image, resized_pixels

        x = npp.normalise(resized_pixels(load_image(path, bbox), self.imsize), self.mean, self.std)
        with self._lock:
            return npp.describe_array(x, self.scales, self.p, self._pool, self._head).astype(np.float32)


def optimized_file(key: str, ort_version: str) -> Path:
    """Where the graph optimised by ONNX Runtime for this machine is kept (cache folder): such a
    graph may use this CPU's kernels, so its name holds the key, the ONNX Runtime version and a
    digest of the CPU's model name and flags."""
    import hashlib
    import platform

    from ..paths import cache_dir

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu += "".join(ln for ln in fh if ln.startswith(("model name", "flags")))[:4000]
    except OSError:
        cpu += platform.processor()
    tag = hashlib.sha256(f"{ort_version}|{cpu}".encode()).hexdigest()[:12]
    return cache_dir("query-models") / f"{key}-ort-{tag}.onnx"


def _session(ort: Any, model: QueryModel) -> Any:
    """An InferenceSession of ``model``: from the kept optimised graph when there is one (optimisation
    off), else optimised now (ORT_ENABLE_ALL) and the result kept atomically for the next start."""
    providers = ["CPUExecutionProvider"]
    fast = optimized_file(model.key, ort.__version__)

    def options(level: Any) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.log_severity_level = 3
        return opts

    if fast.is_file():
        try:
            return ort.InferenceSession(str(fast), options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                        providers=providers)
        except Exception:  # damaged or from another build: made again below
            fast.unlink(missing_ok=True)
    from ..fileio import atomic_write_with

    session = None

    def optimise_into(tmp: str) -> None:  # ORT writes the optimised graph to a file named in its options
        nonlocal session
        opts = options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.optimized_model_filepath = tmp
        session = ort.InferenceSession(model.onnx, opts, providers=providers)

    try:
        atomic_write_with(fast, optimise_into)
    except OSError:  # a read-only cache: optimise in memory every time
        if session is None:
            session = ort.InferenceSession(model.onnx, options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                                           providers=providers)
    return session


# --- where the file lives ---------------------------------------------------------------------------
def _fallback_file(key: str) -> Path:
    from ..paths import cache_dir

    return cache_dir("query-models") / f"{key}.npz"


def _memo_digest() -> Callable[[Any], str | None]:
    """Files' sha256 remembered between runs (the weights file is hashed once, not at every search)."""
    from ..cache.digest import DigestMemo, default_cache_dir

    return DigestMemo(default_cache_dir()).digest


def load_query_model(index_dir: str | os.PathLike[str], settings: dict[str, Any], digest: Any = None
                     ) -> QueryModel | None:
    """The index's exported network when present, readable and of the index's current key, else None."""
    digest = digest or _memo_digest()
    try:
        key = query_model_key(settings, digest)
    except (ValueError, OSError):
        return None
    for file in (Path(index_dir) / QUERY_MODEL, _fallback_file(key)):
        if not file.is_file():
            continue
        try:
            model = QueryModel.load(file)
        except (FormatError, OSError, ValueError):
            continue
        if model.key == key and int(model.meta.get("dim", -1)) == int(settings.get("dim", -2)):
            return model
    return None


def save_query_model(index_dir: str | os.PathLike[str], model: QueryModel) -> Path | None:
    """Write ``model`` atomically into the index folder, else (read-only) the cache folder; None if neither."""
    for file in (Path(index_dir) / QUERY_MODEL, _fallback_file(model.key)):
        try:
            model.save(file)
            return file
        except OSError:
            continue
    return None


def ensure_query_model(index_dir: str | os.PathLike[str], settings: dict[str, Any], make_net: Callable[[], Any], *,
                       check_images: Sequence[Any] = (), check_boxes: Sequence[Box | None] | None = None,
                       digest: Any = None) -> tuple[QueryModel | None, str]:
    """The index's exported network: the saved one when current, else exported from ``make_net()``
    (the index's network, e.g. :func:`cbir.index.embed.build_model_from_source`), checked on
    ``check_images`` and saved. Returns (model or None, one line: what was done, or why not)."""
    digest = digest or _memo_digest()
    found = load_query_model(index_dir, settings, digest)
    if found is not None:
        return found, "present"
    if not (settings.get("source") or {}):
        return None, "the index does not record its model"
    if str(settings.get("pooling", "")) == "bow":
        return None, "a BoW pooling is not exported"
    try:
        model = build_query_model(make_net(), settings, check_images, check_boxes, digest)
    except QueryModelCheckFailed as exc:
        return None, str(exc)
    where = save_query_model(index_dir, model)
    check = model.meta.get("check", {})
    what = f"cosine {check['min_cosine']:.6f} to torch on {check['images']} photos" if check else "not checked"
    return model, (f"exported ({what})" + ("" if where else "; could not be saved"))

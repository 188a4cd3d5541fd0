"""Inference backends for ``net.pool`` (backbone + pooling + L2) in the extraction loop, and the
on-disk cache of converted networks.

- ``"auto"`` (the default): on the CPU, ONNX Runtime in fp32 when it is installed (the fastest path
  measured, descriptors equal to torch fp32 to ~1e-6) unless bf16 is asked for explicitly; torch
  otherwise (CUDA, ``precision="bf16"``, or a network that does not convert; see :func:`resolve_backend`).
- ``"torch"``: eager PyTorch under the loop's autocast (bf16 where the CPU or GPU computes it
  natively), channels_last.
- ``"onnxruntime"``: the network exported to ONNX once (:func:`converted_model_path`) and run by ONNX
  Runtime's CPU provider in fp32 (all graph optimisations, as many threads as torch uses).
- ``"openvino"``: the same ONNX file read by OpenVINO and compiled for the CPU with
  ``INFERENCE_PRECISION_HINT`` = bf16 when the extraction's precision is bf16, else f32.

**Converted networks are cached on disk** (:func:`converted_model_path`): ``model.pool`` exported to
ONNX (opset :data:`OPSET`, dynamic batch/height/width), checked against torch at two other input
sizes (a network whose export baked in a size is refused with :class:`ConversionError`, and the
``"auto"`` backend then falls back to torch), and written atomically under
:func:`converted_cache_dir` with a name keyed by :func:`conversion_key`: the sha256 of the weights,
the network's structure, the format and the versions of torch, timm and onnx. A second process with
the same network loads the file instead of converting again (seconds saved per process); a weight
change gives another key. The file carries the key in its metadata (checked on load).

Within a process the loaded session is also kept per model object (in a weak dictionary beside it,
so the model stays picklable), keyed by the backend, the precision and the version counters of its
parameters, so an in-place weight change (training) converts again. Descriptors agree with torch fp32 (tests/test_extract_backends.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["BACKENDS", "ConversionError", "resolve_backend", "pool_function", "converted_model_path",
           "converted_cache_dir", "conversion_key", "weights_sha256", "onnx_session", "select_backend"]

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
#: ONNX opset of the exported networks.
OPSET = 17
#: Bumped when the export or the file layout changes (part of every key).
CONVERT_VERSION = 1
#: Input sizes (H, W) the exported network is checked at against torch (neither is the export size).
CHECK_SIZES = ((96, 128), (160, 96))
#: Largest max |difference| to torch fp32 accepted from a converted network (L2-normalised outputs).
CHECK_ATOL = 1e-4
# per model object, outside it (a model stays picklable and deep-copyable): the loaded sessions and the key
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_KEYS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_EXPORT_SIZE = (64, 64)


class ConversionError(ValueError):
    """A network could not be converted faithfully (export failed, or its output differs from torch)."""


class _StaleFile(RuntimeError):
    """A cached converted file that is not this model's (converted again)."""


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_backend(dev: torch.device, backend: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """(backend, precision) an extraction on ``dev`` runs with.

    ``backend="auto"``: on the CPU with ``precision`` "auto" or "fp32" and onnxruntime installed ->
    ("onnxruntime", "fp32"); otherwise ("torch", :func:`cbir.device.resolve_precision`). An explicit
    "onnxruntime" computes in fp32 (ValueError for "bf16"); "openvino" and "torch" take the resolved
    precision. ValueError for an unknown backend or a CPU-only backend on another device.
    """
    from ..device import resolve_precision

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    amp = resolve_precision(dev, precision)  # also checks the precision's name
    if backend == "auto":
        if dev.type == "cpu" and precision in ("auto", "fp32") and _installed("onnxruntime"):
            return "onnxruntime", "fp32"
        return "torch", amp
    if backend != "torch" and dev.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU only (got device {dev})")
    if backend == "onnxruntime":
        if precision == "bf16":
            raise ValueError("backend 'onnxruntime' computes in fp32: use precision fp32 (or auto), or backend torch "
                             "for bf16")
        return backend, "fp32"
    return backend, amp


def pool_function(model, dev: torch.device, backend: str, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B,3,H,W) -> (B,D) pooled, L2-normalised descriptors computed by ``backend`` (a resolved one:
    "torch", "onnxruntime" or "openvino"; see :func:`resolve_backend`)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of torch, onnxruntime, openvino, got {backend!r}")
    if backend == "torch":
        return model.pool
    if dev.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU only (got device {dev})")
    key = (backend, precision, _version_key(model))
    cache = _SESSIONS.setdefault(model, {})
    if key not in cache:
        cache.clear()
        cache[key] = _load_converted(model, backend, precision)
    return cache[key]


def select_backend(model, dev: torch.device, backend: str = "auto", precision: str = "auto"
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, str]:
    """(pool function, backend, precision) for an extraction: :func:`resolve_backend`, then
    :func:`pool_function`. With ``backend="auto"`` a network that does not convert
    (:class:`ConversionError`) runs in torch at the same precision instead."""
    name, amp = resolve_backend(dev, backend, precision)
    if backend == "auto" and name != "torch":
        try:
            return pool_function(model, dev, name, amp), name, amp
        except ConversionError:
            return model.pool, "torch", amp
    return pool_function(model, dev, name, amp), name, amp


def _load_converted(model, backend: str, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The converted network from the disk cache; a file that does not load (damaged, another key) is
    converted again once."""
    for attempt in (0, 1):
        path = converted_model_path(model)
        try:
            if backend == "openvino":
                return _openvino(path, precision)
            return _onnxruntime(path, conversion_key(model))
        except ValueError:
            raise
        except Exception:
            if attempt:
                raise
            path.unlink(missing_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover


def _version_key(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# the on-disk cache of converted networks


def converted_cache_dir() -> Path:
    """:func:`cbir.paths.cache_dir` ``("converted")``: ``$CBIR_CONVERTED_CACHE``, else
    ``$XDG_CACHE_HOME/cbir/converted`` (``~/.cache/cbir/converted``)."""
    from ..paths import cache_dir

    return cache_dir("converted")


def weights_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 of every parameter and buffer of ``model`` (names, dtypes, shapes, values; memory
    layout does not matter)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "convert": str(CONVERT_VERSION), "opset": str(OPSET)}
    for pkg in ("timm", "onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def conversion_key(model: torch.nn.Module, fmt: str = "onnx") -> str:
    """Hex sha256 naming ``model.pool`` converted to ``fmt``: the weights' sha256, the network's
    structure (its module tree as text), ``fmt`` and the converter's versions (:func:`_versions`)."""
    cached = _KEYS.get(model)
    vkey = _version_key(model)
    if cached is not None and cached[0] == (fmt, vkey):
        return cached[1]
    text = json.dumps({"weights": weights_sha256(model), "structure": str(model), "format": fmt,
                       "versions": _versions()}, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()
    _KEYS[model] = ((fmt, vkey), key)
    return key


def _file_name(model, key: str) -> str:
    name = str(getattr(model, "config", {}).get("model", "network"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name)[:60] or "network"
    return f"{name}-{key[:24]}"


def converted_model_path(model: torch.nn.Module, fmt: str = "onnx",
                         cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``model.pool`` (backbone + pooling + L2) converted to ``fmt`` (only "onnx" so far), made
    once and kept under ``cache_dir`` (default :func:`converted_cache_dir`), named by
    :func:`conversion_key`.

    On a miss: exported (dynamic batch, height and width), checked against torch fp32 at
    :data:`CHECK_SIZES` (max |diff| <= :data:`CHECK_ATOL`), then written atomically; a network that
    fails the check raises :class:`ConversionError`, and the refusal is remembered next to it
    (``<name>.refused.json``) so that the next process does not try again. Safe with several
    processes: each write is atomic and any of them gives the same network.
    """
    from ..fileio import atomic_write_bytes, atomic_write_json, read_json

    if fmt != "onnx":
        raise ValueError(f"converted format must be 'onnx', got {fmt!r}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else converted_cache_dir()
    key = conversion_key(model, fmt)
    path = folder / f"{_file_name(model, key)}.onnx"
    refused = path.with_suffix(".refused.json")
    if path.is_file():
        return path
    if refused.is_file():
        try:
            why = read_json(refused, "conversion refusal").get("reason", "refused earlier")
        except (ValueError, OSError, AttributeError):
            why = "refused earlier"
        raise ConversionError(f"{_file_name(model, key)}: ONNX conversion refused ({why}); see {refused}")
    try:
        data = _export_onnx(model, key)
        _check_onnx(model, data, key)
    except ConversionError as exc:
        atomic_write_json(refused, {"format": "cbir-conversion-refusal", "format_version": 1, "key": key,
                                    "reason": str(exc)})
        raise
    atomic_write_bytes(path, data)
    return path


def _pool_module(model) -> torch.nn.Module:
    class PoolNet(torch.nn.Module):
        """``model.pool`` as a module of its own (what the exporter traces)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.pool(x)

    return PoolNet(model).eval()


def _export_onnx(model, key: str) -> bytes:
    import warnings

    try:
        import onnx
    except ImportError as exc:
        raise ValueError("converting a network to ONNX needs the onnx package (pip install onnx)") from exc
    from unittest import mock

    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    try:
        # torch's exporter switches its C++ log on by mistake and prints the whole graph when an op does not
        # export; a library does not print: the log call is silenced for the export
        with torch.no_grad(), warnings.catch_warnings(), mock.patch.object(torch._C, "_jit_onnx_log", _no_log):
            warnings.simplefilter("ignore")  # tracer warnings about Python values; the check below decides
            torch.onnx.export(_pool_module(model), (torch.zeros(1, 3, *_EXPORT_SIZE),), buf, input_names=["x"],
                              output_names=["v"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "v": {0: "b"}})
    except Exception as exc:  # the exporter raises many kinds
        raise ConversionError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                              ) from exc
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in {"cbir_format": "cbir-converted-network", "cbir_format_version": "1", "cbir_key": key}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString()


def _no_log(*args: Any) -> None:
    return None


def _check_onnx(model, data: bytes, key: str) -> None:
    """ConversionError unless the ONNX network gives torch's fp32 output at :data:`CHECK_SIZES` (batch 2)."""
    try:
        run = _onnxruntime(data, key)
    except ValueError:
        raise
    except Exception as exc:  # ONNX Runtime refuses the graph (an op it does not run)
        raise ConversionError(f"ONNX Runtime cannot load the exported network: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    gen = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        for h, w in CHECK_SIZES:
            x = torch.randn(2, 3, h, w, generator=gen)
            with torch.no_grad():
                want = model.pool(x).float()
            try:
                got = run(x)
            except Exception as exc:
                raise ConversionError(f"the ONNX network fails at input {h}x{w}: {type(exc).__name__}") from exc
            diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
            if not diff <= CHECK_ATOL:
                raise ConversionError(f"the ONNX network differs from torch at input {h}x{w} (max |diff| {diff:.3g} > "
                                      f"{CHECK_ATOL:g}): the export fixed a size")
    finally:
        model.train(was_training)


def onnx_session(source: str | os.PathLike[str] | bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (all graph optimisations, ``threads`` intra-op threads: default
    ``torch.get_num_threads()``, which follows OMP_NUM_THREADS; warnings not printed)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ValueError("backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime)") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _onnxruntime(source: str | os.PathLike[str] | bytes, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    session = onnx_session(source)
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("cbir_key") != key:
        raise _StaleFile(f"{source if not isinstance(source, bytes) else 'ONNX network'}: not the converted network "
                          f"of this model (key {meta.get('cbir_key')!r})")

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.float().contiguous().numpy()})[0])

    return run


def _openvino(path: Path, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import openvino as ov
    except ImportError as exc:
        raise ValueError("backend 'openvino' needs the openvino package (pip install openvino)") from exc
    hint = "bf16" if precision == "bf16" else "f32"
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(torch.get_num_threads())})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer([x.float().contiguous().numpy()])
        return torch.from_numpy(out[compiled.output(0)].copy())

    return run

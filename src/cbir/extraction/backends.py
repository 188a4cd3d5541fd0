"""Inference backends for ``net.pool`` (backbone + pooling + L2) in the extraction loop.

- ``"torch"``: eager PyTorch under the loop's autocast (bf16 where the CPU or GPU computes it
  natively), channels_last; the default everywhere.
- ``"openvino"``: the network converted once by OpenVINO (``openvino.convert_model`` straight from
  the torch module, dynamic batch/height/width) and compiled for the CPU with
  ``INFERENCE_PRECISION_HINT`` = bf16 when the extraction's precision is bf16, else f32.
  Optional (``pip install openvino``); CPU only.
- ``"onnxruntime"``: the network exported to ONNX (``torch.onnx.export``, dynamic axes) and run
  by ONNX Runtime's CPU provider in fp32. Optional (``pip install onnxruntime onnx``); CPU only.

The converted network is cached on the model object, keyed by the backend, the precision and the
version counters of its parameters, so an in-place weight change (training) converts it again.
Descriptors agree with the torch backend to float tolerance (tests/test_extract_backends.py).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["BACKENDS", "pool_function"]

BACKENDS = ("torch", "openvino", "onnxruntime")
_CACHE = "_cbir_backend_cache"


class _PoolNet(torch.nn.Module):
    """``model.pool`` as a module of its own (what the converters trace)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pool(x)


def _weights_key(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def pool_function(model, dev: torch.device, backend: str, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B,3,H,W) -> (B,D) pooled, L2-normalised descriptors computed by ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return model.pool
    if dev.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU only (got device {dev})")
    key = (backend, precision, _weights_key(model))
    cache = model.__dict__.setdefault(_CACHE, {})
    if key not in cache:
        cache.clear()
        cache[key] = _openvino(model, precision) if backend == "openvino" else _onnxruntime(model)
    return cache[key]


def _example(model) -> torch.Tensor:
    return torch.zeros(1, 3, 64, 64)


def _openvino(model, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import openvino as ov
    except ImportError as exc:
        raise ValueError("backend 'openvino' needs the openvino package (pip install openvino)") from exc
    net = _PoolNet(model).eval()
    with torch.no_grad():
        converted = ov.convert_model(net, example_input=_example(model), input=[ov.PartialShape([-1, 3, -1, -1])])
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer([x.float().contiguous().numpy()])
        return torch.from_numpy(out[compiled.output(0)].copy())

    return run


def _onnxruntime(model) -> Callable[[torch.Tensor], torch.Tensor]:
    import io

    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ValueError("backend 'onnxruntime' needs the onnxruntime and onnx packages") from exc
    net = _PoolNet(model).eval()
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(net, (_example(model),), buf, input_names=["x"], output_names=["v"], opset_version=17,
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "v": {0: "b"}}, dynamo=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.float().contiguous().numpy()})[0])

    return run

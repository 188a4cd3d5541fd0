"""Extraction paths: the CPU inference backends (ONNX Runtime = the default "auto" on the CPU, OpenVINO)
give the fp32 torch descriptors to float tolerance; converted networks are cached on disk by key and
refused when the export fixed a size; the decoding thread changes nothing; the GPU-decode path
(nvjpeg on CUDA) crops, shrinks and normalises like PIL — checked here with torchvision's CPU JPEG
decoder, the same code path on another device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.extract import extract, image_tensor, load_image

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"


@pytest.fixture(scope="module")
def lite0():
    from cbir.model import build_model

    return build_model("efficientnet_lite0", pooling="gem")


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return sorted(DEMO.glob("*.jpg"))[:3]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime", "auto"])
def test_backend_equals_torch(lite0, images, backend):
    pytest.importorskip("onnxruntime" if backend == "auto" else backend)
    kw = dict(imsize=96, scales=(1.0, 0.5), progress=False, device="cpu", workers=0, precision="fp32")
    ref = extract(lite0, images, backend="torch", **kw)
    assert (ref.backend, ref.precision) == ("torch", "fp32")
    got = extract(lite0, images, backend=backend, **kw)
    assert got.backend == ("onnxruntime" if backend == "auto" else backend) and got.precision == "fp32"
    assert got.ok.tolist() == ref.ok.tolist() == [0, 1, 2]
    np.testing.assert_allclose(got.vectors, ref.vectors, atol=1e-4)
    again = extract(lite0, images[:1], backend=backend, **kw)  # converted once, kept for this model
    np.testing.assert_allclose(again.vectors[0], ref.vectors[0], atol=1e-4)


def test_default_cpu_path_equals_fp32_torch_on_real_photos(lite0):
    """The default (no backend, no precision given) at the default settings (512 px, 3 scales) on real
    photos: cosine >= 0.999 to fp32 torch (in fact equal to float rounding: ONNX Runtime in fp32)."""
    pytest.importorskip("onnxruntime")
    photos = sorted(DEMO.glob("*.jpg"))[3:7]
    kw = dict(imsize=512, progress=False, device="cpu")
    ref = extract(lite0, photos, backend="torch", precision="fp32", **kw)
    got = extract(lite0, photos, **kw)
    assert (got.backend, got.precision) == ("onnxruntime", "fp32")
    cos = (got.vectors * ref.vectors).sum(axis=1)
    assert cos.min() >= 0.999, cos
    assert np.abs(got.vectors - ref.vectors).max() < 1e-4


def test_resolve_backend_rules():
    from cbir.device import cpu_has_native_bf16
    from cbir.extraction.backends import resolve_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_backend(cpu) == (("onnxruntime", "fp32") if has_ort else ("torch", native))
    assert resolve_backend(cpu, "auto", "fp32") == (("onnxruntime", "fp32") if has_ort else ("torch", "fp32"))
    assert resolve_backend(cpu, "auto", "bf16") == ("torch", "bf16")  # bf16 asked for: torch computes it
    assert resolve_backend(cuda, "auto", "auto") == ("torch", "bf16")  # the GPU path is unchanged
    assert resolve_backend(cpu, "torch", "auto") == ("torch", native)
    assert resolve_backend(cpu, "onnxruntime", "auto") == ("onnxruntime", "fp32")
    with pytest.raises(ValueError, match="computes in fp32"):
        resolve_backend(cpu, "onnxruntime", "bf16")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend(cuda, "openvino", "auto")
    with pytest.raises(ValueError, match="precision"):
        resolve_backend(cpu, "auto", "fp8")


def test_unknown_or_misplaced_backend_is_named(lite0, images):
    with pytest.raises(ValueError, match="backend must be one of"):
        extract(lite0, images[:1], imsize=64, progress=False, device="cpu", backend="tensorrt")


class _Tiny(torch.nn.Module):
    """A small network with RetrievalNet's ``pool``: conv -> ReLU -> pooling -> L2."""

    def __init__(self, fixed_size: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fixed_size = fixed_size
        self.config = {"model": "tiny/net"}

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x))
        if self.fixed_size:  # a Python int taken from the shape: the trace bakes in the export size
            f = torch.nn.functional.avg_pool2d(f, kernel_size=(int(f.shape[2]), int(f.shape[3])))
            f = f.flatten(1)
        else:
            f = f.mean(dim=(2, 3))
        return torch.nn.functional.normalize(f, dim=-1)


def test_converted_network_is_cached_on_disk_by_key(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from cbir.extraction import backends

    calls = []
    real = backends._export_onnx
    monkeypatch.setattr(backends, "_export_onnx", lambda m, k: calls.append(k) or real(m, k))
    a = _Tiny(seed=0).eval()
    path = backends.converted_model_path(a, cache_dir=tmp_path)
    assert path.is_file() and path.parent == tmp_path and path.name.startswith("net-") and len(calls) == 1
    # another process with the same network (a fresh object, same weights): the file, no conversion
    b = _Tiny(seed=0).eval()
    assert backends.conversion_key(b) == backends.conversion_key(a)
    assert backends.converted_model_path(b, cache_dir=tmp_path) == path and len(calls) == 1
    # other weights, or the same weights changed in place: another key, converted again
    c = _Tiny(seed=1).eval()
    assert backends.converted_model_path(c, cache_dir=tmp_path) != path and len(calls) == 2
    with torch.no_grad():
        b.conv.bias.add_(1.0)
    assert backends.converted_model_path(b, cache_dir=tmp_path) not in (path,) and len(calls) == 3
    # the file runs and gives the torch output; it carries its key
    session = backends.onnx_session(path)
    assert session.get_modelmeta().custom_metadata_map["cbir_key"] == backends.conversion_key(a)
    x = torch.randn(1, 3, 50, 70)
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], a.pool(x).detach().numpy(), atol=1e-5)
    # nothing half-written is left beside the files
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".onnx"] * 3


def test_default_cache_folder_follows_xdg(tmp_path, monkeypatch):
    from cbir.extraction.backends import converted_cache_dir

    monkeypatch.delenv("CBIR_CONVERTED_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert converted_cache_dir() == tmp_path / "cbir" / "converted"
    monkeypatch.setenv("CBIR_CONVERTED_CACHE", str(tmp_path / "x"))
    assert converted_cache_dir() == tmp_path / "x"


def test_damaged_or_foreign_cached_file_is_converted_again(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from cbir.extraction import backends

    monkeypatch.setenv("CBIR_CONVERTED_CACHE", str(tmp_path))
    net = _Tiny(seed=3).eval()
    path = backends.converted_model_path(net)
    x = torch.randn(2, 3, 40, 40)
    want = net.pool(x).detach()
    other = backends.converted_model_path(_Tiny(seed=4).eval())
    for bad in (b"not an onnx file", other.read_bytes()):  # damaged; another network's file under this name
        path.write_bytes(bad)
        backends._SESSIONS.pop(net, None)
        run = backends.pool_function(net, torch.device("cpu"), "onnxruntime", "fp32")
        torch.testing.assert_close(run(x), want, atol=1e-5, rtol=0)
        assert backends.onnx_session(path).get_modelmeta().custom_metadata_map["cbir_key"] == \
            backends.conversion_key(net)


def test_export_that_fixes_a_size_is_refused_and_auto_falls_back_to_torch(tmp_path, monkeypatch, images):
    pytest.importorskip("onnxruntime")
    from cbir.extraction import backends

    monkeypatch.setenv("CBIR_CONVERTED_CACHE", str(tmp_path))
    net = _Tiny(fixed_size=True).eval()
    with pytest.raises(backends.ConversionError, match="differs from torch at input"):
        backends.converted_model_path(net)
    refusal = next(tmp_path.glob("*.refused.json"))
    assert not list(tmp_path.glob("*.onnx"))
    calls = []
    monkeypatch.setattr(backends, "_export_onnx", lambda m, k: calls.append(k))
    with pytest.raises(backends.ConversionError, match="refused"):  # remembered: not exported again
        backends.converted_model_path(net)
    assert calls == [] and refusal.is_file()
    x = torch.randn(1, 3, 90, 60)
    pool, name, amp = backends.select_backend(net, torch.device("cpu"), "auto", "auto")
    assert (name, amp) == ("torch", "fp32") and torch.equal(pool(x), net.pool(x))
    with pytest.raises(backends.ConversionError):  # asked for by name: the refusal is an error
        backends.select_backend(net, torch.device("cpu"), "onnxruntime", "auto")


def test_model_stays_picklable_after_a_converted_run(lite0, images):
    """The sessions are kept beside the model, not in it (Ray ships models to its actors by pickling)."""
    import copy
    import pickle

    pytest.importorskip("onnxruntime")
    extract(lite0, images[:1], imsize=64, scales=(1.0,), progress=False, device="cpu")
    clone = pickle.loads(pickle.dumps(lite0))
    assert copy.deepcopy(lite0) is not lite0
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), lite0.state_dict().values()))


def test_prefetched_keeps_order_errors_and_stops_early():
    import threading

    from cbir.extraction.batching import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad image")

    got = []
    with pytest.raises(ValueError, match="bad image"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1, 2]
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = prefetched(endless(), depth=2)
    assert [next(gen), next(gen)] == [0, 1]
    gen.close()  # the consumer stops: the thread ends, the source is no longer drained
    assert not any(t.name == "cbir-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 6


def test_decoding_thread_changes_nothing(lite0, images):
    kw = dict(imsize=80, scales=(1.0, 0.5), progress=False, device="cpu", workers=0, backend="torch",
              precision="fp32")
    a = extract(lite0, list(images) + [b"not an image"], prefetch=True, **kw)
    b = extract(lite0, list(images) + [b"not an image"], prefetch=False, **kw)
    assert a.ok.tolist() == b.ok.tolist() == [0, 1, 2] and a.failed == b.failed and len(a.failed) == 1
    assert np.array_equal(a.vectors, b.vectors)


def test_pixels_tensor_is_the_plain_formula():
    from cbir.extraction.images import pixels_tensor

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = pixels_tensor(px, mean, std)
    x = torch.from_numpy(px.copy()).permute(2, 0, 1).float() / 255.0  # the formula, written out
    want = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert got.shape == (3, 37, 53) and got.is_contiguous() and torch.equal(got, want)


def test_gpu_decode_path_matches_pil(lite0, images):
    from cbir.extraction.batching import _gpu_decode
    from cbir.extraction.images import image_size, resized_size

    boxes = [None, (30, 20, 200, 150), None]
    sizes = {i: resized_size(*image_size(p, b), 128) for i, (p, b) in enumerate(zip(images, boxes))}
    raw = [(i, torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)) for i, p in enumerate(images)]
    stacked, fallback = _gpu_decode(raw, images, boxes, sizes, lite0.mean, lite0.std, torch.device("cpu"))
    assert fallback == []
    got = {i: x[j] for idx, x in stacked for j, i in enumerate(idx)}
    assert sorted(got) == [0, 1, 2]
    for i, p in enumerate(images):
        want = image_tensor(load_image(p, boxes[i]), 128, lite0.mean, lite0.std)
        assert got[i].shape == want.shape
        # another decoder (libjpeg-turbo in torchvision vs PIL) and another bicubic: close, not equal
        assert (got[i] - want).abs().mean() < 0.05, (p.name, float((got[i] - want).abs().mean()))


def test_gpu_decode_needs_cuda(lite0, images):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        extract(lite0, images[:1], imsize=64, progress=False, device="cpu", decode="cuda")

"""Device and precision choice, one source for extraction, search and training.

``"auto"`` means the first CUDA GPU when torch sees one, else the CPU; asking for CUDA without a
GPU is a ValueError (one line the CLI prints). Precision ``"auto"`` means bf16 autocast on CUDA and
on CPUs that compute bf16 natively (Intel AMX / AVX512-BF16), else fp32.
torch is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "cpu_has_native_bf16", "resolve_precision", "autocast", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: "str | torch.device" = "auto", local_rank: int | None = None) -> "torch.device":
    """``"auto"`` -> cuda (``cuda:local_rank`` when given) if available, else cpu; else ``torch.device(device)``.

    ValueError when CUDA is asked for and torch sees no GPU. With ``local_rank`` a bare ``"cuda"``
    becomes ``cuda:local_rank`` (one GPU per process in distributed training).
    """
    import torch

    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but torch sees no CUDA GPU (use --device cpu)")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (Intel AMX or AVX512-BF16; read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(dev: "torch.device", precision: str = "auto") -> str:
    """"auto": bf16 on CUDA and on CPUs with native bf16, else fp32. On this project's AMX CPU bf16 was
    1.12x faster than fp32 in benchmarks/extract.py, descriptors at cosine >= 0.998 to fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return "bf16" if dev.type == "cuda" or cpu_has_native_bf16() else "fp32"
    return precision


def autocast(dev: "torch.device", precision: str) -> Any:
    """``torch.autocast`` context: bf16 when ``precision == "bf16"``, else a disabled one (fp32)."""
    import torch

    return torch.autocast(dev.type if dev.type in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=precision == "bf16")

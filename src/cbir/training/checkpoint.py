"""Training checkpoints: one format-stamped file of plain data and tensors, loaded without pickle code.

A checkpoint holds everything an interrupted run needs to continue exactly as if it had not
stopped: model, optimiser and scheduler state dicts, the numpy and torch random states, the
history, the cleaned image list and the best validated weights. Every value is a tensor or a
plain Python type (dict, list, str, int, float, bool, None), so it loads with
``torch.load(weights_only=True)``: a crafted ``last.pt`` cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import FormatError, atomic_write_with, check_format, load_error_reason

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "numpy_rng_state",
           "set_numpy_rng_state"]

CHECKPOINT_FORMAT = "cbir-train-checkpoint"
CHECKPOINT_VERSION = 2  # 2: plain data only (weights_only loading), best validated weights

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError if ``obj`` holds anything but tensors and plain containers/scalars."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str/int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__name__}, not plain data (it would not load with weights_only)")


def numpy_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The bit generator's state as plain Python data (PCG64: two 128-bit ints and two small ones)."""
    st = rng.bit_generator.state

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, np.generic):
            return x.item()
        return x

    return plain(st)


def set_numpy_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Stamp and write ``ckpt`` atomically; refuses (TypeError) anything that is not plain data."""
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **ckpt}
    _check_plain(ckpt)
    atomic_write_with(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check its stamp."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused globals, zip or pickle damage of many kinds
        raise FormatError(f"{path} is not a readable checkpoint: {load_error_reason(exc)}") from exc
    check_format(ck, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,), path, what="cbir training checkpoint")
    return ck

"""Weights: reading weight files, fitting them onto a network, hash checks, the library downloads.

* :func:`read_state_dict`: the tensors of a state dict or checkpoint file (``torch.load(weights_only=True)``);
* :func:`load_into`: by name (a classifier head may differ), else one to one in order when every shape
  matches in order (:func:`map_in_order`; how the offline EfficientNet-Lite files and cirtorch's
  ``features`` map onto timm's / torchvision's networks);
* :func:`check_hash_in_name`: ``name-<sha256 prefix>.pth`` verified (torch hub, cirtorch);
* :func:`pretrained_net`: the library's download (timm: Hugging Face hub, after one quick
  :func:`hub_reachable` probe so that offline fails at once; torchvision: download.pytorch.org),
  :class:`WeightsUnavailable` naming ``--weights FILE`` / ``--weights none`` when it cannot be had.

Which network to build and where to cut it is :mod:`cbir.networks`.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from . import networks
from .fileio import load_error_reason, sha256_file
from .networks import Source

__all__ = ["OFFLINE_HINT", "WeightsUnavailable", "check_hash_in_name", "read_state_dict", "map_in_order", "load_into",
           "is_head", "hub_reachable", "hub_offline_unless_reachable", "pretrained_net"]

OFFLINE_HINT = "pass --weights FILE (a local state dict) or --weights none (random initialisation)"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be obtained (offline, unknown name, bad file)."""


# --------------------------------------------------------------------------------------------
# Weight files


def check_hash_in_name(path: str | os.PathLike[str]) -> None:
    """Verify a ``name-<hex>.pth`` file against the sha256 prefix in its name (torch-hub and cirtorch
    convention, 6+ hex digits); files named otherwise are not checked. Raises WeightsUnavailable."""
    path = Path(path)
    match = re.search(r"-([0-9a-f]{6,64})\.pth$", path.name)
    if not match:
        return
    digest = sha256_file(path)
    if not digest.startswith(match.group(1)):
        raise WeightsUnavailable(f"{path}: its sha256 {digest[:12]}... does not start with the "
                                 f"{match.group(1)} in its name (damaged or different file)")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: a state dict or a checkpoint holding one (``state_dict``/``model``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise WeightsUnavailable(f"{path} is not a readable PyTorch weights file: {load_error_reason(exc)}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailable(f"{path} does not hold a state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def map_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s names, pairing them one to one in order.

    Valid only when both have the same number of tensors and the i-th shapes agree for every i;
    otherwise raises ValueError naming the first disagreement (a reordered or foreign file).
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise ValueError(f"cannot map weights in order: file has {len(src)} tensors, model has {len(tgt)}")
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(
                f"cannot map weights in order: tensor {i} {sk!r} {tuple(sv.shape)} "
                f"does not fit {tk!r} {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` into ``model``: by name when the names are the model's own (a classifier
    head may be missing or differ), else one to one in order when every shape matches in order."""
    own = model.state_dict()
    extra = [k for k in tensors if k not in own and not is_head(k)]
    missing = [k for k in own if k not in tensors and not is_head(k)]
    if not extra and not missing:
        wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape and not is_head(k)]
        if wrong:
            k = wrong[0]
            raise WeightsUnavailable(f"weights {where} do not fit this model: {k!r} has shape "
                                     f"{tuple(tensors[k].shape)}, the model needs {tuple(own[k].shape)}")
        fit = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape}
        model.load_state_dict(fit, strict=False)
        return
    try:
        model.load_state_dict(map_in_order(tensors, own))
    except ValueError as by_order:
        hint = f" ({len(extra)} unknown tensors, e.g. {extra[0]!r})" if extra else f" (missing {missing[0]!r})"
        raise WeightsUnavailable(f"weights {where} do not fit this model{hint}: {by_order}") from by_order


def is_head(key: str) -> bool:
    return bool(re.match(r"^(fc|classifier|head|heads?\.head)\.", key))


# --------------------------------------------------------------------------------------------
# The libraries' downloads


def hub_reachable(url: str | None = None, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co)
    opens within ``timeout`` seconds: one quick probe instead of the hub client's retries."""
    import socket
    import urllib.parse

    parsed = urllib.parse.urlparse(url or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode while the hub cannot be reached: cached weights still
    load, missing ones fail at once (the client otherwise retries with back-off for ~50 s)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    if not before and not hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def pretrained_net(src: Source) -> nn.Module:
    """The whole network of ``src`` with the library's pretrained weights (timm: Hugging Face hub,
    probed first; torchvision: download.pytorch.org); WeightsUnavailable naming the offline options."""
    try:
        if src.library == "timm":
            with hub_offline_unless_reachable():
                return networks.timm_net(src.arch, True)
        return networks.torchvision_net(src.arch, True)
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise WeightsUnavailable(
            f"could not download pretrained weights for {src.library}:{src.arch} "
            f"({type(exc).__name__}: {first}); offline? {OFFLINE_HINT}"
        ) from exc

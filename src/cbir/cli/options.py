"""The options several commands share, declared once: the model (``--model``, ``--pooling``,
``--weights``) and the extraction (``--imsize``, ``--scales``, ``--device``, ``--batch-size``,
``--precision``, ``--backend``). Every command that describes images takes them with the same names, forms and
defaults, and turns them into library objects with :func:`model_spec` / :func:`extraction`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch comes with cbir.model: imported where a handler needs it, never to build the parser
    from ..model import ModelSpec

def add_model_options(parser: Any) -> None:
    """``--model``, ``--pooling``, ``--weights`` (on a parser or an argument group)."""
    parser.add_argument("--model", default="efficientnet_lite0",
                        help="backbone name (timm or torchvision, e.g. resnet101, torchvision:resnet50, "
                             "vit_small_patch16_224) or a model file saved by cbir (default: efficientnet_lite0)")
    from ..model_names import pooling_option_help

    parser.add_argument("--pooling", default="gem", metavar="NAME[:k=v,...]", help=pooling_option_help("gem"))
    parser.add_argument("--weights", default="default",
                        help="default (offline Lite0/1/2, else the library download), imagenet (download), "
                             "none (random), or a weights FILE (default: default)")


def add_extraction_options(parser: Any, *, per_benchmark: bool = False) -> None:
    """``--imsize``, ``--scales``, ``--device``, ``--batch-size``, ``--precision`` (``per_benchmark``:
    say that a benchmark of small photos, the demo, has its own defaults)."""
    from ..pipeline.benchmark import DEFAULT_IMSIZE, DEFAULT_SCALES_TEXT, SMALL_PHOTO_SETS

    small_size = "".join(f"; {n}: {v[0]}" for n, v in SMALL_PHOTO_SETS.items()) if per_benchmark else ""
    small_scales = "".join(f"; {n}: {','.join(f'{x:g}' for x in v[1])}" for n, v in SMALL_PHOTO_SETS.items()) \
        if per_benchmark else ""
    parser.add_argument("--imsize", type=int, default=None, metavar="PX",
                        help=f"longest image side; larger images are shrunk (default: the model's, see `cbir models`: "
                             f"512 for EfficientNet-Lite, {DEFAULT_IMSIZE} for ResNet/VGG and others{small_size})")
    parser.add_argument("--scales", default=None, metavar="S,S,...",
                        help=f"comma-separated scales, combined by the pooling's generalized mean "
                             f"(default: the model's, e.g. {DEFAULT_SCALES_TEXT}{small_scales})")
    add_device_option(parser)
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="images per forward pass (default: 1 on CPU, 16 on GPU)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="compute precision: auto = fp32 through ONNX Runtime on the CPU when installed, else bf16 "
                             "autocast on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), else fp32; bf16 "
                             "on the CPU uses the torch backend (default: auto)")


def add_backend_option(parser: Any) -> None:
    """``--backend``: the CPU inference backend (:func:`cbir.extraction.backends.resolve_backend`)."""
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "openvino"),
                        help="inference backend: auto = ONNX Runtime in fp32 on the CPU when installed (the fastest "
                             "measured; converted once and cached in ~/.cache/cbir/converted), else torch; torch; "
                             "onnxruntime; openvino (CPU only). Descriptors equal torch fp32 to ~1e-6 "
                             "(docs/extraction.md) (default: auto)")


def add_device_option(parser: Any) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,0.7071,0.5"`` -> (1.0, 0.7071, 0.5); ValueError unless positive numbers."""
    try:
        scales = tuple(float(s) for s in str(text).replace(" ", ",").split(",") if s)
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"--scales must be positive numbers, got {text!r}")
    return scales


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The ModelSpec of ``--model/--pooling/--weights`` (the pooling text is checked here)."""
    from ..model import ModelSpec, parse_pooling

    spec = ModelSpec(model=args.model, pooling=args.pooling, weights=args.weights)
    if not spec.is_file:
        parse_pooling(spec.pooling)  # a malformed --pooling fails before any work
    return spec


def extraction(args: argparse.Namespace, bench: Any = None, model: Any = None) -> tuple[int, tuple[float, ...]]:
    """(imsize, scales) from ``--imsize``/``--scales``, the defaults of :func:`cbir.pipeline.extraction_defaults`
    (for ``bench``, and the backbone: the built ``model``'s config, else the configuration ``--model``
    names: a backbone name, or the one a model file carries) where not given."""
    from ..model import is_model_file, model_file_config
    from ..pipeline.benchmark import extraction_defaults

    if model is not None:
        d_imsize, d_scales = extraction_defaults(bench, model.config.get("model", ""), model.config)
    elif not is_model_file(getattr(args, "model", "")):
        d_imsize, d_scales = extraction_defaults(bench, getattr(args, "model", None))
    elif args.imsize is None or args.scales is None:  # a model file: its backbone's (or its own) default
        config = model_file_config(args.model)
        d_imsize, d_scales = extraction_defaults(bench, str(config.get("model", "")), config)
    else:
        d_imsize, d_scales = extraction_defaults(bench)
    imsize = d_imsize if args.imsize is None else int(args.imsize)
    if imsize < 1:
        raise ValueError(f"--imsize must be a positive number of pixels, got {imsize}")
    scales = d_scales if args.scales is None else parse_scales(args.scales)
    return imsize, tuple(scales)

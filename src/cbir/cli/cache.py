"""``cbir cache info|prune|clear``: the extraction cache (every image described once per model and settings)."""

from __future__ import annotations

import argparse
import json
import time

EPILOG = """\
The cache keeps one descriptor per (image contents, crop box) for each model, weights and extraction
settings, so that `cbir extract`, `evaluate`, `tune`, `index build` and `index add` never describe an
image twice. Where: $CBIR_CACHE (default ~/.cache/cbir/descriptors). Size: bounded by
$CBIR_CACHE_MAX_GB (default 20; least recently used descriptors go first). Deleting the folder is
always safe: descriptors are computed again when needed. The local features (SIFT) of spatial
verification (`--verify`) live beside them, in local-v1/ (one store per SIFT settings): listed by
`info`, deleted by `clear` (without --older-than), not bounded by `prune`; so does the mining work of
`cbir adapt` (adapt-v1/, one folder per photo folder + settings).

examples:
  cbir cache info                 # one line per model + settings: images, size, last use
  cbir cache prune --max-gb 2     # drop the least recently used descriptors down to 2 GB
  cbir cache clear --older-than 30   # drop descriptors unused for 30 days; without it: everything
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show or empty the extraction cache", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Show, bound or empty the extraction cache.")
    p.add_argument("action", choices=("info", "prune", "clear"))
    p.add_argument("--dir", metavar="DIR", default=None, help="the cache folder (default: $CBIR_CACHE or "
                                                              "~/.cache/cbir/descriptors)")
    p.add_argument("--max-gb", type=float, default=None, help="prune: the size to keep (default: $CBIR_CACHE_MAX_GB or 20)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="clear: only descriptors not used for DAYS days")
    p.add_argument("--json", action="store_true", help="info: print JSON")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    from ..adapt.work import adapt_work_info, clear_adapt_work
    from ..cache.digest import default_cache_dir
    from ..cache.vectors import cache_info, clear_cache, prune
    from ..local.cache import clear_local_cache, local_cache_info

    root = default_cache_dir() if args.dir is None else args.dir
    if args.action == "info":
        stores = cache_info(root)
        local = local_cache_info(root)
        work = adapt_work_info(root)
        if args.json:
            print(json.dumps({"dir": str(root), "stores": stores, "local_features": local, "adapt_work": work},
                             indent=2, default=str))
            return 0
        total = sum(s["bytes"] for s in stores)
        print(f"{root}: {len(stores)} model/settings stores, {total / 2**20:.1f} MiB")
        for s in stores:
            key = s.get("key") or {}
            model, st = key.get("model", {}), key.get("settings", {})
            name = model.get("model") or ("model file " + str(model.get("model_file_sha256", "?"))[:12])
            used = time.strftime("%Y-%m-%d", time.localtime(s["last_used"])) if s.get("last_used") else "-"
            what = (f"{name} {model.get('pooling', '')} {st.get('imsize')} px scales "
                    f"{','.join(f'{x:g}' for x in st.get('scales', []))} {st.get('precision')} {st.get('backend')}")
            print(f"  {s['rows'] if s.get('rows') is not None else 'damaged':>8} images  "
                  f"{s['bytes'] / 2**20:8.1f} MiB  last used {used}  {what}")
        for s in local:
            print(f"  {s['images'] if s.get('images') is not None else 'damaged':>8} images  "
                  f"{s['bytes'] / 2**20:8.1f} MiB  local features {s['key']}")
        for s in work:
            print(f"  {'':>8}         {s['bytes'] / 2**20:8.1f} MiB  cbir adapt work {s['key']}")
        return 0
    if args.action == "prune":
        n = prune(root, None if args.max_gb is None else int(args.max_gb * (1 << 30)))
        print(f"removed {n} descriptors from {root}")
        return 0
    n = clear_cache(root, args.older_than)
    local = clear_local_cache(root) if args.older_than is None else 0
    work = clear_adapt_work(root) if args.older_than is None else 0
    print(f"removed {n} descriptors from {root}" + (f" and the local features of {local} images" if local else "")
          + (f" and {work} `cbir adapt` work folders" if work else ""))
    return 0

"""``cbir serve INDEX``: the search page and HTTP API (uvicorn)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  cbir serve photos.index                       # http://127.0.0.1:8000/
  cbir serve photos.index --port 8080 --read-only
  cbir serve photos.index --host 0.0.0.0        # reachable from other machines: no authentication!

API: GET /api/health, POST /api/search (multipart file [+ bbox, top]), GET /api/search/{id},
POST /api/images (multipart file), GET /api/images/{id}, GET /api/thumb/{id}; docs at /api/docs.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a search page and HTTP API for an index", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve the search web page at / and the JSON API under /api/.")
    p.add_argument("index", metavar="INDEX", help="index folder made by `cbir index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--read-only", action="store_true", help="refuse additions to the index")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default: 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest upload in pixels (default: 40M)")
    p.add_argument("--no-preload", action="store_true", help="load the model at the first upload, not at start")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server import Limits, create_app

    limits = Limits(max_request_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels)
    app = create_app(args.index, limits=limits, read_only=args.read_only, device=args.device)
    svc = app.state.service
    print(f"index {args.index}: {len(svc.index)} images ({svc.index.kind})", file=sys.stderr)
    if not args.no_preload and svc.index.settings.get("source"):
        print("loading the model ...", file=sys.stderr)
        svc.get_encoder()
    print(f"serving on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0

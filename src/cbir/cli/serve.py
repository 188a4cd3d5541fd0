"""``cbir serve INDEX``: the search page and HTTP API (uvicorn)."""

from __future__ import annotations

import argparse
import errno
import math
import socket
import sys

from . import CLIError

EPILOG = """\
examples:
  cbir serve photos.index                       # http://127.0.0.1:8000/
  cbir serve photos.index --port 8080 --read-only
  cbir serve photos.index --host 0.0.0.0 --token-file ~/.cbir-token --allowed-host photos.lan

who may do what:
  Reading (search, thumbnails) is open to whoever reaches the address. Writes (POST /api/images,
  DELETE /api/images/{id}) need `Authorization: Bearer TOKEN` when a token is set (--token-file F,
  or $CBIR_TOKEN); on any address other than loopback a token is required (or --read-only).
  Writes from a page of another site (a foreign Origin) are refused. Requests must name this
  server by an allowed host: loopback names, the bound address, or --allowed-host NAME.

spatial verification: an index built with --verify K (INDEX/verify.json) verifies every search's
  top K by default (--verify 0: off); results show their inlier count and, when clicked, the inlier
  correspondences drawn between the two photos.

API: GET /api/health, POST /api/search (multipart file [+ bbox, top, matches]), GET /api/search/{id},
POST /api/images (multipart file), DELETE /api/images/{id}, GET /api/images/{id},
GET /api/thumb/{id}; docs at /api/docs.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from ..server.connections import ConnectionLimits

    d = ConnectionLimits()
    p = sub.add_parser("serve", help="serve a search page and HTTP API for an index", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve the search web page at / and the JSON API under /api/.")
    p.add_argument("index", metavar="INDEX", help="index folder made by `cbir index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--read-only", action="store_true", help="refuse additions and removals")
    p.add_argument("--token-file", metavar="FILE",
                   help="file whose first line is the token that writes must present (default: $CBIR_TOKEN)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use to reach this server, besides loopback names and the bound "
                        "address (repeatable; '*' allows any)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default: 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest upload in pixels (default: 40M)")
    p.add_argument("--max-store-gb", type=float, default=10.0,
                   help="total size of the photos added through the service, in GB (default: 10)")
    p.add_argument("--recipe", metavar="FILE",
                   help="re-rank every search with a `cbir tune` recipe (default: INDEX/recipe.json when the "
                        "index was built with --recipe; 'none': plain search)")
    p.add_argument("--no-preload", action="store_true", help="load the model at the first upload, not at start")
    from .rerank_options import add_verify_arguments

    add_verify_arguments(p)  # default: the recipe's verification, else the index's (cbir index build --verify K)
    c = p.add_argument_group("connections (slow or too many clients)")
    c.add_argument("--header-timeout", type=float, default=d.header_timeout, metavar="S",
                   help="seconds a client has to send a request's line and headers, else 408 and closed "
                        f"(default: {d.header_timeout:g})")
    c.add_argument("--body-timeout", type=float, default=d.body_timeout, metavar="S",
                   help="seconds a client has to send a request's whole body (an upload), else 408 and closed "
                        f"(default: {d.body_timeout:g}; a 20 MB upload then needs about 3 Mbit/s)")
    c.add_argument("--keep-alive", type=float, default=d.keep_alive, metavar="S",
                   help=f"seconds an idle connection is kept open between requests (default: {d.keep_alive:g})")
    c.add_argument("--max-connections", type=int, default=d.max_connections, metavar="N",
                   help="connections served at once; a request arriving while more are open gets 503 "
                        f"(default: {d.max_connections})")
    c.add_argument("--max-header-kb", type=float, default=d.max_header_bytes / 1024, metavar="KB",
                   help="a request line + headers still incomplete past this many KB is refused with 400 "
                        f"(default: {d.max_header_bytes // 1024})")
    c.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout, metavar="S",
                   help="on Ctrl+C / SIGTERM, seconds running requests get before they are cancelled "
                        f"(default: {d.shutdown_timeout:g})")
    p.set_defaults(func=cmd_serve)


FLAGS = {"header_timeout": "--header-timeout", "body_timeout": "--body-timeout", "keep_alive": "--keep-alive",
         "max_connections": "--max-connections", "max_header_bytes": "--max-header-kb",
         "shutdown_timeout": "--shutdown-timeout"}


def connection_limits(args: argparse.Namespace):
    """The :class:`cbir.server.ConnectionLimits` of the command line; CLIError naming the flag when one is bad."""
    from ..server.connections import ConnectionLimits, LimitError

    kb = args.max_header_kb
    try:
        return ConnectionLimits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                                keep_alive=args.keep_alive, max_connections=args.max_connections,
                                max_header_bytes=max(1, round(kb * 1024)) if math.isfinite(kb) and kb > 0 else kb,
                                shutdown_timeout=args.shutdown_timeout)
    except LimitError as exc:
        shown = kb if exc.field == "max_header_bytes" else getattr(args, exc.field)
        raise CLIError(f"{FLAGS[exc.field]} must be a positive number, got {shown:g}") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (what uvicorn would open); CLIError in one line when it cannot be had."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise CLIError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CLIError(f"port {port} on {host} is in use by another program; choose another with --port") from None
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve_settings(args: argparse.Namespace):
    """The re-ranking of every search: --recipe (default: the index's kept recipe), with --verify K,
    else the recipe's own verification, else the index's (INDEX/verify.json); None: plain search.
    CLIError in one line when verification is asked for and the index has no local features."""
    from ..index.local import NO_LOCAL, has_local, load_verify
    from ..rerank.compose import Rerank
    from ..rerank.recipe import recipe_for_index
    from .rerank_options import verify_of_args

    settings = recipe_for_index(args.index, args.recipe)
    given, verify = verify_of_args(args)
    if not given and getattr(settings, "verify", None) is None:
        verify, given = load_verify(args.index), True
    if given and (verify is not None or settings is not None):
        settings = (settings or Rerank()).with_verify(verify)
    if getattr(settings, "verify", None) is not None and not has_local(args.index):
        raise CLIError(NO_LOCAL(args.index, settings.verify.k))
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server import Guard, Limits, create_app
    from ..server.connections import uvicorn_config
    from ..server.security import check_bind, read_token

    token = read_token(args.token_file)
    check_bind(args.host, token, args.read_only)
    if args.max_store_gb <= 0:
        raise CLIError("--max-store-gb must be positive")
    connections = connection_limits(args)
    sock = bind_socket(args.host, args.port)  # before the slow part: a busy port fails at once
    try:
        limits = Limits(max_request_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                        max_store_bytes=int(args.max_store_gb * 1e9))
        guard = Guard.for_bind(args.host, token=token, allowed_hosts=args.allowed_host)
        app = create_app(args.index, limits=limits, read_only=args.read_only, device=args.device, guard=guard,
                         rerank=serve_settings(args))
        svc = app.state.service
        print(f"index {args.index}: {len(svc.index)} images ({svc.index.kind})", file=sys.stderr)
        if not args.no_preload and svc.index.settings.get("source"):
            print("loading the model ...", file=sys.stderr)
            svc.get_encoder()
        verify = getattr(svc.rerank, "verify", None)
        if verify is not None:
            print(f"searches verify their top {verify.k} (local features of {len(svc.local.store())} images)",
                  file=sys.stderr)
        writes = "read-only" if args.read_only else ("writes need the token" if token else "writes open to this machine")
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving on http://{host}:{args.port}/ ({writes})", file=sys.stderr)
        server = uvicorn.Server(uvicorn_config(app, args.host, args.port, connections, log_level="info"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0

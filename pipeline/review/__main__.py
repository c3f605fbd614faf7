"""``python -m pipeline.review OUT_DIR [--port N] [--host 127.0.0.1] [--slides-root DIR]``: serve the review app.

The app (Starlette) is served by uvicorn on a socket this process binds (127.0.0.1 unless told
otherwise). Bad input (a folder that is not a batch output, a port in use) is one ``error: ...``
line and exit status 2; Ctrl-C (or SIGTERM) stops the server.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.core.cli import run_cli, setup_logging
from pipeline.core.errors import ConfigError
from pipeline.review.server import LOOPBACK, make_server

log = logging.getLogger("pipeline.review")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.review",
        description="Review a batch output folder in the browser: worklist, deep-zoom viewer with the model's "
        "tile layers, tile and slide verdicts saved as QuPath GeoJSON (OUT_DIR/<slide_id>/review.geojson). "
        "Decision support only.",
    )
    p.add_argument("out_dir", type=Path, help="batch output folder written by infer.py")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--slides-root", type=Path, help="folder to find slides in when they moved since inference")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(quiet=args.quiet)
    logging.getLogger("uvicorn").setLevel(logging.WARNING)  # its start/stop chatter; our own line says where
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 0-65535")
    if args.host not in LOOPBACK:
        log.warning(
            "binding %s: anyone who can reach this address sees the slides (the default 127.0.0.1 is this machine only)",
            args.host,
        )
    try:
        server = make_server(args.out_dir, args.host, args.port, args.slides_root)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    print(f"review: {server.url}  ({len(server.app.folder.slides)} slide(s) in {server.app.folder.root}; Ctrl-C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

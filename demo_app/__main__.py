"""python -m demo_app [--host H] [--port P]: serve the demo with uvicorn.

The port is ``--port``, else the ``PORT`` environment variable (as platforms that assign one set it),
else 8000. The host is only ever ``--host`` (default 127.0.0.1): a stray ``HOST`` variable, which some
shells set to the machine's name, must not decide what the demo listens on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

DEFAULT_PORT = 8000
# Ctrl-C waits at most this long for requests in flight (a deliberate 30 s hold, a leak's
# background task) before cancelling them: a demo stops in seconds, not half a minute.
SHUTDOWN_GRACE_SECONDS = 2


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(
            f"must be a port number from 1 to 65535 (--port or PORT), got {text!r}"
        )
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo_app", description="Serve the poolwatch demo API.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=port_number,
        # argparse passes a string default through `type`, so a bad PORT fails like a bad --port.
        default=os.environ.get("PORT") or str(DEFAULT_PORT),
        help=f"port to listen on (default: $PORT, else {DEFAULT_PORT})",
    )
    return parser.parse_args(argv)


def show_poolwatch_events() -> None:
    """The demo logs through plain stdlib logging: poolwatch's events, info included, on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:  %(name)s %(message)s"))
    events = logging.getLogger("poolwatch")
    events.addHandler(handler)
    events.setLevel(logging.INFO)
    events.propagate = False


def where_to_look(host: str, port: int) -> str:
    """What a newcomer opens first, printed before the server starts."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    lines = [
        "poolwatch demo",
        f"  API and its docs   {base}/docs",
        f"  live pool page     {base}/poolwatch",
        f"  Prometheus metrics {base}/metrics",
        f"  health             {base}/health/db  {base}/health/live",
        f"  some load          python -m demo_app.load --url {base}",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    show_poolwatch_events()
    print(where_to_look(args.host, args.port), file=sys.stderr, flush=True)
    uvicorn.run(
        "demo_app.main:app",
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )


if __name__ == "__main__":
    main()

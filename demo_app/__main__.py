"""python -m demo_app [--host H] [--port P]: serve the demo with uvicorn.

The port is ``--port``, else the ``PORT`` environment variable (as platforms that assign one set it),
else 8000. The host is only ever ``--host`` (default 127.0.0.1): a stray ``HOST`` variable, which some
shells set to the machine's name, must not decide what the demo listens on.
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

DEFAULT_PORT = 8000


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


def main() -> None:
    args = parse_args()
    show_poolwatch_events()
    uvicorn.run("demo_app.main:app", host=args.host, port=args.port)


if __name__ == "__main__":
    main()

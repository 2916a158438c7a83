"""python -m demo_app [--host H] [--port P]: serve the demo with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the poolwatch demo API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run("demo_app.main:app", host=args.host, port=args.port)


if __name__ == "__main__":
    main()

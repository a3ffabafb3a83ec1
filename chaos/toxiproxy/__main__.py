"""``python -m raftq.chaos.toxiproxy``: the toxiproxy-server command line.

Flags follow the real ``toxiproxy-server``: ``--host`` (default localhost), ``--port`` (default
8474), ``--config`` (a JSON list of proxies to create at start), ``--seed`` (for the toxics'
randomness), ``--version``. ``LOG_LEVEL`` (debug, info, warn, error) sets the log level;
logs go to stderr. Once the API listens, one JSON line goes to stdout with the actual
address (useful with ``--port 0``)::

    {"level": "info", "address": "127.0.0.1:8474", "version": "...", "message": "Starting Toxiproxy HTTP server"}

SIGINT / SIGTERM stop it cleanly (every proxy closed, exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from .proxy import join_host_port
from .server import DEFAULT_PORT, VERSION, ToxiproxyServer

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m raftq.chaos.toxiproxy",
                                     description="Toxiproxy-compatible TCP fault injection server.")
    parser.add_argument("--host", default="localhost", help="host for the API to listen on (default localhost)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port for the API to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--config", default="", help="JSON file containing proxies to create on startup")
    parser.add_argument("--seed", type=int, default=None, help="seed for randomizing toxics with")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with ToxiproxyServer(args.host, args.port, seed=args.seed) as server:
        if args.config:
            try:
                count = await server.populate_file(args.config)
                logging.getLogger("chaos.toxiproxy").info("populated %d proxies from %s", count, args.config)
            except Exception:  # the real server logs a bad config file and keeps serving
                logging.getLogger("chaos.toxiproxy").exception("failed to populate proxies from %s", args.config)
        print(json.dumps({"level": "info", "address": join_host_port(server.host, server.port),
                          "version": VERSION, "message": "Starting Toxiproxy HTTP server"}), flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(f"toxiproxy-server version {VERSION}")
        return 0
    level = _LEVELS.get(os.environ.get("LOG_LEVEL", "info").lower(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except Exception as exc:  # e.g. the API port is taken
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

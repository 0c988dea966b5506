"""Run the Hub bucket emulator in the foreground.

    python -m hub_emulator --data DIR [--host H] [--port N] [--page-size N] [--xet local|http]
                             [--token TOKEN=USER[:ro]] ...

The first stdout line is the endpoint (``http://127.0.0.1:PORT``); the process serves until SIGINT / SIGTERM.
Without ``--token`` every caller is accepted as user "emulator" with write access.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .hub import XET_MODES, HubEmulator, TokenInfo


def _parse_token(spec: str) -> tuple[str, TokenInfo]:
    token, sep, rest = spec.partition("=")
    if not sep or not token or not rest:
        raise argparse.ArgumentTypeError(f"expected TOKEN=USER[:ro], got {spec!r}")
    user, _, mode = rest.partition(":")
    if mode not in ("", "rw", "ro"):
        raise argparse.ArgumentTypeError(f"mode must be 'ro' or 'rw', got {mode!r}")
    return token, TokenInfo(user=user, write=mode != "ro")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_emulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="state + Xet CAS directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument(
        "--xet", choices=XET_MODES, default=None, help="Xet storage: a local:// dir (default) or the HTTP CAS"
    )
    parser.add_argument("--token", action="append", type=_parse_token, default=None, metavar="TOKEN=USER[:ro]")
    args = parser.parse_args(argv)

    tokens = dict(args.token) if args.token else None
    emulator = HubEmulator(
        args.data, host=args.host, port=args.port, page_size=args.page_size, tokens=tokens, xet=args.xet
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with emulator:
        print(emulator.endpoint, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

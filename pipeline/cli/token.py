"""`pipeline token`: a viewer token signed with the broadcast nodes' secret."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import Subparsers
from pipeline.runtime import settings as settings_mod


def register(sub: Subparsers) -> None:
    token = sub.add_parser(
        "token",
        help="print a viewer token signed with the configured secret (PIPELINE_BROADCAST_SECRET)",
        description="A signed, expiring viewer token scoped to channels (docs/BROADCAST.md).",
    )
    token.add_argument("--viewer", required=True, help="viewer id (the token's sub)")
    token.add_argument("--channels", required=True, help="comma-separated channels, or * for all")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default 3600)")
    token.add_argument("--config", help="TOML settings file")
    token.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import time

    from pipeline.core import tokens
    from pipeline.core.fanout import parse_channels

    try:
        settings = settings_mod.load(args.config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pipeline token: {exc}", file=sys.stderr)
        return 2
    secret = settings.broadcast_secret.get_secret_value()
    if not secret:
        print("pipeline token: set PIPELINE_BROADCAST_SECRET (the nodes' secret)", file=sys.stderr)
        return 2
    expires = int(time.time()) + args.ttl
    print(tokens.issue(secret.encode(), args.viewer, parse_channels(args.channels), expires))
    return 0

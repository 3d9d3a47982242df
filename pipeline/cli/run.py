"""`pipeline run`: one worker of one tier, until SIGTERM."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import Subparsers
from pipeline.runtime import settings as settings_mod


def register(sub: Subparsers) -> None:
    run = sub.add_parser(
        "run",
        help="run one worker of one tier until SIGTERM",
        description="Run one worker. Start any number per tier, each with its own --instance.",
    )
    run.add_argument("topology", help="a name in topologies/ (live_likes, analytics) or module:ATTR")
    run.add_argument(
        "--tier",
        required=True,
        choices=["coalesce", "merge", "ingest", "broadcast", "sink"],
        help="which tier this worker runs",
    )
    run.add_argument(
        "--port", type=int, help="ingest and broadcast tiers: HTTP port to serve on (0: any free port)"
    )
    run.add_argument("--instance", help="stable identity of this worker (keep it across restarts)")
    run.add_argument("--name", help="run the topology under another name (its own topics and Redis keys)")
    run.add_argument("--kafka", help="Kafka bootstrap servers")
    run.add_argument("--redis", help="Redis URL")
    run.add_argument("--postgres", help="PostgreSQL URL (the sink tier; the broadcast tier's history)")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port)")
    run.add_argument("--config", help="TOML settings file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.runtime import worker

    try:
        settings = settings_mod.load(
            args.config,
            kafka=args.kafka,
            redis=args.redis,
            postgres=args.postgres,
            instance=args.instance,
            metrics_port=args.metrics_port,
            log_level=args.log_level,
            ingest_port=args.port if args.tier == "ingest" else None,
            broadcast_port=args.port if args.tier == "broadcast" else None,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"pipeline run: {exc}", file=sys.stderr)
        return 2
    if args.tier == "ingest" and not settings.ingest_api_keys.strip() and not settings.ingest_open:
        print(
            "pipeline run: the ingest gateway needs API keys (PIPELINE_INGEST_API_KEYS=k1,k2) "
            "or PIPELINE_INGEST_OPEN=true to serve without them",
            file=sys.stderr,
        )
        return 2
    if args.tier == "broadcast" and not settings.broadcast_secret.get_secret_value():
        print(
            "pipeline run: a broadcast node needs PIPELINE_BROADCAST_SECRET (signs viewer tokens)",
            file=sys.stderr,
        )
        return 2
    if args.tier == "sink" and not settings.postgres:
        print(
            "pipeline run: the sink tier needs a PostgreSQL URL (--postgres postgresql://host:5432/db "
            "or PIPELINE_POSTGRES)",
            file=sys.stderr,
        )
        return 2
    topology = worker.load_topology(args.topology)
    if args.name:
        topology = topology.renamed(args.name)
    worker.run(args.tier, topology, settings)
    return 0

"""`pipeline` command line: run a worker, run the demo, run benchmarks, start local servers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline import settings as settings_mod

EPILOG = """
examples:
  pipeline demo --duration 15            start everything locally and watch counts converge
  pipeline run live_likes --tier coalesce --instance c1 --kafka 127.0.0.1:9092
  pipeline run live_likes --tier merge --instance m1 --redis redis://127.0.0.1:6379/0
  pipeline bench coalesce --json         tier-1 drain rate vs. a bare consumer and a naive Faust agent
  pipeline servers                       start a local Kafka-protocol broker and Redis, print their URLs

Settings come from (lowest to highest): defaults, a TOML file (--config or PIPELINE_CONFIG),
environment variables PIPELINE_<NAME> (e.g. PIPELINE_KAFKA, PIPELINE_REDIS, PIPELINE_INSTANCE), flags.
"""


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka", help="Kafka bootstrap servers (default: start a local broker)")
    p.add_argument("--redis", help="Redis URL (default: start a local Redis)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Hierarchical aggregation for write-heavy counters: Kafka events -> coalescing agents "
        "(tier 1) -> root merger (tier 2) -> Redis, exactly once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run one worker of one tier until SIGTERM",
        description="Run one worker. Start any number per tier, each with its own --instance.",
    )
    run.add_argument("topology", help="a name in topologies/ (live_likes, analytics) or module:ATTR")
    run.add_argument(
        "--tier", required=True, choices=["coalesce", "merge"], help="which tier this worker runs"
    )
    run.add_argument("--instance", help="stable identity of this worker (keep it across restarts)")
    run.add_argument("--name", help="run the topology under another name (its own topics and Redis keys)")
    run.add_argument("--kafka", help="Kafka bootstrap servers")
    run.add_argument("--redis", help="Redis URL")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port)")
    run.add_argument("--config", help="TOML settings file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline locally with a load generator",
        description="Starts a local broker and Redis (unless --kafka/--redis are given), "
        "two tier-1 workers and a root merger as separate processes, and a load generator "
        "(Zipf keys plus one viral key); shows progress; ends with a summary.",
    )
    demo.add_argument("--topology", default="live_likes")
    demo.add_argument("--duration", type=float, default=15.0, help="seconds of load (default 15)")
    demo.add_argument(
        "--rate", type=int, default=0, help="events/s to aim for (default: as fast as possible)"
    )
    demo.add_argument("--keys", type=int, default=10_000, help="distinct comment keys (default 10000)")
    demo.add_argument("--channels", type=int, default=20, help="distinct live videos (default 20)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    _server_flags(demo)

    bench = sub.add_parser("bench", help="measure throughput (results go in docs/BENCHMARKS.md)")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bc = bsub.add_parser("coalesce", help="tier-1 drain rate vs. bare getmany ceiling vs. naive Faust agent")
    bc.add_argument("--events", type=int, default=600_000, help="events pre-loaded (default 600000)")
    bc.add_argument("--faust-events", type=int, default=15_000, help="events the Faust baseline gets")
    bc.add_argument("--keys", type=int, default=10_000)
    bc.add_argument("--rounds", type=int, default=3, help="alternating ceiling/tier-1 rounds (default 3)")
    bc.add_argument("--json", action="store_true")
    _server_flags(bc)

    servers = sub.add_parser("servers", help="start a local broker and Redis and wait (Ctrl-C stops them)")
    servers.add_argument("--data-dir", help="keep data here (default: a temporary directory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from pipeline.tiers import worker

        try:
            settings = settings_mod.load(
                args.config,
                kafka=args.kafka,
                redis=args.redis,
                instance=args.instance,
                metrics_port=args.metrics_port,
                log_level=args.log_level,
            )
        except (FileNotFoundError, ValueError) as exc:
            print(f"pipeline run: {exc}", file=sys.stderr)
            return 2
        topology = worker.load_topology(args.topology)
        if args.name:
            topology = topology.renamed(args.name)
        worker.run(args.tier, topology, settings)
        return 0
    if args.command == "demo":
        from pipeline import demo

        return demo.main(args)
    if args.command == "bench":
        from pipeline.bench import coalesce_bench

        return coalesce_bench.main(args)
    if args.command == "servers":
        from pipeline import local_servers

        return local_servers.serve_forever(args.data_dir)
    return 2


if __name__ == "__main__":
    sys.exit(main())

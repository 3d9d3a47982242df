"""`pipeline` command line: run a worker, plan, replay quarantined batches; demo, chaos, benchmarks.

One module per command (or family of commands) registers its parser and its handler with
`set_defaults(func=...)`; `main` calls `args.func(args)`. Handlers of the harness and the benchmarks
import their module only when they run, so the runtime alone (`pip install .`) serves `pipeline --help`
and `pipeline run`, and a command that needs an extra says which one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.cli import bench, harness, plan, quarantine, run, token
from pipeline.runtime import extras

EPILOG = """
examples:
  pipeline demo --duration 15            start everything locally and watch counts converge
  pipeline run live_likes --tier coalesce --instance c1 --kafka 127.0.0.1:9092
  pipeline run live_likes --tier merge --instance m1 --redis redis://127.0.0.1:6379/0
  pipeline bench coalesce --json         tier-1 drain rate vs. a bare consumer and a naive Faust agent
  pipeline bench all --json --plot DIR   every benchmark, median/min/max of 3 runs, PNG plots (~15 min)
  pipeline bench cardinality --json      the pipeline beside a per-event writer, 1 to 100 events per key
  pipeline servers --broker kafka        start a local Apache Kafka (KRaft) and Redis, print their URLs
  pipeline run live_likes --tier broadcast --instance b1 --port 8765   a broadcast node (viewers)
  pipeline token --viewer v1 --channels video-1 --ttl 3600             a viewer token
  PIPELINE_INGEST_API_KEYS=k1 pipeline run live_likes --tier ingest --port 8080   the HTTP front door
  pipeline plan --rate 100000 --keys 50000 --hot-share 0.3             what a workload costs each tier
  pipeline chaos --seed 7 --json           the whole pipeline under faults, exact counts checked
  pipeline chaos --broker kafka --brokers 3 --json   on 3 Apache Kafka brokers, brokers SIGKILLed too
  pipeline replay-quarantine live_likes --list     batches the root quarantined (repair, then replay)

Settings come from (lowest to highest): defaults, a TOML file (--config or PIPELINE_CONFIG),
environment variables PIPELINE_<NAME> (e.g. PIPELINE_KAFKA, PIPELINE_REDIS, PIPELINE_INSTANCE), flags.
"""

# the order of `pipeline --help`
COMMANDS = (
    run.register,
    harness.register_demo,
    bench.register,
    plan.register,
    token.register,
    harness.register_chaos,
    harness.register_soak,
    quarantine.register,
    harness.register_servers,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Hierarchical aggregation for write-heavy counters: Kafka events -> coalescing agents "
        "(tier 1) -> root merger (tier 2) -> Redis, exactly once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except extras.MissingExtra as exc:
        print(f"pipeline {args.command}: {exc}", file=sys.stderr)
        return 1
    return result

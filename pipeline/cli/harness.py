"""The development harness's commands: demo, chaos, soak and local servers (pipeline/harness/).

Their modules load only when they run; local servers need the [local] extra where no JDK or no
redis-server is found (pipeline/runtime/extras.py says so).
"""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers, broker_flag, lazy, server_flags


def register_demo(sub: Subparsers) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline locally with a load generator",
        description="Starts a local broker and Redis (unless --kafka/--redis are given), "
        "a local PostgreSQL (unless --postgres), two tier-1 workers, a root merger, the PostgreSQL sink and "
        "a broadcast node as separate processes, and load "
        "through the SDK (Zipf keys plus one viral key, ids, hot keys split; and a trickle of "
        "comments); prints the viewer and dashboard URLs, shows progress, and ends with a summary "
        "read back from Redis (with --json: `hot_keys_split`, the keys split during the run).",
    )
    demo.add_argument("--topology", default="live_likes")
    demo.add_argument("--duration", type=float, default=15.0, help="seconds of load (default 15)")
    demo.add_argument(
        "--rate", type=int, default=0, help="events/s to aim for (default: as fast as possible)"
    )
    demo.add_argument("--keys", type=int, default=10_000, help="distinct comment keys (default 10000)")
    demo.add_argument("--channels", type=int, default=20, help="distinct live videos (default 20)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    demo.add_argument(
        "--postgres", help="PostgreSQL URL for the sink tier's rollups (default: start a local one)"
    )
    server_flags(demo)
    demo.set_defaults(func=lazy("pipeline.harness.demo"))


def register_chaos(sub: Subparsers) -> None:
    chaos = sub.add_parser(
        "chaos",
        help="run the whole pipeline under injected faults and check every key's count exactly",
        description="Writers (producer SDK) send a seeded workload while tier-1, root and broadcast workers "
        "are SIGKILLed and restarted, Redis and the broker are restarted, and tier-1 and root workers join "
        "and leave gracefully; then "
        "every key's total in Redis is compared with the ledger of accepted events. Exit 1 if any is wrong.",
    )
    chaos.add_argument("--seed", type=int, default=1, help="workload and fault schedule seed (default 1)")
    chaos.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    chaos.add_argument(
        "--duration", type=float, help="seconds of load (default 60; 90 on a cluster of brokers)"
    )
    chaos.add_argument(
        "--rate", type=float, help="events/s the writers send together (default 3000; 15000 with --brokers 3)"
    )
    chaos.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    server_flags(chaos)
    chaos.add_argument(
        "--brokers",
        type=int,
        default=1,
        help="Apache Kafka brokers to start (3: replication 3, min.insync.replicas 2; brokers are then "
        "SIGKILLed too, and a tier-1 worker and a root die for good so their partitions fail over)",
    )
    chaos.add_argument(
        "--sink",
        choices=["postgres"],
        help="also run the PostgreSQL sink tier: kill_sink (3 or more) and restart_postgres (1 or more) "
        "faults, and every key's total in PostgreSQL checked against the ledger and Redis "
        "(sink_keys_checked, sink_keys_wrong)",
    )
    chaos.add_argument("--postgres", help="PostgreSQL URL for --sink (default: start a local one)")
    chaos.set_defaults(func=lazy("pipeline.harness.chaos"))


def register_soak(sub: Subparsers) -> None:
    soak = sub.add_parser(
        "soak",
        help="the pipeline at half its measured capacity for N minutes: RSS growth, lag trend, exact counts",
        description="Starts a local broker and Redis (unless --kafka/--redis are given) and the live_likes "
        "pipeline (2 tier-1 workers, 1 root merger, 1 broadcast node, as processes). First measures the "
        "capacity: 2 writer processes send as fast as they can for --capacity-seconds, capacity = events / "
        "time until Redis has counted them all. Then paced writers send at --rate (default: half that "
        "capacity) for --minutes while the RSS of every worker (and of the broker and Redis, for "
        "information) and the consumer lag of tier 1 and of the root are sampled every 2 s. Reports RSS "
        "at the end of the warm-up (the first 10% of the soak, at most 60 s) and at the end, the lag "
        "samples and trend, and checks that Redis counted exactly the events the broker accepted. "
        "Targets: RSS growth under 5% for every worker, lag not growing. Exit 1 if the counts differ.",
    )
    soak.add_argument("--minutes", type=float, default=30.0, help="minutes of paced load (default 30)")
    soak.add_argument("--rate", type=int, default=0, help="events/s (default: half the measured capacity)")
    soak.add_argument(
        "--capacity-seconds", type=float, default=20.0, help="seconds of flat-out load to measure capacity"
    )
    soak.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    server_flags(soak)
    soak.set_defaults(func=lazy("pipeline.harness.soak"))


def register_servers(sub: Subparsers) -> None:
    servers = sub.add_parser("servers", help="start a local broker and Redis and wait (Ctrl-C stops them)")
    servers.add_argument("--data-dir", help="keep data here (default: a temporary directory)")
    broker_flag(servers)
    servers.add_argument(
        "--brokers", type=int, default=1, help="Apache Kafka nodes (3: replication 3, min.insync.replicas 2)"
    )
    servers.set_defaults(func=_servers)


def _servers(args: argparse.Namespace) -> int:
    from pipeline.harness import local_servers

    return local_servers.serve_forever(args.data_dir, args.broker, args.brokers)

"""`pipeline` command line: run a worker, run the demo, run benchmarks, start local servers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import settings as settings_mod
from pipeline.runtime import extras

if TYPE_CHECKING:
    from pipeline.core.topology import Topology

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


def _broker_flag(p: argparse.ArgumentParser, *extra: str) -> None:
    p.add_argument(
        "--broker",
        choices=["auto", "kafka", "embedded", *extra],
        help="which local broker to start: Apache Kafka (KRaft; needs a JDK 17+ and the jars that "
        "ops/kafka/fetch brings) or the embedded Kafka-protocol broker; auto (the default, or "
        "$PIPELINE_LOCAL_BROKER) picks Apache Kafka where it can run",
    )


def _server_flags(p: argparse.ArgumentParser, *extra_brokers: str) -> None:
    p.add_argument("--kafka", help="Kafka bootstrap servers (default: start a local broker)")
    p.add_argument("--redis", help="Redis URL (default: start a local Redis)")
    _broker_flag(p, *extra_brokers)


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
        "--tier",
        required=True,
        choices=["coalesce", "merge", "ingest", "broadcast"],
        help="which tier this worker runs",
    )
    run.add_argument(
        "--port", type=int, help="ingest and broadcast tiers: HTTP port to serve on (0: any free port)"
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
        "two tier-1 workers, a root merger and a broadcast node as separate processes, and load "
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
    _server_flags(demo)

    bench = sub.add_parser("bench", help="measure throughput (results go in docs/BENCHMARKS.md)")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bc = bsub.add_parser("coalesce", help="tier-1 drain rate vs. bare getmany ceiling vs. naive Faust agent")
    bc.add_argument("--events", type=int, default=1_000_000, help="events pre-loaded (default 1000000)")
    bc.add_argument("--faust-events", type=int, default=15_000, help="events the Faust baseline gets")
    bc.add_argument("--keys", type=int, default=10_000)
    bc.add_argument("--rounds", type=int, default=3, help="alternating ceiling/tier-1 rounds (default 3)")
    bc.add_argument("--json", action="store_true")
    _server_flags(bc, "both")  # both: the whole benchmark on Apache Kafka, then on the embedded broker
    bh = bsub.add_parser(
        "hotkey", help="viral key plus Zipf background, hot-key splitting off then on: balance, lag, latency"
    )
    bh.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode (default 20)")
    bh.add_argument("--writers", type=int, default=2, help="producer processes (default 2)")
    bh.add_argument("--viral-share", type=float, default=0.5, help="share of events on the viral key")
    bh.add_argument("--keys", type=int, default=10_000)
    bh.add_argument("--rate", type=float, default=0, help="total events/s to aim for (default: all they can)")
    bh.add_argument("--json", action="store_true")
    _server_flags(bh)
    bi = bsub.add_parser("ingest", help="gateway events/s and p99 latency, batches of 100, beside the SDK")
    bi.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    bi.add_argument("--batch", type=int, default=100, help="events per request (default 100)")
    bi.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    bi.add_argument("--json", action="store_true")
    _server_flags(bi)
    bf = bsub.add_parser(
        "fanout", help="one broadcast node, simulated viewers in several processes: pushes/s, staleness, RSS"
    )
    bf.add_argument("--viewers", type=int, default=10_000, help="viewers to connect (default 10000)")
    bf.add_argument("--procs", type=int, default=4, help="viewer processes (default 4)")
    bf.add_argument(
        "--channels", type=int, default=100, help="channels the viewers spread over (default 100)"
    )
    bf.add_argument("--keys", type=int, default=20, help="keys per channel (default 20)")
    bf.add_argument("--update-rate", type=float, default=8.0, help="updates/s published per channel")
    bf.add_argument("--push-rate", type=float, default=4.0, help="the node's pushes/s per viewer (default 4)")
    bf.add_argument("--duration", type=float, default=20.0, help="seconds measured once all are connected")
    bf.add_argument("--json", action="store_true")
    _server_flags(bf)

    bcard = bsub.add_parser(
        "cardinality",
        help="the pipeline beside a per-event HINCRBY writer at 1, 2, 10 and 100 events per key",
        description="For each events-per-key ratio: a backlog whose keys' events sit together (so they "
        "share a window), drained by one tier-1 worker and one root into Redis (until T:stats.events "
        "equals the backlog) and, beside it, by a consumer writing one pipelined HINCRBY per event. "
        "Reports both rates, their ratio, Redis commands per cell, the largest partial message and the "
        "tier-1 peak RSS (docs/BENCHMARKS.md).",
    )
    bcard.add_argument("--keys", type=int, default=100_000, help="distinct keys per backlog (default 100000)")
    bcard.add_argument(
        "--max-events", type=int, default=1_000_000, help="cap on a backlog: fewer keys at high ratios"
    )
    bcard.add_argument("--ratios", default="1,2,10,100", help="events per key, comma-separated")
    bcard.add_argument("--plot", metavar="DIR", help="write cardinality.png (the ratio curve) to DIR")
    bcard.add_argument("--json", action="store_true")
    _server_flags(bcard)

    brb = bsub.add_parser(
        "redis-baseline",
        help="per-event Redis HINCRBY/INCR without coalescing: events/s, round trip or pipelined",
    )
    brb.add_argument("--events", type=int, default=300_000, help="events pre-loaded (default 300000)")
    brb.add_argument(
        "--roundtrip-events",
        type=int,
        default=50_000,
        help="events the round-trip modes apply (default 50000)",
    )
    brb.add_argument("--keys", type=int, default=10_000)
    brb.add_argument(
        "--modes",
        default="hincrby_roundtrip,hincrby_pipelined,incr_pipelined",
        help="comma-separated: hincrby_roundtrip, hincrby_pipelined, incr_pipelined, incr_roundtrip",
    )
    brb.add_argument("--json", action="store_true")
    _server_flags(brb)
    ball = bsub.add_parser(
        "all", help="every benchmark N times on one set of servers: median/min/max, one JSON, PNG plots"
    )
    ball.add_argument("--runs", type=int, help="runs of every benchmark (default 3, --quick 2)")
    ball.add_argument("--quick", action="store_true", help="small sizes, a few minutes (for trying it out)")
    ball.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR")
    ball.add_argument(
        "--only", help="comma-separated subset: coalesce,redis_baseline,ingest,hotkey,fanout,e2e"
    )
    ball.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    _server_flags(ball)

    be = bsub.add_parser(
        "e2e", help="whole pipeline at a set rate: p50/p99 send->Redis, send->viewer; each tier's reduction"
    )
    be.add_argument("--rate", type=float, default=20_000.0, help="events/s to send (default 20000)")
    be.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    be.add_argument("--keys", type=int, default=10_000, help="distinct comment keys (default 10000)")
    be.add_argument("--channels", type=int, default=20, help="distinct live videos (default 20)")
    be.add_argument("--viewers", type=int, default=200, help="WebSocket viewers on the busy channels")
    be.add_argument("--json", action="store_true")
    _server_flags(be)

    plan = sub.add_parser(
        "plan",
        help="predict what a workload costs each tier (partials/s, Redis commands/s, hot keys, workers)",
        description="A closed-form model of the reduction: Zipf keys, Poisson arrivals per key. "
        "Checked against measured runs in docs/BENCHMARKS.md.",
    )
    plan.add_argument("--rate", type=float, required=True, help="events per second")
    plan.add_argument("--keys", type=int, default=10_000, help="distinct keys (default 10,000)")
    plan.add_argument("--skew", type=float, default=1.1, help="Zipf exponent of key popularity (default 1.1)")
    plan.add_argument("--hot-share", type=float, default=0.0, help="share of events on one viral key")
    plan.add_argument("--channels", type=int, default=20)
    plan.add_argument("--window-ms", type=float, default=250.0, help="tier-1 flush interval (default 250)")
    plan.add_argument("--partitions", type=int, default=6, help="events topic partitions")
    plan.add_argument("--root-partitions", type=int, default=3, help="partials topic partitions")
    plan.add_argument("--tier1-workers", type=int, help="default: as many as the rate needs")
    plan.add_argument("--split-threshold", type=float, default=20_000.0, help="events/s that makes a key hot")
    plan.add_argument(
        "--dedup-horizon", type=float, default=600.0, help="seconds an event id is remembered (default 600)"
    )
    plan.add_argument(
        "--id-share", type=float, default=1.0, help="share of events that carry an id (default 1: the SDK's)"
    )
    plan.add_argument("--json", action="store_true")

    token = sub.add_parser(
        "token",
        help="print a viewer token signed with the configured secret (PIPELINE_BROADCAST_SECRET)",
        description="A signed, expiring viewer token scoped to channels (docs/BROADCAST.md).",
    )
    token.add_argument("--viewer", required=True, help="viewer id (the token's sub)")
    token.add_argument("--channels", required=True, help="comma-separated channels, or * for all")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default 3600)")
    token.add_argument("--config", help="TOML settings file")

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
    _server_flags(chaos)
    chaos.add_argument(
        "--brokers",
        type=int,
        default=1,
        help="Apache Kafka brokers to start (3: replication 3, min.insync.replicas 2; brokers are then "
        "SIGKILLed too, and a tier-1 worker and a root die for good so their partitions fail over)",
    )

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
    _server_flags(soak)

    rq = sub.add_parser(
        "replay-quarantine",
        help="show, replay or release the batches the root merger quarantined",
        description="A batch the root's apply refuses (a Redis key of another type, a field holding a value "
        "the apply cannot take) and that stays refused for quarantine_after_s is quarantined: its partials "
        "are copied to T.partials-quarantine, T:quarantine records it, and the root stops that partials "
        "partition. Repair the key (for example DEL it), then run this: it applies each quarantined batch "
        "from its copies, exactly once (the positions in Redis guard it), publishes the totals, and lifts "
        "the quarantine; the root resumes the partition within 2 s. Exit 1 if a batch is still refused.",
    )
    rq.add_argument("topology", help="a name in topologies/ (live_likes, analytics) or module:ATTR")
    rq.add_argument("--name", help="the topology runs under another name (as `pipeline run --name`)")
    rq.add_argument(
        "--partition", type=int, action="append", help="only this partials partition (may be repeated)"
    )
    rq.add_argument("--list", action="store_true", help="only show what is quarantined, change nothing")
    rq.add_argument(
        "--release",
        action="store_true",
        help="lift the quarantine without applying: the root reads the batch again from the partials topic",
    )
    rq.add_argument("--kafka", help="Kafka bootstrap servers")
    rq.add_argument("--redis", help="Redis URL")
    rq.add_argument("--config", help="TOML settings file")
    rq.add_argument("--json", action="store_true", help="print one JSON object per batch")

    servers = sub.add_parser("servers", help="start a local broker and Redis and wait (Ctrl-C stops them)")
    servers.add_argument("--data-dir", help="keep data here (default: a temporary directory)")
    _broker_flag(servers)
    servers.add_argument(
        "--brokers", type=int, default=1, help="Apache Kafka nodes (3: replication 3, min.insync.replicas 2)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_extras(args)
        return _dispatch(args)
    except extras.MissingExtra as exc:
        print(f"pipeline {args.command}: {exc}", file=sys.stderr)
        return 1


def _check_extras(args: argparse.Namespace) -> None:
    """The benchmarks' yardstick and plots come with the [bench] extra; say so before starting servers."""
    if args.command != "bench":
        return
    only = {b.strip() for b in (getattr(args, "only", None) or "coalesce").split(",")}
    if args.bench == "coalesce" or (args.bench == "all" and "coalesce" in only):
        extras.check("faust", "pipeline bench coalesce (its yardstick is a Faust agent)")
    if getattr(args, "plot", None):
        extras.check("matplotlib", f"pipeline bench {args.bench} --plot")


def _dispatch(args: argparse.Namespace) -> int:
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
        topology = worker.load_topology(args.topology)
        if args.name:
            topology = topology.renamed(args.name)
        worker.run(args.tier, topology, settings)
        return 0
    if args.command == "demo":
        from pipeline import demo

        return demo.main(args)
    if args.command == "bench" and args.bench == "hotkey":
        from pipeline.bench import hotkey_bench

        return hotkey_bench.main(args)
    if args.command == "bench" and args.bench == "fanout":
        from pipeline.bench import fanout_bench

        return fanout_bench.main(args)
    if args.command == "token":
        return _token(args)
    if args.command == "bench" and args.bench == "ingest":
        from pipeline.bench import ingest_bench

        return ingest_bench.main(args)
    if args.command == "bench" and args.bench == "redis-baseline":
        from pipeline.bench import redis_baseline

        return redis_baseline.main(args)
    if args.command == "bench" and args.bench == "cardinality":
        from pipeline.bench import cardinality_bench

        return cardinality_bench.main(args)
    if args.command == "bench" and args.bench == "all":
        from pipeline.bench import suite

        return suite.main(args)
    if args.command == "bench" and args.bench == "e2e":
        from pipeline.bench import e2e_bench

        return e2e_bench.main(args)
    if args.command == "bench":
        from pipeline.bench import coalesce_bench

        return coalesce_bench.main(args)
    if args.command == "plan":
        from pipeline import plan_command

        return plan_command.main(args)
    if args.command == "chaos":
        from pipeline import chaos as chaos_mod

        return chaos_mod.main(args)
    if args.command == "soak":
        from pipeline import soak as soak_mod

        return soak_mod.main(args)
    if args.command == "replay-quarantine":
        return _replay_quarantine(args)
    if args.command == "servers":
        from pipeline import local_servers

        return local_servers.serve_forever(args.data_dir, args.broker, args.brokers)
    return 2


def _token(args: argparse.Namespace) -> int:
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


def _replay_quarantine(args: argparse.Namespace) -> int:
    import asyncio

    from pipeline.tiers import worker

    try:
        settings = settings_mod.load(args.config, kafka=args.kafka, redis=args.redis)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pipeline replay-quarantine: {exc}", file=sys.stderr)
        return 2
    topology = worker.load_topology(args.topology)
    if args.name:
        topology = topology.renamed(args.name)
    return asyncio.run(_replay_quarantined(topology, settings, args))


async def _replay_quarantined(
    topology: Topology, settings: settings_mod.Settings, args: argparse.Namespace
) -> int:
    import json

    from pipeline.io import kafka, quarantine, redis_client

    conn = kafka.connection_from(settings)
    client = redis_client.connect(settings)
    producer = None
    failed = 0
    try:
        state = quarantine.QuarantineState(client, topology)
        held = sorted((await state.all()).items())
        chosen = [q for p, q in held if not args.partition or p in args.partition]
        if not chosen:
            print(
                f"nothing quarantined for {topology.name}"
                + (f" in {args.partition}" if args.partition else "")
            )
            return 0
        if not (args.list or args.release):
            producer = kafka.producer(conn, f"{topology.group('merge')}.replay")
            await kafka.start(producer)
        for q in chosen:
            if args.list:
                outcome, detail, ok = "quarantined", q.reason, True
            elif args.release:
                ok = await state.release(q)
                outcome = "released" if ok else "changed meanwhile"
                detail = "the root reads the batch again from the partials topic" if ok else "run again"
            else:
                done = await quarantine.replay(conn, client, topology, q, producer)
                outcome, detail, ok = done.outcome, done.detail, done.ok
            failed += not ok
            if args.json:
                report = {"partition": q.partition, "outcome": outcome, "ok": ok, "detail": detail}
                print(json.dumps({**report, "quarantined": json.loads(q.to_json())}))
            else:
                print(
                    f"partition {q.partition}, offsets {q.first}-{q.last} ({q.messages} partials, "
                    f"quarantined by {q.by}): {outcome}: {detail}"
                )
    finally:
        if producer is not None:
            await producer.stop()
        await client.aclose()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`pipeline bench ...`: the benchmarks (pipeline/bench/), each loaded only when it runs.

The Faust agent that `bench coalesce` measures against and the plots of --plot come with the [bench]
extra; a missing one is named before any server starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pipeline.cli.common import Handler, Subparsers, lazy, server_flags
from pipeline.runtime import extras


def _needs(module: str, *, faust: Callable[[argparse.Namespace], bool] = lambda args: False) -> Handler:
    """The benchmark in pipeline/bench/`module`, after checking the extras its flags call for."""
    run = lazy(f"pipeline.bench.{module}")

    def handler(args: argparse.Namespace) -> int:
        if faust(args):
            extras.check("faust", "pipeline bench coalesce (its yardstick is a Faust agent)")
        if getattr(args, "plot", None):
            extras.check("matplotlib", f"pipeline bench {args.bench} --plot")
        return run(args)

    return handler


def _all_includes_coalesce(args: argparse.Namespace) -> bool:
    return not args.only or "coalesce" in {b.strip() for b in args.only.split(",")}


def register(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="measure throughput (results go in docs/BENCHMARKS.md)")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bc = bsub.add_parser("coalesce", help="tier-1 drain rate vs. bare getmany ceiling vs. naive Faust agent")
    bc.add_argument("--events", type=int, default=1_000_000, help="events pre-loaded (default 1000000)")
    bc.add_argument("--faust-events", type=int, default=15_000, help="events the Faust baseline gets")
    bc.add_argument("--keys", type=int, default=10_000)
    bc.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds, each phase once per round, in alternating order (default 5)",
    )
    bc.add_argument("--json", action="store_true")
    server_flags(bc, "both")  # both: the whole benchmark on Apache Kafka, then on the embedded broker
    bh = bsub.add_parser(
        "hotkey", help="viral key plus Zipf background, hot-key splitting off then on: balance, lag, latency"
    )
    bh.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode (default 20)")
    bh.add_argument("--writers", type=int, default=2, help="producer processes (default 2)")
    bh.add_argument("--viral-share", type=float, default=0.5, help="share of events on the viral key")
    bh.add_argument("--keys", type=int, default=10_000)
    bh.add_argument("--rate", type=float, default=0, help="total events/s to aim for (default: all they can)")
    bh.add_argument("--json", action="store_true")
    server_flags(bh)
    bi = bsub.add_parser("ingest", help="gateway events/s and p99 latency, batches of 100, beside the SDK")
    bi.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    bi.add_argument("--batch", type=int, default=100, help="events per request (default 100)")
    bi.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    bi.add_argument("--json", action="store_true")
    server_flags(bi)
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
    server_flags(bf)

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
    server_flags(bcard)

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
    server_flags(brb)
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
    server_flags(ball)

    be = bsub.add_parser(
        "e2e", help="whole pipeline at a set rate: p50/p99 send->Redis, send->viewer; each tier's reduction"
    )
    be.add_argument("--rate", type=float, default=20_000.0, help="events/s to send (default 20000)")
    be.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    be.add_argument("--keys", type=int, default=10_000, help="distinct comment keys (default 10000)")
    be.add_argument("--channels", type=int, default=20, help="distinct live videos (default 20)")
    be.add_argument("--viewers", type=int, default=200, help="WebSocket viewers on the busy channels")
    be.add_argument("--json", action="store_true")
    server_flags(be)

    bsink = bsub.add_parser(
        "sink",
        help="the PostgreSQL sink: partials/s and rows/s, batched (COPY, upsert) beside a statement per row",
    )
    bsink.add_argument("--partials", type=int, default=600, help="partials per round (default 600)")
    bsink.add_argument("--cells", type=int, default=100, help="keys per partial, x3 rollups (default 100)")
    bsink.add_argument("--batch", type=int, default=30, help="partials per transaction (default 30)")
    bsink.add_argument("--rounds", type=int, default=4, help="alternating batched/naive rounds (default 4)")
    bsink.add_argument("--pages", type=int, default=20_000, help="distinct pages (default 20000)")
    bsink.add_argument("--postgres", help="PostgreSQL URL (default: start a local one)")
    bsink.add_argument("--json", action="store_true")

    bc.set_defaults(func=_needs("coalesce_bench", faust=lambda args: True))
    bsink.set_defaults(func=_needs("sink_bench"))
    bh.set_defaults(func=_needs("hotkey_bench"))
    bi.set_defaults(func=_needs("ingest_bench"))
    bf.set_defaults(func=_needs("fanout_bench"))
    bcard.set_defaults(func=_needs("cardinality_bench"))
    brb.set_defaults(func=_needs("redis_baseline"))
    ball.set_defaults(func=_needs("suite", faust=_all_includes_coalesce))
    be.set_defaults(func=_needs("e2e_bench"))

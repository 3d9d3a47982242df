"""`pipeline plan`: what a workload costs each tier (the closed-form model in core/planner.py)."""

from __future__ import annotations

import argparse
import dataclasses

import orjson

from pipeline.cli.common import Subparsers
from pipeline.core import coalescer
from pipeline.core.planner import Workload, plan


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "plan",
        help="predict what a workload costs each tier (partials/s, Redis commands/s, hot keys, workers)",
        description="A closed-form model of the reduction: Zipf keys, Poisson arrivals per key. "
        "Checked against measured runs in docs/BENCHMARKS.md.",
    )
    p.add_argument("--rate", type=float, required=True, help="events per second")
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys (default 10,000)")
    p.add_argument("--skew", type=float, default=1.1, help="Zipf exponent of key popularity (default 1.1)")
    p.add_argument("--hot-share", type=float, default=0.0, help="share of events on one viral key")
    p.add_argument("--channels", type=int, default=20)
    p.add_argument("--window-ms", type=float, default=250.0, help="tier-1 flush interval (default 250)")
    p.add_argument("--partitions", type=int, default=6, help="events topic partitions")
    p.add_argument("--root-partitions", type=int, default=3, help="partials topic partitions")
    p.add_argument("--tier1-workers", type=int, help="default: as many as the rate needs")
    p.add_argument(
        "--redis-shards",
        type=int,
        default=1,
        help="Redis Cluster masters holding equal slot ranges (default 1: one Redis); "
        "prints Redis commands/s per shard",
    )
    p.add_argument("--split-threshold", type=float, default=20_000.0, help="events/s that makes a key hot")
    p.add_argument(
        "--dedup-horizon", type=float, default=600.0, help="seconds an event id is remembered (default 600)"
    )
    p.add_argument(
        "--id-share", type=float, default=1.0, help="share of events that carry an id (default 1: the SDK's)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        workload = Workload(
            events_per_s=args.rate,
            keys=args.keys,
            zipf_s=args.skew,
            hot_share=args.hot_share,
            channels=args.channels,
            flush_interval_s=args.window_ms / 1000,
            events_partitions=args.partitions,
            partials_partitions=args.root_partitions,
            tier1_workers=args.tier1_workers,
            split_threshold_eps=args.split_threshold,
            partition_budget_eps=args.split_threshold,
            dedup_horizon_s=args.dedup_horizon,
            id_share=args.id_share,
            redis_shards=args.redis_shards,
        )
    except ValueError as exc:
        print(f"pipeline plan: {exc}")
        return 2
    result = plan(workload)
    if args.json:
        print(orjson.dumps(dataclasses.asdict(result)).decode())
        return 0
    print(f"events/s                {result.events_per_s:>14,.0f}")
    print(f"cells per window        {result.cells_per_window:>14,.0f}")
    print(
        f"partials/s (tier 1)     {result.partials_per_s:>14,.1f}   "
        f"{result.events_per_partial:,.0f} events each"
    )
    print(f"applies/s (tier 2)      {result.applies_per_s:>14,.1f}")
    print(
        f"Redis commands/s        {result.redis_commands_per_s:>14,.0f}   "
        f"{result.events_per_redis_command:,.1f} events each"
    )
    if workload.redis_shards > 1:
        per_shard = result.redis_commands_per_s_per_shard
        mean = sum(per_shard) / len(per_shard)
        print(
            "Redis commands/s/shard  "
            + ", ".join(f"{n:,.0f}" for n in per_shard)
            + f"   busiest {max(per_shard) / mean if mean else 0:.2f}x the mean"
            + (f" ({workload.partials_partitions} root partitions over {workload.redis_shards} shards)")
        )
    for key, rate, k in result.hot_keys:
        print(f"hot key {key:<15} {rate:>14,.0f} events/s -> split {k} ways")
    if result.dedup_ids:
        changelog_mb = result.dedup_changelog_bytes / 1e6
        print(
            f"dedup memory (tier 1)   {result.dedup_memory_bytes / 1e6:>14,.1f} MB   "
            f"{result.dedup_ids:,.0f} ids in the horizon, {result.dedup_bytes_per_id:.2f} bytes each; "
            f"{result.dedup_memory_bytes / 1e6 / result.workers['coalesce']:,.1f} MB per tier-1 worker"
        )
        print(
            f"dedup changelog         {changelog_mb:>14,.1f} MB   kept on Kafka; "
            f"a moved partition re-reads {changelog_mb / workload.events_partitions:,.1f} MB"
        )
    print(
        f"tier-1 memory bound     {result.tier1_memory_bytes / 1e6:>14,.1f} MB   per worker: the process, "
        f"{coalescer.BYTES_PER_OPEN_CELL} bytes per open cell, its share of the dedup state"
    )
    print("workers                 " + ", ".join(f"{tier} {n}" for tier, n in result.workers.items()))
    for warning in result.warnings:
        print(f"note: {warning}")
    return 0

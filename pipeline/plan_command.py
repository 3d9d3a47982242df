"""`pipeline plan`: print the capacity plan of a workload."""

from __future__ import annotations

import argparse
import dataclasses

import orjson

from pipeline.core.planner import Workload, plan


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
    print("workers                 " + ", ".join(f"{tier} {n}" for tier, n in result.workers.items()))
    for warning in result.warnings:
        print(f"note: {warning}")
    return 0

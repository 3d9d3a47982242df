"""`pipeline bench sink`: the sink tier's PostgreSQL stage, batched beside a naive sink, in one run.

Partials shaped like the analytics topology's (page views per page and site, each cell in the
all-time total, its minute and its hour; Zipf-like pages) are encoded as tier 1 sends them, then
drained the way the sink drains `T.partials`: `Merger.add` per message, one merged batch per
`--batch` partials, `plan_rows`, and one PostgreSQL transaction with the batch's offsets. Two sinks
drain the same partials into two schemas of one server, alternating round by round:

- batched: COPY into a temporary table, then one INSERT ... SELECT ... ON CONFLICT DO UPDATE
  (pipeline/io/postgres_sink.py, what the tier runs);
- naive: one INSERT ... VALUES ... ON CONFLICT DO UPDATE per row, in the same transaction.

Both end exact (every row checked against the partials summed in Python). Reports partials/s and
rows/s of each, and their ratio; Kafka is left out (the tier's consumer is the root's, measured by
the other benchmarks), so this is the sink's cost per partial on top of reading it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from pipeline.core.merger import Merger
from pipeline.core.model import Partial
from pipeline.core.sink_plan import plan_rows
from pipeline.core.topology import Topology
from pipeline.io import postgres_sink
from pipeline.io.postgres_sink import PostgresSink
from pipeline.topology import count, every, topology, total


def bench_topology(name: str) -> Topology:
    return topology(
        name,
        metrics=[count("views", "page_view", total(), every(60, 3600), every(3600, 86400))],
        priorities={"page_view": 0},
    )


def make_partials(n: int, cells: int, pages: int, seed: int = 1) -> list[bytes]:
    """`n` partial messages of about `cells` keys each (x3 cells: total, minute, hour)."""
    rng = random.Random(seed)
    t0 = int(time.time()) // 3600 * 3600 - 6 * 3600
    out = []
    for i in range(n):
        minute = t0 + (i // 20) * 60  # time moves on: new minute buckets, now and then a new hour
        body: dict[Any, Any] = {}
        while len(body) < 3 * cells:
            site = f"site{rng.randrange(5)}"
            page = f"/p{int(rng.paretovariate(1.1)) % pages}"
            n_events = rng.randrange(1, 6)
            for bucket in ("total", f"60:{minute}", f"3600:{minute // 3600 * 3600}"):
                cell = (0, site, page, bucket)
                body[cell] = body.get(cell, 0) + n_events
        out.append(
            Partial(i % 6, 0, 1, i, i, body, sum(v for c, v in body.items() if c[3] == "total")).to_json()
        )
    return out


def expected_rows(partials: list[bytes]) -> Counter[tuple[int, int, str, str]]:
    want: Counter[tuple[int, int, str, str]] = Counter()
    for raw in partials:
        p = Partial.from_json(raw, frozenset())
        for (_m, channel, key, bucket), v in p.cells.items():
            size, _, start = bucket.partition(":")
            want[(0, 0, channel, key) if bucket == "total" else (int(size), int(start), channel, key)] += v
    return want


async def drain(
    conn: asyncpg.Connection, topo: Topology, partials: list[bytes], batch: int, naive: bool, offset0: int
) -> dict[str, Any]:
    sink = PostgresSink(conn, topo, naive=naive)
    merger = Merger(topo)
    merger.resume({0: offset0 - 1 if offset0 else None})
    rows = statements = 0
    started = time.perf_counter()
    for i in range(0, len(partials), batch):
        for j, raw in enumerate(partials[i : i + batch]):
            merger.add(0, offset0 + i + j, raw)
        merged = merger.take()
        result = await sink.apply(merged, plan_rows(topo, merged))
        if not result.applied:
            raise RuntimeError(f"a batch was refused: {result.refusal}")
        merger.applied(merged)
        rows += result.rows
        statements += result.statements
    elapsed = time.perf_counter() - started
    return {"partials": len(partials), "rows": rows, "statements": statements, "seconds": elapsed}


async def run(url: str, partials_n: int, cells: int, batch: int, rounds: int, pages: int) -> dict[str, Any]:
    conn = await postgres_sink.connect(url)
    suffix = f"{int(time.time()) % 100000}_{random.randrange(1000)}"
    topos = {
        "batched": bench_topology(f"bench_sink_b{suffix}"),
        "naive": bench_topology(f"bench_sink_n{suffix}"),
    }
    try:
        for topo in topos.values():
            await postgres_sink.migrate(conn, topo)
        totals: dict[str, dict[str, float]] = {
            mode: {"partials": 0, "rows": 0, "statements": 0, "seconds": 0.0} for mode in topos
        }
        per_round: dict[str, list[float]] = {mode: [] for mode in topos}
        want: Counter[tuple[int, int, str, str]] = Counter()
        offset = 0
        for r in range(rounds):
            partials = make_partials(partials_n, cells, pages, seed=r + 1)
            want += expected_rows(partials)
            order = ("batched", "naive") if r % 2 == 0 else ("naive", "batched")
            for mode in order:
                got = await drain(conn, topos[mode], partials, batch, mode == "naive", offset)
                for k in ("partials", "rows", "statements", "seconds"):
                    totals[mode][k] += got[k]
                per_round[mode].append(got["rows"] / got["seconds"])
            offset += partials_n
        exact = {}
        for mode, topo in topos.items():
            held = await postgres_sink.all_rows(conn, topo, "views")
            exact[mode] = held == {k: Decimal(v) for k, v in want.items()}
        out: dict[str, Any] = {"benchmark": "sink", "exact": all(exact.values())}
        for mode, t in totals.items():
            out[mode] = {
                "partials": int(t["partials"]),
                "rows": int(t["rows"]),
                "statements": int(t["statements"]),
                "seconds": round(t["seconds"], 3),
                "partials_per_s": round(t["partials"] / t["seconds"], 1),
                "rows_per_s": round(t["rows"] / t["seconds"]),
                "rows_per_s_rounds": [round(x) for x in per_round[mode]],
                "exact": exact[mode],
            }
        out["speedup_rows_per_s"] = round(
            out["batched"]["rows_per_s"] / max(1, out["naive"]["rows_per_s"]), 2
        )
        out["shape"] = {
            "partials_per_round": partials_n,
            "keys_per_partial": cells,
            "cells_per_partial": 3 * cells,
            "partials_per_batch": batch,
            "rounds": rounds,
            "distinct_rows": len(want),
        }
        return out
    finally:
        for topo in topos.values():
            await conn.execute(f"DROP SCHEMA IF EXISTS {topo.name} CASCADE")
        await conn.close()


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench sink` (flags are defined in pipeline/cli/bench.py)."""
    if min(args.partials, args.cells, args.batch, args.rounds, args.pages) <= 0:
        print("pipeline bench sink: every size must be positive", file=sys.stderr)
        return 2

    def measure(url: str) -> dict[str, Any]:
        return asyncio.run(run(url, args.partials, args.cells, args.batch, args.rounds, args.pages))

    if args.postgres:
        summary = measure(args.postgres)
    else:
        from pipeline.harness.local_postgres import LocalPostgres

        print("starting a local PostgreSQL ...", file=sys.stderr, flush=True)
        with LocalPostgres() as server:
            summary = measure(server.url)
    print(f"{'sink':10}{'partials/s':>12}{'rows/s':>12}{'statements':>12}  exact")
    for mode in ("batched", "naive"):
        r = summary[mode]
        print(
            f"{mode:10}{r['partials_per_s']:>12,}{r['rows_per_s']:>12,}{r['statements']:>12,}  {r['exact']}"
        )
    print(f"batched / naive rows/s: {summary['speedup_rows_per_s']}x")
    if args.json:
        print(orjson.dumps(summary).decode())
    return 0 if summary["exact"] else 1

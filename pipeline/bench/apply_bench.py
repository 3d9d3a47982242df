"""The root's apply script alone: milliseconds per apply of a merged batch, into a real Redis.

    python -m pipeline.bench.apply_bench --redis redis://127.0.0.1:6379/0 [--shape live_likes|rollups]
        [--cells 1000] [--applies 300]

Batches shaped like live_likes' (counts over 20 channels, a leaderboard of 100 per channel, Zipf-like
keys; `rollups`: each cell also in a 60 s bucket with a retention) are planned and applied one after
the other through `RedisSink.apply`, each with the next offset, after one warm-up apply. It only uses
`RedisSink(client, topology).apply(MergedBatch(...))`, so the same file measures another version of the
code: `git archive <commit> pipeline topologies | tar -x -C DIR`, then run it with `PYTHONPATH=DIR`
(docs/BENCHMARKS.md, "the apply script"). One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.core.merger import MergedBatch
from pipeline.core.topology import Topology
from pipeline.io.redis_sink import RedisSink
from pipeline.topology import count, every, topology, total

SHAPES = {
    "live_likes": lambda name: topology(
        name,
        metrics=[count("likes", "like", leaderboard=100), count("comments", "comment")],
        priorities={"like": 0, "comment": 1},
    ),
    "rollups": lambda name: topology(
        name,
        metrics=[count("likes", "like", total(), every(60, 3600), leaderboard=100)],
        priorities={"like": 0},
    ),
}


def batches(shape: str, cells_per_apply: int, applies: int, seed: int = 1) -> list[MergedBatch]:
    rng = random.Random(seed)
    out = []
    for i in range(applies):
        cells: dict[Any, Any] = {}
        while len(cells) < cells_per_apply:
            channel = f"video-{rng.randrange(20)}"
            key = f"c{int(rng.paretovariate(1.1)) % 10_000}-{rng.randrange(10_000)}"
            cells[(0, channel, key, "total")] = rng.randrange(1, 5)
            if shape == "rollups":
                cells[(0, channel, key, f"60:{(i // 50) * 60}")] = rng.randrange(1, 5)
        out.append(
            MergedBatch(
                cells=cells, ranges={0: (i, i)}, events=2 * len(cells), partials=3, expected={0: i - 1}
            )
        )
    return out


async def run(redis_url: str, shape: str, cells_per_apply: int, applies: int) -> dict[str, Any]:
    name = f"bench_apply_{shape}_{time.time_ns():x}"
    topo: Topology = SHAPES[shape](name)
    client = aioredis.Redis.from_url(redis_url)
    try:
        sink = RedisSink(client, topo)
        todo = batches(shape, cells_per_apply, applies + 1)
        assert (await sink.apply(todo[0])).applied  # warm-up: the script is loaded, the keys exist
        started = time.perf_counter()
        for batch in todo[1:]:
            assert (await sink.apply(batch)).applied
        elapsed = time.perf_counter() - started
        keys = [k async for k in client.scan_iter(f"{name}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()
    return {
        "shape": shape,
        "cells_per_apply": cells_per_apply,
        "applies": applies,
        "ms_per_apply": round(elapsed / applies * 1000, 3),
        "cells_per_s": round(cells_per_apply * applies / elapsed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.apply_bench", description=__doc__)
    parser.add_argument("--redis", required=True, help="Redis URL (its keys are created and deleted)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="live_likes")
    parser.add_argument("--cells", type=int, default=1000, help="cells per apply (default 1000)")
    parser.add_argument("--applies", type=int, default=300, help="applies measured (default 300)")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.redis, args.shape, args.cells, args.applies))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

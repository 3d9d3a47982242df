"""Tier 1's memory per open cell is what `pipeline.core.coalescer` states, measured on its Python heap."""

from __future__ import annotations

import gc
import tracemalloc
from typing import NamedTuple

import orjson

from pipeline.core.coalescer import BYTES_PER_OPEN_CELL, Coalescer, tier1_memory_bound
from topologies.live_likes import TOPOLOGY

CELLS = 100_000


class Rec(NamedTuple):
    offset: int
    value: bytes
    timestamp: int


def test_an_open_cell_and_closing_its_window_stay_within_the_stated_bytes() -> None:
    # the long tail: every event its own cell, keys and channels as a live-video site names them
    values = [
        orjson.dumps({"type": "like", "key": f"comment-{k:07d}", "channel": f"video-{k % 50}"})
        for k in range(CELLS)
    ]
    records = [Rec(i, v, 1_700_000_000_000) for i, v in enumerate(values)]
    coalescer = Coalescer(TOPOLOGY, 3, 0.0)
    gc.collect()
    tracemalloc.start()
    try:
        for start in range(0, CELLS, 500):
            coalescer.add_batch(start // 500 % 6, records[start : start + 500])
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        flush = coalescer.flush(0.0)
        messages = [m for partial in flush.partials for m in partial.encode(900_000)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert coalescer.size == 0 and flush.cells == CELLS and messages
    assert held / CELLS < BYTES_PER_OPEN_CELL * 0.6  # the cells themselves: about half the figure
    assert peak / CELLS < BYTES_PER_OPEN_CELL  # and closing the window, its partials encoded
    assert tier1_memory_bound(200_000) == tier1_memory_bound(0) + 200_000 * BYTES_PER_OPEN_CELL

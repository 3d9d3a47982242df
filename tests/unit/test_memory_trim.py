"""Freed heap pages go back to the OS when trimmed, and the trimming task stops with the worker."""

from __future__ import annotations

import asyncio
import os

import pytest

from pipeline.harness.supervisor import rss_kb
from pipeline.runtime import memory_trim


@pytest.mark.skipif(not memory_trim.available(), reason="malloc_trim exists only in glibc")
def test_trimming_returns_freed_heap_pages() -> None:
    assert memory_trim.TRIM is not None
    blocks = [bytes(4000) + bytes([i % 256]) for i in range(25_000)]  # ~100 MB on the malloc heap
    keep = bytes(4000) + b"x"  # allocated after them: the heap's top cannot shrink by itself
    del blocks
    before = rss_kb(os.getpid())
    memory_trim.TRIM()
    after = rss_kb(os.getpid())
    assert before is not None and after is not None
    assert before - after > 50_000, (before, after)
    assert keep


async def test_the_task_ends_when_stopped_and_never_runs_when_off() -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(memory_trim.trim_every(0.01, stop))
    await asyncio.sleep(0.05)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 1)
    await asyncio.wait_for(memory_trim.trim_every(0, asyncio.Event()), 1)  # 0: returns at once

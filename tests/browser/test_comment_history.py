"""A viewer who opens the page late sees the channel's recent comments, also after the node restarts.

30 comments go through the real pipeline before anyone watches the channel; the root writes them to
the channel's history in Redis, each once. A viewer that opens the page then sees the last 20 (the
node never saw them live), and after the broadcast node restarts, the same page (resuming) and a new
one still show them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.core.comment_history import HistoryPolicy
from pipeline.io.comment_history import CommentHistory
from tests.browser.live_pipeline import LivePipeline

pytestmark = [pytest.mark.integration, pytest.mark.browser]

TIMEOUT_MS = 20_000
CHANNEL = "video-late"
KEYS = [f"comment-{i:02d}" for i in range(30)]


async def shown(page: Any) -> list[str]:
    """The comment keys the page lists, newest first."""
    return [
        await li.get_attribute("data-key") or "" for li in await page.locator("#comments li.comment").all()
    ]


async def test_a_late_viewer_sees_the_last_20_comments_also_after_the_node_restarts(
    browser: Any, live: LivePipeline, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    await live.send(
        [
            {
                "type": "comment",
                "key": k,
                "channel": CHANNEL,
                "user": f"user{i}",
                "text": f"comment number {i}",
            }
            for i, k in enumerate(KEYS)
        ]
    )
    redis = aioredis.Redis.from_url(live.servers.redis_url)
    history = CommentHistory(redis, live.topology.name, HistoryPolicy())
    deadline = time.monotonic() + 60
    try:  # settle: the root has written all 30 to the channel's history, each once
        while sorted(order := [c["key"] for c in await history.recent(CHANNEL, 100)]) != KEYS:
            assert time.monotonic() < deadline, live.pipe.logs()
            await asyncio.sleep(0.3)
    finally:
        await redis.aclose()
    # the last 20 as they arrived (comments of different keys pass tier 1 in any order); newest first
    last_20 = list(reversed(order[-20:]))

    errors: list[str] = []
    page = await browser.new_page(viewport={"width": 1100, "height": 720})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{live.url}/?channel={CHANNEL}&transport=ws&token={live.viewer_token(CHANNEL)}")
    await expect(page.locator("#seq-info")).to_have_attribute("data-synced", "true", timeout=TIMEOUT_MS)
    await expect(page.locator("#comments li.comment")).to_have_count(20, timeout=TIMEOUT_MS)
    assert await shown(page) == last_20
    n = KEYS.index(order[-1])
    newest = page.locator(f'#comments li.comment[data-key="{order[-1]}"]')
    await expect(newest.locator(".text")).to_have_text(f"comment number {n}")
    await expect(newest.locator(".who")).to_contain_text(f"user{n}")
    await expect(page.locator("#total-comments")).to_have_text("30")  # counted: all 30
    await page.screenshot(path=str(tmp_path / "late-viewer.png"), full_page=True)

    await live.restart_node()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)
    await asyncio.sleep(1.0)  # the resumed connection has had its introduction
    assert await shown(page) == last_20

    fresh = await browser.new_page(viewport={"width": 1100, "height": 720})
    fresh.on("pageerror", lambda exc: errors.append(str(exc)))
    await fresh.goto(f"{live.url}/?channel={CHANNEL}&transport=sse&token={live.viewer_token(CHANNEL)}")
    await expect(fresh.locator("#comments li.comment")).to_have_count(20, timeout=TIMEOUT_MS)
    assert await shown(fresh) == last_20
    await fresh.screenshot(path=str(tmp_path / "after-restart.png"), full_page=True)
    await fresh.close()
    await page.close()
    assert errors == []

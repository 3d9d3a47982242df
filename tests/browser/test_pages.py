"""The viewer page and the dashboard in a real browser, fed by the real pipeline: events go to
the events topic, through tier 1 and the root into Redis and the updates/feed topics, and out
of a broadcast node to the page; the pages must show exactly what was sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.core.redis_layout import splits_key
from tests.browser.live_pipeline import LivePipeline

pytestmark = [pytest.mark.integration, pytest.mark.browser]

TIMEOUT_MS = 15_000


def comment(channel: str, key: str, user: str, text: str) -> dict[str, object]:
    return {"type": "comment", "key": key, "channel": channel, "user": user, "text": text}


def likes(channel: str, key: str, n: int) -> list[dict[str, object]]:
    return [{"type": "like", "key": key, "channel": channel}] * n


async def open_page(browser: Any, url: str, errors: list[str]) -> Any:
    page = await browser.new_page(viewport={"width": 1100, "height": 720})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    return page


async def test_viewer_page_shows_comments_and_likes_live(
    browser: Any, live: LivePipeline, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    errors: list[str] = []
    token = live.viewer_token("video-1")
    page = await open_page(browser, f"{live.url}/?channel=video-1&transport=ws&token={token}", errors)
    await expect(page.locator("#seq-info")).to_have_attribute("data-synced", "true", timeout=TIMEOUT_MS)

    await live.send(
        [
            comment("video-1", "comment-1", "alice", "first!"),
            comment("video-1", "comment-2", "bob", "hello"),
            *likes("video-1", "comment-1", 5),
            *likes("video-1", "comment-2", 3),
            comment("video-2", "comment-9", "eve", "elsewhere"),
            *likes("video-2", "comment-9", 4),
        ]
    )
    first = page.locator('#comments li.comment[data-key="comment-1"]')
    second = page.locator('#comments li.comment[data-key="comment-2"]')
    await expect(first).to_have_attribute("data-likes", "5", timeout=TIMEOUT_MS)
    await expect(second).to_have_attribute("data-likes", "3", timeout=TIMEOUT_MS)
    await expect(first.locator(".text")).to_have_text("first!")
    await expect(first.locator(".who")).to_contain_text("alice")
    await expect(page.locator("#total-likes")).to_have_text("8")
    await expect(page.locator("#total-comments")).to_have_text("2")
    assert await page.locator('[data-key="comment-9"]').count() == 0  # another video's

    await live.send(likes("video-1", "comment-2", 4))  # comment-2 overtakes comment-1
    await expect(second).to_have_attribute("data-likes", "7", timeout=TIMEOUT_MS)
    await expect(page.locator("#total-likes")).to_have_text("12")
    top = page.locator("#top li")
    await expect(top).to_have_count(2)
    assert [await li.get_attribute("data-key") for li in await top.all()] == ["comment-2", "comment-1"]
    assert [await li.get_attribute("data-likes") for li in await top.all()] == ["7", "5"]
    await expect(page.locator("#comments li.comment")).to_have_count(2)

    await page.screenshot(path=str(tmp_path / "viewer-ws.png"), full_page=True)
    await page.close()
    assert errors == []


async def test_sse_viewer_resumes_with_since_after_node_restart(
    browser: Any, live: LivePipeline, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    errors: list[str] = []
    streams: list[str] = []
    page = await browser.new_page(viewport={"width": 1100, "height": 720})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: streams.append(request.url) if "/v1/sse" in request.url else None)
    await page.goto(f"{live.url}/?channel=video-3&transport=sse&token={live.viewer_token('video-3')}")
    await expect(page.locator("#seq-info")).to_have_attribute("data-synced", "true", timeout=TIMEOUT_MS)

    await live.send([comment("video-3", "comment-30", "carol", "SSE"), *likes("video-3", "comment-30", 2)])
    item = page.locator('#comments li.comment[data-key="comment-30"]')
    await expect(item).to_have_attribute("data-likes", "2", timeout=TIMEOUT_MS)
    seq_before = int(await page.locator("#seq-info").get_attribute("data-seq") or 0)
    assert seq_before > 0
    assert "since" not in streams[0]

    await live.restart_node()
    await live.send(likes("video-3", "comment-30", 3))
    await expect(item).to_have_attribute("data-likes", "5", timeout=TIMEOUT_MS)
    await expect(page.locator("#total-likes")).to_have_text("5")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    resumed = [url for url in streams[1:] if "since=video-3%3A" in url]
    assert resumed, streams  # the page told the new node what it had
    assert int(await page.locator("#seq-info").get_attribute("data-seq") or 0) > seq_before

    await page.screenshot(path=str(tmp_path / "viewer-sse.png"), full_page=True)
    await page.close()
    assert errors == []


async def test_dashboard_shows_exact_totals_top_splits_and_counters(
    browser: Any, live: LivePipeline, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    await live.send(likes("video-d", "comment-a", 6) + likes("video-d", "comment-b", 2))
    client = aioredis.Redis.from_url(live.servers.redis_url)
    try:  # what a writer announces when it splits a hot key
        await client.hset(splits_key(live.topology.name), mapping={"comment-a": 4})
    finally:
        await client.aclose()

    errors: list[str] = []
    # the operator key in the address's fragment (never sent): the sign-in form submits it and comes back
    dashboard = f"{live.url}/dashboard?metric=likes&channel=video-d&refresh=500"
    page = await open_page(browser, f"{dashboard}#operator-key={live.operator_key}", errors)
    await expect(page).to_have_url(dashboard, timeout=TIMEOUT_MS)
    await expect(page.locator("#topology")).to_have_text(live.topology.name)

    per_channel: dict[str, int] = {}
    for (channel, _), n in live.likes.items():
        per_channel[channel] = per_channel.get(channel, 0) + n
    totals = page.locator("[data-testid=totals] g.row")
    await expect(totals).to_have_count(len(per_channel), timeout=TIMEOUT_MS)
    for channel, n in per_channel.items():
        row = page.locator(f'[data-testid=totals] g.row[data-label="{channel}"]')
        await expect(row).to_have_attribute("data-value", str(n), timeout=TIMEOUT_MS)
        await expect(row.locator("text.value")).to_have_text(str(n))

    top = page.locator("[data-testid=top] g.row")
    await expect(top.nth(0)).to_have_attribute("data-label", "comment-a", timeout=TIMEOUT_MS)
    await expect(top.nth(0)).to_have_attribute("data-value", "6")
    await expect(top.nth(1)).to_have_attribute("data-label", "comment-b")
    await expect(top.nth(1)).to_have_attribute("data-value", "2")
    await expect(top).to_have_count(2)

    events = page.locator('[data-testid=stats] tr[data-key="events"]')
    await expect(events).to_have_attribute("data-value", str(live.events), timeout=TIMEOUT_MS)
    await expect(page.locator('[data-testid=splits] tr[data-key="comment-a"]')).to_have_attribute(
        "data-value", "4"
    )
    await expect(page.locator("[data-testid=minutes]")).to_contain_text("keeps no per-minute buckets")
    await expect(page.locator("#status")).not_to_have_class("error")

    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    await page.close()
    assert errors == []

"""The viewer page and the dashboard show the same exact numbers on a Redis Cluster as on one Redis
(issue 11): the same events go through the real pipeline (tier 1, the root, a broadcast node) once with
one Redis and once with the local 3-master cluster (key layout 2 on both: a channel's values,
leaderboard and seq spread over the root partitions' hash tags), and each page must show the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.core.coalescer import root_partition
from pipeline.harness.local_servers import Endpoints
from tests.browser.live_pipeline import LivePipeline
from tests.browser.test_pages import TIMEOUT_MS, comment, likes, open_page
from tests.integration.redis_cluster import STORES, on_store, redis_cluster  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.browser]

# comments whose keys spread over the 3 root partitions, with distinct like counts
KEYS = {f"comment-{i}": 2 + 3 * i for i in range(6)}
SHOWN: dict[str, dict[str, Any]] = {}  # store -> what its pages showed


@pytest.fixture(scope="module", params=STORES)
def servers(request: pytest.FixtureRequest, servers: Endpoints) -> Endpoints:
    return on_store(request, servers)


async def test_viewer_page_and_dashboard_show_the_ledger_on_one_redis_and_on_the_cluster(
    browser: Any, live: LivePipeline, servers: Endpoints, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    assert len({root_partition(k, 3) for k in KEYS}) == 3  # every root partition holds some
    store = "redis-cluster" if "+cluster" in servers.redis_url else "redis"
    errors: list[str] = []
    token = live.viewer_token("video-c")
    page = await open_page(browser, f"{live.url}/?channel=video-c&transport=ws&token={token}", errors)
    await expect(page.locator("#seq-info")).to_have_attribute("data-synced", "true", timeout=TIMEOUT_MS)
    events: list[dict[str, object]] = []
    for key, n in KEYS.items():
        events += [comment("video-c", key, "u", f"text of {key}"), *likes("video-c", key, n)]
    events += likes("video-other", "comment-0", 4)
    await live.send(events)

    shown: dict[str, Any] = {"viewer": {}, "totals": {}, "top": []}
    for key, n in KEYS.items():
        row = page.locator(f'#comments li.comment[data-key="{key}"]')
        await expect(row).to_have_attribute("data-likes", str(n), timeout=TIMEOUT_MS)
        shown["viewer"][key] = int(await row.get_attribute("data-likes") or -1)
    await page.screenshot(path=str(tmp_path / f"viewer-{store}.png"), full_page=True)
    await page.close()

    dashboard = f"{live.url}/dashboard?metric=likes&channel=video-c&refresh=500"
    page = await open_page(browser, f"{dashboard}#operator-key={live.operator_key}", errors)
    await expect(page).to_have_url(dashboard, timeout=TIMEOUT_MS)
    per_channel = {"video-c": sum(KEYS.values()), "video-other": 4}
    for channel, n in per_channel.items():
        row = page.locator(f'[data-testid=totals] g.row[data-label="{channel}"]')
        await expect(row).to_have_attribute("data-value", str(n), timeout=TIMEOUT_MS)
        shown["totals"][channel] = int(await row.get_attribute("data-value") or -1)
    best = sorted(KEYS.items(), key=lambda kv: -kv[1])  # the leaderboard, merged over the partitions
    top = page.locator("[data-testid=top] g.row")
    await expect(top).to_have_count(len(best), timeout=TIMEOUT_MS)
    for i, (key, n) in enumerate(best):
        await expect(top.nth(i)).to_have_attribute("data-label", key, timeout=TIMEOUT_MS)
        await expect(top.nth(i)).to_have_attribute("data-value", str(n))
        shown["top"].append((key, n))
    stats = page.locator('[data-testid=stats] tr[data-key="events"]')
    await expect(stats).to_have_attribute("data-value", str(live.events), timeout=TIMEOUT_MS)
    await page.screenshot(path=str(tmp_path / f"dashboard-{store}.png"), full_page=True)
    await page.close()
    assert errors == []

    SHOWN[store] = shown
    if len(SHOWN) == len(STORES):  # the second store: the same numbers as the first
        assert SHOWN["redis-cluster"] == SHOWN["redis"]

"""What the browser tests share: Debian's Chromium driven by Playwright, and a live_likes
pipeline (coalesce, merge and broadcast worker processes) against the session's real servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.harness.local_servers import Endpoints
from tests.browser.live_pipeline import LivePipeline

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the session (install it with ops/_setup.sh or apt-get install chromium)."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (ops/_setup.sh does it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture(scope="module")
async def live(servers: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LivePipeline]:
    pipeline = LivePipeline(servers, tmp_path_factory.mktemp("browser-logs"))
    try:
        await pipeline.start()
        yield pipeline
    finally:
        pipeline.stop()

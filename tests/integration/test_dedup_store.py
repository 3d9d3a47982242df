"""Claims of event ids in Redis: a retry is a duplicate, a replay of the same record is not."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from pipeline.io.dedup_store import DedupStore
from pipeline.local_servers import Endpoints

pytestmark = pytest.mark.integration

ODD_IDS = ["plain", 'quo"te', "nul\x00byte", "ünï©ødé 🚀", "back\\slash", "a:b:c", "\xff", "x" * 128]


async def test_retries_are_duplicates_and_replays_are_not(servers: Endpoints, unique_name: str) -> None:
    client = aioredis.Redis.from_url(servers.redis_url)
    store = DedupStore(client, unique_name, horizon_s=60)
    try:
        first = [(0, i, event_id) for i, event_id in enumerate(ODD_IDS)]
        assert await store.duplicates(first) == set()
        # the same records read again after a crash: their own claims, so not duplicates
        assert await store.duplicates(first) == set()
        # the same ids again at other offsets (client retries), and one new id
        retries = [(3, 100 + i, event_id) for i, event_id in enumerate(ODD_IDS)] + [(3, 999, "new")]
        assert await store.duplicates(retries) == {(3, 100 + i) for i in range(len(ODD_IDS))}
        # a retry inside the same batch as its original
        assert await store.duplicates([(1, 5, "twice"), (2, 9, "twice")]) == {(2, 9)}
        assert 0 < await client.ttl(f"{unique_name}:dedup:plain") <= 60
    finally:
        await client.aclose()

"""Event-id deduplication for tier 1, exact across crashes.

Each id is claimed in Redis with the (partition, offset) of the record that
claimed it, for the dedup horizon. A later record with the same id is a
duplicate (a retry); the same record read again after a crash finds its own
claim and is counted, because the window that read it the first time never
committed. So a retry is counted once and a replay is never lost, although
Redis and Kafka do not commit together.
"""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from pipeline.io.redis_retry import redis_retry

CLAIM_LUA = r"""
local ttl = tonumber(ARGV[1])
local prefix = ARGV[2]
local dups = {}
for i, claim in ipairs(cjson.decode(ARGV[3])) do
  local key = prefix .. claim[3]
  local mark = string.format('%d:%d', claim[1], claim[2])
  if not redis.call('SET', key, mark, 'NX', 'EX', ttl) then
    if redis.call('GET', key) ~= mark then
      dups[#dups + 1] = i - 1
    end
  end
end
return dups
"""


def dedup_key(topology: str, event_id: str) -> str:
    return f"{topology}:dedup:{event_id}"


class DedupStore:
    def __init__(self, client: aioredis.Redis, topology: str, horizon_s: int) -> None:
        self.client = client
        self.topology = topology
        self.horizon_s = horizon_s
        self._script = client.register_script(CLAIM_LUA)

    @redis_retry
    async def duplicates(self, held: list[tuple[int, int, str]]) -> set[tuple[int, int]]:
        """Claim each (partition, offset, id); return the (partition, offset) pairs that are retries.

        Retried while Redis is unreachable: the window cannot close without a verdict.
        """
        found = await self._script(args=[self.horizon_s, dedup_key(self.topology, ""), orjson.dumps(held)])
        return {(held[int(i)][0], held[int(i)][1]) for i in found}

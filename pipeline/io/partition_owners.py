"""Which transactional id may commit offsets of each source partition.

Kafka fences a zombie's offset commits by group generation only from
KIP-447 on, and aiokafka's transactional offset commit does not carry the
generation. So two workers that both believe they own a partition (a member
that missed a rebalance, a broker that forgot the group on a restart) could
both commit a window of the same records: counted twice. Instead, each
worker claims its newly assigned partitions here, under the transactional id
it will commit them with, and fences the ids that held them before (the
KIP-98 way: one owner per input partition). A fenced worker's next commit
fails and aborts, so only the latest claimant's windows ever commit, and it
reads from the committed offsets only after the fence.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis.asyncio as aioredis

from pipeline.io.redis_retry import retrying

# KEYS[1] = the group's owner hash; KEYS[2] = per partition, the ids that held it and are not
# known fenced (a JSON list); KEYS[3] = ids known fenced (sorted set); ARGV[1] = claimant's id;
# ARGV[2..] = partitions. Returns the distinct ids that held any of them, except the claimant and
# ids known fenced: every one of them must be fenced before the partitions are read. A holder is
# returned until somebody records it fenced, so a claim whose answer was lost, repeated under the
# same id or under a new one, still returns the ids the first one displaced.
CLAIM_LUA = r"""
local seen, previous = {}, {}
for i = 2, #ARGV do
  local p = ARGV[i]
  local raw = redis.call('HGET', KEYS[2], p)
  local holders = raw and cjson.decode(raw) or {}
  local owner = redis.call('HGET', KEYS[1], p)
  if owner then holders[#holders + 1] = owner end
  local kept, here = {}, {}
  for _, id in ipairs(holders) do
    if id ~= ARGV[1] and not here[id] and not redis.call('ZSCORE', KEYS[3], id) then
      here[id] = true
      kept[#kept + 1] = id
      if not seen[id] then
        seen[id] = true
        previous[#previous + 1] = id
      end
    end
  end
  redis.call('HSET', KEYS[1], p, ARGV[1])
  if #kept > 0 then
    redis.call('HSET', KEYS[2], p, cjson.encode(kept))
  else
    redis.call('HDEL', KEYS[2], p)
  end
end
return previous
"""

# KEYS[1] = the group's owner hash; ARGV[1] = old id; ARGV[2] = new id; ARGV[3..] = partitions.
# Moves the partitions still held by the old id to the new one; returns those the new id holds
# (run again after a lost answer, it returns the same).
HANDOVER_LUA = r"""
local kept = {}
for i = 3, #ARGV do
  local owner = redis.call('HGET', KEYS[1], ARGV[i])
  if owner == ARGV[1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[2])
    kept[#kept + 1] = tonumber(ARGV[i])
  elseif owner == ARGV[2] then
    kept[#kept + 1] = tonumber(ARGV[i])
  end
end
return kept
"""

FENCED_KEPT_S = 7 * 86400  # how long an id is remembered as fenced (forgotten: fenced once more)


def owners_key(group: str) -> str:
    """Partition -> the transactional id that may commit it. The claim script's three keys carry the
    hash tag `{<group>}`: one slot on a Redis Cluster."""
    return f"{group}:{{{group}}}:owners"


def holders_key(group: str) -> str:
    """Per partition, the ids that held it and are not known fenced yet."""
    return f"{group}:{{{group}}}:owners:unfenced"


def fenced_key(group: str) -> str:
    """Transactional ids fenced for good (sorted set, scored by when)."""
    return f"{group}:{{{group}}}:fenced"


class PartitionOwners:
    def __init__(self, client: aioredis.Redis, group: str) -> None:
        self.key = owners_key(group)
        self.keys = [self.key, holders_key(group), fenced_key(group)]
        self.fenced_key = fenced_key(group)
        self.client = client
        self._claim = client.register_script(CLAIM_LUA)
        self._handover = client.register_script(HANDOVER_LUA)

    async def claim(self, partitions: list[int], transactional_id: str) -> list[str]:
        """Take the partitions for `transactional_id`; return the ids to fence before reading them."""
        if not partitions:
            return []
        previous = await retrying(lambda: self._claim(keys=self.keys, args=[transactional_id, *partitions]))
        return [p.decode() if isinstance(p, bytes) else str(p) for p in previous]

    async def hand_over(self, partitions: list[int], old_id: str, new_id: str) -> set[int]:
        """Re-point the partitions nobody took from `old_id` to `new_id`; return those kept."""
        if not partitions:
            return set()
        kept = await retrying(lambda: self._handover(keys=[self.key], args=[old_id, new_id, *partitions]))
        return {int(p) for p in kept}

    async def record_fenced(self, ids: Iterable[str]) -> None:
        """Record ids fenced for good (their producer started before the fence): claims skip them."""
        now = time.time()
        members = {i: now for i in ids}
        if not members:
            return

        async def record() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zadd(self.fenced_key, members)
                pipe.zremrangebyscore(self.fenced_key, "-inf", now - FENCED_KEPT_S)
                await pipe.execute()

        await retrying(record)

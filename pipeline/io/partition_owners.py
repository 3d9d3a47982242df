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

import redis.asyncio as aioredis

from pipeline.io.redis_retry import retrying

# KEYS[1] = the group's owner hash; ARGV[1] = claimant's id; ARGV[2..] = partitions.
# Returns the distinct ids that held any of them before (the claimant's own excluded).
CLAIM_LUA = r"""
local seen, previous = {}, {}
for i = 2, #ARGV do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old and old ~= ARGV[1] and not seen[old] then
    seen[old] = true
    previous[#previous + 1] = old
  end
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
end
return previous
"""

# KEYS[1] = the group's owner hash; ARGV[1] = old id; ARGV[2] = new id; ARGV[3..] = partitions.
# Moves the partitions still held by the old id to the new one; returns those moved.
HANDOVER_LUA = r"""
local kept = {}
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[2])
    kept[#kept + 1] = tonumber(ARGV[i])
  end
end
return kept
"""


def owners_key(group: str) -> str:
    return f"{group}:owners"


class PartitionOwners:
    def __init__(self, client: aioredis.Redis, group: str) -> None:
        self.key = owners_key(group)
        self._claim = client.register_script(CLAIM_LUA)
        self._handover = client.register_script(HANDOVER_LUA)

    async def claim(self, partitions: list[int], transactional_id: str) -> list[str]:
        """Take the partitions for `transactional_id`; return the ids to fence before reading them."""
        if not partitions:
            return []
        previous = await retrying(lambda: self._claim(keys=[self.key], args=[transactional_id, *partitions]))
        return [p.decode() if isinstance(p, bytes) else str(p) for p in previous]

    async def hand_over(self, partitions: list[int], old_id: str, new_id: str) -> set[int]:
        """Re-point the partitions nobody took from `old_id` to `new_id`; return those kept."""
        if not partitions:
            return set()
        kept = await retrying(lambda: self._handover(keys=[self.key], args=[old_id, new_id, *partitions]))
        return {int(p) for p in kept}

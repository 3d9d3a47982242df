"""Comment history in Redis: appended exactly once by the root tier, read by broadcast nodes.

What is kept and why: `core/comment_history.py`. One Lua script per channel and batch
appends the channel's new comments, skipping every record at or below the feed offset
already applied for its (channel, feed partition), records the new offsets in the same
step, trims to the count and the age, and sets both keys to expire once the channel has
been quiet longer than the age.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from pipeline.core.comment_history import Append, HistoryPolicy, history_key, history_positions_key, parse
from pipeline.runtime.settings import Settings

POSITIONS_KEPT_MS = 86_400_000  # a channel's applied offsets outlive its history by a day

# KEYS: the history list, its positions hash. ARGV: max count, max age ms, ttl of the positions ms,
# then partition, offset, item for each comment in offset order. Answers how many were appended.
APPEND_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local applied = {}
local added = 0
for i = 4, #ARGV, 3 do
  local p = ARGV[i]
  local offset = tonumber(ARGV[i + 1])
  local last = applied[p]
  if last == nil then
    last = tonumber(redis.call('HGET', KEYS[2], p) or '-1')
  end
  if offset > last then
    redis.call('RPUSH', KEYS[1], ARGV[i + 2])
    added = added + 1
    last = offset
  end
  applied[p] = last
end
for p, last in pairs(applied) do
  redis.call('HSET', KEYS[2], p, string.format('%d', last))
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
local oldest = now - tonumber(ARGV[2])
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then
    break
  end
  local at = tonumber(string.match(head, '^{"at":(%d+)'))
  if at ~= nil and at >= oldest then
    break
  end
  redis.call('LPOP', KEYS[1])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return added
"""


def history_policy(settings: Settings) -> HistoryPolicy:
    """The caps of the comment history, from settings (`comment_history_count`, `comment_history_age_s`)."""
    return HistoryPolicy(settings.comment_history_count, settings.comment_history_age_s)


class CommentHistory:
    """A topology's comment histories: `append` (the root) and `recent` (broadcast nodes)."""

    def __init__(self, redis: aioredis.Redis, topology: str, policy: HistoryPolicy) -> None:
        self.redis = redis
        self.topology = topology
        self.policy = policy
        self._script = redis.register_script(APPEND_LUA)

    async def append(self, appends: dict[str, list[Append]]) -> int:
        """Each channel's comments, once: those at or below its applied offsets are skipped. How many
        were appended (one round trip for the whole batch; each channel's script is atomic)."""
        if not appends:
            return 0
        policy = self.policy
        age_ms = int(policy.max_age_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for channel, items in appends.items():
            args: list[Any] = [policy.max_count, age_ms, age_ms + POSITIONS_KEPT_MS]
            for a in items:
                args.extend((a.partition, a.offset, a.item))
            keys = [history_key(self.topology, channel), history_positions_key(self.topology, channel)]
            await self._script(keys=keys, args=args, client=pipe)
        return sum(int(n) for n in await pipe.execute())

    async def recent(self, channel: str, n: int) -> list[dict[str, Any]]:
        """The channel's last `n` comments within the age, oldest first."""
        if n <= 0:
            return []
        raw = await self.redis.lrange(history_key(self.topology, channel), -n, -1)
        now_ms = int(time.time() * 1000)
        return [c for c in (parse(r, now_ms, self.policy.max_age_s) for r in raw) if c is not None]

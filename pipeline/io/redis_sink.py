"""Applies merged batches to Redis: data, counters and the applied offset range
in one Lua script, so a batch is applied entirely or not at all, and once.

Before it writes anything, the script checks the type of every key it will touch
and refuses the whole batch if one holds another type (Redis keeps a script's
earlier writes when a later command fails: half a batch, then the same half
again on every retry). The script also refuses a batch whose offset range starts at or before an offset
already applied for that partition (a replay after a crash, or a zombie
merger that lost its partitions), and one whose merger expected another
applied position than Redis holds: ahead of it, another merger applied more;
behind it, Redis lost its last writes (a crash between AOF fsyncs), and those
partials must be applied again from Kafka. Either way the caller re-reads the
positions and seeks there.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from pipeline.core.merger import MergedBatch
from pipeline.core.redis_layout import ApplyPlan, plan_apply, positions_key
from pipeline.core.topology import Topology
from pipeline.io.redis_retry import redis_retry

MIN_REDIS = (7, 0)  # EXPIRE ... NX

APPLY_LUA = r"""
local p = cjson.decode(ARGV[1])
for _, r in ipairs(p.ranges) do
  local raw = redis.call('HGET', p.pos, tostring(r[1]))
  local cur = raw and tonumber(raw) or -1
  if cur >= r[2] or (r[4] ~= -2 and cur ~= r[4]) then
    return {0, r[1], cur}
  end
end
-- Redis does not undo a script's earlier writes when a later command fails: check every key's type
-- before the first write, so that a key holding another type refuses the whole batch, not half of it
local want = {[p.stats] = 'hash', [p.seq] = 'hash', [p.pos] = 'hash'}
for _, op in ipairs(p.ops) do
  want[op[2]] = (op[1] == 'd') and 'string' or 'hash'
  if op[6] ~= '' then
    want[op[6]] = 'zset'
  end
end
for key, wanted in pairs(want) do
  local have = redis.call('TYPE', key).ok
  if have ~= 'none' and have ~= wanted then
    return {-1, key, have, wanted}
  end
end
local out = {1}
-- leaderboard entries, gathered per sorted set: one ZADD of many members and one trim per set and
-- apply, not three commands per cell
local boards, board_order = {}, {}
for _, ch in ipairs(p.channels) do
  out[#out + 1] = redis.call('HINCRBY', p.seq, ch, 1)
end
for _, op in ipairs(p.ops) do
  local code, key, field, arg, ttl, zkey, ztop = op[1], op[2], op[3], op[4], op[5], op[6], op[7]
  local nv
  if code == 'i' then
    nv = redis.call('HINCRBY', key, field, arg)
  elseif code == 'f' then
    nv = redis.call('HINCRBYFLOAT', key, field, arg)
  elseif code == 'n' or code == 'x' then
    local cur = redis.call('HGET', key, field)
    local v = tonumber(arg)
    if (not cur) or (code == 'n' and v < tonumber(cur)) or (code == 'x' and v > tonumber(cur)) then
      redis.call('HSET', key, field, arg)
      nv = arg
    else
      nv = cur
    end
  else
    for i = 1, #arg, 1000 do
      redis.call('PFADD', key, unpack(arg, i, math.min(i + 999, #arg)))
    end
    nv = redis.call('PFCOUNT', key)
  end
  if ttl > 0 then
    redis.call('EXPIRE', key, ttl, 'NX')
  end
  if zkey ~= '' then
    local b = boards[zkey]
    if not b then
      b = {ztop, {}}
      boards[zkey] = b
      board_order[#board_order + 1] = zkey
    end
    local m = b[2]
    m[#m + 1] = nv
    m[#m + 1] = field
  end
  out[#out + 1] = tostring(nv)
end
for _, zkey in ipairs(board_order) do
  local ztop, m = boards[zkey][1], boards[zkey][2]
  for i = 1, #m, 2000 do
    redis.call('ZADD', zkey, unpack(m, i, math.min(i + 1999, #m)))
  end
  if redis.call('ZCARD', zkey) > 2 * ztop then
    redis.call('ZREMRANGEBYRANK', zkey, 0, -(ztop + 1))
  end
end
for _, c in ipairs(p.counters) do
  redis.call('HINCRBY', p.stats, c[1], c[2])
end
for _, r in ipairs(p.ranges) do
  redis.call('HSET', p.pos, tostring(r[1]), r[3])
end
return out
"""


@dataclass(slots=True)
class ApplyResult:
    applied: bool
    plan: ApplyPlan
    seqs: dict[str, int]
    values: list[str]
    stale_partition: int | None = None
    stale_position: int | None = None  # what Redis holds for it (-1: nothing)
    # refused before any write: (key, the type it holds, the type the apply needs)
    wrong_type: tuple[str, str, str] | None = None


class RedisSink:
    """The root merger's only door to Redis."""

    def __init__(self, client: aioredis.Redis, topology: Topology) -> None:
        self.client = client
        self.topology = topology
        self._script = client.register_script(APPLY_LUA)

    @redis_retry
    async def check_server(self) -> str:
        """The server's version; refuse one older than 7.0 (the apply uses `EXPIRE ... NX`)."""
        info = await self.client.info("server")
        version = str(info.get("redis_version", "0"))
        numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        if numbers < MIN_REDIS:
            raise RuntimeError(
                f"Redis {version} is too old: the apply needs {'.'.join(map(str, MIN_REDIS))} or newer"
            )
        return version

    @redis_retry
    async def positions(self) -> dict[int, int]:
        """Last applied offset per partials partition: where a merger resumes."""
        raw = await self.client.hgetall(positions_key(self.topology.name))
        return {int(k): int(v) for k, v in raw.items()}

    @redis_retry
    async def apply(self, batch: MergedBatch) -> ApplyResult:
        plan = plan_apply(self.topology, batch)
        reply = await self._script(args=[plan.payload])
        if int(reply[0]) == -1:
            key, have, wanted = (v.decode() if isinstance(v, bytes) else str(v) for v in reply[1:4])
            return ApplyResult(False, plan, {}, [], wrong_type=(key, have, wanted))
        if int(reply[0]) == 0:
            return ApplyResult(
                False, plan, {}, [], stale_partition=int(reply[1]), stale_position=int(reply[2])
            )
        n = len(plan.channels)
        seqs = {ch: int(s) for ch, s in zip(plan.channels, reply[1 : 1 + n], strict=True)}
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in reply[1 + n :]]
        return ApplyResult(True, plan, seqs, values)

"""Applies merged batches to Redis: data, counters and the applied offset range
in one Lua script, so a batch is applied entirely or not at all, and once.

The script's argument is one JSON object with named fields, built by
`pipeline.core.redis_layout.plan_apply`, whose module docstring documents it and
the reply (docs/ARCHITECTURE.md, "the apply").

It refuses a batch whose offset range starts at or before an offset already
applied for that partition (a replay after a crash, or a zombie merger that lost
its partitions), and one whose merger expected another applied position than
Redis holds: ahead of it, another merger applied more; behind it, Redis lost its
last writes (a crash between AOF fsyncs), and those partials must be applied
again from Kafka. Either way the caller re-reads the positions and seeks there.

A batch covers one root partition: every key the script touches carries that
partition's hash tag (pipeline/core/redis_layout.py), so on Redis Cluster it
runs on one shard, atomically, and the positions sit in the slot of the data.

Before it writes anything, it reads everything it will change: the type of every
key, and the value of every field a command could fail on (HINCRBY needs an
integer, HINCRBYFLOAT and the min/max comparisons a finite number, PFADD a
HyperLogLog). Redis keeps a script's earlier writes when a later command fails,
so one bad key used to leave half a batch applied, and the same half again on
every retry. Now the whole batch is refused (`Refusal`) and nothing is written;
the root holds it and, if it stays refused, quarantines it
(pipeline/io/quarantine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from pipeline.core.merger import MergedBatch
from pipeline.core.redis_layout import ApplyPlan, partition_tag, plan_apply, positions_key
from pipeline.core.topology import Topology
from pipeline.io.redis_retry import redis_retry

MIN_REDIS = (7, 0)  # EXPIRE ... NX

APPLY_LUA = r"""
-- ARGV[1]: the apply, one JSON object with named fields (documented in pipeline/core/redis_layout.py)
local a = cjson.decode(ARGV[1])
local BATCH = 1000

local function failed(reply)
  return type(reply) == 'table' and reply.err ~= nil
end
local function refuse_type(key, wanted)
  return {-1, key, redis.call('TYPE', key).ok, wanted}
end
local function shown(v)
  return #v > 40 and (string.sub(v, 1, 40) .. '...') or v
end
local function held(field, v)
  return 'field ' .. cjson.encode(field) .. ' = ' .. cjson.encode(shown(v))
end
-- what HINCRBY takes: a decimal 64-bit integer without '+' or leading zeros
local function integer(v)
  return v == '0' or (#v <= 20 and string.find(v, '^%-?[1-9]%d*$') ~= nil)
end
-- what HINCRBYFLOAT and a comparison take: a finite number, no blanks
local function finite(n)
  return n == n and n ~= math.huge and n ~= -math.huge
end
local function number(v)
  local n = tonumber(v)
  return n ~= nil and finite(n) and not string.find(v, '%s')
end
local INT_ROOM = 9.2e18  -- under 2^63: an HINCRBY that stays below cannot overflow
local EXACT = 9007199254740992  -- 2^53: integers whose sum stays below it add exactly as Lua numbers
-- cur (what a field holds: an integer string, or false) + add, when a Lua number holds it exactly
local function sum(cur, add)
  local c, d = cur and tonumber(cur) or 0, tonumber(add)
  if math.abs(c) + math.abs(d) < EXACT then
    return c + d
  end
  return nil
end
local function hset(key, pairs_)
  for i = 1, #pairs_, 2 * BATCH do
    redis.call('HSET', key, unpack(pairs_, i, math.min(i + 2 * BATCH - 1, #pairs_)))
  end
end
local function hmget(key, fields)
  if #fields == 0 then
    return {}
  end
  if #fields <= BATCH then  -- one HMGET: its reply as it is, not copied a field at a time
    local part = redis.pcall('HMGET', key, unpack(fields))
    if failed(part) then
      return nil
    end
    return part
  end
  local got = {}
  for i = 1, #fields, BATCH do
    local part = redis.pcall('HMGET', key, unpack(fields, i, math.min(i + BATCH - 1, #fields)))
    if failed(part) then
      return nil
    end
    for j = 1, #part do
      got[#got + 1] = part[j]
    end
  end
  return got
end

-- 1. the ranges: refused if already applied, or if Redis holds another position than expected
local partitions = {}
for i, r in ipairs(a.ranges) do
  partitions[i] = tostring(r.partition)
end
local positions = hmget(a.positions, partitions)
if not positions then
  return refuse_type(a.positions, 'hash')
end
for i, r in ipairs(a.ranges) do
  local raw = positions[i]
  local cur = raw and tonumber(raw) or -1
  if cur >= r.first or (r.expected ~= -2 and cur ~= r.expected) then
    return {0, r.partition, cur}
  end
end

-- 2. everything it will touch, read before the first write: Redis keeps a script's earlier writes
-- when a later command fails, so a key of another type or a value a command cannot take refuses the
-- whole batch here, not half of it later
local names = {}
for name in pairs(a.counters) do
  names[#names + 1] = name
end
local counters = hmget(a.stats, names)
if not counters then
  return refuse_type(a.stats, 'hash')
end
for i, v in ipairs(counters) do
  if v and not integer(v) then
    return {-1, a.stats, held(names[i], v), 'an integer'}
  end
end
local seqs = hmget(a.seq, a.channels)
if #a.channels > 0 then
  if not seqs then
    return refuse_type(a.seq, 'hash')
  end
  for i, v in ipairs(seqs) do
    if v and not integer(v) then
      return {-1, a.seq, held(a.channels[i], v), 'an integer'}
    end
  end
end
local before = {}  -- per op, what its fields held
local fit = {}  -- per increment's text, whether a count can take it (a batch's increments repeat: 1, 2, ...)
local cards = {}  -- per op with a leaderboard, its members before the apply
for n, op in ipairs(a.ops) do
  local kind, key = op.kind, op.key
  if kind == 'distinct' then
    if failed(redis.pcall('PFCOUNT', key)) then
      local t = redis.call('TYPE', key).ok
      return {-1, key, t == 'string' and 'a string that is not a HyperLogLog' or t, 'a HyperLogLog'}
    end
  else
    local cur = hmget(key, op.fields)
    if not cur then
      return refuse_type(key, 'hash')
    end
    for i = 1, #op.fields do
      local v, add = cur[i], op.values[i]
      if kind == 'count' then
        local ok = fit[add]
        if ok == nil then
          ok = integer(add) and math.abs(tonumber(add)) < INT_ROOM
          fit[add] = ok
        end
        if not ok then
          return {-1, key, 'field ' .. cjson.encode(op.fields[i]) .. ' and an increment of ' .. shown(add),
                  'an increment that is a 64-bit integer'}
        end
        if v then
          if not integer(v) then
            return {-1, key, held(op.fields[i], v), 'an integer'}
          end
          if math.abs(tonumber(v)) + math.abs(tonumber(add)) >= INT_ROOM then
            return {-1, key, held(op.fields[i], v), 'room for +' .. add .. ' in 64 bits'}
          end
        end
      else
        if not number(add) then
          return {-1, key, 'field ' .. cjson.encode(op.fields[i]) .. ' and a value of ' .. shown(add),
                  'a value that is a finite number'}
        end
        if v and not (number(v) and (kind ~= 'sum' or finite(tonumber(v) + tonumber(add)))) then
          return {-1, key, held(op.fields[i], v), 'a finite number'}
        end
      end
    end
    before[n] = cur
    if op.board then
      local card = redis.pcall('ZCARD', op.board)  -- fails on another type; the trim needs it anyway
      if failed(card) then
        return refuse_type(op.board, 'zset')
      end
      cards[n] = card
    end
  end
end

-- 3. the writes
-- Integers are added here and written with one HSET per hash (of up to 1,000 fields), not one
-- HINCRBY per field: each command a script calls costs Redis its dispatch. A sum a Lua number
-- cannot hold exactly (2^53 or more) goes through HINCRBY instead.
local out = {1}
local vals = {}  -- every op's new values, answered as one string (see the reply, in core/redis_layout.py)
local function add_all(key, fields, held_now, adds, new)
  local pairs_, slow, np = {}, {}, 0
  for i = 1, #fields do
    local c, add = held_now[i], adds[i]
    local text
    if not c and type(add) == 'string' then
      text = add  -- a new field: the increment, already checked to be a decimal integer, is its value
    else
      local s = sum(c, add)
      if s then
        text = string.format('%d', s)
      end
    end
    if text then
      new[i] = text
      pairs_[np + 1] = fields[i]
      pairs_[np + 2] = text
      np = np + 2
    else
      slow[#slow + 1] = i
    end
  end
  hset(key, pairs_)
  if #slow > 0 then
    local names_ = {}
    for j, i in ipairs(slow) do
      redis.call('HINCRBY', key, fields[i], adds[i])
      names_[j] = fields[i]
    end
    -- read back as text: HINCRBY's reply would become a Lua number, rounded
    local now = hmget(key, names_)
    for j, i in ipairs(slow) do
      new[i] = now[j]
    end
  end
end
if #a.channels > 0 then
  local ones, next_seqs = {}, {}
  for i = 1, #a.channels do
    ones[i] = 1
  end
  add_all(a.seq, a.channels, seqs, ones, next_seqs)
  for i = 1, #a.channels do
    out[#out + 1] = next_seqs[i]
  end
end
for n, op in ipairs(a.ops) do
  local kind, key = op.kind, op.key
  if kind == 'distinct' then
    local members = op.members
    for i = 1, #members, BATCH do
      redis.call('PFADD', key, unpack(members, i, math.min(i + BATCH - 1, #members)))
    end
    vals[#vals + 1] = string.format('%d', redis.call('PFCOUNT', key))
  else
    local fields, values = op.fields, op.values
    local new = {}
    if kind == 'count' then
      add_all(key, fields, before[n], values, new)
    elseif kind == 'sum' then
      for i = 1, #fields do
        new[i] = redis.call('HINCRBYFLOAT', key, fields[i], values[i])
      end
    else
      -- the smaller (larger) of what is held and the batch's value; one HSET per 1,000 fields, of all of
      -- them (a field that keeps its value is written unchanged: the command count stays what the plan says)
      local cur, pairs_ = before[n], {}
      for i = 1, #fields do
        local c, v = cur[i], values[i]
        if (not c) or (kind == 'min' and tonumber(v) < tonumber(c))
            or (kind == 'max' and tonumber(v) > tonumber(c)) then
          new[i] = v
        else
          new[i] = c
        end
        pairs_[#pairs_ + 1] = fields[i]
        pairs_[#pairs_ + 1] = new[i]
      end
      for i = 1, #pairs_, 2 * BATCH do
        redis.call('HSET', key, unpack(pairs_, i, math.min(i + 2 * BATCH - 1, #pairs_)))
      end
    end
    local nv = #vals
    for i = 1, #new do
      vals[nv + i] = new[i]
    end
    if op.board then
      local scored, added = {}, 0
      for i = 1, #fields do
        scored[2 * i - 1] = new[i]
        scored[2 * i] = fields[i]
      end
      for i = 1, #scored, 2 * BATCH do
        added = added + redis.call('ZADD', op.board, unpack(scored, i, math.min(i + 2 * BATCH - 1, #scored)))
      end
      if cards[n] + added > 2 * op.board_size then
        redis.call('ZREMRANGEBYRANK', op.board, 0, -(op.board_size + 1))
      end
    end
  end
  if op.ttl > 0 then
    redis.call('EXPIRE', key, op.ttl, 'NX')
  end
end
if #names > 0 then
  local adds = {}
  for i, name in ipairs(names) do
    adds[i] = a.counters[name]
  end
  add_all(a.stats, names, counters, adds, {})
end
local applied = {}
for i, r in ipairs(a.ranges) do
  applied[#applied + 1] = partitions[i]
  applied[#applied + 1] = string.format('%d', r.last)
end
hset(a.positions, applied)
-- the values joined by commas in one reply string: a reply element per value cost the client far more
-- to read than the apply itself (no value holds a comma: each is a number the checks above passed)
out[#out + 1] = table.concat(vals, ',')
return out
"""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the script refused a batch before its first write."""

    key: str
    holds: str  # the type the key holds, or the field and its value
    needs: str  # what the apply needs there

    def __str__(self) -> str:
        return f"{self.key} holds {self.holds}, the apply needs {self.needs}"


@dataclass(slots=True)
class ApplyResult:
    applied: bool
    plan: ApplyPlan
    seqs: dict[str, int]
    values: list[str]
    stale_partition: int | None = None
    stale_position: int | None = None  # what Redis holds for it (-1: nothing)
    refused: Refusal | None = None  # refused before any write: a key or a value the apply cannot take


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
        if "redis_version" not in info:  # a cluster client answers per node: the oldest decides
            info = min(info.values(), key=lambda i: _version(str(i.get("redis_version", "0"))))
        version = str(info.get("redis_version", "0"))
        numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        if numbers < MIN_REDIS:
            raise RuntimeError(
                f"Redis {version} is too old: the apply needs {'.'.join(map(str, MIN_REDIS))} or newer"
            )
        return version

    @redis_retry
    async def positions(self) -> dict[int, int]:
        """Last applied offset per partials partition: where a merger resumes (each partition's in the
        slot of its own hash tag)."""
        name = self.topology.name
        parts = range(self.topology.partitions.partials)
        async with self.client.pipeline(transaction=False) as pipe:
            for p in parts:
                pipe.hget(positions_key(partition_tag(name, p, len(parts))), str(p))
            replies = await pipe.execute()
        return {p: int(v) for p, v in zip(parts, replies, strict=True) if v is not None}

    @redis_retry
    async def apply(self, batch: MergedBatch) -> ApplyResult:
        """Apply a batch of one root partition. The script's one declared key (the positions hash)
        carries the partition's hash tag, as every key it writes: a cluster client sends it to the shard
        of that slot."""
        plan = plan_apply(self.topology, batch)
        reply = await self._script(
            keys=[
                positions_key(
                    partition_tag(self.topology.name, plan.partition, self.topology.partitions.partials)
                )
            ],
            args=[plan.payload],
        )
        if int(reply[0]) == -1:
            key, holds, needs = (_text(v) for v in reply[1:4])
            return ApplyResult(False, plan, {}, [], refused=Refusal(key, holds, needs))
        if int(reply[0]) == 0:
            return ApplyResult(
                False, plan, {}, [], stale_partition=int(reply[1]), stale_position=int(reply[2])
            )
        n = len(plan.channels)
        seqs = {ch: int(s) for ch, s in zip(plan.channels, reply[1 : 1 + n], strict=True)}
        joined = _text(reply[1 + n])
        values = joined.split(",") if joined else []
        return ApplyResult(True, plan, seqs, values)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _text(value: bytes | int | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Hot-key splits in Redis and Kafka: the split history writers route by, and announcements for people.

`SplitHistoryStore` keeps the split history every writer routes by
(`core/split_history.py`): the Redis hash `{topology}:split-history` (field = key,
value = JSON `[[effective_ms, k], ...]`) and a version counter beside it,
`{topology}:split-history:version`, raised by every change so that a writer reads
the hash again only when it changed. A change is a compare-and-set by one Lua
script, which also refuses an entry that would take effect sooner than the guard
(Redis clock): a writer paused between deciding and writing cannot change the
routing of events already sent.

`SharedRates` is how writers agree on what is hot (`core/hotkeys.py`): every writer
puts the rates it measured in its last interval, and gets back the sum over every
writer, in one Lua script over three keys of one hash tag (one shard of a Redis
Cluster): `T:{T}:hot-rates` (HASH key -> the summed events/s), `T:{T}:hot-rates:reports`
(HASH writer -> its report, MessagePack `[key, rate, ...]`) and `T:{T}:hot-rates:writers`
(ZSET writer -> expiry, ms by the Redis clock). A report replaces the writer's previous one in the
sum; a report that expires (a writer that died) is taken out of it by the next
writer's call; a writer that stops withdraws its own.

`SplitAnnouncer` is for people (readers merge every sub-key anyway): the hash
`{topology}:splits` (field = key, value = the k a writer decided, removed when the
key is one key again) and the compacted topic `{topology}.splits` (message key =
the key, value = {"key", "k", "writer", "ts"}, a tombstone when unsplit). Several
writers may split the same key with different k: the last announcement wins,
which is enough to see what is hot.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from pipeline.core.redis_layout import splits_key
from pipeline.core.split_history import Proposal, SplitHistory, encode, propose, trim

# KEYS: history hash, version. ARGV: field, expected value ('' = none), new value ('' = delete),
# the earliest effective time the new value adds (ms, 0: it adds none), guard ms.
# Answers {1, now} when written, {0, now, current} when the field is not what was expected,
# {-1, now} when the new entry would take effect sooner than now + guard (Redis clock).
HISTORY_CAS_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then
  return {0, now, current}
end
local effective = tonumber(ARGV[4])
if effective > 0 and effective < now + tonumber(ARGV[5]) then
  return {-1, now}
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('INCR', KEYS[2])
return {1, now}
"""

# KEYS: history hash, version. ARGV: the version the caller holds.
# Answers {now, version} when unchanged, else {now, version, HGETALL}.
HISTORY_READ_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local version = redis.call('GET', KEYS[2]) or '0'
if version == ARGV[1] then
  return {now, version}
end
return {now, version, redis.call('HGETALL', KEYS[1])}
"""

CAS_ATTEMPTS = 5

# KEYS: totals, reports, writers. ARGV: writer, ttl ms, the least total answered, then the report as
# key, rate, key, rate, ... (none: withdraw). The report is kept as MessagePack (binary-safe keys).
# Answers the flat [key, total, ...] of totals at or above the least.
SHARE_RATES_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function withdraw(writer)
  local old = redis.call('HGET', KEYS[2], writer)
  if old then
    local flat = cmsgpack.unpack(old)
    for i = 1, #flat, 2 do
      if redis.call('HINCRBY', KEYS[1], flat[i], -flat[i + 1]) <= 0 then
        redis.call('HDEL', KEYS[1], flat[i])
      end
    end
    redis.call('HDEL', KEYS[2], writer)
  end
  redis.call('ZREM', KEYS[3], writer)
end
for _, writer in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  withdraw(writer)
end
withdraw(ARGV[1])
if #ARGV > 3 then
  local flat = {}
  for i = 4, #ARGV, 2 do
    local rate = tonumber(ARGV[i + 1])
    redis.call('HINCRBY', KEYS[1], ARGV[i], rate)
    flat[#flat + 1] = ARGV[i]
    flat[#flat + 1] = rate
  end
  redis.call('HSET', KEYS[2], ARGV[1], cmsgpack.pack(flat))
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
end
local least = tonumber(ARGV[3])
local out = {}
local totals = redis.call('HGETALL', KEYS[1])
for i = 1, #totals, 2 do
  if tonumber(totals[i + 1]) >= least then
    out[#out + 1] = totals[i]
    out[#out + 1] = totals[i + 1]
  end
end
return out
"""


def split_history_key(topology: str) -> str:
    """HASH of key -> its split history, JSON [[effective_ms, k], ...] (k = 1: one key). With its
    version it carries the hash tag `{T}`: the compare-and-set script's keys share a slot on a Redis
    Cluster."""
    return f"{topology}:{{{topology}}}:split-history"


def split_history_version_key(topology: str) -> str:
    """Counter raised by every change of the split history."""
    return f"{topology}:{{{topology}}}:split-history:version"


class SplitHistoryStore:
    """The shared split history: read it back, propose changes, drop entries past the horizon.

    `lead_ms`: how far ahead of now a change takes effect; `guard_ms`: the least lead the
    store accepts (Redis clock), at least the writers' refresh interval; `keep_ms`: how far
    back the history must answer (the dedup horizon, and a margin).
    """

    def __init__(
        self, redis: aioredis.Redis, topology: str, *, lead_ms: int, guard_ms: int, keep_ms: int
    ) -> None:
        self.redis = redis
        self.topology = topology
        self.lead_ms = lead_ms
        self.guard_ms = guard_ms
        self.keep_ms = keep_ms
        self.keys = [split_history_key(topology), split_history_version_key(topology)]
        self.redis_now_ms = 0  # Redis clock at the last answer
        self._cas = redis.register_script(HISTORY_CAS_LUA)
        self._read = redis.register_script(HISTORY_READ_LUA)

    async def load(self, history: SplitHistory) -> bool:
        """Read the history into `history` if it changed since it was read; True if it did."""
        answer = await self._read(keys=self.keys, args=[history.version or b"-"])
        self.redis_now_ms = int(answer[0])
        version = _bytes(answer[1])
        if len(answer) < 3:
            return False
        flat = answer[2]
        stored = {_bytes(flat[i]).decode(): _bytes(flat[i + 1]) for i in range(0, len(flat), 2)}
        history.replace(stored, version)
        return True

    async def propose(self, history: SplitHistory, change: Proposal, now_ms: int | None = None) -> bool:
        """Ask for `change`; True if the store took it. `history` holds the key's stored value after."""
        key = change.key
        effective = (now_ms if now_ms is not None else int(time.time() * 1000)) + self.lead_ms
        for _ in range(CAS_ATTEMPTS):
            current = history.get(key)
            new = propose(current, change.k, change.expect, effective)
            if new is None:
                return False
            oldest = max(self.redis_now_ms, effective - self.lead_ms) - self.keep_ms
            value = encode(trim(new, oldest))
            answer = await self._cas(
                keys=self.keys,
                args=[key, history.raw.get(key, b""), value, new[-1][0], self.guard_ms],
            )
            status, self.redis_now_ms = int(answer[0]), int(answer[1])
            if status == 1:
                history.set(key, value)
                return True
            if status == 0:
                _set_stored(history, key, _bytes(answer[2]))
            else:  # this writer's clock is behind Redis: take effect a lead after Redis's now
                effective = self.redis_now_ms + self.lead_ms
        return False

    async def trim(self, history: SplitHistory) -> int:
        """Drop entries nothing is routed by any more (older than `keep_ms`); how many keys changed."""
        oldest = self.redis_now_ms - self.keep_ms
        changed = 0
        for key in history.stale(oldest):
            value = trim(history.get(key), oldest)
            raw = encode(value) if value else b""
            answer = await self._cas(keys=self.keys, args=[key, history.raw.get(key, b""), raw, 0, 0])
            if int(answer[0]) == 1:
                history.set(key, raw)
                changed += 1
            else:  # another writer changed it: the next read brings it
                _set_stored(history, key, _bytes(answer[2]))
        return changed


def _set_stored(history: SplitHistory, key: str, raw: bytes) -> None:
    try:
        history.set(key, raw)
    except ValueError:  # not a history (written by hand?): treat the key as unsplit
        history.set(key, None)


def _bytes(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def hot_rates_keys(topology: str) -> list[str]:
    """The summed rates (HASH key -> events/s), the writers' reports (HASH), their expiries (ZSET)."""
    tag = f"{topology}:{{{topology}}}"  # the script's three keys share a slot on a Redis Cluster
    return [f"{tag}:hot-rates", f"{tag}:hot-rates:reports", f"{tag}:hot-rates:writers"]


class SharedRates:
    """Writers' rates summed in Redis: `share` puts this writer's report and answers the sum."""

    def __init__(self, redis: aioredis.Redis, topology: str) -> None:
        self.redis = redis
        self.keys = hot_rates_keys(topology)
        self._script = redis.register_script(SHARE_RATES_LUA)

    async def share(
        self, writer: str, report: Mapping[str, int], ttl_ms: int, min_total: float = 0
    ) -> dict[str, int]:
        """Replace `writer`'s report with `report` (key -> events/s) for `ttl_ms`; the sums at or above
        `min_total`, over every writer's live report."""
        args: list[bytes | str | int | float] = [writer, max(1, ttl_ms), min_total]
        for key, rate in report.items():
            if rate > 0:
                args.append(key.encode("utf-8", "surrogatepass"))
                args.append(int(rate))
        answer = await self._script(keys=self.keys, args=args)
        return {
            _bytes(answer[i]).decode("utf-8", "surrogatepass"): int(answer[i + 1])
            for i in range(0, len(answer), 2)
        }

    async def withdraw(self, writer: str) -> None:
        """Take this writer's report out of the sums (a writer that stops)."""
        await self._script(keys=self.keys, args=[writer, 1, 0])


class SplitAnnouncer:
    def __init__(
        self,
        topology: str,
        writer: str,
        producer: AIOKafkaProducer | None = None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        self.topology = topology
        self.writer = writer
        self.topic = f"{topology}.splits"
        self.producer = producer
        self.redis = redis

    async def announce(self, changes: Mapping[str, int]) -> None:
        """Publish changed splits (k = 1: the key is no longer split)."""
        if not changes:
            return
        if self.redis is not None:
            pipe = self.redis.pipeline(transaction=False)
            name = splits_key(self.topology)
            for key, k in changes.items():
                if k > 1:
                    pipe.hset(name, key, k)
                else:
                    pipe.hdel(name, key)
            await pipe.execute()
        if self.producer is not None:
            now_ms = int(time.time() * 1000)
            futures = []
            for key, k in changes.items():
                value = (
                    orjson.dumps({"key": key, "k": k, "writer": self.writer, "ts": now_ms}) if k > 1 else None
                )
                futures.append(await self.producer.send(self.topic, value, key=key.encode()))
            for fut in futures:
                await fut

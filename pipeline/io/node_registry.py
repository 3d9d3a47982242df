"""Which broadcast nodes are alive, and which one owns a viewer.

Each node refreshes its entry in `{topology}:broadcast:nodes` (a sorted set of
node id -> expiry time in ms, Redis clock) every `ttl_s / 3`; entries past
their expiry are pruned by whoever heartbeats next. Node URLs sit beside it in
`{topology}:broadcast:urls`. Every node builds the same consistent-hash ring
(uhashring, virtual nodes, md5) from the same live set, so any node answers
"who owns viewer X" the same way, and a node joining or leaving moves only the
viewers whose owner changed.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis
from uhashring import HashRing

VNODES = 160

# KEYS: nodes zset, urls hash. ARGV: node id ('' to only read), url, ttl ms.
HEARTBEAT_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(dead))
end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
"""


def nodes_key(topology: str) -> str:
    """ZSET of node id -> expiry (ms since the epoch, Redis clock). Both keys of the heartbeat script
    carry the hash tag `{T}`: one slot on a Redis Cluster."""
    return f"{topology}:{{{topology}}}:broadcast:nodes"


def urls_key(topology: str) -> str:
    """HASH of node id -> the URL viewers connect to."""
    return f"{topology}:{{{topology}}}:broadcast:urls"


class Ring:
    """The consistent-hash ring of a set of live nodes."""

    def __init__(self, nodes: Mapping[str, str], vnodes: int = VNODES) -> None:
        self.urls = dict(nodes)
        self._ring = HashRing({n: {"vnodes": vnodes} for n in sorted(self.urls)}) if self.urls else None

    def owner(self, viewer: str) -> str | None:
        """The node id that owns `viewer` (None when no node is alive)."""
        if self._ring is None:
            return None
        node: str = self._ring.get_node(viewer)
        return node

    def url(self, node: str) -> str:
        return self.urls[node]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and other.urls == self.urls

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.urls.items())))

    def __len__(self) -> int:
        return len(self.urls)


class NodeRegistry:
    """One node's membership: join/heartbeat, leave, and the ring of the live nodes."""

    def __init__(
        self, client: aioredis.Redis, topology: str, node_id: str, url: str, ttl_s: float = 5.0
    ) -> None:
        if not node_id:
            raise ValueError("a node needs an id")
        self.client = client
        self.node_id = node_id
        self.url = url
        self.ttl_s = ttl_s
        self.keys = [nodes_key(topology), urls_key(topology)]
        self._script = client.register_script(HEARTBEAT_LUA)

    async def heartbeat(self) -> Ring:
        """Register (or refresh) this node, prune expired ones, return the ring of the live ones."""
        return await self._call(self.node_id)

    async def live(self) -> Ring:
        """The ring of the live nodes, without registering."""
        return await self._call("")

    async def leave(self) -> None:
        """Take this node out at once (a node that dies instead drops out when its entry expires)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys[0], self.node_id)
        pipe.hdel(self.keys[1], self.node_id)
        await pipe.execute()

    async def _call(self, node_id: str) -> Ring:
        reply = await self._script(keys=self.keys, args=[node_id, self.url, int(self.ttl_s * 1000)])
        items = [r.decode() if isinstance(r, bytes) else str(r) for r in reply]
        return Ring(dict(zip(items[::2], items[1::2], strict=True)))

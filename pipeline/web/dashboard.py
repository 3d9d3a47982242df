"""The dashboard page and its JSON query API (`/api/...`), mounted on the broadcast node.

Read-only and stateless: every answer is read from Redis when it is asked for
(through pipeline/io/redis_query.py), so any node can serve it and a reload
always shows what Redis holds. A bad parameter gets HTTP 400 with a JSON
`error` that says what is wrong.

    GET /api/topologies                      {"topologies": [{name, description, feed_types, metrics: [...]}]}
    GET /api/channels?limit=200              {"channels": [{channel, seq}], "count"}  busiest first
    GET /api/totals?metric=m                 {"channels": {channel: total}}  (count, sum: sum; min; max)
    GET /api/totals?metric=m&channel=c       {"values": {key: total}, "total"}
    GET /api/top?metric=m&channel=c&n=10     {"top": [[key, total]], "source": "leaderboard" | "scan"}
    GET /api/series?metric=m&channel=c&key=k&size=60|3600&points=60&end=unix_s
                                             {"points": [[bucket_start_s, value]]}  oldest first, 0 if empty;
                                             no key: the channel's sum (count and sum metrics only)
    GET /api/splits                          {"splits": {key: k}}  hot keys split over k sub-keys
    GET /api/stats                           {"stats": {counter: n}, "channels"}
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web

from pipeline.core.aggregates import Kind
from pipeline.core.redis_layout import seq_key
from pipeline.core.topology import Metric, Topology
from pipeline.io import redis_query

STATIC_DIR = Path(__file__).parent / "static"
MAX_TOP = 1000
MAX_POINTS = 1000
MAX_CHANNELS = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadQuery(ValueError):
    """A query parameter that is missing, malformed or names something that does not exist."""


def series_starts(size_s: int, points: int, end_s: int) -> list[int]:
    """Bucket starts (epoch seconds), oldest first: `points` buckets ending with the one holding `end_s`."""
    last = end_s // size_s * size_s
    return [last - (points - 1 - i) * size_s for i in range(points)]


def fold(kind: Kind, values: list[float]) -> float | None:
    """One number for many keys' values of a metric: their sum, or their min or max."""
    if kind is Kind.DISTINCT:
        return None  # distinct users of different keys overlap: they do not add up
    if not values:
        return 0
    if kind is Kind.MIN:
        return min(values)
    if kind is Kind.MAX:
        return max(values)
    return sum(values)


def describe(topology: Topology) -> dict[str, Any]:
    """What the pages need to know about a topology to build their pickers."""
    return {
        "name": topology.name,
        "description": topology.description,
        "feed_types": sorted(topology.feed_types),
        "flush_interval_ms": topology.flush_interval_ms,
        "metrics": [
            {
                "name": m.name,
                "kind": m.kind.value,
                "on": m.on,
                "rollups": [r.size_s for r in m.rollups],
                "leaderboard": m.leaderboard,
            }
            for m in topology.metrics
        ],
    }


class DashboardApi:
    """The `/api/...` handlers of one topology."""

    def __init__(self, topology: Topology, client: aioredis.Redis) -> None:
        self.topology = topology
        self.client = client
        self.metrics = {m.name: m for m in topology.metrics}

    # -- query parameters -----------------------------------------------------------------------------
    def _metric(self, request: web.Request) -> Metric:
        name = request.query.get("metric")
        if name is None:
            raise BadQuery(f"missing parameter 'metric' (one of {sorted(self.metrics)})")
        metric = self.metrics.get(name)
        if metric is None:
            raise BadQuery(f"unknown metric {name!r} (one of {sorted(self.metrics)})")
        return metric

    @staticmethod
    def _channel(request: web.Request) -> str:
        channel = request.query.get("channel")
        if channel is None:
            raise BadQuery("missing parameter 'channel'")
        return channel

    @staticmethod
    def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
        raw = request.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadQuery(f"parameter {name!r} must be an integer, got {raw[:40]!r}") from None
        if not low <= value <= high:
            raise BadQuery(f"parameter {name!r} must be between {low} and {high}, got {value}")
        return value

    # -- endpoints ------------------------------------------------------------------------------------
    async def topologies(self, request: web.Request) -> dict[str, Any]:
        return {"topologies": [describe(self.topology)]}

    async def channels(self, request: web.Request) -> dict[str, Any]:
        """Channels the root has written to, the busiest (most updates) first."""
        limit = self._int(request, "limit", 200, 1, MAX_CHANNELS)
        seqs = await redis_query.channel_seqs(self.client, self.topology.name)
        ranked = sorted(seqs.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return {"channels": [{"channel": c, "seq": s} for c, s in ranked], "count": len(seqs)}

    async def totals(self, request: web.Request) -> dict[str, Any]:
        metric = self._metric(request)
        name, client = self.topology.name, self.client
        channel = request.query.get("channel")
        if channel is None:
            if metric.kind is Kind.DISTINCT:
                raise BadQuery(f"totals of the distinct metric {metric.name!r} need a 'channel'")
            sums = await redis_query.channel_sums(client, name, metric.name)
            per_channel = {c: fold(metric.kind, v) for c, v in sorted(sums.items())}
            return {"metric": metric.name, "kind": metric.kind.value, "channels": per_channel}
        values: dict[str, float] | dict[str, int]
        if metric.kind is Kind.DISTINCT:
            values = await redis_query.channel_distinct(client, name, metric.name, channel)
        else:
            values = await redis_query.channel_totals(client, name, metric.name, channel)
        return {
            "metric": metric.name,
            "kind": metric.kind.value,
            "channel": channel,
            "values": dict(sorted(values.items())),
            "total": fold(metric.kind, list(values.values())),
        }

    async def top(self, request: web.Request) -> dict[str, Any]:
        """The channel's top keys: from its leaderboard if the metric keeps one, else by sorting all."""
        metric = self._metric(request)
        channel = self._channel(request)
        n = self._int(request, "n", 10, 1, MAX_TOP)
        name, client = self.topology.name, self.client
        if metric.leaderboard:
            n = min(n, metric.leaderboard)
            top = await redis_query.top_keys(client, name, metric.name, channel, n)
            source = "leaderboard"
        else:
            values: dict[str, float] | dict[str, int]
            if metric.kind is Kind.DISTINCT:
                values = await redis_query.channel_distinct(client, name, metric.name, channel)
            else:
                values = await redis_query.channel_totals(client, name, metric.name, channel)
            reverse = metric.kind is not Kind.MIN
            ranked = sorted(values.items(), key=lambda kv: (-kv[1] if reverse else kv[1], kv[0]))
            top = ranked[:n]
            source = "scan"
        return {
            "metric": metric.name,
            "channel": channel,
            "n": n,
            "source": source,
            "top": [[k, v] for k, v in top],
        }

    async def series(self, request: web.Request) -> dict[str, Any]:
        """Per-minute or per-hour values of one key (or, for a count or sum, of the whole channel)."""
        metric = self._metric(request)
        channel = self._channel(request)
        sizes = [r.size_s for r in metric.rollups if r.size_s]
        if not sizes:
            raise BadQuery(f"metric {metric.name!r} keeps only all-time totals, no series")
        size = self._int(request, "size", min(sizes), 1, 10**9)
        if size not in sizes:
            raise BadQuery(f"metric {metric.name!r} has buckets of {sizes} seconds, not {size}")
        points = self._int(request, "points", 60, 1, MAX_POINTS)
        end = self._int(request, "end", int(time.time()), 0, 2**40)
        key = request.query.get("key") or None
        starts = series_starts(size, points, end)
        buckets = [f"{size}:{s}" for s in starts]
        name, client = self.topology.name, self.client
        values: list[float] | list[int]
        if metric.kind is Kind.DISTINCT:
            if key is None:
                raise BadQuery(f"a series of the distinct metric {metric.name!r} needs a 'key'")
            values = await redis_query.bucket_distinct(client, name, metric.name, channel, key, buckets)
        else:
            if key is None and metric.kind is not Kind.COUNT and metric.kind is not Kind.SUM:
                raise BadQuery(f"a series of the {metric.kind.value} metric {metric.name!r} needs a 'key'")
            values = await redis_query.bucket_values(client, name, metric.name, channel, key, buckets)
        return {
            "metric": metric.name,
            "channel": channel,
            "key": key,
            "size": size,
            "points": [[s, v] for s, v in zip(starts, values, strict=True)],
        }

    async def splits(self, request: web.Request) -> dict[str, Any]:
        return {"splits": dict(sorted((await redis_query.splits(self.client, self.topology.name)).items()))}

    async def stats(self, request: web.Request) -> dict[str, Any]:
        name = self.topology.name
        counters = await redis_query.stats(self.client, name)
        channels = await self.client.hlen(seq_key(name))
        return {"topology": name, "stats": dict(sorted(counters.items())), "channels": channels}


def _json(handler: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> Handler:
    async def respond(request: web.Request) -> web.StreamResponse:
        try:
            body: dict[str, Any] = await handler(request)
            status = 200
        except BadQuery as exc:
            body, status = {"error": str(exc)}, 400
        return web.Response(
            body=orjson.dumps(body),
            status=status,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    return respond


def _file(name: str) -> Handler:
    path = STATIC_DIR / name

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve


def setup(app: web.Application, topology: Topology, redis_client: aioredis.Redis) -> DashboardApi:
    """Mount `/dashboard` and the JSON query API for `topology` on `app`."""
    api = DashboardApi(topology, redis_client)
    routes = app.router
    routes.add_get("/dashboard", _file("dashboard.html"))
    routes.add_get("/dashboard.js", _file("dashboard.js"))
    routes.add_get("/api/topologies", _json(api.topologies))
    routes.add_get("/api/channels", _json(api.channels))
    routes.add_get("/api/totals", _json(api.totals))
    routes.add_get("/api/top", _json(api.top))
    routes.add_get("/api/series", _json(api.series))
    routes.add_get("/api/splits", _json(api.splits))
    routes.add_get("/api/stats", _json(api.stats))
    return api

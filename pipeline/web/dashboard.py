"""The dashboard page and its JSON query API (`/api/...`), mounted on the broadcast node.

Read-only and stateless: every answer is read from Redis when it is asked for
(through the reader API, pipeline/read.py), so any node can serve it and a reload
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
from pipeline.core.topology import Metric, Topology
from pipeline.io.postgres_history import PostgresHistory
from pipeline.read import QueryError, Reader, fold
from pipeline.web import auth

STATIC_DIR = Path(__file__).parent / "static"
MAX_TOP = 1000
MAX_POINTS = 1000
MAX_CHANNELS = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# A query parameter that is missing, malformed or names something that does not exist; the reader's
# QueryError (a question the topology cannot answer) is one too: both are answered 400.
BadQuery = QueryError


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

    def __init__(
        self, topology: Topology, client: aioredis.Redis, history: PostgresHistory | None = None
    ) -> None:
        self.topology = topology
        self.client = client
        self.reader = Reader(topology, client, history)
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
        seqs = await self.reader.channels()
        ranked = sorted(seqs.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return {"channels": [{"channel": c, "seq": s} for c, s in ranked], "count": len(seqs)}

    async def totals(self, request: web.Request) -> dict[str, Any]:
        metric = self._metric(request)
        channel = request.query.get("channel")
        if channel is None:
            if metric.kind is Kind.DISTINCT:
                raise BadQuery(f"totals of the distinct metric {metric.name!r} need a 'channel'")
            per_channel = await self.reader.totals(metric.name)
            return {"metric": metric.name, "kind": metric.kind.value, "channels": per_channel}
        values = await self.reader.values(metric.name, channel)
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
        if metric.leaderboard:
            n = min(n, metric.leaderboard)
        top = await self.reader.top(metric.name, channel, n)
        return {
            "metric": metric.name,
            "channel": channel,
            "n": n,
            "source": top.source,
            "top": [[k, v] for k, v in top.items],
        }

    async def series(self, request: web.Request) -> dict[str, Any]:
        """Per-minute or per-hour values of one key (or, for a count or sum, of the whole channel)."""
        metric = self._metric(request)
        channel = self._channel(request)
        rollup = self.reader.rollup(metric, self._int(request, "size", 0, 1, 10**9) or None)
        points = self._int(request, "points", 60, 1, MAX_POINTS)
        end = self._int(request, "end", int(time.time()), 0, 2**40)
        key = request.query.get("key") or None
        values = await self.reader.series(
            metric.name, channel, key, size_s=rollup.size_s, points=points, end_s=end
        )
        return {
            "metric": metric.name,
            "channel": channel,
            "key": key,
            "size": rollup.size_s,
            "points": [[s, v] for s, v in values],
        }

    async def splits(self, request: web.Request) -> dict[str, Any]:
        return {"splits": dict(sorted((await self.reader.splits()).items()))}

    async def stats(self, request: web.Request) -> dict[str, Any]:
        counters = await self.reader.stats()
        channels = await self.reader.channel_count()
        return {"topology": self.topology.name, "stats": dict(sorted(counters.items())), "channels": channels}


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


def setup(
    app: web.Application,
    topology: Topology,
    redis_client: aioredis.Redis,
    guard: auth.Guard | None = None,
    history: PostgresHistory | None = None,
) -> DashboardApi:
    """Mount `/dashboard` and the JSON query API for `topology` on `app`, each route behind `guard`
    by what it reveals (pipeline/web/auth.py). No guard mounts them open: only for an app that
    authenticates by itself (the broadcast node always passes one)."""
    api = DashboardApi(topology, redis_client, history)
    guard = guard or auth.Guard.open()
    routes = app.router
    routes.add_get("/dashboard", guard.page(_file("dashboard.html")))
    routes.add_get("/dashboard.js", guard.page(_file("dashboard.js")))
    routes.add_get("/api/topologies", guard.viewer(_json(api.topologies)))
    routes.add_get("/api/channels", guard.channel_list(_json(api.channels)))
    routes.add_get("/api/totals", guard.channel(_json(api.totals)))
    routes.add_get("/api/top", guard.channel(_json(api.top)))
    routes.add_get("/api/series", guard.channel(_json(api.series)))
    routes.add_get("/api/splits", guard.operator(_json(api.splits)))
    routes.add_get("/api/stats", guard.operator(_json(api.stats)))
    guard.add_routes(app)
    return api

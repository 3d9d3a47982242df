"""The ingest gateway: an HTTP front door for events (`pipeline run TOPOLOGY --tier ingest`).

`POST /v1/events` takes a JSON array (Content-Type application/json) or NDJSON
(application/x-ndjson) and answers per event. Status codes:

- 202: at least one event was accepted; every event has a result (accepted,
  rejected with field and reason, or shed), so a batch with some bad events
  still gets its good ones counted;
- 400: nothing accepted because every event was invalid (or the body is not
  JSON); the results name field and reason for each;
- 401 no API key, 403 a wrong one (`Authorization: Bearer KEY` or `X-API-Key`);
- 413 body over `ingest_max_body_bytes` or more than `ingest_max_events` events;
- 415 neither JSON nor NDJSON;
- 429 with Retry-After: tier 1 is too far behind (throttled), or every event of
  the request was of a priority class being shed;
- 503 with Retry-After: the broker is unreachable or did not acknowledge in
  time. Nothing is buffered. When some events were sent, `resend` lists each
  whose fate is unknown with its index, id (generated ones too), ts and sub:
  resend those with that id, ts and sub (the others of the request were
  accepted, or rejected as the results of a 202 would say).

Ids: an event's own `id` is kept, otherwise one is generated and returned; an
empty `id` is refused (field `id`): leave the field out to have one made. A
resent id within the topology's dedup horizon (600 s by default) is acknowledged
again but counted once by tier 1. Tier 1 does the deduplication; this gateway
only reports the pipeline-wide `deduplicated` counter from Redis as a metric.

Routing: an accepted event's result also carries its `ts` (the event's own, or
the time the gateway accepted it) and its `sub` (the one given, or chosen by the
key's split factor at that ts, from the split history every writer shares). A
retry that carries them goes to the partition of its original, where tier 1
remembers its id, through this gateway, another one, or the SDK.

Also served: `GET /openapi.json`, `GET /healthz`, `GET /metrics` (Prometheus), and CORS for
the browser origins listed in `ingest_cors_origins` (preflight `OPTIONS /v1/events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import prometheus_client
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from pipeline.client import BrokerUnavailable, PipelineClient, SendResult
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.core.model import MAX_SUBKEYS, event_json_schema
from pipeline.core.shedding import NORMAL, DrainRate, LoadLimits, LoadShedder, Overload
from pipeline.core.topology import Topology
from pipeline.io import kafka, redis_client, redis_query
from pipeline.io.lag import Tier1Lag
from pipeline.runtime import observability as obs
from pipeline.runtime.settings import Settings

LABELS = obs.LABELS
REQUESTS = Counter(
    "pipeline_ingest_requests_total", "Requests to POST /v1/events by status", (*LABELS, "status")
)
ACCEPTED = Counter(
    "pipeline_ingest_accepted_total", "Events accepted (acknowledged by the broker)", (*LABELS, "type")
)
REJECTED = Counter(
    "pipeline_ingest_rejected_total",
    "Invalid events refused, by field and reason",
    (*LABELS, "field", "reason"),
)
SHED = Counter(
    "pipeline_ingest_shed_total", "Events shed under overload, by priority class", (*LABELS, "priority")
)
THROTTLED = Counter(
    "pipeline_ingest_throttled_total", "Requests answered 429 because tier 1 is behind", LABELS
)
UNAVAILABLE = Counter(
    "pipeline_ingest_unavailable_total", "Requests answered 503 (broker unreachable)", LABELS
)
DEDUPLICATED = Gauge(
    "pipeline_ingest_deduplicated",
    "Retried events counted once, pipeline-wide (Redis stats, from tier 1)",
    LABELS,
)
TIER1_LAG = Gauge("pipeline_ingest_tier1_lag", "Events acknowledged but not yet aggregated by tier 1", LABELS)
DRAIN = Gauge("pipeline_ingest_drain_eps", "Events/s tier 1 is consuming (smoothed)", LABELS)
SHEDDING = Gauge("pipeline_ingest_shedding_classes", "Priority classes being shed now", LABELS)
RETRY_AFTER = Gauge(
    "pipeline_ingest_retry_after_seconds", "Retry-After given now (0: not overloaded)", LABELS
)
ACK_LATENCY = Gauge("pipeline_ingest_ack_latency_ms", "Broker acknowledgement latency (smoothed)", LABELS)
SPLIT_K = Gauge("pipeline_ingest_split_k", "Sub-keys of each key this writer splits now", (*LABELS, "key"))
KEY_RATE = Gauge("pipeline_ingest_key_rate_eps", "Estimated events/s of the top keys", (*LABELS, "key"))
LATENCY = Histogram(
    "pipeline_ingest_request_seconds",
    "Time to answer POST /v1/events",
    LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
TOP_KEYS = 20  # per-key rate gauges
MAX_LABEL_CHARS = 64
UNAVAILABLE_RETRY_S = 5
STALE_LATENCY_S = 5.0  # an ack latency older than this says nothing about the broker now
BEARER = 'Bearer realm="ingest"'


class IngestWorker:
    tier = "ingest"

    def __init__(self, topology: Topology, settings: Settings, client: PipelineClient | None = None) -> None:
        self.topology = topology
        self.settings = settings
        self.kafka = kafka.connection_from(settings)
        self.labels = (topology.name, self.tier, settings.instance)
        self.log = obs.log(topology=topology.name, tier=self.tier, instance=settings.instance)
        self.api_keys = [k.strip().encode() for k in settings.ingest_api_keys.split(",") if k.strip()]
        self.cors_origins = {o.strip() for o in settings.ingest_cors_origins.split(",") if o.strip()}
        if not self.api_keys and not settings.ingest_open:
            raise ValueError(
                "the ingest gateway needs API keys (PIPELINE_INGEST_API_KEYS) "
                "or PIPELINE_INGEST_OPEN=true to serve without them"
            )
        self.splitter = HotKeySplitter(
            SplitPolicy(
                threshold_eps=settings.split_threshold_eps,
                budget_eps=settings.split_budget_eps,
                max_k=min(settings.split_max_k, MAX_SUBKEYS),
                cooldown_s=settings.split_cooldown_s,
                static_k=settings.split_static_k,
            ),
            now=time.monotonic(),
        )
        self.client = client or PipelineClient(
            topology,
            self.kafka,
            redis_url=settings.redis,
            redis_options=redis_client.options(settings),
            splitter=self.splitter,
            ack_timeout_ms=settings.ingest_ack_timeout_ms,
            client_id=f"{topology.name}.ingest.{settings.instance}",
        )
        self.shedder = LoadShedder(
            topology.priorities.values(),
            LoadLimits(
                lag_shed=settings.ingest_lag_shed,
                lag_high=settings.ingest_lag_high,
                latency_high_ms=settings.ingest_latency_high_ms,
            ),
        )
        self.drain = DrainRate()
        self.overload: Overload = NORMAL
        self.lag_known = False
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._redis = redis_client.connect(settings)
        self._split_labels: set[str] = set()
        self._rate_labels: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            stopping = asyncio.create_task(stop.wait())
            connecting = self._tasks[0]
            await asyncio.wait([stopping, connecting], return_when=asyncio.FIRST_COMPLETED)
            if connecting.done() and not connecting.cancelled() and connecting.exception() is not None:
                stopping.cancel()
                raise connecting.exception()  # type: ignore[misc]  # a refused password: stop, say why
            await stopping
        finally:
            await self.close()

    async def start(self) -> int:
        """Serve at once (answering 503 until the broker is reached); return the port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.ingest_host, self.settings.ingest_port)
        await site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.settings.ingest_port
        self.log.info("serving", url=f"http://{self.settings.ingest_host}:{self.port}/v1/events")
        self._tasks = [asyncio.create_task(self._connect()), asyncio.create_task(self._watch())]
        return self.port

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        await self.client.stop()
        await self._redis.aclose()
        self.log.info("stopped")

    async def _connect(self) -> None:
        """Reach the broker, retrying; until then POST answers 503."""
        while not self.client.started:
            try:
                await asyncio.wait_for(
                    kafka.ensure_topics(self.kafka, kafka.topology_topics(self.topology), 10.0), 15.0
                )
                await self.client.start()
                self.log.info("connected", kafka=self.kafka.describe())
            except kafka.AccessRefused:
                raise  # waiting cannot cure a refused password or certificate
            except Exception as exc:
                self.log.warning("broker unreachable; retrying", error=repr(exc)[:200])
                await asyncio.sleep(1.0)

    async def _watch(self) -> None:
        """Sample tier-1 lag and decide throttling and shedding; refresh the gauges."""
        interval = self.settings.ingest_lag_interval_ms / 1000
        lag: Tier1Lag | None = None
        try:
            while True:
                if lag is None and self.client.started:
                    lag = Tier1Lag(self.kafka, self.topology)
                    try:
                        await lag.start()
                    except Exception as exc:
                        self.log.warning("cannot read lag yet", error=repr(exc)[:200])
                        lag = None
                if lag is not None:
                    await self._sample(lag)
                await self._refresh_gauges()
                await asyncio.sleep(interval)
        finally:
            if lag is not None:
                with contextlib.suppress(Exception):
                    await lag.stop()

    async def _sample(self, lag: Tier1Lag) -> None:
        try:
            sample = await asyncio.wait_for(lag.sample(), 5.0)
        except Exception as exc:  # keep the last decision; the broker may be briefly away
            self.log.warning("lag sample failed", error=repr(exc)[:200])
            return
        now = time.monotonic()
        drain = self.drain.update(now, sample.committed)
        latency = self.client.ack_latency_ms if now - self.client.last_ack_at < STALE_LATENCY_S else 0.0
        before = self.overload
        self.overload = self.shedder.decide(sample.lag, drain, latency)
        self.lag_known = True
        if (before.throttle, before.shed) != (self.overload.throttle, self.overload.shed):
            self.log.info(
                "overload changed",
                lag=sample.lag,
                drain_eps=round(drain),
                ack_latency_ms=round(latency, 1),
                throttle=self.overload.throttle,
                shed=sorted(self.overload.shed),
                retry_after_s=self.overload.retry_after_s,
            )
        TIER1_LAG.labels(*self.labels).set(sample.lag)
        DRAIN.labels(*self.labels).set(drain)
        ACK_LATENCY.labels(*self.labels).set(latency)
        SHEDDING.labels(*self.labels).set(len(self.overload.shed))
        RETRY_AFTER.labels(*self.labels).set(self.overload.retry_after_s)

    async def _refresh_gauges(self) -> None:
        with contextlib.suppress(Exception):
            stats = await asyncio.wait_for(redis_query.stats(self._redis, self.topology), 2.0)
            DEDUPLICATED.labels(*self.labels).set(stats.get("deduplicated", 0))
        splits = {_label(k): v for k, v in self.splitter.splits.items()}
        _set_keyed(SPLIT_K, self.labels, splits, self._split_labels)
        rates = {_label(k): r for k, r in self.splitter.top_rates(TOP_KEYS)}
        _set_keyed(KEY_RATE, self.labels, rates, self._rate_labels)

    # -- HTTP -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.ingest_max_body_bytes, middlewares=[self._errors_middleware]
        )
        app.router.add_post("/v1/events", self.post_events)
        app.router.add_route("OPTIONS", "/v1/events", self.preflight)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.content_type != "application/json":
                return _error(
                    exc.status, exc.reason, headers={k: v for k, v in exc.headers.items() if k == "Allow"}
                )
            raise
        except Exception as exc:
            self.log.exception("request failed", path=request.path, error=repr(exc)[:200])
            return _error(500, "internal error")

    async def post_events(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        response = await self._post_events(request)
        response.headers.update(self._cors(request))
        REQUESTS.labels(*self.labels, str(response.status)).inc()
        LATENCY.labels(*self.labels).observe(time.perf_counter() - started)
        return response

    async def _post_events(self, request: web.Request) -> web.Response:
        source = self._authorize(request)
        if not isinstance(source, str):
            return source
        overload = self.overload
        if overload.throttle:
            THROTTLED.labels(*self.labels).inc()
            return _error(
                429,
                f"overloaded: tier 1 is {overload.lag} events behind; retry after {overload.retry_after_s} s",
                retry_after=overload.retry_after_s,
            )
        ctype = request.content_type
        if ctype not in JSON_TYPES and ctype not in NDJSON_TYPES:
            return _error(
                415, f"Content-Type must be application/json or application/x-ndjson, not {ctype!r}"
            )
        limit = self.settings.ingest_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"body is {request.content_length} bytes, over the {limit} byte limit")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body is over the {limit} byte limit")
        if ctype in NDJSON_TYPES:
            items, unparsed = _parse_ndjson(body)
        else:
            try:
                items, unparsed = _parse_json(body), {}
            except ValueError as exc:
                return _error(400, str(exc))
        total = len(items) + len(unparsed)
        if total == 0:
            return _error(400, "no events in the body")
        if total > self.settings.ingest_max_events:
            return _error(
                413, f"{total} events, over the {self.settings.ingest_max_events} per request limit"
            )
        if not self.client.started:
            UNAVAILABLE.labels(*self.labels).inc()
            return _error(503, "the broker is unreachable", retry_after=UNAVAILABLE_RETRY_S)
        try:
            sent = await self.client.send_many(
                [obj for _, obj in items], shed=self._shed_rule(overload), source=source
            )
        except BrokerUnavailable as exc:
            UNAVAILABLE.labels(*self.labels).inc()
            self.log.warning("broker unavailable", error=str(exc)[:200])
            # which events were acknowledged, and the id and sub of each whose fate is unknown
            resend = [
                {"index": items[r.index][0], "status": "unknown", "id": r.id, "ts": r.ts, "sub": r.sub}
                for r in exc.results
                if r.unknown
            ]
            response = _error(
                503,
                "the broker did not acknowledge in time: resend the events listed in `resend`, "
                "each with its id, ts and sub (those already counted are not counted twice)",
                retry_after=UNAVAILABLE_RETRY_S,
                extra={"accepted": sum(r.accepted for r in exc.results), "resend": resend},
            )
            return response
        return self._answer(items, unparsed, sent, overload)

    def _cors(self, request: web.Request) -> dict[str, str]:
        """CORS headers for a browser origin in `ingest_cors_origins` (none for others)."""
        origin = request.headers.get("Origin")
        if origin is None or not ("*" in self.cors_origins or origin in self.cors_origins):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": "Retry-After",
            "Vary": "Origin",
        }

    async def preflight(self, request: web.Request) -> web.Response:
        """The browser's OPTIONS check before a cross-origin POST with an API key header."""
        headers = self._cors(request)
        if not headers:
            return _error(403, "origin not allowed")
        headers.update(
            {
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "Content-Type, Authorization, X-API-Key",
                "Access-Control-Max-Age": "600",
            }
        )
        return web.Response(status=204, headers=headers)

    def _authorize(self, request: web.Request) -> web.Response | str:
        """A refusal, or the request's source: the label of its API key ("" when serving open).

        Ids are scoped by source, so two applications with their own keys that number their
        events alike are both counted. The label is a digest: the key itself never leaves here.
        """
        if not self.api_keys:
            return ""
        given = []  # every credential the request carries must be right: a wrong one is never outvoted
        if "X-API-Key" in request.headers:
            given.append(request.headers["X-API-Key"])
        if "Authorization" in request.headers:
            scheme, _, token = request.headers["Authorization"].partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return _error(401, "Authorization must be: Bearer KEY", headers={"WWW-Authenticate": BEARER})
            given.append(token.strip())
        if not given:
            return _error(401, "missing API key", headers={"WWW-Authenticate": BEARER})
        for candidate in given:
            raw = candidate.encode("utf-8", "surrogateescape")
            ok = False
            for key in self.api_keys:  # every key compared, each in constant time
                ok |= hmac.compare_digest(raw, key)
            if not ok:
                return _error(403, "invalid API key")
        return key_source(given[0].encode("utf-8", "surrogateescape"))

    def _shed_rule(self, overload: Overload) -> Callable[[str], str | None] | None:
        if not overload.shed:
            return None
        priorities = self.topology.priorities
        shed = overload.shed
        reason = (
            f"shed under overload (tier 1 is {overload.lag} events behind); "
            f"retry after {overload.retry_after_s} s"
        )

        def rule(etype: str) -> str | None:
            return reason if priorities[etype] in shed else None

        return rule

    def _answer(
        self,
        items: list[tuple[int, Any]],
        unparsed: dict[int, str],
        sent: list[SendResult],
        overload: Overload,
    ) -> web.Response:
        labels = self.labels
        priorities = self.topology.priorities
        out: list[dict[str, Any] | None] = [None] * (len(items) + len(unparsed))
        for index, reason in unparsed.items():
            out[index] = {"index": index, "status": "rejected", "reason": reason, "field": None}
        if unparsed:
            REJECTED.labels(*labels, "", "not valid JSON").inc(len(unparsed))
        accepted = rejected = shed = 0
        by_type: dict[str, int] = {}
        for (index, obj), r in zip(items, sent, strict=True):
            if r.accepted:
                accepted += 1
                etype = obj["type"]
                by_type[etype] = by_type.get(etype, 0) + 1
                out[index] = {"index": index, "status": "accepted", "id": r.id, "ts": r.ts, "sub": r.sub}
            elif r.shed:
                shed += 1
                SHED.labels(*labels, str(priorities[obj["type"]])).inc()
                out[index] = {"index": index, "status": "shed", "id": r.id, "reason": r.reason}
            else:
                rejected += 1
                REJECTED.labels(*labels, r.field or "", _reason_label(r.reason or "")).inc()
                out[index] = {
                    "index": index,
                    "status": "rejected",
                    "id": r.id,
                    "reason": r.reason,
                    "field": r.field,
                }
        for etype, n in by_type.items():
            ACCEPTED.labels(*labels, etype).inc(n)
        rejected += len(unparsed)
        body = {"accepted": accepted, "rejected": rejected, "shed": shed, "results": out}
        headers = {}
        if shed:
            headers["Retry-After"] = str(overload.retry_after_s)
        status = 202 if accepted else 429 if shed else 400
        return web.Response(
            body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(openapi_document(self.topology)), content_type="application/json"
        )

    async def healthz(self, request: web.Request) -> web.Response:
        ok = self.client.started
        body = {
            "status": "ok" if ok else "broker unreachable",
            "broker": ok,
            "lag": self.overload.lag if self.lag_known else None,
            "throttling": self.overload.throttle,
            "shedding": sorted(self.overload.shed),
            "splits": len(self.splitter.splits),
        }
        return web.Response(
            body=orjson.dumps(body), status=200 if ok else 503, content_type="application/json"
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )


def _parse_json(body: bytes) -> list[tuple[int, Any]]:
    """A JSON array of events (or one event object); ValueError says what is wrong."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise ValueError(f"body must be a JSON array of events, got {type(doc).__name__}")
    return list(enumerate(doc))


def _parse_ndjson(body: bytes) -> tuple[list[tuple[int, Any]], dict[int, str]]:
    """One event per non-blank line; a line that is not JSON is rejected alone."""
    items: list[tuple[int, Any]] = []
    unparsed: dict[int, str] = {}
    index = 0
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            items.append((index, orjson.loads(line)))
        except orjson.JSONDecodeError as exc:
            unparsed[index] = f"line is not valid JSON: {exc}"
        index += 1
    return items, unparsed


_QUOTED = re.compile(r"'[^']*'")


def _reason_label(reason: str) -> str:
    """A bounded metric label: quoted values (types, field names) removed, the field is its own label."""
    return _QUOTED.sub("…", reason)[:80]


def _label(key: str) -> str:
    return key[:MAX_LABEL_CHARS]


def _set_keyed(gauge: Gauge, labels: tuple[str, ...], values: Mapping[str, float], shown: set[str]) -> None:
    for gone in shown - set(values):
        with contextlib.suppress(KeyError):
            gauge.remove(*labels, gone)
    for key, value in values.items():
        gauge.labels(*labels, key).set(value)
    shown.clear()
    shown.update(values)


def key_source(api_key: bytes) -> str:
    """The source an API key's events are scoped by: `key-` and 12 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(api_key).hexdigest()[:12]


def _error(
    status: int,
    message: str,
    *,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = str(retry_after)
    body: dict[str, Any] = {"error": message, **(extra or {})}
    if retry_after is not None:
        body["retry_after_s"] = retry_after
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=hdrs)


def openapi_document(topology: Topology) -> dict[str, Any]:
    """OpenAPI 3 description of POST /v1/events for this topology's event types."""
    error = {"$ref": "#/components/schemas/Error"}
    retry = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}

    def resp(
        description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
        if headers:
            out["headers"] = headers
        return out

    batch = {"$ref": "#/components/schemas/BatchResult"}
    event = {"$ref": "#/components/schemas/Event"}
    # a batch (at least one event), or one event alone; each event is checked by the table the
    # validator reads (pipeline.core.model.EVENT_FIELDS), so the document and the checks agree
    body = {"oneOf": [{"type": "array", "minItems": 1, "items": event}, event]}
    batch_or_error = {"anyOf": [batch, error]}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": f"{topology.name} ingest gateway",
            "version": "1",
            "description": "Send events to the hierarchical aggregation pipeline. "
            f"Retried ids within {topology.dedup_horizon_s} s are acknowledged and counted once.",
        },
        "paths": {
            "/v1/events": {
                "post": {
                    "summary": "Send a batch of events",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": body},
                            "application/x-ndjson": {
                                "schema": {**body, "description": "one Event JSON object per line"}
                            },
                        },
                    },
                    "responses": {
                        "202": resp("At least one event accepted; a result per event", batch),
                        "400": resp(
                            "No event accepted: each rejected with field and reason, or the body is not JSON",
                            batch_or_error,
                        ),
                        "401": resp("No API key", error),
                        "403": resp("Invalid API key", error),
                        "413": resp("Body or batch too large", error),
                        "415": resp("Unsupported Content-Type", error),
                        "429": resp("Overloaded (throttled, or every event shed)", batch_or_error, retry),
                        "503": resp("Broker unreachable; resend with the same id, ts, sub", error, retry),
                    },
                }
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "Event": event_json_schema(topology.types),
                "EventResult": {
                    "type": "object",
                    "required": ["index", "status"],
                    "properties": {
                        "index": {"type": "integer"},
                        "status": {"type": "string", "enum": ["accepted", "rejected", "shed"]},
                        "id": {"type": "string", "nullable": True},
                        "ts": {"type": "integer", "description": "accepted: the ts it was sent with"},
                        "sub": {"type": "integer", "description": "accepted: the sub it was sent with"},
                        "field": {"type": "string", "nullable": True},
                        "reason": {"type": "string"},
                    },
                },
                "BatchResult": {
                    "type": "object",
                    "properties": {
                        "accepted": {"type": "integer"},
                        "rejected": {"type": "integer"},
                        "shed": {"type": "integer"},
                        "results": {"type": "array", "items": {"$ref": "#/components/schemas/EventResult"}},
                    },
                },
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {"type": "string"},
                        "retry_after_s": {"type": "integer"},
                        "accepted": {"type": "integer"},
                        "resend": {
                            "type": "array",
                            "description": "503: events of unknown fate; resend each with its id, ts, sub",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "index": {"type": "integer"},
                                    "status": {"type": "string", "enum": ["unknown"]},
                                    "id": {"type": "string"},
                                    "ts": {"type": "integer"},
                                    "sub": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
            },
        },
    }

"""Tier 3 runtime, a broadcast node: the updates and feed topics -> Fanout -> viewers.

Every node reads every partition of both topics (no consumer group, from the
end) and keeps the viewers the consistent-hash ring gives it, over WebSocket or
Server-Sent Events. The protocol is in docs/BROADCAST.md; the decisions (what a
viewer gets, when, and who is too slow) are in pipeline/core/fanout.py.

Pushes are written straight to each viewer's transport, never awaited: one
encoded frame per distinct message (pipeline/core/frames.py) goes to every viewer that needs it, and a
viewer whose transport is backed up is skipped (it gets the latest values
later) instead of stalling the others or growing a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
import uuid
from pathlib import Path
from typing import Any, cast

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiolimiter import AsyncLimiter
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from pipeline.core import tokens
from pipeline.core.fanout import (
    Fanout,
    FanoutConfig,
    Group,
    Outgoing,
    SnapshotRequest,
    error_message,
    parse_channels,
    parse_since,
    redirect_message,
    valid_channel,
)
from pipeline.core.frames import http_chunk, sse_comment, sse_event, text_frame
from pipeline.core.model import ChannelUpdate
from pipeline.core.topology import Topology
from pipeline.io import kafka, redis_client
from pipeline.io.comment_history import CommentHistory, history_policy
from pipeline.io.node_registry import NodeRegistry, Ring
from pipeline.io.postgres_history import PostgresHistory
from pipeline.io.redis_retry import retrying
from pipeline.read import Reader, leaderboard_metric
from pipeline.runtime import observability as obs
from pipeline.runtime.settings import Settings
from pipeline.web import auth

LABELS = obs.LABELS
VIEWERS = Gauge("pipeline_broadcast_viewers", "Viewers connected", (*LABELS, "transport"))
PUSHES = Counter("pipeline_broadcast_pushes_total", "Messages pushed to viewers", (*LABELS, "type"))
UPDATES_IN = Counter(
    "pipeline_broadcast_updates_in_total", "Channel updates read from the updates topic", LABELS
)
COMMENTS_IN = Counter("pipeline_broadcast_comments_in_total", "Feed events read from the feed topic", LABELS)
SLOW_VIEWERS = Counter(
    "pipeline_broadcast_slow_viewers_disconnected_total", "Viewers disconnected for staying blocked", LABELS
)
REDIRECTS = Counter(
    "pipeline_broadcast_redirects_total", "Viewers sent to their node", (*LABELS, "transport")
)
TOKENS_REFUSED = Counter("pipeline_broadcast_tokens_refused_total", "Refused tokens", (*LABELS, "reason"))
VIOLATIONS = Counter(
    "pipeline_broadcast_client_violations_total", "Connections closed for what they sent", (*LABELS, "reason")
)
UPDATE_AGE = Gauge(
    "pipeline_broadcast_update_age_seconds",
    "Age of the newest update read (publication to this node)",
    LABELS,
)
RESYNCS = Counter("pipeline_broadcast_resyncs_total", "Channels re-snapshotted after a missing seq", LABELS)

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
WS_HEARTBEAT_S = 30.0
SSE_KEEPALIVE_S = 15.0
SNAPSHOT_RETRY_S = 0.5
DEV_TOKEN_TTL_S = 3600
MAX_WAKE_S = 1.0
SHUTDOWN_CLOSE_S = 2.0
SENDS_PER_SLICE = 1000  # writes between two turns of the event loop (Kafka, handshakes, reads)
IDLE_BACKOFF_S = 0.05  # a quiet topic is polled this often: the wait adds to every viewer's staleness


@web.middleware
async def _any_origin(request: web.Request, handler: Any) -> web.StreamResponse:
    """Viewer endpoints answer any origin: a page served by one node connects to (or is
    redirected to) another node, and access is by token in the query, never by cookie."""
    if not request.path.startswith("/v1/"):
        return cast(web.StreamResponse, await handler(request))
    try:
        response = cast(web.StreamResponse, await handler(request))
    except web.HTTPException as exc:
        exc.headers["Access-Control-Allow-Origin"] = "*"
        raise
    if not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = "*"
    return response


def sse_push(out: Outgoing) -> bytes:
    """A push as one chunk of the SSE response; the event's id is channel:seq, so that EventSource's
    Last-Event-ID resumes where it stopped."""
    event_id = f"{out.channel}:{out.seq}" if out.type in ("snapshot", "update") else None
    return http_chunk(sse_event(out.type, out.data, event_id))


class Refused(Exception):
    """A request the node does not serve; `status` for SSE, `reason` for both."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class Viewer:
    """One connection. Identity is the object: one viewer id may hold several connections."""

    __slots__ = ("claims", "done", "sse", "transport", "ws")

    def __init__(
        self,
        claims: tokens.Claims,
        transport: asyncio.Transport,
        ws: web.WebSocketResponse | None,
    ) -> None:
        self.claims = claims
        self.transport = transport
        self.ws = ws
        self.sse = ws is None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def kind(self) -> str:
        return "sse" if self.sse else "ws"


class BroadcastNode:
    tier = "broadcast"

    def __init__(self, topology: Topology, settings: Settings) -> None:
        self.topology = topology
        self.settings = settings
        self.kafka = kafka.connection_from(settings)
        self.node_id = settings.instance
        self.labels = (topology.name, self.tier, settings.instance)
        self.log = obs.log(topology=topology.name, tier=self.tier, instance=settings.instance)
        self.secret = settings.broadcast_secret.get_secret_value().encode()
        self.guard = auth.Guard.from_settings(settings)  # the dashboard and /api: operators, or viewers' own
        self.updates_topic = topology.topic("updates")
        self.feed_topic = topology.topic("feed")
        likes = "likes" if any(m.name == "likes" for m in topology.metrics) else None
        board = leaderboard_metric(topology)
        self.fanout: Fanout[Viewer] = Fanout(
            FanoutConfig(
                push_rate=settings.broadcast_push_rate,
                max_blocked_s=settings.broadcast_max_blocked_s,
                comment_rate=settings.broadcast_comment_rate,
                reorder_wait_s=settings.broadcast_reorder_wait_ms / 1000,
                likes_metric=likes or (board.name if board else None),
            ),
            feed_types=topology.feed_types,
        )
        self.max_lag = settings.broadcast_max_lag_bytes
        self.redis = redis_client.connect(settings)
        self.reader = Reader(topology, self.redis)  # snapshots (and the dashboard) read through it
        # the channels' recent comments, read with a channel's first snapshot (written by the root)
        self.comment_history = CommentHistory(self.redis, topology.name, history_policy(settings))
        self._update_ts: dict[str, int] = {}  # channel -> newest update not yet pushed (ms): the push age
        # the dashboard's series read buckets past Redis' retention from the sink's PostgreSQL
        self.history = PostgresHistory(topology, settings.postgres) if settings.postgres else None
        self.url = settings.broadcast_public_url
        self.registry: NodeRegistry | None = None
        self.ring = Ring({})
        self.viewers: set[Viewer] = set()
        self.counts: dict[str, int] = {
            "pushes": 0,
            "updates_in": 0,
            "comments_in": 0,
            "slow_disconnected": 0,
            "redirects": 0,
            "refused": 0,
            "violations": 0,
        }
        self.refused: dict[str, int] = {}
        self.update_age_ms = 0.0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._resyncs_seen = 0
        self._m_pushes = {t: PUSHES.labels(*self.labels, t) for t in ("snapshot", "update", "comments")}
        self._m_viewers = {t: VIEWERS.labels(*self.labels, t) for t in ("ws", "sse")}
        self._push_age = obs.PUSH_AGE_SECONDS.labels(*self.labels)

    # --- lifecycle -----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if not self.secret:
            raise SystemExit("a broadcast node needs PIPELINE_BROADCAST_SECRET (the viewer token secret)")
        _raise_fd_limit()
        await kafka.ensure_topics(self.kafka, kafka.topology_topics(self.topology))
        await retrying(self.redis.ping)  # a node may start while Redis restarts: wait for it
        consumer = await self._start_consumer()
        try:
            port = await self._start_http()
            self.url = self.url or f"http://{self.settings.broadcast_host}:{port}"
            self.registry = NodeRegistry(
                self.redis, self.topology.name, self.node_id, self.url, self.settings.broadcast_node_ttl_s
            )
            self.ring = await retrying(self.registry.heartbeat)
            self.log.info("started", url=self.url, nodes=sorted(self.ring.urls))
            loops = [
                asyncio.create_task(self._consume(consumer, stop)),
                asyncio.create_task(self._pump(stop)),
                asyncio.create_task(self._membership(stop)),
                asyncio.create_task(self._keepalive(stop)),
            ]
            try:
                await stop.wait()
            finally:
                for task in loops:
                    task.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
                await self._shutdown()
        finally:
            await consumer.stop()
            await self.redis.aclose()
            if self.history is not None:
                await self.history.aclose()
            self.log.info("stopped", **self.counts)

    async def _shutdown(self) -> None:
        if self.registry is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.registry.leave()
        for viewer in list(self.viewers):
            self._end(viewer, WSCloseCode.GOING_AWAY, "node stopping")
        if self._tasks:  # the close frames, so that pages reconnect through /v1/route at once
            await asyncio.wait(list(self._tasks), timeout=SHUTDOWN_CLOSE_S)
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _start_consumer(self) -> AIOKafkaConsumer:
        """Every partition of both topics, from the end; positions resolved before any viewer comes."""
        consumer = AIOKafkaConsumer(
            **self.kafka.client_kwargs(),
            group_id=None,
            client_id=f"{self.topology.group(self.tier)}.{self.node_id}",
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level="read_committed",  # the feed is written inside tier 1's transactions
            max_poll_records=self.settings.max_poll_records,
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await kafka.start(consumer)
        parts = self.topology.partitions.updates  # topology_topics gives the feed as many
        assigned = [TopicPartition(t, p) for t in (self.updates_topic, self.feed_topic) for p in range(parts)]
        consumer.assign(assigned)
        await consumer.seek_to_end(*assigned)
        for tp in assigned:
            await consumer.position(tp)
        return consumer

    async def _start_http(self) -> int:
        app = web.Application(middlewares=[_any_origin])
        app.router.add_get("/v1/route", self._route)
        app.router.add_get("/v1/ws", self._ws)
        app.router.add_get("/v1/sse", self._sse)
        app.router.add_get("/v1/node", self._node)
        app.router.add_get("/api/dev-token", self.guard.operator(self._dev_token))
        self._mount_pages(app)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.broadcast_host, self.settings.broadcast_port, backlog=4096)
        await site.start()
        self._runner = runner
        port: int = runner.addresses[0][1]
        return port

    def _mount_pages(self, app: web.Application) -> None:
        """The pages and the JSON query API (pipeline/web/), when they are there."""
        try:
            from pipeline.web import dashboard
        except ImportError:
            dashboard = None  # type: ignore[assignment]
        if dashboard is not None:
            dashboard.setup(app, self.topology, self.redis, self.guard, self.history)
        if not STATIC_DIR.is_dir():
            return
        taken = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
        pages = {"/": "index.html", "/dashboard": "dashboard.html"}
        pages.update({f"/{p.name}": p.name for p in STATIC_DIR.iterdir() if p.is_file()})
        for path, name in pages.items():
            if path not in taken and (STATIC_DIR / name).is_file():
                serve = _static(STATIC_DIR / name)
                # the viewer page is public (it holds no data); the dashboard's files are for operators
                app.router.add_get(path, self.guard.page(serve) if name.startswith("dashboard") else serve)

    # --- HTTP endpoints ------------------------------------------------------

    async def _route(self, request: web.Request) -> web.Response:
        viewer = request.query.get("viewer", "")
        if not viewer:
            return _json({"type": "error", "reason": "viewer=ID is required"}, 400)
        node = self.ring.owner(viewer) or self.node_id
        return _json({"node_id": node, "url": self.ring.urls.get(node, self.url)})

    async def _node(self, request: web.Request) -> web.Response:
        ws = sum(1 for v in self.viewers if not v.sse)
        return _json(
            {
                "node_id": self.node_id,
                "url": self.url,
                "nodes": sorted(self.ring.urls),
                "viewers": {"ws": ws, "sse": len(self.viewers) - ws},
                "channels": self.fanout.channels,
                "resyncs": self.fanout.resyncs,
                "stale_updates": self.fanout.stale_updates,
                "refused_by_reason": self.refused,
                "update_age_ms": round(self.update_age_ms, 1),
                **self.counts,
            }
        )

    async def _dev_token(self, request: web.Request) -> web.Response:
        if not self.settings.broadcast_dev_tokens:
            raise web.HTTPNotFound(text="development tokens are off")
        channels = parse_channels(request.query.get("channels")) or [tokens.ALL_CHANNELS]
        viewer = request.query.get("viewer") or f"dev-{uuid.uuid4().hex[:12]}"
        expires = int(time.time()) + DEV_TOKEN_TTL_S
        token = tokens.issue(self.secret, viewer, channels, expires)
        return _json({"token": token, "viewer": viewer, "channels": channels, "exp": expires})

    def _admit(self, query: Any, need_channels: bool) -> tuple[tokens.Claims, list[str], dict[str, int]]:
        """Token, channels and `since` of a connection, or Refused."""
        try:
            claims = tokens.verify(self.secret, query.get("token"), time.time())
        except tokens.TokenRefused as exc:
            raise self._refuse(exc) from None
        channels = parse_channels(query.get("channels"))
        if need_channels and not channels:
            raise Refused(400, "bad_request", "channels=a,b is required")
        self._check_channels(claims, channels, 0)
        try:
            since = parse_since(query.get("since"))
        except ValueError as exc:
            raise Refused(400, "bad_request", str(exc)) from None
        return claims, channels, since

    def _check_channels(self, claims: tokens.Claims, channels: list[str], already: int) -> None:
        bad = next((c for c in channels if not valid_channel(c)), None)
        if bad is not None:
            raise Refused(400, "bad_request", f"bad channel name {bad[:64]!r}")
        if already + len(channels) > self.settings.broadcast_max_channels:
            raise Refused(
                400, "too_many_channels", f"at most {self.settings.broadcast_max_channels} channels"
            )
        try:
            claims.check_scope(channels)
        except tokens.TokenRefused as exc:
            raise self._refuse(exc) from None

    def _refuse(self, exc: tokens.TokenRefused) -> Refused:
        TOKENS_REFUSED.labels(*self.labels, exc.reason).inc()
        self.counts["refused"] += 1
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        return Refused(403 if exc.reason == tokens.OUT_OF_SCOPE else 401, exc.reason, exc.detail)

    def _owner_url(self, claims: tokens.Claims) -> str | None:
        """The URL of the node owning this viewer, when it is not this one."""
        owner = self.ring.owner(claims.viewer)
        if owner is None or owner == self.node_id:
            return None
        return self.ring.urls.get(owner)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            max_msg_size=self.settings.broadcast_max_message_bytes, compress=False, heartbeat=WS_HEARTBEAT_S
        )
        await ws.prepare(request)
        transport = request.transport
        try:
            claims, channels, since = self._admit(request.query, need_channels=False)
        except Refused as exc:
            await ws.send_str(error_message(exc.detail).data.decode())
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=exc.reason.encode())
            return ws
        elsewhere = self._owner_url(claims)
        if elsewhere is not None:
            REDIRECTS.labels(*self.labels, "ws").inc()
            self.counts["redirects"] += 1
            await ws.send_str(redirect_message(elsewhere).data.decode())
            await ws.close(code=WSCloseCode.OK, message=b"redirect")
            return ws
        if transport is None or transport.is_closing():
            return ws
        viewer = Viewer(claims, transport, ws)
        self._join(viewer, channels, since)
        limiter = AsyncLimiter(self.settings.broadcast_client_messages_per_s, 1.0)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    if not limiter.has_capacity():
                        await self._violation(viewer, "rate", "too many messages")
                        break
                    await limiter.acquire()
                    if not await self._on_client_message(viewer, msg.data):
                        break
                elif msg.type is WSMsgType.BINARY:
                    await self._violation(
                        viewer, "binary", "text messages only", WSCloseCode.UNSUPPORTED_DATA
                    )
                    break
            if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
                VIOLATIONS.labels(*self.labels, "size").inc()
                self.counts["violations"] += 1
        finally:
            self._leave(viewer)
        return ws

    async def _on_client_message(self, viewer: Viewer, text: str) -> bool:
        """subscribe / unsubscribe; False when the connection is closed for it."""
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            await self._violation(viewer, "bad_message", "messages are JSON objects")
            return False
        kind = msg.get("type") if isinstance(msg, dict) else None
        channels = msg.get("channels") if isinstance(msg, dict) else None
        if kind not in ("subscribe", "unsubscribe") or not (
            isinstance(channels, list) and all(isinstance(c, str) for c in channels)
        ):
            await self._violation(
                viewer, "bad_message", 'expected {"type": "subscribe"|"unsubscribe", "channels": [...]}'
            )
            return False
        fanout = self.fanout
        if kind == "unsubscribe":
            for channel in channels:
                fanout.unsubscribe(viewer, channel)
            return True
        current = fanout.channels_of(viewer)
        new = [c for c in dict.fromkeys(channels) if c not in current]
        try:
            self._check_channels(viewer.claims, new, len(current))
        except Refused as exc:
            await self._violation(viewer, exc.reason, exc.detail)
            return False
        now = time.monotonic()
        for channel in new:
            fanout.subscribe(viewer, channel, None, now)
        self._wake.set()
        return True

    async def _violation(
        self, viewer: Viewer, reason: str, detail: str, code: WSCloseCode = WSCloseCode.POLICY_VIOLATION
    ) -> None:
        VIOLATIONS.labels(*self.labels, reason).inc()
        self.counts["violations"] += 1
        assert viewer.ws is not None
        self.fanout.remove(viewer)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await viewer.ws.send_str(error_message(detail).data.decode())
        await viewer.ws.close(code=code, message=reason.encode())

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        try:
            claims, channels, since = self._admit(request.query, need_channels=True)
        except Refused as exc:
            return _json({"type": "error", "reason": exc.detail}, exc.status)
        elsewhere = self._owner_url(claims)
        if elsewhere is not None:
            REDIRECTS.labels(*self.labels, "sse").inc()
            self.counts["redirects"] += 1
            raise web.HTTPTemporaryRedirect(elsewhere + request.path_qs)
        # EventSource resends the id of the last event it saw when it reconnects by itself
        with contextlib.suppress(ValueError):
            for channel, seq in parse_since(request.headers.get("Last-Event-ID")).items():
                if channel in channels and seq > since.get(channel, -1):
                    since[channel] = seq
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Access-Control-Allow-Origin": "*",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        transport = request.transport
        if transport is None or transport.is_closing():
            return response
        viewer = Viewer(claims, transport, None)
        self._join(viewer, channels, since)
        try:
            await viewer.done  # cancelled when the viewer goes away
        finally:
            self._leave(viewer)
        return response

    # --- viewers -------------------------------------------------------------

    def _join(self, viewer: Viewer, channels: list[str], since: dict[str, int]) -> None:
        self.viewers.add(viewer)
        self._m_viewers[viewer.kind].inc()
        now = time.monotonic()
        for channel in channels:
            self.fanout.subscribe(viewer, channel, since.get(channel), now)
        self._wake.set()

    def _leave(self, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.discard(viewer)
            self._m_viewers[viewer.kind].dec()
        self.fanout.remove(viewer)
        if not viewer.done.done():
            viewer.done.set_result(None)

    def _end(self, viewer: Viewer, code: WSCloseCode, reason: str, last: Outgoing | None = None) -> None:
        """Close a viewer from the node's side, after one last message if any."""
        self.fanout.remove(viewer)
        if viewer.ws is None:
            if last is not None and not viewer.transport.is_closing():
                viewer.transport.write(sse_push(last))
            if not viewer.done.done():
                viewer.done.set_result(None)
            return
        ws = viewer.ws

        async def close() -> None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                if last is not None:
                    await ws.send_str(last.data.decode())
                await ws.close(code=code, message=reason.encode())

        self._spawn(close())

    def _writable(self, viewer: Viewer) -> bool:
        t = viewer.transport
        return t.get_write_buffer_size() <= self.max_lag and not t.is_closing()

    def _deliver(self, groups: list[Group[Viewer]]) -> None:
        """Write each message to its viewers: encoded once per transport kind, never awaited."""
        for out, viewers in groups:
            ws: bytes | None = None
            sse: bytes | None = None
            for viewer in viewers:
                transport = viewer.transport
                if transport.is_closing():
                    continue
                if viewer.sse:
                    if sse is None:
                        sse = sse_push(out)
                    transport.write(sse)
                else:
                    if ws is None:
                        ws = text_frame(out.data)
                    transport.write(ws)
            metric = self._m_pushes.get(out.type)
            if metric is not None:
                metric.inc(len(viewers))
            if out.type == "update":
                ts_ms = self._update_ts.pop(out.channel, None)
                if ts_ms is not None:  # the first push of the channel's newest update
                    self._push_age.observe(max(0.0, time.time() - ts_ms / 1000))
            self.counts["pushes"] += len(viewers)

    def _drop_slow(self, viewer: Viewer) -> None:
        SLOW_VIEWERS.labels(*self.labels).inc()
        self.counts["slow_disconnected"] += 1
        self.log.info("slow viewer disconnected", viewer=viewer.claims.viewer, transport=viewer.kind)
        viewer.transport.abort()  # a close frame would sit behind the backlog
        if not viewer.done.done():
            viewer.done.set_result(None)

    # --- loops ---------------------------------------------------------------

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        fanout = self.fanout
        updates_in = UPDATES_IN.labels(*self.labels)
        comments_in = COMMENTS_IN.labels(*self.labels)
        update_age = UPDATE_AGE.labels(*self.labels)
        poller = kafka.Poller(consumer, self.settings.max_poll_records, self.settings.idle_backoff_ms / 1000)
        while not stop.is_set():
            batch = await poller.poll(IDLE_BACKOFF_S)
            if not batch:
                continue
            now = time.monotonic()
            for tp, records in batch.items():
                if tp.topic == self.updates_topic:
                    newest = 0
                    for r in records:
                        try:
                            update = ChannelUpdate.from_json(r.value)
                        except (ValueError, KeyError, TypeError):
                            continue
                        fanout.on_update(update, now)
                        newest = max(newest, update.ts_ms)
                        if fanout.channel_seq(update.channel) is not None:  # watched here: its push is timed
                            self._update_ts[update.channel] = update.ts_ms
                    if newest:
                        self.update_age_ms = time.time() * 1000 - newest
                        update_age.set(self.update_age_ms / 1000)
                    updates_in.inc(len(records))
                    self.counts["updates_in"] += len(records)
                else:
                    for r in records:
                        fanout.on_comment(r.value, now)
                    comments_in.inc(len(records))
                    self.counts["comments_in"] += len(records)
            self._wake.set()

    async def _pump(self, stop: asyncio.Event) -> None:
        """Push what is due, then sleep until the next thing is due or new input arrives."""
        fanout = self.fanout
        while not stop.is_set():
            self._wake.clear()
            self._start_reads()
            got = fanout.collect(time.monotonic(), self._writable, SENDS_PER_SLICE)
            if got.sends:
                self._deliver(got.sends)
            for viewer in got.disconnect:
                self._drop_slow(viewer)
            if fanout.resyncs != self._resyncs_seen:
                RESYNCS.labels(*self.labels).inc(fanout.resyncs - self._resyncs_seen)
                self._resyncs_seen = fanout.resyncs
            self._start_reads()
            due = fanout.next_due()
            timeout = MAX_WAKE_S if due is None else min(MAX_WAKE_S, due - time.monotonic())
            if timeout <= 0:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _start_reads(self) -> None:
        for request in self.fanout.take_snapshot_requests():
            self._spawn(self._read_snapshot(request))

    async def _read_snapshot(self, request: SnapshotRequest) -> None:
        try:
            snapshot = await self.reader.snapshot(request.channel)
            comments = (
                await self.comment_history.recent(request.channel, self.fanout.config.recent_comments)
                if self.topology.feed_types and self.fanout.channel_seq(request.channel) is None
                else []
            )
        except (RedisError, OSError) as exc:
            self.log.warning("snapshot read failed; retrying", channel=request.channel, error=repr(exc))
            await asyncio.sleep(SNAPSHOT_RETRY_S)
            self.fanout.on_snapshot_failed(request)
            self._wake.set()
            return
        self.fanout.seed_comments(request, comments)
        self._deliver(self.fanout.on_snapshot(request, snapshot, time.monotonic()))
        self._wake.set()

    async def _membership(self, stop: asyncio.Event) -> None:
        """Heartbeat; when the live set changes, send away the viewers that now belong elsewhere."""
        assert self.registry is not None
        every = self.settings.broadcast_node_ttl_s / 3
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return
            try:
                ring = await self.registry.heartbeat()
            except (RedisError, OSError) as exc:
                self.log.warning("heartbeat failed", error=repr(exc))
                continue
            if ring == self.ring:
                continue
            self.log.info("nodes changed", nodes=sorted(ring.urls))
            self.ring = ring
            for viewer in list(self.viewers):
                url = self._owner_url(viewer.claims)
                if url is not None:
                    REDIRECTS.labels(*self.labels, viewer.kind).inc()
                    self.counts["redirects"] += 1
                    self._end(viewer, WSCloseCode.OK, "redirect", redirect_message(url))

    async def _keepalive(self, stop: asyncio.Event) -> None:
        """An SSE comment now and then, so that idle proxies keep the stream and dead peers show."""
        ping = http_chunk(sse_comment("keepalive"))
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SSE_KEEPALIVE_S)
            for viewer in list(self.viewers):
                if viewer.sse and self._writable(viewer):
                    viewer.transport.write(ping)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _static(path: Path) -> Any:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve


def _raise_fd_limit() -> None:
    """One socket per viewer: take the hard limit on open files, not the often small soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

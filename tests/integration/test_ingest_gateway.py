"""The ingest gateway as a real process (`pipeline run live_likes --tier ingest`) in front of real
tier-1 and root workers: fuzzed bodies never get a 5xx, every good event of a mixed batch is counted
exactly once, retried ids are counted once, and keys, sizes and content types are checked."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from pipeline.read import Reader
from tests.integration.pipeline_harness import LedgerKey, Pipeline
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

API_KEY = "k-test-\u00e9"  # any characters, as configured
MAX_BODY = 64 * 1024
MAX_EVENTS = 300


@dataclass
class Gateway:
    """A gateway process and a keep-alive HTTP connection to it."""

    worker: WorkerProcess
    port: int
    conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(
        self, body: bytes, content_type: str = "application/json", key: str | None = API_KEY
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"Content-Type": content_type}
        if key is not None:
            headers["X-API-Key"] = key
        status, hdrs, data = self.request("POST", "/v1/events", body, _latin1(headers))
        return status, hdrs, orjson.loads(data)

    def post_events(self, events: list[Any]) -> tuple[int, dict[str, str], Any]:
        return self.post(orjson.dumps(events))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.worker.running:
                raise AssertionError(f"gateway exited:\n{self.worker.log_tail(30)}")
            try:
                status, _, _ = self.request("GET", "/healthz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"gateway not ready:\n{self.worker.log_tail(30)}")


def _latin1(headers: dict[str, str]) -> dict[str, str]:
    """http.client sends header values as latin-1: pass UTF-8 bytes through that way."""
    return {k: v.encode().decode("latin-1") for k, v in headers.items()}


def start_gateway(
    servers: Endpoints, name: str, log_dir: Path, instance: str = "g1", **env: str | int
) -> Gateway:
    port = free_port()
    extra = {"PIPELINE_INGEST_PORT": str(port), **{f"PIPELINE_{k.upper()}": str(v) for k, v in env.items()}}
    worker = WorkerProcess(
        "live_likes",
        "ingest",
        instance,
        servers.kafka_bootstrap,
        servers.redis_url,
        log_dir,
        name=name,
        extra_env=extra,
    )
    gateway = Gateway(worker.start(), port)
    gateway.wait_ready()
    return gateway


@dataclass
class Stack:
    pipe: Pipeline
    gateway: Gateway
    name: str
    log_dir: Path
    ids: itertools.count[int] = field(default_factory=itertools.count)


@pytest_asyncio.fixture(scope="module")
async def stack(servers: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    import uuid

    name = "t" + uuid.uuid4().hex[:10]
    log_dir = tmp_path_factory.mktemp("ingest")
    topology = TOPOLOGY.renamed(name)
    pipe = Pipeline(servers, topology, "live_likes", log_dir)
    await pipe.create_topics()
    pipe.add("coalesce", "c1")
    pipe.add("merge", "m1")
    gateway = start_gateway(
        servers,
        name,
        log_dir,
        ingest_api_keys=f"{API_KEY},k-other",
        ingest_max_body_bytes=MAX_BODY,
        ingest_max_events=MAX_EVENTS,
        split_threshold_eps=50,  # the fuzz's hot keys get split too
        ingest_cors_origins="https://app.example",
        split_budget_eps=25,
    )
    pipe.workers.append(gateway.worker)
    try:
        yield Stack(pipe, gateway, name, log_dir)
    finally:
        gateway.close()
        pipe.stop()


# -- the front door -----------------------------------------------------------------------------


def test_openapi_document_describes_the_endpoint(stack: Stack) -> None:
    status, headers, body = stack.gateway.request("GET", "/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = orjson.loads(body)
    assert doc["openapi"].startswith("3.")
    post = doc["paths"]["/v1/events"]["post"]
    assert {"202", "400", "401", "403", "413", "415", "429", "503"} <= set(post["responses"])
    assert set(doc["components"]["schemas"]["Event"]["properties"]["type"]["enum"]) == {"like", "comment"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-API-Key": "wrong"}, 403),
        ({"Authorization": "Bearer wrong"}, 403),
        ({"Authorization": "Basic " + API_KEY}, 401),
        ({"X-API-Key": API_KEY[:-1]}, 403),
        ({"X-API-Key": API_KEY + "x"}, 403),
        ({"Authorization": "Bearer " + API_KEY}, 202),
        ({"authorization": "bearer k-other"}, 202),
        ({"X-API-Key": API_KEY}, 202),
    ],
)
def test_api_keys(stack: Stack, headers: dict[str, str], status: int) -> None:
    body = orjson.dumps([{"type": "like", "key": "auth-check", "channel": "auth"}])
    got, hdrs, data = stack.gateway.request(
        "POST", "/v1/events", body, _latin1({"Content-Type": "application/json", **headers})
    )
    assert got == status, data
    if status == 401:
        assert "bearer" in hdrs.get("www-authenticate", "").lower()
    if status in (401, 403):
        assert "accepted" not in orjson.loads(data)


def test_a_mixed_batch_accepts_the_good_events_and_names_field_and_reason_of_the_bad(stack: Stack) -> None:
    status, _, body = stack.gateway.post_events(
        [
            {"type": "like", "key": "m1", "channel": "v", "id": "mixed-1"},
            {"type": "like", "channel": "v"},
            {"type": "nope", "key": "m2"},
            {"type": "like", "key": "m3", "value": "x"},
            {"type": "comment", "key": "m4", "channel": "v", "user": "u1", "text": "hi"},
            [1, 2],
        ]
    )
    assert status == 202
    assert (body["accepted"], body["rejected"], body["shed"]) == (2, 4, 0)
    results = body["results"]
    assert [r["status"] for r in results] == [
        "accepted",
        "rejected",
        "rejected",
        "rejected",
        "accepted",
        "rejected",
    ]
    assert results[0]["id"] == "mixed-1"
    assert len(results[4]["id"]) == 32  # generated and returned
    assert [results[i]["field"] for i in (1, 2, 3)] == ["key", "type", "value"]
    assert all(results[i]["reason"] for i in (1, 2, 3, 5))


def test_a_batch_of_only_bad_events_is_400_with_each_reason(stack: Stack) -> None:
    status, _, body = stack.gateway.post_events([{"type": "like"}, {"key": "k"}])
    assert status == 400
    assert body["accepted"] == 0
    assert [r["field"] for r in body["results"]] == ["key", "type"]


def test_an_empty_id_is_refused_not_taken_for_an_id(stack: Stack) -> None:
    """Three different likes with "id": "" were once all acknowledged and counted once."""
    likes = [{"type": "like", "key": f"empty-{i}", "channel": "e", "id": ""} for i in range(3)]
    status, _, body = stack.gateway.post_events(likes)
    assert status == 400 and body["accepted"] == 0
    assert [(r["status"], r["field"]) for r in body["results"]] == [("rejected", "id")] * 3
    assert "must not be empty" in body["results"][0]["reason"]


@pytest.mark.parametrize(
    ("ctype", "status"),
    [("text/plain", 415), ("application/xml", 415), ("multipart/form-data", 415), ("", 415)],
)
def test_wrong_content_types_are_415(stack: Stack, ctype: str, status: int) -> None:
    got, _, body = stack.gateway.post(b'[{"type":"like","key":"k"}]', ctype)
    assert got == status and "Content-Type" in body["error"]


def test_ndjson_rejects_bad_lines_alone(stack: Stack) -> None:
    body = b'{"type":"like","key":"nd1","channel":"v"}\n\n{not json\n{"type":"like","key":"nd2"}\r\n'
    status, _, answer = stack.gateway.post(body, "application/x-ndjson")
    assert status == 202
    assert [r["status"] for r in answer["results"]] == ["accepted", "rejected", "accepted"]


def test_size_limits_are_413(stack: Stack) -> None:
    big = orjson.dumps([{"type": "like", "key": "k" * 200, "channel": "c" * 200}] * 200)
    assert len(big) > MAX_BODY
    status, _, body = stack.gateway.post(big)
    assert status == 413 and "limit" in body["error"]
    many = orjson.dumps([{"type": "like", "key": "k"}] * (MAX_EVENTS + 1))
    assert len(many) < MAX_BODY
    status, _, body = stack.gateway.post(many)
    assert status == 413


def test_browsers_of_allowed_origins_only_pass_cors(stack: Stack) -> None:
    ask = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    status, headers, _ = stack.gateway.request("OPTIONS", "/v1/events", headers=ask)
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    assert "x-api-key" in headers["access-control-allow-headers"].lower()
    status, headers, _ = stack.gateway.request(
        "OPTIONS", "/v1/events", headers={**ask, "Origin": "https://evil"}
    )
    assert status == 403 and "access-control-allow-origin" not in headers
    body = orjson.dumps([{"type": "like", "key": "cors", "channel": "auth"}])
    for origin, allowed in (("https://app.example", True), ("https://evil", False)):
        hdrs = {"Content-Type": "application/json", "X-API-Key": API_KEY, "Origin": origin}
        status, headers, _ = stack.gateway.request("POST", "/v1/events", body, _latin1(hdrs))
        assert status == 202 and ("access-control-allow-origin" in headers) == allowed


def test_healthz_and_metrics(stack: Stack) -> None:
    status, _, body = stack.gateway.request("GET", "/healthz")
    assert status == 200 and orjson.loads(body)["broker"] is True
    status, _, body = stack.gateway.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    for name in (
        "pipeline_ingest_accepted_total",
        "pipeline_ingest_rejected_total",
        "pipeline_ingest_requests_total",
        "pipeline_ingest_tier1_lag",
    ):
        assert name in text


# -- fuzz, and exactly-once end to end -----------------------------------------------------------

FUZZ_CHANNEL = "fz:"
INT64 = st.integers(-(2**63), 2**63 - 1)
KEY_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
KEYS = st.one_of(KEY_TEXT, st.sampled_from(["\xff", "hot", "a:b", "k\x00", "{x}", "é☃"]))


@st.composite
def good_events(draw: st.DrawFn) -> dict[str, Any]:
    # channels all start with "fz:" so the check can tell the fuzz's totals from other tests'
    channel = FUZZ_CHANNEL + draw(st.one_of(KEY_TEXT, st.just("")))
    ev: dict[str, Any] = {"type": draw(st.sampled_from(["like", "like", "comment"])), "key": draw(KEYS)}
    ev["channel"] = channel
    if draw(st.booleans()):
        ev["id"] = None  # the test gives it a unique id
    if draw(st.integers(0, 4)) == 0:
        ev["user"] = draw(KEY_TEXT)
    if draw(st.integers(0, 4)) == 0:
        ev["value"] = draw(st.integers(-1000, 1000))
    return ev


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), INT64, st.floats(allow_nan=False, allow_infinity=False), KEY_TEXT
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY_TEXT, inner, max_size=3),
    max_leaves=6,
)
BAD_EVENTS = st.one_of(
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)),
    st.fixed_dictionaries({"type": st.just("like")}),
    st.fixed_dictionaries({"type": st.just("like"), "key": st.just("")}),
    st.fixed_dictionaries({"type": st.just("like"), "key": st.text(min_size=257, max_size=300)}),
    st.fixed_dictionaries({"type": KEY_TEXT.filter(lambda t: t not in ("like", "comment")), "key": KEY_TEXT}),
    st.fixed_dictionaries({"type": st.just("like"), "key": INT64}),
    st.fixed_dictionaries({"type": st.just("like"), "key": KEY_TEXT, "value": st.just(1e16)}),
    st.fixed_dictionaries({"type": st.just("like"), "key": KEY_TEXT, "value": KEY_TEXT}),
    st.fixed_dictionaries({"type": st.just("like"), "key": KEY_TEXT, "ts": st.integers(-(2**63), -1)}),
    st.fixed_dictionaries({"type": st.just("like"), "key": KEY_TEXT, "sub": st.integers(-5, -1)}),
    st.fixed_dictionaries(
        {"type": st.just("like"), "key": KEY_TEXT, "id": st.text(min_size=129, max_size=140)}
    ),
    st.fixed_dictionaries({"type": st.just("like"), "key": KEY_TEXT, "id": INT64}),
)
RAW_BODIES = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 6000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1100, 3000).map(lambda n: b'[{"type":"like","key":"deep","x":' + b"[" * n + b"]" * n + b"}]"),
    st.sampled_from(
        [
            b'[{"type":"like","key":"huge","value":1e999}]',
            b'[{"type":"like","key":"huge","ts":123456789012345678901234567890}]',
            b'[{"type":"like","key":"huge","value":-' + b"9" * 400 + b"}]",
            b'[{"type":"like","key":"\xff\xfe"}]',
            b'[{"type":"like","key":"\\ud800"}]',
            b"\xef\xbb\xbf[]",
            b"[]",
            b"{}",
            b"null",
            b'"events"',
        ]
    ),
)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "application/x-ndjson", "text/plain", "", "a/b"]
)


@dataclass
class Ledger:
    """What the pipeline must end up counting: each accepted id once."""

    likes: Counter[LedgerKey] = field(default_factory=Counter)
    comments: Counter[LedgerKey] = field(default_factory=Counter)
    counted_ids: set[str] = field(default_factory=set)
    accepted: list[dict[str, Any]] = field(default_factory=list)  # sent events with their ids, to retry

    def count(self, event: dict[str, Any], event_id: str) -> None:
        self.accepted.append({**event, "id": event_id})
        if event_id in self.counted_ids:
            return
        self.counted_ids.add(event_id)
        target = self.likes if event["type"] == "like" else self.comments
        target[(event.get("channel", ""), event["key"])] += 1


async def test_fuzzed_bodies_never_5xx_and_good_events_count_exactly_once(stack: Stack) -> None:
    gateway = stack.gateway
    ledger = Ledger()
    seen_statuses: Counter[int] = Counter()

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        kind=st.sampled_from(["batch", "batch", "batch", "ndjson", "raw"]),
        good=st.lists(good_events(), max_size=12),
        bad=st.lists(BAD_EVENTS, max_size=4),
        order=st.randoms(use_true_random=False),
        retries=st.lists(st.integers(0, 10**6), max_size=4),
        raw=RAW_BODIES,
        ctype=CONTENT_TYPES,
    )
    def one_request(
        kind: str,
        good: list[dict[str, Any]],
        bad: list[Any],
        order: Any,
        retries: list[int],
        raw: bytes,
        ctype: str,
    ) -> None:
        for ev in good:
            if "id" in ev:
                ev["id"] = f"fz\xff-{stack.name}-{next(stack.ids)}"  # unique, with any characters
        again = [ledger.accepted[i % len(ledger.accepted)] for i in retries] if ledger.accepted else []
        items: list[tuple[bool, Any]] = [(True, e) for e in good + again] + [(False, b) for b in bad]
        order.shuffle(items)
        if kind == "raw":
            status, _, body = gateway.post(raw, ctype)
            seen_statuses[status] += 1
            # (a raw body may happen to hold valid events; its channels are not the fuzz's: not checked)
            assert status in (202, 400, 415), body
            return
        if kind == "ndjson":
            payload = b"\n".join(orjson.dumps(v) for _, v in items)
            status, _, body = gateway.post(payload, "application/x-ndjson")
        else:
            status, _, body = gateway.post(orjson.dumps([v for _, v in items]))
        seen_statuses[status] += 1
        assert status < 500, body
        if not items:
            assert status == 400
            return
        assert status in (202, 400), body
        results = body["results"]
        assert len(results) == len(items) and [r["index"] for r in results] == list(range(len(items)))
        assert body["accepted"] + body["rejected"] == len(items)
        for (is_good, ev), result in zip(items, results, strict=True):
            if is_good:
                assert result["status"] == "accepted", (ev, result)
                if ev.get("id") is not None:
                    assert result["id"] == ev["id"]
                ledger.count(ev, result["id"])
            else:
                assert result["status"] == "rejected", (ev, result)
                assert result["reason"]
        assert status == (202 if any(g for g, _ in items) else 400)

    one_request()
    gateway.close()
    assert seen_statuses[202] > 20  # the fuzz reached the pipeline, not only the error paths
    for metric, want in (("likes", ledger.likes), ("comments", ledger.comments)):
        got = await wait_for_channels(stack, metric, FUZZ_CHANNEL, want)
        wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        extra = {k: v for k, v in got.items() if k not in want}
        assert not wrong and not extra, (metric, list(wrong.items())[:5], list(extra.items())[:5])


async def wait_for_channels(
    stack: Stack, metric: str, prefix: str, want: Counter[LedgerKey], timeout_s: float = 30.0
) -> dict[LedgerKey, float]:
    """Totals of the channels starting with `prefix`, once they equal `want` (or at the timeout)."""
    client = aioredis.Redis.from_url(stack.pipe.servers.redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            every = await Reader(stack.pipe.topology, client).key_totals(metric)
            got = {k: v for k, v in every.items() if k[0].startswith(prefix)}
            if got == dict(want) or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.3)
    finally:
        await client.aclose()


async def test_retried_ids_are_acknowledged_and_counted_once(stack: Stack) -> None:
    """Runs after the fuzz (same topology): a batch sent twice, in another order, counts once."""
    batch = [{"type": "like", "key": "retry-hot", "channel": "r", "id": f"retry-{i}"} for i in range(120)] + [
        {"type": "comment", "key": "retry-c", "channel": "r", "id": "retry-comment", "user": "u"}
    ]
    status, _, first = stack.gateway.post_events(batch)
    assert status == 202 and first["accepted"] == len(batch)
    status, _, second = stack.gateway.post_events(list(reversed(batch)))
    assert status == 202 and second["accepted"] == len(batch)
    assert {r["id"] for r in first["results"]} == {r["id"] for r in second["results"]}
    assert await wait_for_channels(stack, "likes", "r", Counter({("r", "retry-hot"): 120})) == {
        ("r", "retry-hot"): 120
    }
    assert await wait_for_channels(stack, "comments", "r", Counter({("r", "retry-c"): 1})) == {
        ("r", "retry-c"): 1
    }


async def test_two_sources_that_reuse_an_id_are_both_counted(stack: Stack) -> None:
    """Ids are scoped by API key: two applications numbering their events 1, 2, 3 count both."""
    event = [{"type": "like", "key": "scoped", "channel": "src-scope", "id": "order-1"}]
    for key in (API_KEY, "k-other"):
        status, _, body = stack.gateway.post(orjson.dumps(event), key=key)
        assert status == 202 and body["results"][0]["id"] == "order-1"
    status, _, body = stack.gateway.post(orjson.dumps(event), key="k-other")  # a retry of the second
    assert status == 202
    expected = Counter({("src-scope", "scoped"): 2})
    assert await wait_for_channels(stack, "likes", "src-scope", expected) == dict(expected)
    await asyncio.sleep(1.0)  # settle: the retry must not show up late
    assert await wait_for_channels(stack, "likes", "src-scope", expected) == dict(expected)

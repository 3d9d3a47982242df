"""Who can read the dashboard API of a real broadcast node (a worker process): every /api route
and page without a credential (401), with a wrong one (403), with a viewer token (its channels
only, nothing pipeline-wide) and with the operator key (everything); and the browser sign-in."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web

from pipeline.core import tokens
from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from pipeline.web import auth, dashboard
from tests.integration.test_dashboard_api import apply_events
from topologies.analytics import TOPOLOGY as ANALYTICS

pytestmark = pytest.mark.integration

A, B = "site-a", "site-b"
OPERATOR_KEY = "op-key-" + uuid.uuid4().hex
NODE_START_TIMEOUT_S = 30.0


def routes(channel: str) -> dict[str, str]:
    """Every /api route, by name, with a query about `channel` where it takes one."""
    return {
        "topologies": "/api/topologies",
        "channels": "/api/channels",
        "totals": f"/api/totals?metric=views&channel={channel}",
        "totals_all": "/api/totals?metric=views",
        "top": f"/api/top?metric=views&channel={channel}&n=5",
        "series": f"/api/series?metric=views&channel={channel}&size=60&points=5",
        "splits": "/api/splits",
        "stats": "/api/stats",
        "dev_token": f"/api/dev-token?channels={channel}",
    }


PAGES = ["/dashboard", "/dashboard.js", "/dashboard.html"]
VIEWER_MAY = {"topologies", "channels", "totals", "top", "series"}  # about its own channel


@dataclass
class Node:
    url: str
    secret: str
    worker: WorkerProcess


async def start_node(servers: Endpoints, name: str, log_dir: Path, dev_tokens: bool) -> Node:
    port = free_port()
    secret = uuid.uuid4().hex
    worker = WorkerProcess(
        "analytics",
        "broadcast",
        f"b{port}",
        servers.kafka_bootstrap,
        servers.redis_url,
        log_dir,
        name=name,
        extra_env={
            "PIPELINE_BROADCAST_PORT": str(port),
            "PIPELINE_BROADCAST_SECRET": secret,
            "PIPELINE_BROADCAST_DEV_TOKENS": str(dev_tokens).lower(),
            "PIPELINE_OPERATOR_API_KEYS": f"other-key,{OPERATOR_KEY}",
        },
    )
    worker.start()
    node = Node(f"http://127.0.0.1:{port}", secret, worker)
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(node.url + "/v1/node") as response:
                    if response.status == 200:
                        return node
            except aiohttp.ClientError:
                pass
            if not worker.running or time.monotonic() > deadline:
                raise RuntimeError(f"broadcast node did not start\n{worker.log_tail(30)}")
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module")
async def node(servers: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    name = "t" + uuid.uuid4().hex[:10]
    topology = ANALYTICS.renamed(name)
    now_ms = int(time.time() * 1000)
    events = [{"type": "page_view", "key": "/home", "channel": A, "user": "u1", "ts": now_ms}] * 3
    events += [{"type": "page_view", "key": "/secret", "channel": B, "user": "u2", "ts": now_ms}] * 5
    await apply_events(servers.redis_url, topology, events)
    started = await start_node(servers, name, tmp_path_factory.mktemp("auth"), dev_tokens=True)
    try:
        yield started
    finally:
        started.worker.stop()


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        body = await response.read()
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, body


def viewer_token(node: Node, *channels: str, expires: int | None = None, secret: str | None = None) -> str:
    exp = expires if expires is not None else int(time.time()) + 600
    return tokens.issue((secret or node.secret).encode(), "viewer-a", list(channels), exp)


def test_the_table_names_every_api_route() -> None:
    """A route added to the dashboard without being tried here fails this test."""
    app = web.Application()
    dashboard.setup(app, ANALYTICS, aioredis.Redis(), auth.Guard([], b"secret"))
    mounted = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    tried = {path.split("?")[0] for path in routes(A).values()}
    assert {p for p in mounted if p.startswith("/api/")} | {"/api/dev-token"} == tried
    assert {"/dashboard", "/dashboard.js"} <= mounted


async def test_without_a_credential_every_route_and_page_is_401(node: Node) -> None:
    for path in [*routes(A).values(), *PAGES]:
        status, body = await get(node.url + path)
        assert status == 401, (path, body)
    async with aiohttp.ClientSession() as session, session.get(node.url + "/api/stats") as response:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": OPERATOR_KEY + "x"},
        {"X-API-Key": "wrong", "Authorization": f"Bearer {OPERATOR_KEY}"},  # a wrong one is never outvoted
    ],
)
async def test_a_wrong_credential_is_403_everywhere(node: Node, headers: dict[str, str]) -> None:
    for path in [*routes(A).values(), *PAGES]:
        status, body = await get(node.url + path, headers)
        assert status == 403, (path, body)


@pytest.mark.parametrize("how", ["bearer", "query"])
async def test_a_viewer_token_reads_its_channels_and_nothing_else(node: Node, how: str) -> None:
    token = viewer_token(node, A)

    async def ask(path: str) -> tuple[int, Any]:
        if how == "bearer":
            return await get(node.url + path, {"Authorization": f"Bearer {token}"})
        return await get(node.url + path + ("&" if "?" in path else "?") + f"token={token}")

    own, other = routes(A), routes(B)
    for name, path in own.items():
        status, body = await ask(path)
        assert status == (200 if name in VIEWER_MAY else 403), (path, body)
    for name, path in other.items():
        status, body = await ask(path)
        assert status == (200 if name in {"topologies", "channels"} else 403), (path, body)
    for page in PAGES:
        assert (await ask(page))[0] == 403

    _, channels = await ask("/api/channels")
    assert [c["channel"] for c in channels["channels"]] == [A] and channels["count"] == 1
    _, totals = await ask(own["totals"])
    assert totals["values"] == {"/home": 3}
    _, top = await ask(own["top"])
    assert top["top"] == [["/home", 3]]
    _, series = await ask(own["series"])
    assert series["points"][-1][1] == 3


async def test_refused_viewer_tokens(node: Node) -> None:
    for token in (
        viewer_token(node, A, expires=int(time.time()) - 1),  # expired
        viewer_token(node, A, secret="another secret"),  # not signed by this node's secret
        viewer_token(node, A)[:-2],  # tampered
    ):
        status, body = await get(node.url + routes(A)["totals"], {"Authorization": f"Bearer {token}"})
        assert status == 403, body


async def test_a_token_for_every_channel_still_reads_nothing_pipeline_wide(node: Node) -> None:
    token = viewer_token(node, tokens.ALL_CHANNELS)
    headers = {"Authorization": f"Bearer {token}"}
    assert (await get(node.url + routes(B)["totals"], headers))[0] == 200
    for name in ("splits", "stats", "dev_token", "totals_all"):
        assert (await get(node.url + routes(A)[name], headers))[0] == 403, name


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
async def test_the_operator_key_reads_everything(node: Node, header: str) -> None:
    headers = {header: OPERATOR_KEY if header == "X-API-Key" else f"Bearer {OPERATOR_KEY}"}
    for channel in (A, B):
        for path in routes(channel).values():
            status, body = await get(node.url + path, headers)
            assert status == 200, (path, body)
    for page in PAGES:
        assert (await get(node.url + page, headers))[0] == 200
    _, channels = await get(node.url + "/api/channels", headers)
    assert sorted(c["channel"] for c in channels["channels"]) == [A, B]
    _, stats = await get(node.url + "/api/stats", headers)
    assert stats["stats"]["events"] == 8
    _, minted = await get(node.url + routes(A)["dev_token"], headers)
    assert tokens.verify(node.secret.encode(), minted["token"], time.time()).channels == {A}


async def test_signing_in_from_a_browser_sets_a_session_cookie(node: Node) -> None:
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        async with session.get(node.url + "/dashboard?metric=views") as response:
            assert response.status == 401
            assert 'action="/operator/login"' in await response.text()
        form = {"key": "wrong", "next": "/dashboard"}
        async with session.post(node.url + "/operator/login", data=form, allow_redirects=False) as response:
            assert response.status == 403
        assert len(jar) == 0
        form = {"key": OPERATOR_KEY, "next": "//evil.example/x"}
        async with session.post(node.url + "/operator/login", data=form, allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/dashboard"  # never off this server
            cookie = response.cookies[auth.COOKIE]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            assert OPERATOR_KEY not in cookie.value
        for path in ["/dashboard", "/api/stats", routes(B)["totals"]]:
            async with session.get(node.url + path) as response:
                assert response.status == 200, path
        async with session.post(node.url + "/operator/logout", allow_redirects=False) as response:
            assert response.status == 303
        async with session.get(node.url + "/api/stats") as response:
            assert response.status == 401
    forged = {"Cookie": f"{auth.COOKIE}=s1.{int(time.time()) + 600}.AAAA"}
    assert (await get(node.url + "/api/stats", forged))[0] == 401


async def test_dev_tokens_stay_off_unless_enabled(
    servers: Endpoints, tmp_path_factory: pytest.TempPathFactory
) -> None:
    off = await start_node(
        servers, "t" + uuid.uuid4().hex[:10], tmp_path_factory.mktemp("auth-off"), dev_tokens=False
    )
    try:
        path = off.url + "/api/dev-token?channels=x"
        assert (await get(path))[0] == 401
        assert (await get(path, {"X-API-Key": OPERATOR_KEY}))[0] == 404
    finally:
        off.worker.stop()

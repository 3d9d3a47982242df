"""The viewer client module (pipeline/web/static/viewer-client.js) imported by a page, as a front
end would, against a live broadcast node fed by the real pipeline: it routes, connects, resumes
with `since` and falls back to Server-Sent Events when WebSockets do not get through."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.browser.live_pipeline import LivePipeline

pytestmark = [pytest.mark.integration, pytest.mark.browser]

TIMEOUT_MS = 15_000

# In the page: import the module, connect, and keep what arrives. `total(key)` is the view the
# messages build: the snapshot's value, then each update's (absolute totals).
CONNECT = """async ({token, channel, since, transport}) => {
  const client = await import("/viewer-client.js");
  window.msgs = [];
  window.states = [];
  window.total = (key) => {
    let value = 0;
    for (const m of window.msgs) {
      if (m.type !== "snapshot" && m.type !== "update") continue;
      for (const [metric, k, v] of m.values) if (metric === "likes" && k === key) value = v;
    }
    return value;
  };
  window.conn = client.connect({
    token, channels: [channel], since, transport,
    onMessage: (m) => window.msgs.push(m),
    onState: (s) => window.states.push(s),
  });
  const node = await client.route(location.origin, client.viewerOf(token));
  return node.url;
}"""


def likes(channel: str, key: str, n: int) -> list[dict[str, object]]:
    return [{"type": "like", "key": key, "channel": channel}] * n


async def new_page(browser: Any, live: LivePipeline, errors: list[str]) -> Any:
    page = await browser.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{live.url}/v1/node")  # any page of the node's origin
    return page


async def test_connect_route_and_resume_with_since(browser: Any, live: LivePipeline) -> None:
    errors: list[str] = []
    sockets: list[str] = []
    page = await new_page(browser, live, errors)
    page.on("websocket", lambda ws: sockets.append(ws.url))
    token = live.viewer_token("vc-1", viewer="client-1")

    node = await page.evaluate(CONNECT, {"token": token, "channel": "vc-1", "since": {}, "transport": "ws"})
    assert node == live.url  # the only node owns every viewer
    await page.wait_for_function("window.states.some(s => s.status === 'live')", timeout=TIMEOUT_MS)
    await page.wait_for_function("window.msgs.some(m => m.type === 'snapshot')", timeout=TIMEOUT_MS)
    await live.send(likes("vc-1", "k1", 3))
    await page.wait_for_function("window.total('k1') === 3", timeout=TIMEOUT_MS)
    seq = await page.evaluate("window.conn.seqs['vc-1']")
    assert seq > 0
    assert await page.evaluate("window.states.at(-1).transport") == "ws"

    # closed while two more likes arrive; a new connection resumes from the seq it had
    await page.evaluate("window.conn.close()")
    await live.send(likes("vc-1", "k1", 2))
    await page.evaluate(
        CONNECT, {"token": token, "channel": "vc-1", "since": {"vc-1": seq}, "transport": "ws"}
    )
    await page.wait_for_function("window.total('k1') === 5", timeout=TIMEOUT_MS)
    assert f"since=vc-1%3A{seq}" in sockets[-1], sockets
    delivered = await page.evaluate("window.msgs.filter(m => m.seq !== undefined).map(m => m.seq)")
    assert delivered and all(s > seq for s in delivered)  # nothing at or below what it had
    assert delivered == sorted(delivered)

    # resumed at the current seq: no snapshot again, only what comes after
    now = await page.evaluate("window.conn.seqs['vc-1']")
    await page.evaluate("window.conn.close()")
    await page.evaluate(
        CONNECT, {"token": token, "channel": "vc-1", "since": {"vc-1": now}, "transport": "ws"}
    )
    await page.wait_for_function("window.states.some(s => s.status === 'live')", timeout=TIMEOUT_MS)
    await live.send(likes("vc-1", "k1", 1))
    await page.wait_for_function("window.msgs.some(m => m.type === 'update')", timeout=TIMEOUT_MS)
    assert await page.evaluate("window.total('k1')") == 6
    assert await page.evaluate(f"window.msgs.every(m => m.seq === undefined || m.seq > {now})")
    await page.evaluate("window.conn.close()")
    await page.close()
    assert errors == []


async def test_falls_back_to_sse_when_websockets_do_not_get_through(browser: Any, live: LivePipeline) -> None:
    errors: list[str] = []
    streams: list[str] = []
    page = await new_page(browser, live, errors)
    page.on("request", lambda request: streams.append(request.url) if "/v1/sse" in request.url else None)

    async def blocked(ws: Any) -> None:  # a proxy that takes the upgrade and drops it at once
        await ws.close(code=1001, reason="blocked")

    await page.route_web_socket(re.compile(r".*/v1/ws.*"), blocked)
    token = live.viewer_token("vc-2", viewer="client-2")
    await page.evaluate(CONNECT, {"token": token, "channel": "vc-2", "since": {}, "transport": "ws"})
    await page.wait_for_function(
        "window.states.some(s => s.status === 'live' && s.transport === 'sse')", timeout=TIMEOUT_MS
    )
    await page.wait_for_function("window.msgs.some(m => m.type === 'snapshot')", timeout=TIMEOUT_MS)
    await live.send(likes("vc-2", "k2", 4))
    await page.wait_for_function("window.total('k2') === 4", timeout=TIMEOUT_MS)
    assert streams and "token=" in streams[0]
    await page.evaluate("window.conn.close()")
    await page.close()
    assert errors == []


async def test_a_refused_token_stops_without_retrying(browser: Any, live: LivePipeline) -> None:
    errors: list[str] = []
    page = await new_page(browser, live, errors)
    token = live.viewer_token("vc-3", viewer="client-3")
    await page.evaluate(CONNECT, {"token": token, "channel": "vc-4", "since": {}, "transport": "ws"})
    await page.wait_for_function("window.states.some(s => s.status === 'refused')", timeout=TIMEOUT_MS)
    assert await page.evaluate("window.msgs.map(m => m.type)") == ["error"]
    await page.wait_for_timeout(1000)
    assert await page.evaluate("window.states.at(-1).status") == "refused"  # no reconnect loop
    await page.close()
    assert errors == []

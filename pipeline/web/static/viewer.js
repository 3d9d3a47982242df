"use strict";
// The viewer page: pick a live video, watch its comments and like counts change live.
// Protocol (docs/BROADCAST.md): ask /v1/route which broadcast node owns this viewer, connect to it by
// WebSocket or Server-Sent Events, apply the "snapshot" and then "update"s in seq order (never a step
// back), and on every reconnect tell the node the last seq seen with `since`.
(function () {
  const params = new URLSearchParams(location.search);
  const $ = (id) => document.getElementById(id);
  const MAX_COMMENTS = 200;
  const TOP = 10;
  const TRANSPORTS = { ws: "WebSocket", sse: "Server-Sent Events" };

  const state = {
    channel: params.get("channel") || "",
    transport: params.get("transport") === "sse" ? "sse" : "ws",
    urlToken: params.get("token") || "", // a token in the page URL wins over a development token
    tokens: new Map(), // channel -> development token
    viewer: viewerId(),
    likesMetric: params.get("metric") || "likes",
    commentsMetric: "",
    conn: null,
    generation: 0, // callbacks of an older connection are ignored
    attempt: 0,
    retryTimer: null,
  };
  let view = emptyView();

  function emptyView() {
    return {
      seq: 0,
      synced: false, // a snapshot has arrived
      values: new Map(), // metric -> Map(key -> absolute total)
      comments: new Map(), // comment id -> item
      order: [], // comment ids, newest first
      nodes: new Map(), // comment id -> <li>
    };
  }

  function viewerId() {
    const stored = localStorage.getItem("viewer-id");
    if (stored) return stored;
    const id = "viewer-" + Math.random().toString(36).slice(2, 10);
    localStorage.setItem("viewer-id", id);
    return id;
  }

  function fmt(n) {
    return Number.isInteger(n) ? n.toLocaleString("en-US") : String(n);
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  // -- tokens and routing --------------------------------------------------------------------------------
  async function tokenFor(channel) {
    if (state.urlToken) return state.urlToken;
    if (state.tokens.has(channel)) return state.tokens.get(channel);
    const q = new URLSearchParams({ channels: channel, viewer: state.viewer });
    const response = await fetch("/api/dev-token?" + q.toString(), { cache: "no-store" });
    if (!response.ok) throw new Error("no token: add ?token=... to the address (development tokens are off)");
    const text = await response.text();
    let token = text.trim();
    try {
      const body = JSON.parse(text);
      token = typeof body === "string" ? body : body.token;
    } catch (_) {
      // a plain-text token
    }
    state.tokens.set(channel, token);
    return token;
  }

  function subjectOf(token) {
    try {
      const b64 = token.split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(b64 + "===".slice((b64.length + 3) % 4))).sub || state.viewer;
    } catch (_) {
      return state.viewer;
    }
  }

  async function nodeFor(viewer) {
    try {
      const route = await getJSON("/v1/route?viewer=" + encodeURIComponent(viewer));
      return { url: route.url || location.origin, id: route.node_id || "" };
    } catch (_) {
      return { url: location.origin, id: "" }; // no ring yet: the node that served the page
    }
  }

  function streamQuery(token) {
    const q = new URLSearchParams({ token, channels: state.channel });
    if (view.seq > 0) q.set("since", `${state.channel}:${view.seq}`);
    return q.toString();
  }

  // -- connections ---------------------------------------------------------------------------------------
  function closeConnection() {
    clearTimeout(state.retryTimer);
    if (state.conn) {
      const conn = state.conn;
      state.conn = null;
      conn.close();
    }
  }

  async function connect() {
    const gen = ++state.generation;
    closeConnection();
    if (!state.channel) return;
    setStatus("connecting", "connecting…");
    try {
      const token = await tokenFor(state.channel);
      const node = await nodeFor(subjectOf(token));
      if (gen !== state.generation) return;
      if (state.transport === "sse") openSse(gen, node, token);
      else openWs(gen, node, token, 0);
    } catch (err) {
      retry(gen, err.message);
    }
  }

  function openWs(gen, node, token, hops) {
    const ws = new WebSocket(node.url.replace(/^http/, "ws") + "/v1/ws?" + streamQuery(token));
    let redirected = false;
    state.conn = ws;
    ws.onopen = () => {
      if (gen === state.generation) live(node);
    };
    ws.onmessage = (event) => {
      if (gen !== state.generation) return;
      const msg = JSON.parse(event.data);
      if (msg.type === "redirect") {
        redirected = true;
        ws.close();
        if (hops < 3) openWs(gen, { url: msg.url, id: "" }, token, hops + 1);
        else retry(gen, "redirected too often");
        return;
      }
      handle(msg);
    };
    ws.onclose = (event) => {
      if (gen !== state.generation || redirected) return;
      retry(gen, `connection closed (${event.code}${event.reason ? ": " + event.reason : ""})`);
    };
  }

  function openSse(gen, node, token) {
    // a node that does not own this viewer answers 307; EventSource follows it by itself
    const es = new EventSource(node.url + "/v1/sse?" + streamQuery(token));
    state.conn = es;
    es.onopen = () => {
      if (gen === state.generation) live(node);
    };
    for (const type of ["snapshot", "update", "comments", "redirect"]) {
      es.addEventListener(type, (event) => {
        if (gen === state.generation) handle(JSON.parse(event.data));
      });
    }
    // "error" is both the protocol's error message (with data) and EventSource's own connection error
    es.addEventListener("error", (event) => {
      if (gen !== state.generation) return;
      if (event.data) return handle(JSON.parse(event.data));
      es.close();
      retry(gen, "stream interrupted");
    });
  }

  function retry(gen, reason) {
    if (gen !== state.generation) return;
    state.conn = null;
    const delay = Math.min(3000, 250 * 2 ** state.attempt) + Math.random() * 250;
    state.attempt += 1;
    setStatus("error", `${reason}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(connect, delay);
  }

  function live(node) {
    state.attempt = 0;
    const where = node.id ? `node ${node.id}` : new URL(node.url).host;
    setStatus("live", `live via ${TRANSPORTS[state.transport]} · ${where}`);
  }

  function setStatus(kind, text) {
    $("connection").dataset.state = kind;
    $("connection-text").textContent = text;
  }

  // -- messages ------------------------------------------------------------------------------------------
  function setValue(metric, key, total) {
    let keys = view.values.get(metric);
    if (!keys) view.values.set(metric, (keys = new Map()));
    keys.set(key, total);
  }

  function handle(msg) {
    switch (msg.type) {
      case "snapshot":
        if (msg.channel !== state.channel || msg.seq < view.seq) return;
        view.seq = msg.seq;
        view.synced = true;
        view.values = new Map();
        for (const [metric, key, total] of msg.values || []) setValue(metric, key, total);
        for (const [key, total] of msg.top || []) {
          if (!(view.values.get(state.likesMetric) || new Map()).has(key)) setValue(state.likesMetric, key, total);
        }
        break;
      case "update":
        if (msg.channel !== state.channel || msg.seq <= view.seq) return; // old news
        view.seq = msg.seq;
        for (const [metric, key, total] of msg.values || []) setValue(metric, key, total);
        break;
      case "comments":
        if (msg.channel !== state.channel) return;
        for (const item of msg.items || []) {
          const id = item.id || item.key;
          if (!view.comments.has(id)) view.order.unshift(id);
          view.comments.set(id, { ...(view.comments.get(id) || {}), ...item });
        }
        for (const id of view.order.splice(MAX_COMMENTS)) {
          view.comments.delete(id);
          view.nodes.delete(id);
        }
        break;
      case "error":
        setStatus("error", msg.reason || "refused");
        state.tokens.delete(state.channel); // a refused development token is not asked for again
        return;
      default:
        return;
    }
    scheduleRender();
  }

  // -- drawing -------------------------------------------------------------------------------------------
  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  function likesOf(key, item) {
    const likes = view.values.get(state.likesMetric);
    if (likes && likes.has(key)) return likes.get(key);
    return item && typeof item.likes === "number" ? item.likes : 0;
  }

  function showNumber(el, value) {
    const text = fmt(value);
    if (el.textContent === text) return;
    el.textContent = text;
    el.classList.remove("bump");
    void el.offsetWidth; // restart the animation
    el.classList.add("bump");
  }

  function render() {
    const likes = view.values.get(state.likesMetric) || new Map();
    let total = 0;
    for (const v of likes.values()) total += v;
    showNumber($("total-likes"), total);
    const counted = state.commentsMetric && view.values.get(state.commentsMetric);
    let comments = view.comments.size;
    if (counted) {
      comments = 0;
      for (const v of counted.values()) comments += v;
    }
    showNumber($("total-comments"), comments);
    $("seq-info").textContent = view.seq ? `update #${view.seq} of ${state.channel}` : "";
    $("seq-info").dataset.seq = String(view.seq);
    $("seq-info").dataset.synced = String(view.synced);
    renderComments();
    renderTop(likes);
  }

  function renderComments() {
    const list = $("comments");
    if (!view.order.length) {
      list.innerHTML = '<li class="empty">no comments yet</li>';
      return;
    }
    const items = view.order.map((id) => {
      const item = view.comments.get(id);
      let li = view.nodes.get(id);
      if (!li) {
        li = document.createElement("li");
        li.className = "comment";
        li.innerHTML = '<div class="who"></div><div class="text"></div><div class="likes">♥ <span class="n">0</span></div>';
        view.nodes.set(id, li);
      }
      li.dataset.key = item.key;
      li.dataset.id = id;
      const who = li.querySelector(".who");
      who.textContent = item.user || "anonymous";
      const keyTag = document.createElement("span");
      keyTag.className = "key";
      keyTag.textContent = item.key;
      who.append(keyTag);
      li.querySelector(".text").textContent = item.text || "";
      const n = likesOf(item.key, item);
      li.dataset.likes = String(n);
      showNumber(li.querySelector(".n"), n);
      return li;
    });
    const current = [...list.children];
    if (current.length !== items.length || current.some((node, i) => node !== items[i])) list.replaceChildren(...items);
  }

  function renderTop(likes) {
    const list = $("top");
    const ranked = [...likes.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, TOP);
    if (!ranked.length) {
      list.innerHTML = '<li class="empty">no likes yet</li>';
      return;
    }
    const textOf = new Map();
    for (const item of view.comments.values()) if (item.text) textOf.set(item.key, item.text);
    list.replaceChildren(
      ...ranked.map(([key, n], i) => {
        const li = document.createElement("li");
        li.dataset.key = key;
        li.dataset.likes = String(n);
        li.innerHTML = '<span class="rank"></span><span class="label"></span><span class="likes"></span>';
        li.querySelector(".rank").textContent = String(i + 1);
        li.querySelector(".label").textContent = textOf.has(key) ? `${textOf.get(key)} (${key})` : key;
        li.querySelector(".label").title = key;
        li.querySelector(".likes").textContent = "♥ " + fmt(n);
        return li;
      })
    );
  }

  // -- picking a video -----------------------------------------------------------------------------------
  function remember() {
    const q = new URLSearchParams(location.search);
    q.set("channel", state.channel);
    q.set("transport", state.transport);
    history.replaceState(null, "", "?" + q.toString());
  }

  function watch(channel) {
    channel = channel.trim();
    if (!channel || (channel === state.channel && state.conn)) return;
    state.channel = channel;
    view = emptyView();
    $("video-name").textContent = channel;
    document.title = `${channel} · live comments`;
    remember();
    render();
    state.attempt = 0;
    connect();
  }

  async function refreshChannels() {
    try {
      const body = await getJSON("/api/channels?limit=100");
      const names = body.channels.map((c) => c.channel).filter((c) => c !== "").sort();
      if (state.channel && !names.includes(state.channel)) names.unshift(state.channel);
      const select = $("channel");
      const same = select.options.length === names.length && names.every((n, i) => select.options[i].value === n);
      if (!same) select.replaceChildren(...names.map((n) => new Option(n, n)));
      select.value = state.channel;
      if (!state.channel && names.length) watch(names[0]);
      if (!names.length) setStatus("connecting", "no live video yet");
    } catch (_) {
      // the list is a convenience; the stream does not depend on it
    }
  }

  async function start() {
    try {
      const described = await getJSON("/api/topologies");
      const topology = described.topologies[0];
      const metrics = topology.metrics;
      if (!metrics.some((m) => m.name === state.likesMetric)) {
        const board = metrics.find((m) => m.leaderboard) || metrics[0];
        if (board) state.likesMetric = board.name;
      }
      const feed = metrics.find((m) => m.kind === "count" && topology.feed_types.includes(m.on));
      state.commentsMetric = feed ? feed.name : "";
    } catch (_) {
      // keep the defaults
    }
    $("transport").value = state.transport;
    $("transport").addEventListener("change", () => {
      state.transport = $("transport").value;
      remember();
      state.attempt = 0;
      connect();
    });
    $("channel").addEventListener("change", () => watch($("channel").value));
    $("go").addEventListener("click", () => watch($("channel-input").value));
    $("channel-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter") watch($("channel-input").value);
    });
    if (state.channel) {
      const channel = state.channel;
      state.channel = "";
      watch(channel);
    }
    await refreshChannels();
    setInterval(refreshChannels, 5000);
  }

  start();
})();

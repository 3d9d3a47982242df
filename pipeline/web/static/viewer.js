// The viewer page: pick a live video, watch its comments and like counts change live.
// The protocol (routing, WebSocket or SSE, redirects, resuming with `since`, the SSE fallback) is the
// viewer client module, viewer-client.js, that any front end can import; this file only draws.
import { connect } from "./viewer-client.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const MAX_COMMENTS = 200;
const TOP = 10;
const TRANSPORTS = { ws: "WebSocket", sse: "Server-Sent Events" };

const state = {
  channel: params.get("channel") || "",
  transport: params.get("transport") === "sse" ? "sse" : "ws",
  urlToken: params.get("token") || "", // a viewer token in the page URL; else a development token
  tokens: new Map(), // channel -> development token (minted for a signed-in operator)
  viewer: viewerId(),
  likesMetric: params.get("metric") || "likes",
  commentsMetric: "",
  conn: null, // the ViewerConnection
  generation: 0,
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

// The query API takes the page's viewer token (its channels only) or an operator's sign-in cookie.
async function getJSON(url) {
  const headers = state.urlToken ? { Authorization: "Bearer " + state.urlToken } : {};
  const response = await fetch(url, { cache: "no-store", headers });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// -- tokens and the connection -------------------------------------------------------------------------
async function tokenFor(channel) {
  if (state.urlToken) return state.urlToken;
  if (state.tokens.has(channel)) return state.tokens.get(channel);
  const q = new URLSearchParams({ channels: channel, viewer: state.viewer });
  const response = await fetch("/api/dev-token?" + q.toString(), { cache: "no-store" });
  if (!response.ok) throw new Error("no token: add ?token=... to the address");
  const body = await response.json();
  state.tokens.set(channel, body.token);
  return body.token;
}

function closeConnection() {
  clearTimeout(state.retryTimer);
  if (state.conn) {
    const conn = state.conn;
    state.conn = null;
    conn.close();
  }
}

async function open() {
  const gen = ++state.generation;
  closeConnection();
  if (!state.channel) return;
  setStatus("connecting", "connecting…");
  let token;
  try {
    token = await tokenFor(state.channel);
  } catch (err) {
    if (gen !== state.generation) return;
    setStatus("error", `${err.message}; trying again in 3 s`);
    state.retryTimer = setTimeout(open, 3000);
    return;
  }
  if (gen !== state.generation) return;
  state.conn = connect({
    token,
    channels: [state.channel],
    transport: state.transport,
    since: view.seq > 0 ? { [state.channel]: view.seq } : {},
    onMessage: handle,
    onState: (s) => {
      if (gen !== state.generation) return;
      if (s.status === "live") {
        const where = new URL(s.node).host;
        setStatus("live", `live via ${TRANSPORTS[s.transport]} · ${where}`);
        $("transport").value = s.transport; // after a fallback to SSE, too
      } else if (s.status === "retrying") {
        setStatus("error", `${s.detail}; reconnecting`);
      } else if (s.status === "refused") {
        setStatus("error", s.detail || "refused");
        state.tokens.delete(state.channel); // a refused development token is not asked for again
      } else if (s.status === "connecting") {
        setStatus("connecting", "connecting…");
      }
    },
  });
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
      return; // the connection's state says it (refused)
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
  open();
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
    open();
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

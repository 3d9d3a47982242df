// @ts-check
/**
 * The viewer protocol of the broadcast nodes (docs/BROADCAST.md, docs/asyncapi.yaml) as a small ES
 * module with no dependencies: find the viewer's node (`/v1/route`), connect by WebSocket or
 * Server-Sent Events, follow redirects, reconnect with `since` (the last seq seen of each channel),
 * drop anything older than what the viewer has, and fall back to SSE where WebSockets do not get
 * through. Served by every node at `/viewer-client.js`; the viewer page (`/`) is built on it.
 *
 * ```js
 * import { connect } from "https://node.example/viewer-client.js";
 * const conn = connect({
 *   baseUrl: "https://node.example", token, channels: ["video-1"],
 *   onMessage: (msg) => { if (msg.type === "update") render(msg.values); },
 *   onState: (state) => console.log(state.status, state.transport),
 * });
 * // later: conn.close();
 * ```
 *
 * @module viewer-client
 */

/** @typedef {[metric: string, key: string, total: number]} Value */

/**
 * @typedef {object} SnapshotMessage  First thing for each channel; the whole state at `seq`.
 * @property {"snapshot"} type
 * @property {string} channel
 * @property {number} seq
 * @property {Value[]} values
 * @property {[key: string, total: number][]} [top]  the leaderboard, best first
 */

/**
 * @typedef {object} UpdateMessage  Absolute totals of the keys that changed; `seq` only increases.
 * @property {"update"} type
 * @property {string} channel
 * @property {number} seq
 * @property {Value[]} values
 */

/**
 * @typedef {object} Comment
 * @property {string} [id]
 * @property {string} key
 * @property {string | null} [user]
 * @property {string | null} [text]
 * @property {number} [ts]
 * @property {number} [likes]
 */

/**
 * @typedef {object} CommentsMessage  New comments, and comments whose like count changed.
 * @property {"comments"} type
 * @property {string} channel
 * @property {Comment[]} items
 */

/**
 * @typedef {object} ErrorMessage  A refusal or a violation; the node closes the connection after it.
 * @property {"error"} type
 * @property {string} reason
 */

/** @typedef {SnapshotMessage | UpdateMessage | CommentsMessage | ErrorMessage} ViewerMessage */

/** @typedef {"ws" | "sse"} Transport */

/**
 * @typedef {object} ConnectionState
 * @property {"connecting" | "live" | "retrying" | "refused" | "closed"} status
 * @property {Transport} transport  the transport in use (it changes to "sse" on a fallback)
 * @property {string} [node]  the node's URL once live
 * @property {string} [detail]  why it is retrying or was refused
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string} token  a viewer token (docs/BROADCAST.md, "Tokens")
 * @property {string[]} channels  channels to watch, all within the token's scope
 * @property {(message: ViewerMessage) => void} onMessage  each fresh message, in seq order per channel
 * @property {(state: ConnectionState) => void} [onState]
 * @property {string} [baseUrl]  any node (default: the page's origin); the viewer's own is found from it
 * @property {Transport} [transport]  "ws" (default) or "sse"
 * @property {boolean} [fallbackToSse]  switch to SSE after WebSocket attempts that get nothing (default true)
 * @property {Record<string, number>} [since]  the last seq already seen per channel (a resumed view)
 * @property {number} [maxRetryDelayMs]  the longest wait between reconnects (default 3000)
 */

/** WebSocket attempts that end without a single message before falling back to SSE. */
export const WS_FAILURES_BEFORE_SSE = 2;
const MAX_REDIRECTS = 3;

/**
 * The viewer id a token was issued to (its `sub`), read without checking the signature (the node does).
 * @param {string} token
 * @returns {string}
 */
export function viewerOf(token) {
  const b64 = token.split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
  const payload = JSON.parse(atob(b64 + "===".slice((b64.length + 3) % 4)));
  return String(payload.sub);
}

/**
 * The node that owns `viewer`, as any node answers it (every node builds the same ring).
 * @param {string} baseUrl  any node
 * @param {string} viewer
 * @returns {Promise<{url: string, nodeId: string}>}
 */
export async function route(baseUrl, viewer) {
  const response = await fetch(`${baseUrl}/v1/route?viewer=${encodeURIComponent(viewer)}`, { cache: "no-store" });
  if (!response.ok) throw new Error(`/v1/route: HTTP ${response.status}`);
  const body = await response.json();
  return { url: body.url || baseUrl, nodeId: body.node_id || "" };
}

/**
 * The stream URL of a node: `/v1/ws` or `/v1/sse` with token, channels and since.
 * @param {string} nodeUrl
 * @param {Transport} transport
 * @param {string} token
 * @param {string[]} channels
 * @param {Record<string, number>} since
 * @returns {string}
 */
export function streamUrl(nodeUrl, transport, token, channels, since) {
  const query = new URLSearchParams({ token, channels: channels.join(",") });
  const seen = Object.entries(since).filter(([, seq]) => seq > 0);
  if (seen.length) query.set("since", seen.map(([channel, seq]) => `${channel}:${seq}`).join(","));
  const base = transport === "ws" ? nodeUrl.replace(/^http/, "ws") : nodeUrl;
  return `${base}/v1/${transport}?${query.toString()}`;
}

/** One viewer's live view of some channels; reconnects by itself until `close()`. */
export class ViewerConnection {
  /** @param {ConnectOptions} options */
  constructor(options) {
    this.options = options;
    this.token = options.token;
    this.channels = [...options.channels];
    /** @type {Transport} */
    this.transport = options.transport || "ws";
    /** @type {Record<string, number>} the last seq delivered per channel: what a reconnect resumes from */
    this.seqs = { ...(options.since || {}) };
    this.baseUrl = options.baseUrl || globalThis.location?.origin || "";
    this.attempt = 0;
    this.wsFailures = 0;
    this.closed = false;
    this.generation = 0;
    /** @type {WebSocket | EventSource | null} */
    this.conn = null;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined;
  }

  /** Start (or restart) the connection. */
  start() {
    this.closed = false;
    this.open();
    return this;
  }

  /** Stop for good: no reconnects. */
  close() {
    this.closed = true;
    this.generation += 1;
    clearTimeout(this.timer);
    if (this.conn) this.conn.close();
    this.conn = null;
    this.setState({ status: "closed", transport: this.transport });
  }

  /**
   * Watch more channels: over WebSocket a subscribe message, over SSE a reconnect.
   * @param {string[]} channels
   */
  subscribe(channels) {
    const added = channels.filter((c) => !this.channels.includes(c));
    if (!added.length) return;
    this.channels.push(...added);
    if (this.conn instanceof WebSocket && this.conn.readyState === WebSocket.OPEN) {
      this.conn.send(JSON.stringify({ type: "subscribe", channels: added }));
    } else {
      this.open();
    }
  }

  /**
   * Stop watching channels.
   * @param {string[]} channels
   */
  unsubscribe(channels) {
    this.channels = this.channels.filter((c) => !channels.includes(c));
    for (const c of channels) delete this.seqs[c];
    if (this.conn instanceof WebSocket && this.conn.readyState === WebSocket.OPEN) {
      this.conn.send(JSON.stringify({ type: "unsubscribe", channels }));
    } else {
      this.open();
    }
  }

  /** @param {ConnectionState} state */
  setState(state) {
    if (this.options.onState) this.options.onState(state);
  }

  /** @private */
  async open() {
    const gen = ++this.generation;
    clearTimeout(this.timer);
    if (this.conn) {
      const old = this.conn;
      this.conn = null;
      old.close();
    }
    this.setState({ status: "connecting", transport: this.transport });
    let node;
    try {
      node = await route(this.baseUrl, viewerOf(this.token));
    } catch (_) {
      node = { url: this.baseUrl, nodeId: "" }; // no ring yet: the node asked
    }
    if (gen !== this.generation) return;
    if (this.transport === "ws") this.openWs(gen, node.url, 0);
    else this.openSse(gen, node.url);
  }

  /**
   * @private
   * @param {number} gen
   * @param {string} nodeUrl
   * @param {number} hops
   */
  openWs(gen, nodeUrl, hops) {
    const ws = new WebSocket(streamUrl(nodeUrl, "ws", this.token, this.channels, this.seqs));
    this.conn = ws;
    let heard = false;
    let redirected = false;
    ws.onopen = () => {
      if (gen === this.generation) this.live(nodeUrl);
    };
    ws.onmessage = (event) => {
      if (gen !== this.generation) return;
      heard = true;
      this.wsFailures = 0;
      const msg = JSON.parse(event.data);
      if (msg.type === "redirect") {
        redirected = true;
        ws.close();
        if (hops < MAX_REDIRECTS) this.openWs(gen, msg.url, hops + 1);
        else this.retry(gen, "redirected too often");
        return;
      }
      this.deliver(msg);
    };
    ws.onclose = (event) => {
      if (gen !== this.generation || redirected) return;
      if (!heard && ++this.wsFailures >= WS_FAILURES_BEFORE_SSE && this.options.fallbackToSse !== false) {
        this.transport = "sse"; // WebSockets do not get through here (a proxy, a firewall): SSE does
      }
      this.retry(gen, `connection closed (${event.code}${event.reason ? ": " + event.reason : ""})`);
    };
  }

  /**
   * @private
   * @param {number} gen
   * @param {string} nodeUrl
   */
  openSse(gen, nodeUrl) {
    // a node that does not own this viewer answers 307; EventSource follows it by itself
    const es = new EventSource(streamUrl(nodeUrl, "sse", this.token, this.channels, this.seqs));
    this.conn = es;
    es.onopen = () => {
      if (gen === this.generation) this.live(nodeUrl);
    };
    for (const type of ["snapshot", "update", "comments"]) {
      es.addEventListener(type, (event) => {
        if (gen === this.generation) this.deliver(JSON.parse(/** @type {MessageEvent} */ (event).data));
      });
    }
    // "error" is both the protocol's message (with data) and EventSource's own connection error
    es.addEventListener("error", (event) => {
      if (gen !== this.generation) return;
      const data = /** @type {MessageEvent} */ (event).data;
      if (data) {
        this.deliver(JSON.parse(data));
        return;
      }
      es.close();
      this.retry(gen, "stream interrupted");
    });
  }

  /**
   * Pass a message on unless the viewer already has what it says (seq at or below the last seen).
   * @private
   * @param {ViewerMessage} msg
   */
  deliver(msg) {
    if (msg.type === "snapshot" || msg.type === "update") {
      const have = this.seqs[msg.channel] || 0;
      if (msg.type === "update" ? msg.seq <= have : msg.seq < have) return; // old news
      this.seqs[msg.channel] = msg.seq;
    } else if (msg.type === "error") {
      this.generation += 1; // a refusal: reconnecting would be refused again
      if (this.conn) this.conn.close();
      this.conn = null;
      this.setState({ status: "refused", transport: this.transport, detail: msg.reason });
    }
    this.options.onMessage(msg);
  }

  /**
   * @private
   * @param {string} nodeUrl
   */
  live(nodeUrl) {
    this.attempt = 0;
    this.setState({ status: "live", transport: this.transport, node: nodeUrl });
  }

  /**
   * @private
   * @param {number} gen
   * @param {string} reason
   */
  retry(gen, reason) {
    if (gen !== this.generation || this.closed) return;
    this.conn = null;
    const delay = Math.min(this.options.maxRetryDelayMs ?? 3000, 250 * 2 ** this.attempt) + Math.random() * 250;
    this.attempt += 1;
    this.setState({ status: "retrying", transport: this.transport, detail: reason });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (gen === this.generation && !this.closed) this.open();
    }, delay);
  }
}

/**
 * Connect a viewer: route, open, and keep the view live (reconnecting with `since`) until closed.
 * @param {ConnectOptions} options
 * @returns {ViewerConnection}
 */
export function connect(options) {
  return new ViewerConnection(options).start();
}

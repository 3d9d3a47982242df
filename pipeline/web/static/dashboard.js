"use strict";
// The dashboard: charts of what Redis holds, read through the JSON query API (/api/...) and redrawn
// every few seconds. Plain JS and inline SVG: no library and nothing fetched from anywhere else.
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const params = new URLSearchParams(location.search);
  const $ = (id) => document.getElementById(id);
  const state = {
    topology: null,
    metric: params.get("metric") || "",
    channel: params.get("channel"),
    key: params.get("key") || "",
    refreshMs: Number(params.get("refresh") || 2000),
    // the per-hour chart's span: 48 hours, 7 days or 30 days (older buckets than Redis keeps come
    // from the sink's PostgreSQL rollups, through the same /api/series)
    hours: Number(params.get("hours") || 48),
    timer: null,
    busy: false,
  };

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    return Number.isInteger(v) ? v.toLocaleString("en-US") : v.toLocaleString("en-US", { maximumFractionDigits: 3 });
  }

  function channelName(c) {
    return c === "" ? "(no channel)" : c;
  }

  async function api(path, query) {
    const url = path + (query ? "?" + new URLSearchParams(query).toString() : "");
    const response = await fetch(url, { cache: "no-store" });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.status + " " + url);
    return body;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function note(container, text) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = text;
    container.replaceChildren(p);
  }

  // Horizontal bars, one row per [label, value], each labelled with its exact value.
  function barChart(container, rows, emptyText) {
    if (!rows.length) return note(container, emptyText);
    const width = 600, rowH = 22, labelW = 170, valueW = 70;
    const max = Math.max(...rows.map((r) => r[1]), 0) || 1;
    const root = svg("svg", { viewBox: `0 0 ${width} ${rows.length * rowH + 4}`, role: "img" });
    rows.forEach(([label, value], i) => {
      const y = i * rowH + 2;
      const g = svg("g", { class: "row", "data-label": label, "data-value": String(value) });
      const shown = label.length > 26 ? label.slice(0, 25) + "…" : label;
      g.append(svg("text", { x: labelW - 6, y: y + 15, "text-anchor": "end" }, channelName(shown)));
      const w = Math.max(1, ((width - labelW - valueW) * Math.max(value, 0)) / max);
      const bar = svg("rect", { class: "bar", x: labelW, y: y + 3, width: w, height: rowH - 6, rx: 2 });
      bar.append(svg("title", {}, `${label}: ${value}`));
      g.append(bar);
      g.append(svg("text", { class: "value", x: labelW + w + 5, y: y + 15 }, fmt(value)));
      root.append(g);
    });
    container.replaceChildren(root);
  }

  function timeLabel(startS, size) {
    const d = new Date(startS * 1000);
    const hm = d.toISOString().slice(11, 16);
    return size >= 3600 ? d.toISOString().slice(5, 10) + " " + hm : hm;
  }

  // Columns over time, one per bucket [start_s, value]; times in UTC.
  function columnChart(container, points, size) {
    const width = 600, height = 190, left = 44, bottom = 22, top = 10;
    const max = Math.max(...points.map((p) => p[1]), 0);
    const scale = max || 1;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    const plotH = height - top - bottom;
    const step = (width - left - 4) / points.length;
    root.append(svg("line", { x1: left, y1: top + plotH, x2: width - 4, y2: top + plotH, stroke: "#c9ced8" }));
    root.append(svg("text", { class: "dim", x: left - 4, y: top + 8, "text-anchor": "end" }, fmt(max)));
    root.append(svg("text", { class: "dim", x: left - 4, y: top + plotH, "text-anchor": "end" }, "0"));
    const every = Math.max(1, Math.ceil(points.length / 6));
    points.forEach(([start, value], i) => {
      const h = (plotH * Math.max(value, 0)) / scale;
      const x = left + i * step;
      const col = svg("rect", {
        class: "col",
        x: x + 0.5,
        y: top + plotH - h,
        width: Math.max(1, step - 1),
        height: h,
        "data-start": String(start),
        "data-value": String(value),
      });
      col.append(svg("title", {}, `${timeLabel(start, size)} UTC: ${value}`));
      root.append(col);
      if ((points.length - 1 - i) % every === 0) {
        const cx = x + step / 2;
        const anchor = cx > width - 40 ? "end" : "middle"; // the newest label must not run off the edge
        root.append(svg("text", { class: "dim", x: anchor === "end" ? width - 2 : cx, y: height - 6, "text-anchor": anchor }, timeLabel(start, size)));
      }
    });
    const total = points.reduce((s, p) => s + p[1], 0);
    const last = points.length ? points[points.length - 1][1] : 0;
    const summary = document.createElement("div");
    summary.className = "summary";
    summary.textContent = `sum ${fmt(total)} · current bucket ${fmt(last)} · peak ${fmt(max)} (UTC)`;
    summary.dataset.sum = String(total);
    container.replaceChildren(root, summary);
  }

  function table(container, rows, emptyText, header) {
    if (!rows.length) return note(container, emptyText);
    const t = document.createElement("table");
    const head = t.createTHead().insertRow();
    head.innerHTML = `<th>${header[0]}</th><th class="num">${header[1]}</th>`;
    const body = t.createTBody();
    for (const [k, v] of rows) {
      const tr = body.insertRow();
      tr.dataset.key = k;
      tr.dataset.value = String(v);
      tr.insertCell().textContent = k;
      const cell = tr.insertCell();
      cell.className = "num";
      cell.textContent = fmt(v);
    }
    container.replaceChildren(t);
  }

  function currentMetric() {
    return state.topology.metrics.find((m) => m.name === state.metric) || state.topology.metrics[0];
  }

  function fillChannels(channels) {
    const select = $("channel");
    const names = channels.map((c) => c.channel);
    if (state.channel === null || state.channel === undefined) state.channel = names.length ? names[0] : null;
    if (state.channel !== null && !names.includes(state.channel)) names.unshift(state.channel);
    const same = select.options.length === names.length && names.every((n, i) => select.options[i].value === n);
    if (!same) {
      select.replaceChildren(...names.map((n) => new Option(channelName(n), n)));
    }
    if (state.channel !== null) select.value = state.channel;
  }

  async function drawSeries(id, metric, size, points) {
    const container = $(id);
    if (!metric.rollups.includes(size)) {
      return note(container, `${metric.name} keeps no ${size === 60 ? "per-minute" : "per-hour"} buckets (only ${metric.rollups.map((r) => (r ? r + " s" : "all-time")).join(", ")}).`);
    }
    if (state.channel === null) return note(container, "no channel yet");
    if (metric.kind === "distinct" && !state.key) {
      return note(container, `${metric.name} counts distinct users per key: enter a key to see its series.`);
    }
    const query = { metric: metric.name, channel: state.channel, size, points };
    if (state.key) query.key = state.key;
    const series = await api("/api/series", query);
    columnChart(container, series.points, size);
  }

  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    const status = $("status");
    try {
      const metric = currentMetric();
      const channels = await api("/api/channels", { limit: 200 });
      fillChannels(channels.channels);
      const work = [];
      if (metric.kind === "distinct") {
        note($("totals"), `${metric.name} counts distinct users; they do not add up across keys. See the top keys.`);
        $("totals-caption").textContent = "";
      } else {
        work.push(
          api("/api/totals", { metric: metric.name }).then((t) => {
            const rows = Object.entries(t.channels).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
            $("totals-caption").textContent = `${metric.name} · ${rows.length} channels` + (rows.length > 20 ? " (top 20)" : "");
            barChart($("totals"), rows.slice(0, 20), "nothing counted yet");
          })
        );
      }
      $("top-channel").textContent = state.channel === null ? "…" : channelName(state.channel);
      if (state.channel !== null) {
        work.push(
          api("/api/top", { metric: metric.name, channel: state.channel, n: 10 }).then((t) => {
            $("top-caption").textContent = `${metric.name} · ${t.source}`;
            barChart($("top"), t.top, "nothing in this channel yet");
          })
        );
      } else {
        note($("top"), "no channel yet");
      }
      work.push(drawSeries("minutes", metric, 60, 60));
      $("hours-caption").textContent = state.hours % 24 === 0 && state.hours > 48 ? `last ${state.hours / 24} days` : `last ${state.hours} hours`;
      work.push(drawSeries("hours", metric, 3600, state.hours));
      work.push(
        api("/api/splits").then((s) => table($("splits"), Object.entries(s.splits), "no key is split", ["key", "sub-keys"]))
      );
      work.push(
        api("/api/stats").then((s) => {
          const rows = Object.entries(s.stats);
          rows.push(["channels", s.channels]);
          table($("stats"), rows, "no counters yet", ["counter", "value"]);
        })
      );
      await Promise.all(work);
      status.className = "";
      status.textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.refreshed = String(Date.now());
    } catch (err) {
      status.className = "error";
      status.textContent = "error: " + err.message;
    } finally {
      state.busy = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    if (state.refreshMs > 0) state.timer = setTimeout(refresh, state.refreshMs);
  }

  function remember() {
    const q = new URLSearchParams();
    q.set("metric", state.metric);
    if (state.channel !== null) q.set("channel", state.channel);
    if (state.key) q.set("key", state.key);
    if (state.refreshMs !== 2000) q.set("refresh", String(state.refreshMs));
    if (state.hours !== 48) q.set("hours", String(state.hours));
    history.replaceState(null, "", "?" + q.toString());
  }

  function changed() {
    remember();
    clearTimeout(state.timer);
    refresh();
  }

  async function start() {
    const described = await api("/api/topologies");
    state.topology = described.topologies[0];
    $("topology").textContent = state.topology.name;
    $("description").textContent = state.topology.description;
    document.title = `${state.topology.name} · pipeline dashboard`;
    const metrics = $("metric");
    metrics.replaceChildren(...state.topology.metrics.map((m) => new Option(`${m.name} (${m.kind} of ${m.on})`, m.name)));
    if (!state.topology.metrics.some((m) => m.name === state.metric)) state.metric = state.topology.metrics[0].name;
    metrics.value = state.metric;
    $("key").value = state.key;
    const refreshSelect = $("refresh");
    if (![...refreshSelect.options].some((o) => Number(o.value) === state.refreshMs)) {
      refreshSelect.append(new Option(`${state.refreshMs} ms`, String(state.refreshMs)));
    }
    refreshSelect.value = String(state.refreshMs);
    metrics.addEventListener("change", () => { state.metric = metrics.value; changed(); });
    $("channel").addEventListener("change", () => { state.channel = $("channel").value; changed(); });
    $("key").addEventListener("change", () => { state.key = $("key").value.trim(); changed(); });
    refreshSelect.addEventListener("change", () => { state.refreshMs = Number(refreshSelect.value); changed(); });
    const hoursSelect = $("hours-span");
    if (![...hoursSelect.options].some((o) => Number(o.value) === state.hours)) {
      hoursSelect.append(new Option(`${state.hours} hours`, String(state.hours)));
    }
    hoursSelect.value = String(state.hours);
    hoursSelect.addEventListener("change", () => { state.hours = Number(hoursSelect.value); changed(); });
    await refresh();
  }

  start().catch((err) => {
    $("status").className = "error";
    $("status").textContent = "error: " + err.message;
  });
})();

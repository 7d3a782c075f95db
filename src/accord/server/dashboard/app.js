// accord dashboard: vanilla JS, no build step, no third-party code.
//
// Every string that comes from the API is put in the page with textContent
// or as an attribute value of an element built here, never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "accord.token";
  const STATS_EVERY_MS = 1000;
  const REFRESH_EVERY_MS = 2000;
  const WINDOW_S = 120;
  const PAGE = 50;
  const OUTCOMES = ["ok", "refused", "transient", "rejected", "in_flight"];
  const STATUSES = ["preparing", "committing", "aborting", "committed", "aborted", "needs_attention"];
  const TERMINAL = ["committed", "aborted", "needs_attention"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    samples: [], // [{t: ms, rate: tx/s}]
    last: null, // {t, finished}
    cursor: null,
    pages: 0,
    txnId: null,
    txn: null,
    pendingAction: null,
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
  }

  function append(node, children) {
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // Only known values become part of a class name.
  const known = (value, allowed, fallback) => (allowed.includes(value) ? value : fallback);

  function fmtTime(ms) {
    if (!ms) return "";
    const d = new Date(ms);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "…";
    if (ms >= 1000) return (ms / 1000).toFixed(2) + " s";
    if (ms >= 10) return ms.toFixed(0) + " ms";
    return ms.toFixed(1) + " ms";
  }

  function fmtJson(value) {
    if (value === null || value === undefined) return "";
    const text = JSON.stringify(value);
    return text.length > 200 ? text.slice(0, 197) + "..." : text;
  }

  function statusBadge(status) {
    return el("span", { class: "badge s-" + known(status, STATUSES, "other") }, status);
  }

  // ------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options) {
    const opts = Object.assign({ method: "GET" }, options || {});
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(opts.body);
    }
    opts.headers = headers;
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (err) {
      setConn("unreachable", "bad");
      throw new ApiError(0, "the coordinator is unreachable");
    }
    let body = null;
    try {
      body = await resp.json();
    } catch (err) {
      body = null;
    }
    if (resp.status === 401) {
      setConn(state.token ? "token refused" : "token needed", "bad");
      throw new ApiError(401, state.token ? "the API refused this token (401)" : "enter the API token");
    }
    if (!resp.ok) {
      const message = body && typeof body.error === "string" ? body.error : "HTTP " + resp.status;
      throw new ApiError(resp.status, message);
    }
    setConn("connected", "ok");
    return body;
  }

  function setConn(text, kind) {
    const conn = $("conn");
    conn.textContent = text;
    conn.className = "conn " + kind;
  }

  function showError(err) {
    const box = $("error");
    if (!err) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    box.hidden = false;
    box.textContent = err.message || String(err);
  }

  // ------------------------------------------------------------ stats and chart

  async function pollStats() {
    if (document.hidden) return;
    let stats;
    try {
      stats = await api("v1/stats");
    } catch (err) {
      if (err.status === 401 || err.status === 0) showError(err);
      return;
    }
    for (const key of ["in_flight", "committed", "aborted", "needs_attention", "started", "recovered", "calls", "retries"]) {
      const node = $("c-" + key);
      if (node) node.textContent = Number(stats[key] || 0).toLocaleString();
    }
    const now = performance.now();
    const finished = Number(stats.committed || 0) + Number(stats.aborted || 0);
    if (state.last !== null && now > state.last.t) {
      const rate = Math.max(0, finished - state.last.finished) / ((now - state.last.t) / 1000);
      state.samples.push({ t: now, rate: rate });
      $("c-throughput").textContent = rate.toFixed(rate < 10 ? 1 : 0);
    }
    state.last = { t: now, finished: finished };
    state.samples = state.samples.filter((s) => now - s.t <= WINDOW_S * 1000);
    const parts = [];
    for (const [status, count] of Object.entries(stats.by_status || {})) {
      parts.push(status.replace("_", " ") + " " + Number(count).toLocaleString());
    }
    $("by-status").textContent = parts.length ? "in the log: " + parts.join(", ") : "";
    drawChart(now);
  }

  function niceMax(value) {
    if (value <= 1) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) {
      if (value <= step * magnitude) return step * magnitude;
    }
    return 10 * magnitude;
  }

  function drawChart(now) {
    const canvas = $("throughput");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 720;
    const height = canvas.clientHeight || 150;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 44, right = 8, top = 8, bottom = 18;
    const plotW = width - left - right, plotH = height - top - bottom;
    const peak = niceMax(Math.max(0, ...state.samples.map((s) => s.rate)));
    const x = (t) => left + plotW * (1 - (now - t) / (WINDOW_S * 1000));
    const y = (v) => top + plotH * (1 - v / peak);

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.strokeStyle = "#e5e7eb";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (peak * i) / 4;
      ctx.beginPath();
      ctx.moveTo(left, y(v) + 0.5);
      ctx.lineTo(width - right, y(v) + 0.5);
      ctx.stroke();
      ctx.fillText(v % 1 === 0 ? String(v) : v.toFixed(1), left - 6, y(v));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let s = WINDOW_S; s >= 0; s -= 30) {
      ctx.textAlign = s === 0 ? "right" : "center";
      ctx.fillText(s === 0 ? "now" : "-" + s + "s", x(now - s * 1000), height - bottom + 4);
    }
    if (state.samples.length < 2) return;
    ctx.beginPath();
    state.samples.forEach((s, i) => (i === 0 ? ctx.moveTo(x(s.t), y(s.rate)) : ctx.lineTo(x(s.t), y(s.rate))));
    ctx.strokeStyle = "#2563eb";
    ctx.lineWidth = 2;
    ctx.stroke();
    ctx.lineTo(x(state.samples[state.samples.length - 1].t), y(0));
    ctx.lineTo(x(state.samples[0].t), y(0));
    ctx.closePath();
    ctx.fillStyle = "rgba(37, 99, 235, 0.12)";
    ctx.fill();
  }

  // ------------------------------------------------------------ transaction list

  async function loadList(reset) {
    const params = new URLSearchParams({ limit: String(PAGE) });
    const filter = $("state-filter").value;
    if (filter) params.set("state", filter);
    if (!reset && state.cursor) params.set("cursor", state.cursor);
    let page;
    try {
      page = await api("v1/transactions?" + params.toString());
    } catch (err) {
      showError(err);
      return;
    }
    showError(null);
    const rows = $("txn-rows");
    if (reset) {
      clear(rows);
      state.pages = 0;
    }
    state.pages += 1;
    for (const item of page.items || []) rows.append(txnRow(item));
    state.cursor = page.next_cursor || null;
    $("more").hidden = !state.cursor;
    $("list-empty").hidden = rows.childElementCount > 0;
  }

  function txnRow(item) {
    const link = el("a", { href: "#/txn/" + encodeURIComponent(item.id) }, item.id);
    return el(
      "tr",
      { "data-id": item.id, "data-status": item.status },
      el("td", { class: "id" }, link),
      el("td", null, statusBadge(item.status)),
      el("td", null, item.protocol),
      el("td", null, item.decision || ""),
      el("td", { class: "num" }, item.branches),
      el("td", null, fmtTime(item.created_at_ms)),
      el("td", null, fmtTime(item.updated_at_ms)),
      el("td", { class: "reason" }, item.reason || "")
    );
  }

  // ------------------------------------------------------------ one transaction

  async function loadTxn(id) {
    let txn;
    try {
      txn = await api("v1/transactions/" + encodeURIComponent(id));
    } catch (err) {
      if (state.txnId === id) showError(err);
      return;
    }
    if (state.txnId !== id) return; // navigated away meanwhile
    showError(null);
    state.txn = txn;
    renderTxn(txn);
  }

  function renderTxn(txn) {
    $("txn-title").textContent = txn.id;
    const facts = $("txn-facts");
    clear(facts);
    const fact = (name, value) => {
      facts.append(el("dt", null, name), el("dd", null, value));
    };
    fact("status", statusBadge(txn.status));
    fact("protocol", txn.protocol);
    fact("decision", txn.decision || "none yet");
    fact("reason", txn.reason || "");
    fact("created", fmtTime(txn.created_at_ms));
    fact("updated", fmtTime(txn.updated_at_ms));
    fact("deadline", fmtTime(txn.deadline_at_ms));
    renderActions(txn);
    renderTimeline(txn);
    renderBranches(txn);
    const ops = $("operator-actions");
    clear(ops);
    for (const action of txn.operator_actions || []) {
      ops.append(
        el("li", null, el("strong", null, action.action), " at " + fmtTime(action.at_ms) + ": ", el("span", { class: "reason" }, action.reason))
      );
    }
    if (!ops.childElementCount) ops.append(el("li", { class: "muted" }, "none"));
  }

  function renderActions(txn) {
    const terminal = TERMINAL.includes(txn.status);
    // retry: a running transaction's waiting calls go now; a parked one resumes.
    $("act-retry").hidden = txn.status === "committed" || txn.status === "aborted";
    // abort: only before a commit decision.
    $("act-abort").hidden = terminal || txn.decision !== null;
    // resolve: the operator repaired a parked transaction by hand.
    $("act-resolve").hidden = txn.status !== "needs_attention";
  }

  function renderBranches(txn) {
    const rows = $("branch-rows");
    clear(rows);
    for (const b of txn.branches || []) {
      rows.append(
        el(
          "tr",
          { "data-branch": b.name },
          el("td", null, b.name),
          el("td", { class: "url" }, b.participant),
          el("td", null, b.status),
          el("td", null, b.op || ""),
          el("td", { class: "num" }, b.attempts),
          el("td", { class: "err" }, b.error || ""),
          el("td", { class: "json" }, fmtJson(b.result))
        )
      );
    }
  }

  function renderTimeline(txn) {
    const box = $("timeline");
    clear(box);
    const branches = txn.branches || [];
    const now = Date.now();
    let t0 = Infinity, t1 = -Infinity;
    for (const b of branches) {
      for (const a of b.timeline || []) {
        const end = a.latency_ms === null || a.latency_ms === undefined ? now : a.started_at_ms + a.latency_ms;
        t0 = Math.min(t0, a.started_at_ms);
        t1 = Math.max(t1, end);
      }
    }
    if (!isFinite(t0)) {
      clear($("call-rows"));
      box.append(el("p", { class: "muted" }, "No calls recorded by this coordinator process (the attempts counted above come from the log)."));
      return;
    }
    const span = Math.max(t1 - t0, 1);
    const labelW = 150, width = 900, rowH = 30, axisH = 24, padR = 12;
    const plotW = width - labelW - padR;
    const height = axisH + rowH * branches.length + 4;
    const x = (t) => labelW + (plotW * (t - t0)) / span;
    const chart = svg("svg", {
      viewBox: "0 0 " + width + " " + height,
      width: "100%",
      role: "img",
      "aria-label": "Calls of each branch on a time axis",
      class: "timeline-svg",
    });
    for (let i = 0; i <= 4; i++) {
      const t = t0 + (span * i) / 4;
      chart.append(
        svg("line", { x1: x(t), x2: x(t), y1: axisH - 4, y2: height, class: "grid" }),
        svg("text", { x: x(t), y: 12, class: "tick", "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, "+" + fmtMs(t - t0))
      );
    }
    const charW = 6.2; // average width of an 11px character, for label placement
    branches.forEach((b, row) => {
      const yTop = axisH + row * rowH;
      chart.append(svg("text", { x: 4, y: yTop + rowH / 2 + 4, class: "branch-label" }, b.name));
      const attempts = (b.timeline || []).slice().sort((p, q) => p.started_at_ms - q.started_at_ms);
      let labelEnd = -Infinity; // a label never overlaps the previous one
      attempts.forEach((a, i) => {
        const outcome = known(a.outcome, OUTCOMES, "other");
        const open = a.latency_ms === null || a.latency_ms === undefined;
        const end = open ? now : a.started_at_ms + a.latency_ms;
        const barX = x(a.started_at_ms);
        const barW = Math.max(x(end) - barX, 3);
        const nextX = i + 1 < attempts.length ? x(attempts[i + 1].started_at_ms) : width - padR;
        const label = a.op + " #" + a.attempt + ": " + a.outcome + ", " + fmtMs(open ? null : a.latency_ms) + (a.error ? " — " + a.error : "");
        const bar = svg(
          "g",
          {
            class: "bar o-" + outcome,
            "data-branch": b.name,
            "data-op": a.op,
            "data-attempt": a.attempt,
            "data-outcome": a.outcome,
          },
          svg("title", null, label),
          svg("rect", { x: barX, y: yTop + 5, width: barW, height: rowH - 10, rx: 2 })
        );
        // The label goes inside a wide bar, else right of it if there is room
        // before the next bar, else left of it; else only in the tooltip and
        // the table of calls below.
        const text = a.op + " #" + a.attempt + " " + fmtMs(open ? null : a.latency_ms);
        const textW = text.length * charW;
        let at = null, cls = "bar-text", anchor = "start";
        if (barW >= textW + 8 && barX + 4 >= labelEnd) {
          at = barX + 4;
          cls = "bar-text in";
        } else if (barX + barW + 3 >= labelEnd && barX + barW + 3 + textW <= Math.min(nextX - 4, width - padR)) {
          at = barX + barW + 3;
        } else if (barX - 3 - textW >= Math.max(labelEnd, labelW)) {
          at = barX - 3;
          anchor = "end";
        }
        if (at !== null) {
          bar.append(svg("text", { x: at, y: yTop + rowH / 2 + 4, class: cls, "text-anchor": anchor }, text));
          labelEnd = (anchor === "end" ? at : at + textW) + 4;
        }
        chart.append(bar);
      });
    });
    box.append(chart);
    renderCalls(branches);
  }

  function renderCalls(branches) {
    const rows = $("call-rows");
    clear(rows);
    const calls = [];
    for (const b of branches) for (const a of b.timeline || []) calls.push([b.name, a]);
    calls.sort((p, q) => p[1].started_at_ms - q[1].started_at_ms);
    for (const [branch, a] of calls) {
      const outcome = known(a.outcome, OUTCOMES, "other");
      rows.append(
        el(
          "tr",
          null,
          el("td", null, fmtTime(a.started_at_ms)),
          el("td", null, branch),
          el("td", null, a.op),
          el("td", { class: "num" }, a.attempt),
          el("td", null, el("span", { class: "key o-" + outcome }, el("i"), a.outcome)),
          el("td", { class: "num" }, fmtMs(a.latency_ms === undefined ? null : a.latency_ms)),
          el("td", { class: "err" }, a.error || "")
        )
      );
    }
  }

  function renderLegend() {
    const legend = $("legend");
    clear(legend);
    for (const outcome of OUTCOMES) {
      legend.append(el("span", { class: "key o-" + outcome }, el("i"), outcome.replace("_", " ")));
    }
  }

  // ------------------------------------------------------------ operator actions

  function askReason(action) {
    state.pendingAction = action;
    $("reason-label").textContent = "Reason to " + action;
    $("reason").value = "";
    $("reason-form").hidden = false;
    $("reason").focus();
  }

  async function submitAction(event) {
    event.preventDefault();
    const action = state.pendingAction;
    const reason = $("reason").value.trim();
    if (!action || !reason || !state.txnId) return;
    $("reason-form").hidden = true;
    state.pendingAction = null;
    const result = $("action-result");
    result.textContent = action + "…";
    result.className = "";
    try {
      const out = await api("v1/transactions/" + encodeURIComponent(state.txnId) + "/" + action, {
        method: "POST",
        body: { reason: reason },
      });
      result.textContent = action + ": done, status " + (out && out.status ? out.status : "unknown");
      result.className = "ok";
    } catch (err) {
      result.textContent = action + " refused: " + err.message;
      result.className = "bad";
    }
    await loadTxn(state.txnId);
  }

  // ------------------------------------------------------------ routing

  function route() {
    const hash = location.hash || "#/";
    const match = /^#\/txn\/(.+)$/.exec(hash);
    $("action-result").textContent = "";
    $("reason-form").hidden = true;
    if (match) {
      let id;
      try {
        id = decodeURIComponent(match[1]);
      } catch (err) {
        id = match[1];
      }
      state.txnId = id;
      state.txn = null;
      $("list-view").hidden = true;
      $("txn-view").hidden = false;
      $("txn-title").textContent = id;
      clear($("timeline"));
      clear($("call-rows"));
      clear($("branch-rows"));
      loadTxn(id);
    } else {
      state.txnId = null;
      $("txn-view").hidden = true;
      $("list-view").hidden = false;
      loadList(true);
    }
  }

  function refresh() {
    if (document.hidden) return;
    if (state.txnId) {
      loadTxn(state.txnId);
    } else if (state.pages <= 1) {
      loadList(true); // keeps the first page live; paging through stops it
    }
  }

  function init() {
    $("token").value = state.token;
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.token = $("token").value.trim();
      if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
      else sessionStorage.removeItem(TOKEN_KEY);
      showError(null);
      pollStats();
      route();
    });
    $("state-filter").addEventListener("change", () => loadList(true));
    $("refresh").addEventListener("click", () => loadList(true));
    $("more").addEventListener("click", () => loadList(false));
    for (const button of document.querySelectorAll("#txn-actions button[data-action]")) {
      button.addEventListener("click", () => askReason(button.getAttribute("data-action")));
    }
    $("reason-form").addEventListener("submit", submitAction);
    $("reason-cancel").addEventListener("click", () => {
      $("reason-form").hidden = true;
      state.pendingAction = null;
    });
    window.addEventListener("hashchange", route);
    window.addEventListener("resize", () => drawChart(performance.now()));
    renderLegend();
    if (!state.token) setConn("token needed", "bad");
    route();
    pollStats();
    setInterval(pollStats, STATS_EVERY_MS);
    setInterval(refresh, REFRESH_EVERY_MS);
  }

  init();
})();

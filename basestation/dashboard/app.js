// The live view of `basestation serve` (issue 25). Plain JS, no libraries, no build step.
// Data: `state` events of /v1/wdmoe/events (read with fetch() and a stream reader, since
// EventSource cannot send the key header), /v1/wdmoe/state when the stream ends. Every element
// that shows a figure carries it as a data attribute, for tests and users' scripts.
"use strict";

const KEY_STORAGE = "wdmoe-api-key"; // sessionStorage: this tab only, never in a URL
const RETRY_FIRST_MS = 500; // reconnect backoff, doubled per failure up to the cap
const RETRY_CAP_MS = 8000;
const STALL_MS = 15000; // no byte (state or keepalive) for this long: the stream is dead
const REQUEST_TIMEOUT_MS = 10000; // one snapshot request
const POLL_INTERVAL_MS = 1000;
const POLLS_BEFORE_STREAM = 10; // after the stream ended, poll this many times, then retry it
const CHAT_TIMEOUT_MS = 120000; // one whole streamed answer
const STEPS_SHOWN = 8; // waterfall rows
const SVG_NS = "http://www.w3.org/2000/svg";

const page = {
  snapshot: null,
  expertsView: "routed",
  unreachableSince: null, // Date of the first failure of the current outage
  keyWaiters: [], // resolvers waiting for the key form
};

class NeedKey extends Error {}
class HttpError extends Error {} // the server answered, with an error status

// -- small helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const isNum = (x) => typeof x === "number" && Number.isFinite(x);
const fmt = (x, digits = 1) => (isNum(x) ? x.toFixed(digits) : "–");
const clock = (date) => date.toTimeString().slice(0, 8); // HH:MM:SS

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// -- status banner and key form --------------------------------------------------------------

function setStatus(status, text) {
  const banner = $("status");
  banner.dataset.status = status;
  banner.textContent = text;
}

function markConnected(how) {
  page.unreachableSince = null;
  setStatus(how, how === "connected" ? "live" : "live (polling: the event stream ended)");
}

function markUnreachable(err, retryMs) {
  page.unreachableSince = page.unreachableSince || new Date();
  const what = err instanceof HttpError ? `server error (${err.message})` : "server unreachable";
  setStatus("disconnected", `${what} since ${clock(page.unreachableSince)} — ` +
    `retrying in ${(retryMs / 1000).toFixed(1)} s`);
}

function askKey() {
  setStatus("key-needed", "the server asks for its API key");
  const form = $("key-form");
  form.hidden = false;
  $("api-key").focus();
  return new Promise((resolve) => page.keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-form").hidden = true;
  for (const resolve of page.keyWaiters.splice(0)) resolve();
});

// -- data: event stream, polling, reconnect --------------------------------------------------

async function request(path, options = {}) {
  const response = await fetch(path, {
    ...options, cache: "no-store", headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  if (response.status === 401) throw new NeedKey();
  if (!response.ok) throw new HttpError(`HTTP ${response.status} from ${path}`);
  return response;
}

// Parses SSE blocks out of `buffer`; calls onEvent(name, data) for each whole one and returns
// what is left (a partial block).
function parseEvents(buffer, onEvent) {
  const blocks = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // a keepalive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) onEvent(name, data.join("\n"));
  }
  return rest;
}

// Reads /v1/wdmoe/events until it ends (returns) or fails (throws).
async function readEvents() {
  const abort = new AbortController();
  let stall = setTimeout(() => abort.abort(), STALL_MS);
  try {
    const response = await request("/v1/wdmoe/events", { signal: abort.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      clearTimeout(stall);
      stall = setTimeout(() => abort.abort(), STALL_MS);
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, data) => {
        if (name !== "state") return;
        markConnected("connected");
        render(JSON.parse(data));
      });
    }
  } finally {
    clearTimeout(stall);
  }
}

async function pollState() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
  try {
    const response = await request("/v1/wdmoe/state", { signal: abort.signal });
    render(await response.json());
  } finally {
    clearTimeout(timer);
  }
}

// Stream; when it ends, poll a while; on any failure show the banner and retry with backoff.
async function connect() {
  let retryMs = RETRY_FIRST_MS;
  for (;;) {
    try {
      await readEvents();
      for (let i = 0; i < POLLS_BEFORE_STREAM; i++) {
        await pollState();
        markConnected("polling");
        retryMs = RETRY_FIRST_MS;
        await sleep(POLL_INTERVAL_MS);
      }
    } catch (err) {
      if (err instanceof NeedKey) {
        await askKey();
        retryMs = RETRY_FIRST_MS;
        continue;
      }
      markUnreachable(err, retryMs);
      await sleep(retryMs);
      retryMs = Math.min(retryMs * 2, RETRY_CAP_MS);
    }
  }
}

// -- render: header ---------------------------------------------------------------------------

function render(snapshot) {
  page.snapshot = snapshot;
  $("model").textContent = snapshot.model || "";
  const retries = snapshot.replica_retries || 0; // only when a replica failed (issue 24)
  $("summary").textContent = `up ${fmt(snapshot.uptime_s, 0)} s · default θ ` +
    `${fmt(snapshot.theta_default, 2)} · ${(snapshot.agents || []).length} agents` +
    (retries ? ` · ${retries} token groups re-sent to another replica` : "");
  $("summary").dataset.replicaRetries = retries;
  renderAgents(snapshot.agents || []);
  renderHeatmap(snapshot.experts, snapshot.agents || []);
  renderWaterfall(snapshot.tokens || []);
  renderCharts(snapshot.series || []);
}

// -- render: links and boxes ------------------------------------------------------------------

function describeShaping(shaping) {
  if (!shaping) return "not known";
  const applied = Object.entries(shaping).filter(([, value]) => value !== null && value !== 0 &&
    value !== false && value !== "");
  return applied.length ? applied.map(([name, value]) => `${name} ${value}`).join(", ")
    : "none (unshaped)";
}

function agentCard(agent, index) {
  const bits = agent.bits ? ` (${agent.bits}-bit)` : "";
  const rows = [
    ["experts", `${(agent.experts || []).join(", ")}${bits}`],
    ["RTT p50 / p95", `${fmt(agent.rtt_p50_ms, 2)} / ${fmt(agent.rtt_p95_ms, 2)} ms`],
    ["throughput down / up", `${fmt(agent.down_mbit_s)} / ${fmt(agent.up_mbit_s)} Mbit/s`],
    ["compute", `${fmt(agent.compute_us_per_token)} µs/token`],
    ["calls · drops · failures", `${agent.calls ?? "–"} · ${agent.drops ?? "–"} · ` +
      `${agent.failures ?? "–"} (${agent.fault_drops ?? 0} fault drops)`],
  ];
  if (isNum(agent.memory_budget_mb)) {
    rows.push(["memory budget", `${fmt(agent.memory_budget_mb, 0)} MB, cache hits ` +
      `${isNum(agent.cache_hit_rate) ? fmt(100 * agent.cache_hit_rate, 0) + " %" : "–"}`]);
  }
  // a replicated expert's tokens are split among its holders: what this one computed of each
  const replicaCalls = Object.entries(agent.replica_calls || {});
  const replicaTokens = replicaCalls.reduce((sum, [, n]) => sum + n, 0);
  if (agent.replica_calls) {
    rows.push(["replica tokens", `${replicaCalls.map(([e, n]) => `${e}: ${n}`).join(", ")} ` +
      `(${replicaTokens} in all)`]);
  }
  rows.push(["shaping", describeShaping(agent.shaping)]);
  if (agent.throughput_note) rows.push(["note", agent.throughput_note]);
  const table = el("dl");
  for (const [name, value] of rows) table.append(el("dt", { text: name }), el("dd", { text: value }));
  return el("article", {
    class: agent.alive === false ? "card agent dead" : "card agent",
    "data-agent": agent.agent,
    "data-index": index,
    "data-alive": agent.alive,
    "data-rtt-ms": isNum(agent.rtt_p50_ms) ? agent.rtt_p50_ms : "",
    "data-rtt-p95-ms": isNum(agent.rtt_p95_ms) ? agent.rtt_p95_ms : "",
    "data-down-mbit-s": agent.down_mbit_s, "data-up-mbit-s": agent.up_mbit_s,
    "data-compute-us-per-token": agent.compute_us_per_token,
    "data-calls": agent.calls, "data-drops": agent.drops, "data-failures": agent.failures,
    "data-replica-tokens": agent.replica_calls ? replicaTokens : null,
  }, el("h3", { text: `box ${index} · ${agent.address || agent.agent}` }),
  el("p", { class: "muted", text: `${agent.device || ""}${agent.alive === false ? " · DOWN" : ""}` }),
  table);
}

function renderAgents(agents) {
  $("agents").replaceChildren(...agents.map(agentCard));
}

// -- render: experts heatmap ------------------------------------------------------------------

function renderHeatmap(experts, agents) {
  const holder = $("heatmap");
  if (!experts || !experts.layers) {
    holder.replaceChildren(el("p", { class: "muted", text: "no tokens counted yet" }));
    return;
  }
  const view = page.expertsView;
  const holdersOf = {}; // expert -> [[agent, box]] that hold it: several for a replica
  agents.forEach((a, i) => (a.experts || []).forEach((e) =>
    (holdersOf[e] = holdersOf[e] || []).push([a.agent, i])));
  const routed = experts.routed, computed = experts.computed;
  const top = Math.max(1e-9, ...routed.flat()); // one scale for both views: differences show
  $("experts-tokens").textContent = `(${experts.tokens} tokens counted)`;
  const head = el("tr", {}, el("th", { text: "layer \\ expert" }));
  const agentsOf = []; // expert -> its holders' names, space-separated (CSS `~=` finds one)
  for (let e = 0; e < experts.experts; e++) {
    const holders = holdersOf[e] || [];
    const boxes = holders.map((h) => h[1]).join(", ");
    agentsOf[e] = holders.map((h) => h[0]).join(" ");
    head.append(el("th", {
      "data-expert": e, "data-agents": agentsOf[e], title: holders.map((h) => h[0]).join(", "),
      class: holders.length > 1 ? "replicated" : null,
      text: holders.length ? `${e} · box${holders.length > 1 ? "es" : ""} ${boxes}` : `${e}`,
    }));
  }
  const table = el("table", { class: "heatmap", "data-view": view }, head);
  for (let l = 0; l < experts.layers; l++) {
    const row = el("tr", {}, el("th", { text: l }));
    for (let e = 0; e < experts.experts; e++) {
      const r = routed[l][e], c = computed[l][e];
      const share = view === "routed" ? r : c;
      const holders = holdersOf[e] || [];
      const cell = el("td", {
        "data-layer": l, "data-expert": e, "data-agents": agentsOf[e],
        "data-agent": holders.length === 1 ? holders[0][0] : null, // one holder only
        "data-share": share, "data-routed-share": r, "data-computed-share": c,
        title: `layer ${l}, expert ${e}: routed ${fmt(100 * r)} %, computed ${fmt(100 * c)} %`,
        text: fmt(100 * share, 0),
      });
      cell.style.background = `rgba(37, 99, 235, ${Math.min(1, share / top).toFixed(3)})`;
      if (share / top > 0.55) cell.classList.add("dark");
      if (c < r) cell.classList.add("dropped");
      row.append(cell);
    }
    table.append(row);
  }
  holder.replaceChildren(table);
}

for (const radio of document.querySelectorAll('input[name="experts-view"]')) {
  radio.addEventListener("change", () => {
    page.expertsView = radio.value;
    if (page.snapshot) renderHeatmap(page.snapshot.experts, page.snapshot.agents || []);
  });
}

// -- render: tokens waterfall -----------------------------------------------------------------

function stepRow(step, scaleMs) {
  const width = 600, rowHeight = 14, labelWidth = 170;
  const boxes = step.boxes || [];
  const x = (ms) => labelWidth + (width - labelWidth) * Math.max(0, ms) / scaleMs;
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${rowHeight * (boxes.length + 1)}`,
    class: "waterfall" });
  const label = (y, text) => svg.append(el("svg:text", { x: 0, y: y + rowHeight - 3, text }));
  const bar = (y, fromMs, ms, cls, attrs = {}) => svg.append(el("svg:rect", {
    x: x(fromMs), y: y + 2, width: Math.max(1, x(fromMs + ms) - x(fromMs)),
    height: rowHeight - 4, class: cls, ...attrs }));
  label(0, `base station ${fmt(step.base_station_ms)} ms`);
  bar(0, 0, step.base_station_ms, "bs", { "data-ms": step.base_station_ms });
  boxes.forEach((box, i) => {
    const y = rowHeight * (i + 1);
    const slowest = box.agent === step.slowest;
    const g = el("svg:g", { "data-agent": box.agent, "data-calls": box.calls,
      "data-round-trip-ms": box.round_trip_ms, "data-compute-ms": box.compute_ms,
      "data-wire-ms": box.wire_ms, "data-critical-ms": box.critical_ms,
      "data-slowest": slowest, class: slowest ? "slowest" : "" });
    svg.append(g);
    const name = box.agent.replace(/^tcp:\/\//, "");
    g.append(el("svg:text", { x: 0, y: y + rowHeight - 3,
      text: `${slowest ? "◆ " : ""}${name}` }));
    g.append(el("svg:rect", { x: x(step.base_station_ms), y: y + 2, height: rowHeight - 4,
      width: Math.max(1, x(step.base_station_ms + box.compute_ms) - x(step.base_station_ms)),
      class: "compute" }, el("svg:title", { text: `compute ${fmt(box.compute_ms, 2)} ms` })));
    const wireFrom = step.base_station_ms + box.compute_ms;
    g.append(el("svg:rect", { x: x(wireFrom), y: y + 2, height: rowHeight - 4,
      width: Math.max(1, x(wireFrom + box.wire_ms) - x(wireFrom)), class: "wire" },
    el("svg:title", { text: `wire ${fmt(box.wire_ms, 2)} ms (${box.calls} calls, ` +
      `critical ${fmt(box.critical_ms, 2)} ms)` })));
  });
  const kind = step.prefill ? `prefill of ${step.tokens} tokens` : `${step.tokens} token(s)`;
  return el("div", {
    class: "step", "data-step": step.step, "data-prefill": step.prefill,
    "data-total-ms": step.total_ms, "data-base-station-ms": step.base_station_ms,
    "data-wait-ms": step.wait_ms, "data-theta": step.theta, "data-slowest": step.slowest,
  }, el("div", { class: "step-head", text: `step ${step.step} · ${kind} · θ ` +
    `${fmt(step.theta, 2)} · ${fmt(step.total_ms)} ms (waited ${fmt(step.wait_ms)} ms on ` +
    `agents over ${step.layers} layers)` }), svg);
}

function renderWaterfall(tokens) {
  const steps = tokens.slice(-STEPS_SHOWN).reverse();
  if (!steps.length) {
    $("waterfall").replaceChildren(el("p", { class: "muted", text: "no steps yet" }));
    return;
  }
  const scaleMs = Math.max(1e-3, ...steps.map((s) => Math.max(s.total_ms || 0,
    ...(s.boxes || []).map((b) => (s.base_station_ms || 0) + b.round_trip_ms))));
  const legend = el("p", { class: "legend" }, el("span", { class: "key bs" }), " base station ",
    el("span", { class: "key compute" }), " agent compute ", el("span", { class: "key wire" }),
    ` wire (round trip − compute) · full width = ${fmt(scaleMs)} ms`);
  $("waterfall").replaceChildren(legend, ...steps.map((s) => stepRow(s, scaleMs)));
}

// -- render: over time ------------------------------------------------------------------------

const CHARTS = [
  ["token_ms_p50", "token latency p50 (ms)", (p) => p.token_ms_p50],
  ["theta", "θ", (p) => p.theta],
  ["drops", "drops per second", (p) => p.drops],
  ["failures", "failures + fault drops per second", (p) => (p.failures || 0) + (p.fault_drops || 0)],
];

function lineChart(name, title, points) {
  const width = 280, height = 80, pad = 4;
  const values = points.map((p) => p[1]).filter(isNum);
  const top = Math.max(1e-9, ...values);
  const t0 = points.length ? points[0][0] : 0;
  const span = Math.max(1, points.length ? points[points.length - 1][0] - t0 : 1);
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, class: "chart" });
  const xy = points.filter((p) => isNum(p[1])).map(([t, v]) =>
    `${(pad + (width - 2 * pad) * (t - t0) / span).toFixed(1)},` +
    `${(height - pad - (height - 2 * pad) * v / top).toFixed(1)}`);
  svg.append(el("svg:polyline", { points: xy.join(" "), class: "line" }));
  const last = values.length ? values[values.length - 1] : null;
  return el("figure", { class: "chart-box", "data-series": name, "data-last": last,
    "data-max": values.length ? top : null },
  el("figcaption", { text: `${title}: now ${fmt(last, 2)}, max ${fmt(values.length ? top : null, 2)}` }),
  svg);
}

function renderCharts(series) {
  $("charts").replaceChildren(...CHARTS.map(([name, title, pick]) =>
    lineChart(name, title, series.map((p) => [p.t_unix_s, pick(p)]))));
}

// -- chat -------------------------------------------------------------------------------------

function colourTokens(spans) {
  const gaps = spans.map((s) => Number(s.dataset.gapMs));
  const low = Math.min(...gaps), high = Math.max(...gaps);
  for (const span of spans) {
    const f = high > low ? (Number(span.dataset.gapMs) - low) / (high - low) : 0;
    span.style.background = `hsl(${Math.round(120 * (1 - f))}, 70%, 82%)`;
  }
}

async function modelId() {
  if (page.snapshot && page.snapshot.model) return page.snapshot.model;
  const models = await (await request("/v1/models")).json();
  return models.data[0].id;
}

async function chat(text) {
  const output = $("chat-output");
  const answer = el("p", { class: "answer" });
  output.append(el("p", { class: "question", text }), answer);
  const body = {
    model: await modelId(), stream: true, stream_options: { include_usage: true },
    messages: [{ role: "user", content: text }],
    max_tokens: Number($("chat-max-tokens").value) || 48,
    theta: Number($("chat-theta").value) || 0,
  };
  const sent = performance.now();
  let previous = sent;
  const spans = [];
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), CHAT_TIMEOUT_MS);
  let finalChunk = null;
  try {
    const response = await request("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: abort.signal,
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (_, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.wdmoe || chunk.usage) finalChunk = chunk;
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (!piece) return;
        const now = performance.now();
        const span = el("span", { class: "tok", "data-gap-ms": (now - previous).toFixed(1),
          title: `${(now - previous).toFixed(1)} ms after the previous piece`, text: piece });
        previous = now;
        spans.push(span);
        answer.append(span);
        colourTokens(spans);
      });
    }
  } finally {
    clearTimeout(timer);
  }
  const gaps = spans.map((s) => Number(s.dataset.gapMs));
  const usage = finalChunk && finalChunk.usage;
  const tokens = usage ? usage.completion_tokens : spans.length;
  let stats = `${tokens} tokens in ${fmt(performance.now() - sent, 0)} ms (${spans.length} ` +
    `text pieces); first after ${fmt(gaps[0], 0)} ms (measured here)`;
  const wdmoe = finalChunk && finalChunk.wdmoe;
  if (wdmoe) stats += ` · server: θ ${fmt(wdmoe.theta, 2)}, ${wdmoe.experts_dropped ?? "–"} ` +
    `experts dropped of ${wdmoe.expert_calls ?? "–"} calls`;
  $("chat-stats").textContent = stats;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text) return;
  $("chat-send").disabled = true;
  try {
    await chat(text);
    input.value = "";
  } catch (err) {
    if (err instanceof NeedKey) askKey();
    $("chat-stats").textContent = err instanceof NeedKey
      ? "the server asks for its API key: enter it above, then send again"
      : `chat failed: ${err.message}`;
  } finally {
    $("chat-send").disabled = false;
  }
});

connect();

// apigate dashboard: reads the admin API every 2 s and draws it. No framework, no build step.
// Everything shown is set through textContent (never innerHTML): values come from the network.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "apigate.admin.token";
const MAX_EVENTS = 60;
const COLORS = ["#2c64d6", "#d64545", "#1f9d55", "#c98a00", "#8e44ad", "#16a2b8",
  "#e67e22", "#5d6d7e", "#c2185b", "#2e7d32"];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  timer: null,
  eventsSince: 0,
  events: [],
  colors: new Map(),
  paused: false,
};

// ------------------------------------------------------------------ small DOM helpers
function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toFixed(digits === undefined ? 1 : digits);
}

function routeLabel(name) { return name === "" ? "(no route)" : name; }

function colorOf(name) {
  if (!state.colors.has(name)) state.colors.set(name, COLORS[state.colors.size % COLORS.length]);
  return state.colors.get(name);
}

// ------------------------------------------------------------------ the admin API
class AuthNeeded extends Error {}

async function api(path, optional) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) throw new AuthNeeded("token required");
  if (optional && resp.status === 404) return null;
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  return resp.json();
}

function setStatus(text, kind) {
  const node = $("status");
  node.textContent = text;
  node.dataset.state = kind;
}

function askForToken(message, pause) {
  $("token-label").textContent = message;
  $("token-panel").hidden = false;
  $("token-input").focus();
  if (pause === false) return;
  state.paused = true;
  setStatus("token needed", "auth");
}

// ------------------------------------------------------------------ polling
async function refresh() {
  if (state.paused) return;
  try {
    const [health, services, routes, stats, events] = await Promise.all([
      api("/healthz"),
      api("/services"),
      api("/routes"),
      api("/stats", true),
      api("/events?since=" + state.eventsSince + "&limit=" + MAX_EVENTS),
    ]);
    renderSummary(health, stats);
    renderCharts(stats);
    renderRoutes(routes.routes || [], stats);
    renderServices(services.services || []);
    renderEvents(events.events || []);
    setStatus("updated " + new Date().toLocaleTimeString(), "ok");
  } catch (err) {
    if (err instanceof AuthNeeded) {
      askForToken(state.token ? "The token was refused: enter the admin token."
        : "This admin API needs a token.");
    } else {
      setStatus("admin API unreachable: " + err.message, "error");
    }
  }
}

function schedule() {
  if (state.timer !== null) clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
  refresh();
}

// ------------------------------------------------------------------ rendering
function renderSummary(health, stats) {
  $("version").textContent = "v" + health.version;
  const parts = ["up " + Math.round(health.uptime_s) + " s"];
  if (stats) {
    let rps = 0;
    for (const r of Object.values(stats.routes)) rps += r.rps;
    parts.push(stats.connections + " connections", fmt(rps) + " req/s");
  }
  $("summary").textContent = parts.join(" · ");
}

function matchText(route) {
  const match = route.match || {};
  const methods = (match.methods || []).join(",");
  const paths = (match.paths || []).join(" ");
  const hosts = (match.hosts || []).join(",");
  return [methods, hosts, paths].filter(Boolean).join(" ");
}

function renderRoutes(routes, stats) {
  const tbody = $("routes").querySelector("tbody");
  const rows = [];
  const seen = new Set();
  const statsOf = (name) => (stats && stats.routes[name]) || null;
  const row = (name, match, service) => {
    const s = statsOf(name);
    seen.add(name);
    return el("tr", { "data-route": name },
      el("td", {}, el("span", { class: "swatch-text" }, routeLabel(name))),
      el("td", {}, match), el("td", {}, service || "–"),
      el("td", { class: "num" }, s ? fmt(s.rps, 2) : "–"),
      el("td", { class: "num" }, s ? fmt(100 * s.error_rate, 1) + " %" : "–"),
      el("td", { class: "num" }, s ? fmt(s.p50_ms, 2) : "–"),
      el("td", { class: "num" }, s ? fmt(s.p99_ms, 2) : "–"),
      el("td", { class: "num" }, s ? String(s.total) : "–"));
  };
  for (const route of routes) {
    rows.push(row(route.name, matchText(route), route.service || (route.aggregate ? "(aggregate)" : "")));
  }
  if (stats) {
    for (const name of Object.keys(stats.routes)) {
      if (!seen.has(name)) rows.push(row(name, name === "" ? "unmatched requests" : "(removed)", ""));
    }
  }
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { class: "empty", colSpan: 8 }, "no routes")));
  tbody.replaceChildren(...rows);
}

function healthBadge(inst) {
  if (inst.draining) return el("span", { class: "badge warn" }, "draining");
  return inst.healthy ? el("span", { class: "badge ok" }, "healthy")
    : el("span", { class: "badge bad" }, "unhealthy");
}

function breakerBadge(breaker) {
  if (breaker === undefined || breaker === null) return el("span", { class: "badge na" }, "n/a");
  const value = typeof breaker === "string" ? breaker : (breaker.state || JSON.stringify(breaker));
  const kind = value === "closed" ? "ok" : value === "open" ? "bad" : "warn";
  return el("span", { class: "badge " + kind }, value);
}

function renderServices(services) {
  const cards = services.map((svc) => {
    const rows = svc.instances.map((inst) => el("tr", { "data-instance": svc.name + "/" + inst.id },
      el("td", {}, inst.id), el("td", {}, inst.url), el("td", {}, inst.origin),
      el("td", {}, healthBadge(inst)),
      el("td", { class: "num" }, String(inst.weight)),
      el("td", { class: "num" }, String(inst.in_flight)),
      el("td", { class: "num" }, inst.ttl_remaining_s === null ? "–" : fmt(inst.ttl_remaining_s, 0) + " s")));
    if (rows.length === 0) rows.push(el("tr", {}, el("td", { class: "empty", colSpan: 7 }, "no instances")));
    return el("article", { class: "service", "data-service": svc.name },
      el("header", {},
        el("strong", {}, svc.name),
        el("span", { class: "muted" }, svc.balancer),
        el("span", {}, svc.available + " of " + svc.instances.length + " available"),
        el("span", {}, "breaker: ", breakerBadge(svc.breaker)),
        el("span", { class: "muted" }, "routes: " + ((svc.routes || []).join(", ") || "–"))),
      el("table", {},
        el("thead", {}, el("tr", {}, ...["instance", "url", "origin", "health"].map((h) => el("th", {}, h)),
          ...["weight", "in-flight", "ttl"].map((h) => el("th", { class: "num" }, h)))),
        el("tbody", {}, ...rows)));
  });
  if (cards.length === 0) cards.push(el("p", { class: "empty" }, "no services"));
  $("services").replaceChildren(...cards);
}

function renderEvents(fresh) {
  for (const event of fresh) {
    state.eventsSince = Math.max(state.eventsSince, event.seq);
    state.events.unshift(event);
  }
  state.events.length = Math.min(state.events.length, MAX_EVENTS);
  const items = state.events.map((e) => el("li", { class: e.healthy === false ? "unhealthy" : "", "data-seq": String(e.seq) },
    el("time", {}, new Date(e.time * 1000).toLocaleTimeString()),
    el("span", { class: "kind" }, e.kind), el("span", {}, e.message)));
  if (items.length === 0) items.push(el("li", { class: "empty" }, "no events yet"));
  $("events").replaceChildren(...items);
}

// ------------------------------------------------------------------ charts (canvas)
function renderCharts(stats) {
  const note = $("stats-note");
  if (!stats) {
    note.hidden = false;
    note.textContent = "Metrics are not enabled on this gateway (no /stats endpoint).";
    return;
  }
  note.hidden = true;
  const names = Object.keys(stats.routes).sort();
  const now = stats.time;
  const lines = (pick, dashed) => names.map((name) => ({
    name, dashed, color: colorOf(name),
    points: stats.routes[name].series.map((p) => [p.time - now, pick(p)]),
  }));
  drawChart($("chart-rps"), lines((p) => p.rps), stats.window_s);
  drawChart($("chart-errors"), lines((p) => (p.requests === 0 ? null : 100 * p.error_rate)), stats.window_s);
  drawChart($("chart-latency"), [...lines((p) => p.p50_ms, false), ...lines((p) => p.p99_ms, true)], stats.window_s);
  $("legend").replaceChildren(...names.map((name) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colorOf(name);
    return el("span", { "data-legend": name }, swatch, routeLabel(name));
  }));
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const exp = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * exp >= value) return step * exp;
  return 10 * exp;
}

function drawChart(canvas, lines, windowS) {
  const ratio = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 420;
  const cssH = canvas.clientHeight || 180;
  if (canvas.width !== Math.round(cssW * ratio) || canvas.height !== Math.round(cssH * ratio)) {
    canvas.width = Math.round(cssW * ratio);
    canvas.height = Math.round(cssH * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const pad = { l: 44, r: 18, t: 8, b: 20 };
  const w = cssW - pad.l - pad.r;
  const h = cssH - pad.t - pad.b;
  let max = 0;
  for (const line of lines) for (const [, y] of line.points) if (y !== null && y > max) max = y;
  max = niceMax(max * 1.1);  // headroom: a flat line at the maximum stays visible
  const x = (t) => pad.l + w * (1 + t / windowS);
  const y = (v) => pad.t + h * (1 - v / max);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7385";
  ctx.strokeStyle = "#e2e5ea";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y(v) + 0.5); ctx.lineTo(pad.l + w, y(v) + 0.5); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(v >= 100 ? v.toFixed(0) : +v.toFixed(2) + "", pad.l - 4, y(v));
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const t of [-60, -45, -30, -15, 0]) {
    if (-t > windowS) continue;
    ctx.fillText(t === 0 ? "now" : t + "s", x(t), pad.t + h + 4);
  }
  for (const line of lines) {
    ctx.strokeStyle = line.color;
    ctx.lineWidth = 1.6;
    ctx.setLineDash(line.dashed ? [5, 3] : []);
    ctx.beginPath();
    let open = false;
    for (const [t, v] of line.points) {
      if (v === null || v === undefined || t < -windowS) { open = false; continue; }
      if (open) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      open = true;
    }
    ctx.stroke();
  }
  ctx.setLineDash([]);
}

// ------------------------------------------------------------------ start
function useToken(token) {
  state.token = token;
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  state.paused = false;
  $("token-panel").hidden = true;
  schedule();
}

async function start() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useToken($("token-input").value.trim());
  });
  $("token-clear").addEventListener("click", () => {
    $("token-input").value = "";
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    askForToken("Token forgotten. Enter the admin token.");
  });
  $("token-button").addEventListener("click", () => askForToken("Enter the admin token.", false));
  let needed = false;
  try {
    const resp = await fetch("/dashboard/auth", { cache: "no-store" });
    needed = resp.ok && (await resp.json()).token_required;
  } catch (err) {
    setStatus("admin API unreachable: " + err.message, "error");
  }
  if (needed && !state.token) {
    askForToken("This admin API needs a token.");
    return;
  }
  schedule();
}

document.addEventListener("DOMContentLoaded", start);

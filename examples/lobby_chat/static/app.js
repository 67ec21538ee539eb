// The lobby chat page, on the wsmanager browser client served by the app.
// Everything the page shows of the server is pushed over its WebSocket: the
// member list ("members"), the live dashboard ("dashboard"), chat. No polling.
import { WSManagerClient } from "/wsmanager/wsmanager.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// Reconnect tuning from the query string (?base_delay=ms&max_delay=ms&retry_later=ms), for trying it out.
const tuning = {};
for (const [param, option] of [["base_delay", "baseDelay"], ["max_delay", "maxDelay"], ["retry_later", "retryLaterDelay"]]) {
  if (params.has(param)) tuning[option] = Number(params.get(param));
}

const REASONS = {
  lobby_full: "This lobby is full",
  server_full: "The server is full",
  user_limit: "Too many tabs open with this name",
  unauthorized: "That name is not allowed (letters, digits, space . - _; up to 24)",
  shutting_down: "The server is restarting",
  stale: "The connection went silent",
  rate_limited: "Too many messages",
  slow_consumer: "This page could not keep up",
  bad_message: "The server could not read this page's messages",
  server_shutdown: "The server is shutting down",
  bad_lobby: "That lobby name is not allowed",
};

let client = null;
let me = null;
let members = [];
let simulated = new Set(); // users that are simulated clients (from the dashboard)
let left = false; // the visitor pressed Leave
let serverClose = null; // {why, code} of the last close of an open connection (kept while retries fail)
let openedSinceClose = false;
let presence = false; // the server sends presence events
const flash = new Map(); // user -> "joined" | "left": highlighted in the member list for a moment
const leftRows = new Map(); // users who just left, still shown (struck through) for a moment

function line(kind, from, text) {
  const div = document.createElement("div");
  div.className = "msg";
  div.dataset.kind = kind;
  if (from) {
    const b = document.createElement("span");
    b.className = "from";
    b.textContent = from;
    div.append(b);
  }
  div.append(document.createTextNode(text));
  const log = $("log");
  log.append(div);
  log.scrollTop = log.scrollHeight;
}

function fmtMs(ms) {
  return typeof ms === "number" ? `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms` : "—";
}

function renderStatus() {
  const s = client ? client.state : "idle";
  const shown = left || !client ? "idle" : s;
  const labels = { idle: "not connected", connecting: "connecting…", open: "connected", reconnecting: "reconnecting…", closed: "disconnected" };
  $("status").textContent = labels[shown] || shown;
  $("status").dataset.state = shown;
  const ready = Boolean(client && client.ready);
  $("text").disabled = $("send-btn").disabled = !client || s === "closed";
  $("leave-btn").disabled = !client || s === "closed";
  for (const b of document.querySelectorAll("#simulate button")) b.disabled = !ready;
  document.body.dataset.ready = String(ready);
  if (!ready) renderOffline();
}

// One source of truth for latency: the server's member list (best round trip of each user).
function renderLatency() {
  const mine = members.find((m) => m.user === me);
  $("latency").textContent = `latency ${fmtMs(mine ? mine.latency_ms : null)}`;
}

function renderMembers() {
  const ul = $("members");
  ul.replaceChildren();
  for (const u of leftRows.keys()) {
    if (members.some((x) => x.user === u)) continue;
    const li = document.createElement("li");
    li.className = "left";
    li.dataset.presence = "left";
    li.textContent = `${u} left`;
    ul.append(li);
  }
  for (const m of members) {
    const li = document.createElement("li");
    li.dataset.user = m.user;
    if (m.user === me) li.classList.add("me");
    if (flash.has(m.user)) li.dataset.presence = flash.get(m.user);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = m.user === me ? `${m.user} (you)` : m.user;
    if (simulated.has(m.user)) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = "simulated";
      name.append(tag);
    }
    const ms = document.createElement("span");
    ms.className = "ms";
    ms.textContent = fmtMs(m.latency_ms);
    li.append(name, ms);
    li.onclick = () => { if (m.user !== me) { $("to").value = m.user; $("text").focus(); } };
    ul.append(li);
  }
  const select = $("to");
  const current = select.value;
  select.replaceChildren(new Option("everyone", ""));
  for (const m of members) if (m.user !== me) select.append(new Option(`only ${m.user}`, m.user));
  select.value = members.some((m) => m.user === current) ? current : "";
  renderLatency();
}

// ------------------------------------------------------------------ dashboard

function setText(id, text) { $(id).textContent = text; }

function renderOffline() {
  const live = $("live");
  live.dataset.live = "false";
  const s = client ? client.state : "idle";
  setText("live-state", left || !client ? "not connected: join a lobby to watch" : s === "open" ? "connecting…" : "server unreachable");
  for (const id of ["srv-connections", "srv-capacity", "srv-per-lobby", "srv-users", "srv-backlogged", "srv-dropped"]) setText(id, "—");
  $("srv-lobby-list").replaceChildren();
  $("histogram").replaceChildren();
  $("feed").replaceChildren();
  setText("lat-summary", "");
}

function bar(label, value, max, title) {
  const row = document.createElement("div");
  row.className = "row";
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = label;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${max ? Math.min(100, (100 * value) / max) : 0}%`;
  track.append(fill);
  const n = document.createElement("span");
  n.className = "n";
  n.textContent = title;
  row.append(name, track, n);
  return row;
}

function renderDashboard(d) {
  $("live").dataset.live = "true";
  setText("live-state", `live · ${new Date(d.at * 1000).toLocaleTimeString()}`);
  const s = d.stats;
  setText("srv-connections", `${s.total_connections} / ${s.max_connections}`);
  setText("srv-capacity", `${s.capacity_percent} %`);
  setText("srv-per-lobby", String(s.max_per_lobby));
  setText("srv-users", String(s.connected_users));
  setText("srv-backlogged", String(s.backlogged_connections));
  setText("srv-dropped", String(s.rate_limited_messages));

  const lobbies = $("srv-lobby-list");
  lobbies.replaceChildren();
  for (const l of d.lobbies) {
    const li = document.createElement("li");
    li.dataset.lobby = l.lobby;
    li.append(bar(l.lobby, l.connections, l.capacity, `${l.connections} / ${l.capacity}`));
    if (l.connections >= l.capacity) li.classList.add("full");
    lobbies.append(li);
  }

  const h = d.latency;
  const hist = $("histogram");
  hist.replaceChildren();
  const top = Math.max(1, ...h.counts);
  h.counts.forEach((n, i) => {
    const lo = i === 0 ? 0 : h.bounds_ms[i - 1];
    const label = i < h.bounds_ms.length ? `≤ ${h.bounds_ms[i]} ms` : `> ${lo} ms`;
    hist.append(bar(label, n, top, String(n)));
  });
  setText("lat-summary", h.samples ? `· ${h.samples} · p50 ${fmtMs(h.p50)} · p99 ${fmtMs(h.p99)}` : "· none yet");

  simulated = new Set(d.simulated.map((x) => x.user));
  renderMembers();

  const feed = $("feed");
  feed.replaceChildren();
  for (const e of d.feed) {
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    if (e.reason) li.dataset.reason = e.reason;
    const t = document.createElement("time");
    t.textContent = new Date(e.ts * 1000).toLocaleTimeString();
    li.append(t);
    if (e.code) {
      const code = document.createElement("span");
      code.className = "code";
      code.textContent = String(e.code);
      li.append(code);
    }
    li.append(document.createTextNode(e.text));
    feed.append(li);
  }
  if (!d.feed.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "nothing yet: press a button above";
    feed.append(li);
  }
}

// ---------------------------------------------------------------- connection

function join(name, lobby) {
  if (client) client.close();
  me = name;
  left = false;
  members = [];
  serverClose = null;
  renderMembers();
  $("lobby-name").textContent = `· ${lobby}`;
  $("close-info").textContent = "";
  delete $("close-info").dataset.code;
  const url = `/ws/${encodeURIComponent(lobby)}?token=${encodeURIComponent(name)}`;
  client = new WSManagerClient(url, { readyOn: "welcome", ...tuning });
  client.addEventListener("state", renderStatus);
  client.addEventListener("open", () => { openedSinceClose = true; });
  client.addEventListener("ready", () => {
    $("close-info").textContent = "";
    delete $("close-info").dataset.code;
    serverClose = null;
    renderStatus();
  });
  client.addEventListener("close", (ev) => {
    const { code, reason, willRetry, delay } = ev.detail;
    const next = willRetry ? ` — retrying in ${(delay / 1000).toFixed(1)} s` : " — not retrying";
    const info = $("close-info");
    if (openedSinceClose || !serverClose) {
      // the server closed an open connection (or the first attempt failed): say why
      serverClose = { why: REASONS[reason] || reason || "connection lost", code };
      info.textContent = `${serverClose.why} (${code})${next}`;
    } else {
      // a retry failed before opening (the server is still down): keep the reason it gave
      info.textContent = `${serverClose.why} (${serverClose.code}) — server unreachable${next}`;
    }
    info.dataset.code = String(serverClose.code);
    openedSinceClose = false;
    members = []; // out of date until the server sends the list again
    renderMembers();
    renderStatus();
  });
  client.on("welcome", (m) => line("system", "", `joined ${m.lobby} as ${m.user}`));
  client.on("members", (m) => {
    const before = new Set(members.map((x) => x.user));
    members = m.members;
    if (!presence) {
      // without presence events, joins and leaves are told by the member list's changes
      const after = new Set(members.map((x) => x.user));
      for (const u of after) if (before.size && !before.has(u)) line("system", "", `${u} joined`);
      for (const u of before) if (!after.has(u)) line("system", "", `${u} left`);
    }
    renderMembers();
  });
  // presence events (the manager's presence_events=True): who joins and leaves, coalesced
  client.on("presence", (p) => {
    presence = true;
    if (p.state) return; // the lobby as last announced: the member list already has it
    for (const u of p.joins) {
      if (u === me) continue;
      line("system", "", `${u} joined`);
      flash.set(u, "joined");
    }
    for (const u of p.leaves) {
      line("system", "", `${u} left`);
      flash.set(u, "left");
      if (!members.some((x) => x.user === u)) leftRows.set(u, Date.now());
    }
    renderMembers();
    setTimeout(() => { flash.clear(); leftRows.clear(); renderMembers(); }, 2500);
  });
  client.on("dashboard", renderDashboard);
  client.on("chat", (m) => line("chat", m.from, m.text));
  client.on("dm", (m) => line("dm", m.from === me ? `${m.from} → ${m.to}` : `${m.from} (private)`, m.text));
  // the app's own errors carry a text; the manager's (bad_json, rate_limited...) an error and a detail
  client.on("error", (m) => line("error", "", m.text || [m.error, m.detail].filter(Boolean).join(": ")));
  openedSinceClose = false;
  client.connect();
  renderStatus();
  window.wsmClient = client; // for the console (and the browser tests)
}

$("join").addEventListener("submit", (e) => {
  e.preventDefault();
  join($("name").value.trim(), $("lobby").value.trim());
});

$("leave-btn").addEventListener("click", () => {
  left = true;
  if (client) client.close();
  members = [];
  serverClose = null;
  $("close-info").textContent = "";
  delete $("close-info").dataset.code;
  line("system", "", "you left the lobby");
  renderMembers();
  renderStatus();
});

$("say").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value;
  if (!client || !text) return;
  const to = $("to").value;
  const ok = client.send(to ? { type: "dm", to, text } : { type: "chat", text });
  if (!ok) line("error", "", "not sent: the outgoing buffer is full");
  $("text").value = "";
});

for (const button of document.querySelectorAll("#simulate button")) {
  button.addEventListener("click", () => {
    if (client && client.ready) client.send({ type: "simulate", kind: button.dataset.kind });
  });
}

if (params.get("name")) $("name").value = params.get("name");
if (params.get("lobby")) $("lobby").value = params.get("lobby");
renderStatus();
if (params.get("name") && params.get("lobby")) join(params.get("name"), params.get("lobby"));

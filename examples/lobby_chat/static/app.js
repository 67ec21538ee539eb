// The lobby chat page, on the wsmanager browser client served by the app.
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
  bad_message: "The server could not read this page's messages",
  server_shutdown: "The server is shutting down",
  bad_lobby: "That lobby name is not allowed",
};

let client = null;
let me = null;
let members = [];

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
  const labels = { idle: "not connected", connecting: "connecting…", open: "connected", reconnecting: "reconnecting…", closed: "disconnected" };
  $("status").textContent = labels[s] || s;
  $("status").dataset.state = s;
  const ready = Boolean(client && client.ready);
  $("text").disabled = $("send-btn").disabled = !client || s === "closed";
  $("leave-btn").disabled = !client || s === "closed";
  document.body.dataset.ready = String(ready);
}

function renderMembers() {
  const ul = $("members");
  ul.replaceChildren();
  for (const m of members) {
    const li = document.createElement("li");
    li.dataset.user = m.user;
    if (m.user === me) li.classList.add("me");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = m.user === me ? `${m.user} (you)` : m.user;
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
}

function join(name, lobby) {
  if (client) client.close();
  me = name;
  members = [];
  renderMembers();
  $("lobby-name").textContent = `· ${lobby}`;
  $("close-info").textContent = "";
  const url = `/ws/${encodeURIComponent(lobby)}?token=${encodeURIComponent(name)}`;
  client = new WSManagerClient(url, { readyOn: "welcome", ...tuning });
  client.addEventListener("state", renderStatus);
  client.addEventListener("ready", () => {
    $("close-info").textContent = "";
    renderStatus();
  });
  client.addEventListener("latency", (ev) => { $("latency").textContent = `latency ${fmtMs(ev.detail.latency)}`; });
  client.addEventListener("close", (ev) => {
    const { code, reason, willRetry, delay } = ev.detail;
    const why = REASONS[reason] || reason || "connection lost";
    const next = willRetry ? ` — retrying in ${(delay / 1000).toFixed(1)} s` : " — not retrying";
    $("close-info").textContent = `${why} (${code})${next}`;
    $("close-info").dataset.code = String(code);
    members = []; // out of date until the server sends the list again
    renderMembers();
    renderStatus();
  });
  client.on("welcome", (m) => line("system", "", `joined ${m.lobby} as ${m.user}`));
  client.on("members", (m) => {
    const before = new Set(members.map((x) => x.user));
    members = m.members;
    const after = new Set(members.map((x) => x.user));
    for (const u of after) if (before.size && !before.has(u)) line("system", "", `${u} joined`);
    for (const u of before) if (!after.has(u)) line("system", "", `${u} left`);
    renderMembers();
  });
  client.on("chat", (m) => line("chat", m.from, m.text));
  client.on("dm", (m) => line("dm", m.from === me ? `${m.from} → ${m.to}` : `${m.from} (private)`, m.text));
  // the app's own errors carry a text; the manager's (bad_json, rate_limited...) an error and a detail
  client.on("error", (m) => line("error", "", m.text || [m.error, m.detail].filter(Boolean).join(": ")));
  client.connect();
  renderStatus();
  window.wsmClient = client; // for the console (and the browser tests)
}

$("join").addEventListener("submit", (e) => {
  e.preventDefault();
  join($("name").value.trim(), $("lobby").value.trim());
});

$("leave-btn").addEventListener("click", () => {
  if (client) client.close();
  members = [];
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

async function refreshServer() {
  try {
    const s = await (await fetch("/stats")).json();
    $("srv-connections").textContent = `${s.total_connections} / ${s.max_connections}`;
    $("srv-capacity").textContent = `${s.capacity_percent} %`;
    $("srv-per-lobby").textContent = String(s.max_per_lobby);
    $("srv-lobbies").textContent = String(s.active_lobbies);
    const ul = $("srv-lobby-list");
    ul.replaceChildren();
    for (const [name, n] of Object.entries(s.lobbies || {})) {
      const li = document.createElement("li");
      li.textContent = `${name}: ${n}`;
      ul.append(li);
    }
  } catch {
    $("srv-connections").textContent = "unreachable";
  }
}

refreshServer();
setInterval(refreshServer, 2000);

if (params.get("name")) $("name").value = params.get("name");
if (params.get("lobby")) $("lobby").value = params.get("lobby");
renderStatus();
if (params.get("name") && params.get("lobby")) join(params.get("name"), params.get("lobby"));

"""Demo: a lobby chat on the drop-in manager (in memory, no external service).

make demo          # then open http://127.0.0.1:8000
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

from wsmanager import manager

app = FastAPI(title="wsmanager lobby chat")

PAGE = """<!doctype html>
<meta charset="utf-8"><title>wsmanager lobby chat</title>
<style>body{font:15px system-ui;margin:2em;max-width:40em}#log{border:1px solid #ccc;height:18em;
overflow:auto;padding:.5em}#members{color:#555}</style>
<h1>Lobby chat</h1>
<form id="join">name <input id="name" value="guest" required> lobby <input id="lobby" value="main" required>
<button>join</button></form>
<p id="status">not connected</p><p id="members"></p>
<div id="log"></div>
<form id="say"><input id="text" size="40" autocomplete="off"> <button>send</button></form>
<script type="module">
const $ = (id) => document.getElementById(id);
let ws = null;
function log(line) { const p = document.createElement("div"); p.textContent = line; $("log").append(p); }
$("join").onsubmit = (e) => {
  e.preventDefault(); if (ws) ws.close();
  const lobby = encodeURIComponent($("lobby").value), name = encodeURIComponent($("name").value);
  const url = `ws://${location.host}/ws/${lobby}?token=${name}`;
  ws = new WebSocket(url);
  ws.onopen = () => { $("status").textContent = "connected"; };
  ws.onclose = (ev) => { $("status").textContent = `closed ${ev.code} ${ev.reason}`; };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "health_ping") {
      ws.send(JSON.stringify({type: "health_pong", timestamp: m.timestamp})); return;
    }
    if (m.type === "members") { $("members").textContent = "members: " + m.users.join(", "); return; }
    if (m.type === "chat") log(`${m.from}: ${m.text}`);
  };
};
$("say").onsubmit = (e) => {
  e.preventDefault(); if (!ws) return;
  ws.send(JSON.stringify({type: "chat", text: $("text").value})); $("text").value = "";
};
</script>
"""


@app.get("/", response_class=HTMLResponse)
async def index() -> str:
    return PAGE


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return manager.get_stats()


async def announce_members(lobby_code: str) -> None:
    users = sorted(manager.get_lobby_users(lobby_code))
    await manager.broadcast_to_lobby(lobby_code, {"type": "members", "users": users})


@app.websocket("/ws/{lobby_code}")
async def lobby_socket(websocket: WebSocket, lobby_code: str, token: str = Query(...)) -> None:
    user_id = token.strip()
    if not user_id or len(user_id) > 64:
        await websocket.close(code=4001, reason="unauthorized")
        return
    ok, reason = manager.can_accept_connection(lobby_code)
    if not ok:
        await websocket.close(code=4002, reason=reason)
        return
    if not await manager.connect(websocket, lobby_code, user_id):
        return
    await announce_members(lobby_code)
    try:
        while True:
            data = await websocket.receive_json()
            manager.touch(websocket)  # per websocket: a dead tab is found even if another answers
            if not isinstance(data, dict):
                continue
            if data.get("type") == "health_pong":
                manager.record_pong_ws(websocket)
            elif data.get("type") == "chat":
                text = str(data.get("text", ""))[:500]
                await manager.broadcast_to_lobby(lobby_code, {"type": "chat", "from": user_id, "text": text})
    except (WebSocketDisconnect, ValueError):  # ValueError: malformed JSON
        pass
    finally:
        manager.disconnect(websocket)
        await announce_members(lobby_code)

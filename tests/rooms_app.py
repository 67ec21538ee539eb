"""A FastAPI app on ``manager.serve()`` with an ``on_join`` hook and presence
events, for the browser client's tests (tests/js/rooms.test.mjs and
tests/test_rooms_browser.py).

``/ws/{lobby}?token=<user>``: the token is the user id. ``on_join`` admits
lobbies named ``open-*``, refuses ``vip-*`` with the reason ``vip_only`` and
everything else (``forbidden``). ``/`` is a page running ``wsmanager.js``
that shows the client's lobbies and each lobby's members. Test helpers:
``/announce/{lobby}`` broadcasts to a lobby, ``/lobbies/{user}`` lists the
lobbies of the user's newest connection as the server sees them,
``/drop/{user}`` aborts its TCP connection (the client sees 1006).
ROOMS_PRESENCE_INTERVAL: the presence coalescing interval in seconds.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse

from wsmanager import Connection, ConnectionManager
from wsmanager.client import mount_client
from wsmanager.servers import abort_transport

manager = ConnectionManager(
    presence_events=True,
    presence_interval=float(os.environ.get("ROOMS_PRESENCE_INTERVAL", "0.05")),
)
app = FastAPI(lifespan=manager.lifespan)
mount_client(app, "/wsmanager")

newest: dict[str, Connection] = {}


def on_join(conn: Connection, lobby: str) -> bool | str:
    if lobby.startswith("open-"):
        return True
    if lobby.startswith("vip-"):
        return "vip_only"
    return False


async def on_connect(conn: Connection) -> None:
    newest[conn.user_id] = conn
    await conn.send({"type": "welcome", "user": conn.user_id})


async def on_disconnect(conn: Connection) -> None:
    if newest.get(conn.user_id) is conn:
        del newest[conn.user_id]


async def handle(conn: Connection, data: dict[str, Any]) -> None:
    if data.get("type") == "say" and isinstance(data.get("lobby"), str) and data["lobby"] in conn.lobbies:
        await manager.broadcast_to_lobby(data["lobby"], {"type": "said", "from": conn.user_id, **data})


@app.websocket("/ws/{lobby}")
async def ws(websocket: WebSocket, lobby: str, token: str = "") -> None:
    await manager.serve(
        websocket, lobby, token, handle, on_connect=on_connect, on_disconnect=on_disconnect, on_join=on_join
    )


@app.get("/announce/{lobby}")
async def announce(lobby: str) -> dict[str, int]:
    return {"delivered": await manager.broadcast_to_lobby(lobby, {"type": "announce", "lobby": lobby})}


@app.get("/lobbies/{user}")
async def lobbies(user: str) -> dict[str, list[str]]:
    conn = newest.get(user)
    return {"lobbies": sorted(conn.lobbies) if conn is not None else []}


@app.get("/drop/{user}")
async def drop(user: str) -> dict[str, bool]:
    conn = newest.get(user)
    return {"dropped": conn is not None and abort_transport(conn.websocket)}


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>rooms</title>
<p id="status" data-state="idle"></p>
<ul id="lobbies"></ul>
<div id="members"></div>
<script type="module">
import { WSManagerClient } from "/wsmanager/wsmanager.js";
const q = new URLSearchParams(location.search);
const client = new WSManagerClient(`/ws/home?token=${encodeURIComponent(q.get("user"))}`, {
  readyOn: "welcome", baseDelay: 100, maxDelay: 500,
});
const $ = (id) => document.getElementById(id);
function render() {
  $("lobbies").replaceChildren(...client.lobbies.map((lobby) => {
    const li = document.createElement("li");
    li.dataset.lobby = lobby;
    li.textContent = lobby;
    return li;
  }));
  $("members").replaceChildren(...["home", ...client.lobbies].map((lobby) => {
    const ul = document.createElement("ul");
    ul.dataset.lobby = lobby;
    for (const user of client.members(lobby).sort()) {
      const li = document.createElement("li");
      li.dataset.user = user;
      li.textContent = user;
      ul.append(li);
    }
    return ul;
  }));
}
client.addEventListener("state", (ev) => { $("status").dataset.state = ev.detail.state; });
client.addEventListener("lobbies", render);
client.addEventListener("presence", render);
window.wsmClient = client;
client.connect();
</script>
"""


@app.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)

"""One node of a cluster with history on, on ``manager.serve()``, for the
browser client's recovery across nodes (tests/test_history_browser.py).

Its manager joins the Redis backplane named by ``WSMANAGER_REDIS_URL`` (the
test sets it, with a namespace) with ``history_size=100``.

``/ws/{lobby}?token=<user>``: the token is the user id. ``/?user=U&ports=A,B``
is a page running ``wsmanager.js`` whose URL is a function (the client's
``url`` option): its first connection goes to the first port, every later one
to the last, so a reconnect lands on the other node. Its timers wait for
``window.gate`` (a resolved promise unless the test replaces it): the test
decides when the page may reconnect. Test helpers: ``/drop/{user}`` aborts the
TCP connection of the user's newest connection on this node (the client sees
1006); ``/announce/{lobby}?start=S&n=N`` broadcasts ``note`` messages S..S+N-1;
``/stats``: ``get_stats()``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse

from wsmanager import Connection, ConnectionManager
from wsmanager.backends import backend_from_env
from wsmanager.client import mount_client
from wsmanager.servers import abort_transport

manager = ConnectionManager(history_size=100, backend=backend_from_env())
app = FastAPI(lifespan=manager.lifespan)
mount_client(app, "/wsmanager")

newest: dict[str, Connection] = {}


async def on_connect(conn: Connection) -> None:
    newest[conn.user_id] = conn


async def on_disconnect(conn: Connection) -> None:
    if newest.get(conn.user_id) is conn:
        del newest[conn.user_id]


async def handle(conn: Connection, data: dict[str, Any]) -> None:
    pass


@app.websocket("/ws/{lobby}")
async def ws(websocket: WebSocket, lobby: str, token: str = "") -> None:
    await manager.serve(websocket, lobby, token, handle, on_connect=on_connect, on_disconnect=on_disconnect)


@app.get("/announce/{lobby}")
async def announce(lobby: str, start: int, n: int = 1) -> dict[str, int]:
    for i in range(start, start + max(0, min(n, 1000))):
        await manager.broadcast_to_lobby(lobby, {"type": "note", "n": i})
    return {"sent": n}


@app.get("/drop/{user}")
async def drop(user: str) -> dict[str, Any]:
    conn = newest.get(user)
    return {"dropped": conn is not None and abort_transport(conn.websocket)}


@app.get("/stats")
async def stats() -> Any:
    return manager.get_stats()


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>history across nodes</title>
<p id="status" data-state="idle"></p>
<ol id="notes"></ol>
<ol id="recoveries"></ol>
<script type="module">
import { WSManagerClient } from "/wsmanager/wsmanager.js";
const q = new URLSearchParams(location.search);
const ports = q.get("ports").split(",");
const user = encodeURIComponent(q.get("user"));
let opened = 0;
window.gate = Promise.resolve();
window.ports = [];
const client = new WSManagerClient(() => {
  const port = ports[Math.min(opened++, ports.length - 1)];
  window.ports.push(port);
  return `ws://127.0.0.1:${port}/ws/home?token=${user}`;
}, {
  baseDelay: 100, maxDelay: 500,
  setTimeout: (fn, ms) => globalThis.setTimeout(() => window.gate.then(fn), ms),
});
const $ = (id) => document.getElementById(id);
client.addEventListener("state", (ev) => { $("status").dataset.state = ev.detail.state; });
client.on("note", (message, position) => {
  const li = document.createElement("li");
  li.textContent = String(message.n);
  li.dataset.offset = String(position ? position.offset : "");
  $("notes").append(li);
});
client.addEventListener("recovery", (ev) => {
  const li = document.createElement("li");
  li.textContent = `${ev.detail.lobby} ${ev.detail.recovered}`;
  $("recoveries").append(li);
});
window.wsmClient = client;
client.connect();
</script>
"""


@app.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)

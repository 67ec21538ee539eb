// The browser client's history and recovery: positions kept per lobby, sent on every reconnect
// (the URL's lobby as ?wsm_since=, joined lobbies in their lobby_join), `_pos` hidden from
// handlers and given as their second argument, the "recovery" event. Against a mock socket
// (the wire format of docs/history.md), then serve() with history on in uvicorn
// (tests/history_app.py).
//
//   make test-js        (or: WSM_PYTHON=.venv/bin/python node --experimental-websocket --test tests/js/*.test.mjs)

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { WSManagerClient } from "../../wsmanager/static/wsmanager.js";
import { harness } from "./mock_socket.mjs";
import { startServer, stopServer, waitFor } from "./server.mjs";

const pos = (lobby, epoch, offset) => ({ lobby, epoch, offset });
const since = (socket) => new URL(socket.url).searchParams.get("wsm_since");

describe("positions with a mock socket", () => {
  it("hides _pos from handlers, gives it as their second argument and keeps it per lobby", () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    const seen = [];
    const all = [];
    h.client.on("chat", (message, position) => seen.push([message, position]));
    h.client.on("*", (message, position) => all.push([message.type, position]));
    h.socket.receive({ type: "lobby_position", lobby: "lobby", epoch: "e1", offset: 4 });
    h.socket.receive({ type: "chat", text: "hi", _pos: pos("lobby", "e1", 5) });
    h.socket.receive({ type: "chat", text: "dm" });
    assert.deepEqual(seen, [
      [{ type: "chat", text: "hi" }, pos("lobby", "e1", 5)],
      [{ type: "chat", text: "dm" }, undefined],
    ]);
    assert.deepEqual(all.map(([type]) => type), ["lobby_position", "chat", "chat"]);
    assert.deepEqual(h.client.positions, { lobby: { epoch: "e1", offset: 5 } });
    // a malformed _pos is removed all the same, and changes nothing
    h.socket.receive({ type: "chat", text: "x", _pos: { lobby: "lobby", epoch: "e1", offset: "6" } });
    assert.deepEqual(seen.at(-1), [{ type: "chat", text: "x" }, undefined]);
    assert.deepEqual(h.client.positions, { lobby: { epoch: "e1", offset: 5 } });
  });

  it("a client that received nothing reconnects with the position the server gave it", () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    assert.equal(since(h.socket), null, "nothing to resume on the first connection");
    h.socket.receive({ type: "lobby_position", lobby: "lobby", epoch: "k3v9", offset: 7 });
    h.socket.serverClose(1006);
    h.fire();
    assert.equal(since(h.socket), "k3v9:7");
    assert.equal(new URL(h.socket.url).searchParams.get("token"), "alice", "the app's parameters stay");
  });

  it("sends the positions of joined lobbies in their lobby_join after a reconnect, and surfaces recovery", async () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    h.socket.receive({ type: "lobby_position", lobby: "lobby", epoch: "eU", offset: 0 });
    const joined = h.client.join("game");
    const [req] = h.socket.json;
    assert.equal(req.since, undefined, "a first join has no position to send");
    h.socket.receive({ type: "lobby_position", lobby: "game", epoch: "eG", offset: 2 });
    h.socket.receive({ type: "lobby_joined", lobby: "game", ref: req.ref });
    await joined;
    h.socket.receive({ type: "move", _pos: pos("game", "eG", 3) });
    h.socket.receive({ type: "chat", _pos: pos("lobby", "eU", 1) });
    const recoveries = [];
    h.client.addEventListener("recovery", (ev) => recoveries.push(ev.detail));
    h.socket.serverClose(1006);
    h.fire();
    assert.equal(since(h.socket), "eU:1");
    h.socket.open();
    const rejoin = h.socket.json.find((m) => m.type === "lobby_join");
    assert.deepEqual(rejoin.since, { epoch: "eG", offset: 3 });
    // what the server sends: the URL lobby's recovery first, then the joined lobby's
    h.socket.receive({ type: "recovery", lobby: "lobby", recovered: true, epoch: "eU", offset: 1 });
    h.socket.receive({ type: "move", _pos: pos("game", "eG", 4) });
    h.socket.receive({ type: "recovery", lobby: "game", recovered: false, epoch: "eH", offset: 9 });
    assert.deepEqual(recoveries, [
      { lobby: "lobby", recovered: true, epoch: "eU", offset: 1 },
      { lobby: "game", recovered: false, epoch: "eH", offset: 9 },
    ]);
    // after recovered: false the client goes on from the lobby's position now
    assert.deepEqual(h.client.positions, { lobby: { epoch: "eU", offset: 1 }, game: { epoch: "eH", offset: 9 } });
  });

  it("forgets the position of a lobby it leaves, and an epoch of \"\" (history off)", async () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    h.socket.receive({ type: "recovery", lobby: "lobby", recovered: false, epoch: "", offset: 0 });
    assert.deepEqual(h.client.positions, {});
    const joined = h.client.join("game");
    const [req] = h.socket.json;
    h.socket.receive({ type: "lobby_joined", lobby: "game", ref: req.ref });
    await joined;
    h.socket.receive({ type: "move", _pos: pos("game", "eG", 3) });
    void h.client.leave("game");
    assert.deepEqual(h.client.positions, {});
    h.socket.serverClose(1006);
    h.fire();
    assert.equal(since(h.socket), null);
  });
});

describe("recovery against serve() in uvicorn", () => {
  let server;
  const clients = [];
  const get = async (p) => (await fetch(`http://127.0.0.1:${server.port}${p}`)).json();

  before(async () => {
    server = await startServer("tests.history_app:app");
  });

  after(async () => {
    for (const c of clients) c.close();
    await stopServer(server);
  });

  it("gets exactly what was sent while the socket was down, in order, then live ones", async () => {
    const c = new WSManagerClient(`ws://127.0.0.1:${server.port}/ws/home?token=nina`, { baseDelay: 50, maxDelay: 200 });
    clients.push(c);
    const notes = [];
    const recoveries = [];
    c.on("note", (message, position) => notes.push([message.n, position.offset, "_pos" in message]));
    c.addEventListener("recovery", (ev) => recoveries.push(ev.detail));
    c.connect();
    await waitFor(() => c.positions.home, "the URL lobby's position");
    const joined = await c.join("side");
    assert.deepEqual(joined, { lobby: "side", joined: true });
    await get("/announce/side?n=2");
    await waitFor(() => notes.length === 2, "2 live notes of side");
    // the socket drops; 4 notes to home and 3 to side while it is down
    assert.equal((await get("/drop/nina?then=4")).dropped, true);
    await get("/announce/side?n=3");
    await waitFor(() => recoveries.length === 2, "two recoveries");
    await get("/announce/home?n=1");
    await waitFor(() => notes.length === 10, "all the notes");
    assert.deepEqual(
      recoveries.map((r) => [r.lobby, r.recovered]),
      [["home", true], ["side", true]],
    );
    assert.deepEqual(notes, [
      [1, 1, false], [2, 2, false],                                 // side, live
      [1, 1, false], [2, 2, false], [3, 3, false], [4, 4, false],   // home, replayed
      [3, 3, false], [4, 4, false], [5, 5, false],                  // side, replayed on the re-join (or live after it)
      [5, 5, false],                                                // home, live
    ]);
  });
});

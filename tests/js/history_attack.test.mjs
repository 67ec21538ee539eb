// Attacks on the browser client's history handling (issue 12): positions from a server that
// misbehaves (a lobby the client never joined, a recovery for an unknown lobby, `_pos` of the
// wrong types, lobby names that are Object.prototype's own members). Against a mock socket.
//
//   make test-js        (or: WSM_PYTHON=.venv/bin/python node --experimental-websocket --test tests/js/*.test.mjs)

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { harness } from "./mock_socket.mjs";

const since = (socket) => new URL(socket.url).searchParams.get("wsm_since");

function connected() {
  const h = harness();
  h.client.connect();
  h.socket.open();
  h.socket.receive({ type: "lobby_position", lobby: "lobby", epoch: "eU", offset: 3 });
  return h;
}

describe("history attacks on the client", () => {
  it("a position for a lobby it never joined is kept but never sent on a reconnect", () => {
    const h = connected();
    h.socket.receive({ type: "chat", _pos: { lobby: "stranger", epoch: "eS", offset: 9 } });
    assert.deepEqual(h.client.positions, { lobby: { epoch: "eU", offset: 3 }, stranger: { epoch: "eS", offset: 9 } });
    h.socket.serverClose(1006);
    h.fire();
    assert.equal(since(h.socket), "eU:3", "the URL lobby's position, not the stranger's");
    h.socket.open();
    h.socket.receive({ type: "recovery", lobby: "lobby", recovered: true, epoch: "eU", offset: 3 });
    assert.deepEqual(
      h.socket.json.filter((m) => m.type === "lobby_join"),
      [],
      "no lobby_join for a lobby the client never joined",
    );
  });

  it("a recovery for an unknown lobby after the URL lobby's changes neither the URL lobby nor the memberships", () => {
    const h = connected();
    const events = [];
    h.client.addEventListener("recovery", (ev) => events.push(ev.detail));
    h.socket.receive({ type: "recovery", lobby: "ghost", recovered: "yes", epoch: "eG", offset: 1 });
    assert.deepEqual(events, [{ lobby: "ghost", recovered: false, epoch: "eG", offset: 1 }], "only true is true");
    assert.deepEqual(h.client.lobbies, []);
    h.socket.serverClose(1006);
    h.fire();
    assert.equal(since(h.socket), "eU:3");
  });

  it("_pos and position messages of the wrong types change nothing and never reach handlers", () => {
    const h = connected();
    const seen = [];
    h.client.on("chat", (message, position) => seen.push([message, position]));
    const bad = [
      null,
      [],
      "lobby:eU:4",
      4,
      { lobby: "lobby", epoch: "eU", offset: 4.5 },
      { lobby: "lobby", epoch: "eU", offset: 2 ** 53 },
      { lobby: "lobby", epoch: "eU", offset: "4" },
      { lobby: "lobby", epoch: 7, offset: 4 },
      { lobby: ["lobby"], epoch: "eU", offset: 4 },
      { lobby: "lobby", epoch: "eU" },
    ];
    for (const _pos of bad) h.socket.receive({ type: "chat", _pos });
    assert.equal(seen.length, bad.length);
    for (const [message, position] of seen) {
      assert.equal(position, undefined);
      assert.equal("_pos" in message, false);
    }
    for (const offset of [4.5, "4", null, 2 ** 53, Number.NaN]) {
      h.socket.receive(`{"type":"lobby_position","lobby":"lobby","epoch":"eX","offset":${JSON.stringify(offset)}}`);
    }
    h.socket.receive('{"type":"recovery","lobby":"lobby","recovered":true,"epoch":"eX","offset":1e400}');
    assert.deepEqual(h.client.positions, { lobby: { epoch: "eU", offset: 3 } });
  });

  it("a lobby named like a member of Object.prototype is a position like any other", () => {
    const h = connected();
    for (const lobby of ["__proto__", "constructor", "toString", "hasOwnProperty"]) {
      h.socket.receive({ type: "chat", _pos: { lobby, epoch: "e", offset: 1 } });
    }
    const positions = h.client.positions;
    assert.deepEqual(Object.keys(positions).sort(), ["__proto__", "constructor", "hasOwnProperty", "lobby", "toString"]);
    assert.deepEqual(Object.getOwnPropertyDescriptor(positions, "__proto__")?.value, { epoch: "e", offset: 1 });
    assert.equal(Object.getPrototypeOf(positions), Object.prototype, "the object itself is untouched");
    assert.equal(typeof positions.hasOwnProperty, "object");
  });

  it("a replayed message older than the position still moves it (the server's order is the truth)", () => {
    const h = connected();
    h.socket.receive({ type: "chat", _pos: { lobby: "lobby", epoch: "eU", offset: 9 } });
    h.socket.receive({ type: "chat", _pos: { lobby: "lobby", epoch: "eU", offset: 4 } });
    assert.deepEqual(h.client.positions.lobby, { epoch: "eU", offset: 4 });
  });

  it("a _pos inherited through a JSON __proto__ member is not a position", () => {
    const h = connected();
    const seen = [];
    h.client.on("chat", (message, position) => seen.push([message, position]));
    h.socket.receive('{"type":"chat","__proto__":{"_pos":{"lobby":"lobby","epoch":"eZ","offset":99}}}');
    assert.equal(seen.length, 1);
    assert.equal(seen[0][1], undefined);
    assert.deepEqual(h.client.positions, { lobby: { epoch: "eU", offset: 3 } });
  });
});

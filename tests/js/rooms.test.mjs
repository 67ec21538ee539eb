// The browser client's lobbies (rooms): join / leave, memberships kept across reconnects, presence.
// Against a mock socket first (the wire format of README "Lobbies from the client"), then a real
// serve() app with an on_join hook in uvicorn (tests/rooms_app.py).
//
//   make test-js        (or: WSM_PYTHON=.venv/bin/python node --experimental-websocket --test tests/js/*.test.mjs)

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { WSManagerClient } from "../../wsmanager/static/wsmanager.js";
import { harness } from "./mock_socket.mjs";
import { startServer, stopServer, waitFor } from "./server.mjs";

/** The lobby requests the client sent on `socket`, without their refs. */
const requests = (socket) =>
  socket.json.filter((m) => m.type === "lobby_join" || m.type === "lobby_leave").map(({ type, lobby }) => [type, lobby]);

/** Answer the last request for `lobby` on `socket` the way serve() does. */
function answer(socket, lobby, type, extra = {}) {
  const req = socket.json.filter((m) => m.lobby === lobby && m.type.startsWith("lobby_")).at(-1);
  assert.ok(req, `a request for ${lobby}`);
  socket.receive({ type, lobby, ref: req.ref, ...extra });
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

describe("join / leave with a mock socket", () => {
  it("sends lobby_join with a ref and resolves when the server answers it", async () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    const changes = [];
    h.client.addEventListener("lobbies", (ev) => changes.push(ev.detail));
    const joined = h.client.join("game");
    const [sent] = h.socket.json;
    assert.equal(sent.type, "lobby_join");
    assert.equal(sent.lobby, "game");
    assert.ok(Number.isSafeInteger(sent.ref) && sent.ref > 0);
    assert.deepEqual(h.client.lobbies, [], "not a membership before the server says so");
    answer(h.socket, "game", "lobby_joined");
    assert.deepEqual(await joined, { lobby: "game", joined: true });
    assert.deepEqual(h.client.lobbies, ["game"]);
    assert.deepEqual(changes, [{ lobbies: ["game"], lobby: "game", joined: true, reason: "", rejoin: false }]);
    // joining it again needs no round trip
    assert.deepEqual(await h.client.join("game"), { lobby: "game", joined: true });
    assert.equal(h.socket.sent.length, 1);
  });

  it("resolves a refusal with the server's reason and keeps no membership", async () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    const refused = h.client.join("secret");
    answer(h.socket, "secret", "lobby_join_refused", { reason: "forbidden" });
    assert.deepEqual(await refused, { lobby: "secret", joined: false, reason: "forbidden" });
    assert.deepEqual(h.client.lobbies, []);
  });

  it("matches answers by ref: two joins answered out of order, a stale or foreign answer ignored", async () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    const a = h.client.join("a");
    const b = h.client.join("b");
    assert.equal(h.client.join("a"), a, "a second join() of a pending lobby shares its promise");
    const [ra, rb] = h.socket.json;
    assert.notEqual(ra.ref, rb.ref);
    h.socket.receive({ type: "lobby_joined", lobby: "a", ref: 999 }); // nobody asked
    h.socket.receive({ type: "lobby_joined", lobby: "b", ref: ra.ref }); // ref and lobby disagree
    h.socket.receive({ type: "lobby_join_refused", lobby: "b", ref: rb.ref, reason: "lobby_full" });
    h.socket.receive({ type: "lobby_joined", lobby: "a", ref: ra.ref });
    assert.deepEqual(await b, { lobby: "b", joined: false, reason: "lobby_full" });
    assert.deepEqual(await a, { lobby: "a", joined: true });
    assert.deepEqual(h.client.lobbies, ["a"]);
  });

  it("rejects a lobby that is not a non-empty string without sending anything", async () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    for (const bad of ["", 7, null, undefined, {}, ["x"]]) {
      await assert.rejects(h.client.join(bad), TypeError);
      await assert.rejects(h.client.leave(bad), TypeError);
    }
    assert.deepEqual(h.socket.sent, []);
  });

  it("queues join() before the connection is ready and sends it first, before buffered messages", async () => {
    const h = harness({ readyOn: "welcome" });
    h.client.send({ type: "chat", text: "early" });
    const joined = h.client.join("game");
    h.client.connect();
    h.socket.open();
    assert.deepEqual(h.socket.sent, [], "nothing before the server's welcome");
    h.socket.receive({ type: "welcome" });
    assert.deepEqual(
      h.socket.json.map((m) => m.type),
      ["lobby_join", "chat"],
    );
    answer(h.socket, "game", "lobby_joined");
    assert.deepEqual(await joined, { lobby: "game", joined: true });
  });

  it("re-joins every membership in order after a reconnect, before buffered sends, then pending joins", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    for (const lobby of ["one", "two", "three"]) {
      const p = h.client.join(lobby);
      answer(h.socket, lobby, "lobby_joined");
      await p;
    }
    h.socket.serverClose(1006); // the network dropped
    assert.deepEqual(h.client.lobbies, ["one", "two", "three"], "memberships survive the drop");
    h.client.send({ type: "chat", text: "while away" });
    const four = h.client.join("four");
    h.fire();
    const second = h.socket;
    second.open();
    assert.deepEqual(
      second.json.map((m) => [m.type, m.lobby ?? m.text]),
      [
        ["lobby_join", "one"],
        ["lobby_join", "two"],
        ["lobby_join", "three"],
        ["lobby_join", "four"],
        ["chat", "while away"],
      ],
    );
    for (const lobby of ["one", "two", "three", "four"]) answer(second, lobby, "lobby_joined");
    assert.deepEqual(await four, { lobby: "four", joined: true });
    assert.deepEqual(h.client.lobbies, ["one", "two", "three", "four"]);
  });

  it("a join sent on a socket that drops before the answer is sent again on the next one", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    const joined = h.client.join("game");
    h.socket.serverClose(1006);
    h.socket.receive({ type: "lobby_joined", lobby: "game", ref: 1 }); // late event of a dead socket: ignored
    h.fire();
    h.socket.open();
    assert.deepEqual(requests(h.socket), [["lobby_join", "game"]]);
    answer(h.socket, "game", "lobby_joined");
    assert.deepEqual(await joined, { lobby: "game", joined: true });
  });

  it("drops a membership whose re-join is refused after a reconnect, and says so", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    const p = h.client.join("vip");
    answer(h.socket, "vip", "lobby_joined");
    await p;
    const changes = [];
    h.client.addEventListener("lobbies", (ev) => changes.push(ev.detail));
    h.socket.serverClose(1012);
    h.fire();
    h.socket.open();
    answer(h.socket, "vip", "lobby_join_refused", { reason: "membership_expired" });
    assert.deepEqual(h.client.lobbies, []);
    assert.deepEqual(changes, [{ lobbies: [], lobby: "vip", joined: false, reason: "membership_expired", rejoin: true }]);
  });

  it("leave() sends lobby_leave, resolves with was_member, and the lobby is not re-joined", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    const p = h.client.join("game");
    answer(h.socket, "game", "lobby_joined");
    await p;
    const left = h.client.leave("game");
    assert.deepEqual(h.client.lobbies, [], "gone at once");
    answer(h.socket, "game", "lobby_left", { was_member: true });
    assert.equal(await left, true);
    const never = h.client.leave("never-joined");
    answer(h.socket, "never-joined", "lobby_left", { was_member: false });
    assert.equal(await never, false);
    const refused = h.client.leave("lobby");
    answer(h.socket, "lobby", "lobby_leave_refused", { reason: "forbidden" });
    assert.equal(await refused, false);
    h.socket.serverClose(1006);
    h.fire();
    h.socket.open();
    assert.deepEqual(requests(h.socket), [], "nothing to re-join");
  });

  it("leave() while disconnected answers locally; leave() during a pending join settles that join", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    const p = h.client.join("game");
    answer(h.socket, "game", "lobby_joined");
    await p;
    const pending = h.client.join("other");
    h.socket.serverClose(1006);
    assert.equal(await h.client.leave("game"), true);
    assert.equal(await h.client.leave("nope"), false);
    assert.equal(await h.client.leave("other"), true);
    assert.deepEqual(await pending, { lobby: "other", joined: false, reason: "left" });
    h.fire();
    h.socket.open();
    assert.deepEqual(requests(h.socket), []);
  });

  it("a leave in flight when the socket drops resolves: the next connection does not join it", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    const p = h.client.join("game");
    answer(h.socket, "game", "lobby_joined");
    await p;
    const left = h.client.leave("game");
    h.socket.serverClose(1006);
    assert.equal(await left, true);
  });

  it("rejects a request the server never answers after requestTimeout ms", async () => {
    const h = harness({ requestTimeout: 3000 });
    h.client.connect();
    h.socket.open();
    const joined = h.client.join("game");
    const timer = h.pending().find((t) => t.ms === 3000);
    assert.ok(timer, "a timer for the answer");
    timer.fn();
    await assert.rejects(joined, /no answer to join "game" within 3000 ms/);
    answer(h.socket, "game", "lobby_joined"); // too late: ignored
    assert.deepEqual(h.client.lobbies, []);
  });

  it("pending joins reject when the client is closed or stopped for good; lobbies are kept for connect()", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    const p = h.client.join("kept");
    answer(h.socket, "kept", "lobby_joined");
    await p;
    const waiting = h.client.join("waiting");
    h.client.close();
    await assert.rejects(waiting, /closed/);
    await assert.rejects(h.client.join("late"), /closed/);
    assert.deepEqual(h.client.lobbies, ["kept"]);
    h.client.connect();
    h.socket.open();
    assert.deepEqual(requests(h.socket), [["lobby_join", "kept"]]);
    const another = h.client.join("another");
    h.socket.serverClose(4001, "unauthorized");
    await assert.rejects(another, /closed with 4001 unauthorized/);
  });
});

describe("presence with a mock socket", () => {
  it("applies the state then diffs, per lobby, and reports each as a presence event", async () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    const events = [];
    h.client.addEventListener("presence", (ev) => events.push(ev.detail));
    const seen = [];
    h.client.on("presence", (m) => seen.push(m.lobby));
    h.socket.receive({ type: "presence", lobby: "game", joins: ["alice", "bob"], leaves: [], state: true });
    h.socket.receive({ type: "presence", lobby: "game", joins: ["carol"], leaves: ["alice"] });
    h.socket.receive({ type: "presence", lobby: "other", joins: ["zed"], leaves: [] });
    assert.deepEqual(h.client.members("game"), ["bob", "carol"]);
    assert.deepEqual(h.client.members("other"), ["zed"]);
    assert.deepEqual(h.client.members("unknown"), []);
    assert.deepEqual(events[1], { lobby: "game", joins: ["carol"], leaves: ["alice"], state: false, members: ["bob", "carol"] });
    assert.deepEqual(seen, ["game", "game", "other"], "on('presence') sees the raw messages too");
    // a new state (after a re-join) replaces what was known
    h.socket.receive({ type: "presence", lobby: "game", joins: ["dave"], leaves: [], state: true });
    assert.deepEqual(h.client.members("game"), ["dave"]);
    // malformed parts are ignored, not thrown
    h.socket.receive({ type: "presence", lobby: 5, joins: ["x"] });
    h.socket.receive({ type: "presence", lobby: "game", joins: "dave", leaves: [null, 3, "dave"] });
    assert.deepEqual(h.client.members("game"), []);
  });

  it("forgets a lobby's presence when it is left", async () => {
    const h = harness({ requestTimeout: 0 });
    h.client.connect();
    h.socket.open();
    const p = h.client.join("game");
    h.socket.receive({ type: "presence", lobby: "game", joins: ["alice"], leaves: [], state: true });
    answer(h.socket, "game", "lobby_joined");
    await p;
    assert.deepEqual(h.client.members("game"), ["alice"]);
    h.client.leave("game");
    assert.deepEqual(h.client.members("game"), []);
    await flush();
  });
});

// --------------------------------------------------- a real serve() app with on_join

describe("join / leave against serve() in uvicorn", () => {
  let server;
  const clients = [];
  const client = (user, options = {}) => {
    const c = new WSManagerClient(`ws://127.0.0.1:${server.port}/ws/home?token=${user}`, {
      readyOn: "welcome",
      baseDelay: 50,
      maxDelay: 200,
      ...options,
    });
    clients.push(c);
    return c;
  };
  const event = (c, name) => new Promise((resolve) => c.addEventListener(name, (ev) => resolve(ev.detail), { once: true }));
  const get = async (p) => (await fetch(`http://127.0.0.1:${server.port}${p}`)).json();

  before(async () => {
    server = await startServer("tests.rooms_app:app", { ROOMS_PRESENCE_INTERVAL: "0.05" });
  });

  after(async () => {
    for (const c of clients) c.close();
    await stopServer(server);
  });

  it("joins the lobbies on_join allows, is refused the others, and gets their broadcasts", async () => {
    const alice = client("alice");
    alice.connect();
    await event(alice, "ready");
    assert.deepEqual(await alice.join("open-1"), { lobby: "open-1", joined: true });
    assert.deepEqual(await alice.join("vip-1"), { lobby: "vip-1", joined: false, reason: "vip_only" });
    assert.deepEqual(alice.lobbies, ["open-1"]);
    const got = new Promise((resolve) => alice.on("announce", resolve));
    await get("/announce/open-1");
    assert.equal((await got).lobby, "open-1");
    assert.equal(await alice.leave("open-1"), true);
    assert.deepEqual((await get("/lobbies/alice")).lobbies, ["home"]);
  });

  it("sees the presence of a lobby it joined: the state, then a join and a leave", async () => {
    const alice = client("alice");
    const bob = client("bob");
    alice.connect();
    bob.connect();
    await Promise.all([event(alice, "ready"), event(bob, "ready")]);
    await alice.join("open-p");
    await waitFor(() => alice.members("open-p").includes("alice"), "alice sees herself");
    await bob.join("open-p");
    await waitFor(() => alice.members("open-p").includes("bob"), "alice sees bob arrive");
    await bob.leave("open-p");
    await waitFor(() => !alice.members("open-p").includes("bob"), "alice sees bob leave");
    alice.close();
    bob.close();
  });

  it("is re-joined to its lobbies after the server drops the socket", async () => {
    const carol = client("carol");
    carol.connect();
    await event(carol, "ready");
    await carol.join("open-a");
    await carol.join("open-b");
    const dropped = event(carol, "close");
    await get("/drop/carol");
    assert.equal((await dropped).willRetry, true);
    await event(carol, "ready");
    await waitFor(async () => (await get("/lobbies/carol")).lobbies.length === 3, "carol's memberships on the server");
    assert.deepEqual((await get("/lobbies/carol")).lobbies, ["home", "open-a", "open-b"]);
    assert.deepEqual(carol.lobbies, ["open-a", "open-b"]);
  });
});

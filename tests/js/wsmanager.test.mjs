// The browser client's logic on node's test runner (node >= 20, run with --experimental-websocket):
// first against a mock socket with a fake clock and timers, then against the demo app in uvicorn.
//
//   make test-js        (or: WSM_PYTHON=.venv/bin/python node --experimental-websocket --test tests/js/*.test.mjs)

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { backoffDelay, CloseCode, closePolicy, WSManagerClient } from "../../wsmanager/static/wsmanager.js";
import { harness } from "./mock_socket.mjs";
import { startServer, stopServer, waitFor } from "./server.mjs";

// ------------------------------------------------------------ pure logic

describe("backoffDelay", () => {
  it("doubles from baseDelay up to maxDelay without jitter", () => {
    const delays = [0, 1, 2, 3, 4, 5, 6, 10, 50].map((a) =>
      backoffDelay(a, { baseDelay: 500, maxDelay: 8000, jitter: 0 }),
    );
    assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 8000, 8000, 8000, 8000]);
  });

  it("stays within [capped * (1 - jitter), capped] and never above maxDelay", () => {
    const opts = { baseDelay: 300, maxDelay: 10_000, factor: 2, jitter: 0.4 };
    for (let attempt = 0; attempt < 40; attempt++) {
      const capped = Math.min(opts.maxDelay, opts.baseDelay * 2 ** attempt);
      for (const r of [0, 0.001, 0.25, 0.5, 0.75, 0.999, 1]) {
        const d = backoffDelay(attempt, opts, () => r);
        assert.ok(d <= capped && d <= opts.maxDelay, `attempt ${attempt}, r ${r}: ${d} > ${capped}`);
        assert.ok(d >= Math.floor(capped * (1 - opts.jitter)), `attempt ${attempt}, r ${r}: ${d} too small`);
      }
    }
  });

  it("spreads clients apart (jitter) and is finite for absurd attempts", () => {
    const seen = new Set();
    for (let i = 0; i < 50; i++) seen.add(backoffDelay(3, { jitter: 0.5 }));
    assert.ok(seen.size > 10, "random jitter gives different delays");
    assert.equal(backoffDelay(1e9, { maxDelay: 30_000, jitter: 0 }), 30_000);
    assert.equal(backoffDelay(-3, { baseDelay: 500, jitter: 0 }), 500);
  });
});

describe("closePolicy", () => {
  it("maps wsmanager's close codes", () => {
    assert.equal(closePolicy(CloseCode.UNAUTHORIZED), "stop");
    assert.equal(closePolicy(CloseCode.REPLACED), "stop");
    assert.equal(closePolicy(1000), "stop");
    assert.equal(closePolicy(CloseCode.CAPACITY), "later");
    assert.equal(closePolicy(CloseCode.TRY_AGAIN_LATER), "later");
    assert.equal(closePolicy(CloseCode.RATE_LIMITED), "later");
    assert.equal(closePolicy(CloseCode.GOING_AWAY), "restart");
    assert.equal(closePolicy(CloseCode.SERVICE_RESTART), "restart");
    assert.equal(closePolicy(CloseCode.STALE), "retry");
    assert.equal(closePolicy(1006), "retry");
  });
});

// ------------------------------------------------------- client, mock socket

describe("WSManagerClient with a mock socket", () => {
  it("answers health_ping with health_pong echoing the timestamp, and exposes the latency", () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    const latencies = [];
    h.client.addEventListener("latency", (ev) => latencies.push(ev.detail.latency));
    h.socket.receive('{"type":"health_ping","timestamp":1718000000.123456}');
    h.socket.receive({ type: "health_ping", timestamp: 17.5, latency_ms: 3.25 });
    assert.equal(h.socket.sent[0], '{"type":"health_pong","timestamp":1718000000.123456}');
    assert.deepEqual(h.socket.json[1], { type: "health_pong", timestamp: 17.5 });
    assert.equal(h.client.latency, 3.25);
    assert.deepEqual(latencies, [3.25]);
  });

  it("dispatches messages by type, '*' gets them all, unsubscribe works, non-JSON is ignored", () => {
    const h = harness();
    const chats = [];
    const all = [];
    const off = h.client.on("chat", (m) => chats.push(m.text));
    h.client.on("*", (m) => all.push(m.type));
    h.client.connect();
    h.socket.open();
    h.socket.receive({ type: "chat", text: "one" });
    h.socket.receive({ type: "members", members: [] });
    h.socket.receive("not json");
    h.socket.receive("[1, 2]");
    off();
    h.socket.receive({ type: "chat", text: "two" });
    assert.deepEqual(chats, ["one"]);
    assert.deepEqual(all, ["chat", "members", "chat"]);
  });

  it("does not retry after 4001 unauthorized, and says why", () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    h.socket.serverClose(4001, "unauthorized");
    assert.equal(h.client.state, "closed");
    assert.deepEqual(h.pending(), []);
    assert.equal(h.sockets.length, 1);
    assert.equal(h.client.lastClose.code, 4001);
    assert.equal(h.client.lastClose.reason, "unauthorized");
    assert.deepEqual(h.closes.at(-1), {
      code: 4001,
      reason: "unauthorized",
      wasClean: true,
      policy: "stop",
      willRetry: false,
      delay: null,
    });
    assert.equal(h.client.send({ type: "chat", text: "lost" }), false);
    // an explicit connect() (e.g. with a new token) starts over
    h.client.url = "ws://test/ws/lobby?token=bob";
    h.client.connect();
    assert.equal(h.sockets.length, 2);
    assert.equal(h.socket.url, "ws://test/ws/lobby?token=bob");
  });

  it("retries later after a capacity refusal (4002) and after 1013", () => {
    for (const [code, reason] of [
      [4002, "lobby_full"],
      [1013, "shutting_down"],
    ]) {
      const h = harness({ retryLaterDelay: 5000, baseDelay: 500, maxDelay: 4000 });
      h.client.connect();
      h.socket.open();
      h.socket.serverClose(code, reason);
      assert.equal(h.client.state, "reconnecting");
      assert.equal(h.closes.at(-1).policy, "later");
      const delays = [];
      for (let i = 0; i < 6; i++) {
        delays.push(h.fire());
        h.socket.open();
        h.socket.serverClose(code, reason);
      }
      for (const d of delays) assert.ok(d >= 5000 && d <= 5000 + 4000, `${code}: delay ${d}`);
      assert.ok(delays.at(-1) > delays[0], "successive refusals back off further");
      assert.equal(h.sockets.length, 7);
      assert.equal(h.client.lastClose.reason, reason);
    }
  });

  it("reconnects after shutdown closes (1001, 1012) starting from the first backoff step", () => {
    for (const code of [1001, 1012]) {
      const h = harness({ baseDelay: 400, jitter: 0.5 });
      h.client.connect();
      h.socket.serverClose(1006); // a failed attempt first: the backoff grows...
      h.fire();
      h.socket.serverClose(1006);
      h.fire();
      h.socket.open();
      h.socket.serverClose(code, "server_shutdown"); // ...a shutdown close restarts it
      const d = h.fire();
      assert.ok(d >= 200 && d <= 400, `${code}: ${d}`);
      assert.equal(h.closes.at(-1).policy, "restart");
      h.socket.open();
      assert.equal(h.client.state, "open");
    }
  });

  it("backs off exponentially while the server is unreachable, and resets after a stable connection", () => {
    const h = harness({ baseDelay: 100, maxDelay: 1600, jitter: 0, stableAfter: 5000 });
    h.client.connect();
    const delays = [];
    for (let i = 0; i < 8; i++) {
      h.socket.serverClose(1006);
      delays.push(h.fire());
    }
    assert.deepEqual(delays, [100, 200, 400, 800, 1600, 1600, 1600, 1600]);
    h.socket.open();
    h.clock.now += 4999;
    h.socket.serverClose(4004, "stale"); // open, but not long enough to count as stable
    assert.equal(h.fire(), 1600);
    h.socket.open();
    h.clock.now += 5000;
    h.socket.serverClose(4004, "stale");
    assert.equal(h.fire(), 100);
  });

  it("buffers a bounded number of messages while reconnecting and sends them in order once open", () => {
    const h = harness({ maxBuffer: 3 });
    h.client.connect();
    h.socket.open();
    h.socket.serverClose(1006);
    assert.equal(h.client.send({ n: 1 }), true);
    assert.equal(h.client.send({ n: 2 }), true);
    assert.equal(h.client.send("raw text"), true);
    assert.equal(h.client.send({ n: 4 }), false, "the buffer is full");
    assert.equal(h.client.dropped, 1);
    assert.equal(h.client.buffered.length, 3);
    h.fire();
    assert.deepEqual(h.socket.sent, []);
    h.socket.open();
    assert.deepEqual(h.socket.sent, ['{"n":1}', '{"n":2}', "raw text"]);
    assert.equal(h.client.buffered.length, 0);
    assert.equal(h.client.send({ n: 5 }), true);
    assert.equal(h.socket.sent.at(-1), '{"n":5}');
  });

  it("with readyOn, holds the buffer until the server's welcome (a refused socket loses nothing)", () => {
    const h = harness({ readyOn: "welcome", retryLaterDelay: 1000 });
    h.client.connect();
    h.client.send({ type: "chat", text: "early" });
    h.socket.open();
    assert.deepEqual(h.socket.sent, []);
    h.socket.serverClose(4002, "lobby_full"); // accepted then refused: never ready
    assert.equal(h.client.buffered.length, 1);
    h.fire();
    h.socket.open();
    h.socket.receive({ type: "health_ping", timestamp: 1 }); // pongs do not wait for ready
    assert.deepEqual(h.socket.json, [{ type: "health_pong", timestamp: 1 }]);
    h.socket.receive({ type: "welcome", user: "alice" });
    assert.equal(h.client.ready, true);
    assert.deepEqual(h.socket.json.at(-1), { type: "chat", text: "early" });
  });

  it("close() stops for good: no reconnect, the socket is closed", () => {
    const h = harness();
    h.client.connect();
    h.socket.open();
    h.client.close();
    assert.equal(h.client.state, "closed");
    assert.deepEqual(h.socket.closedWith, { code: 1000, reason: "" });
    assert.deepEqual(h.pending(), []);
    h.socket.serverClose(1000); // late events of the old socket are ignored
    assert.deepEqual(h.pending(), []);
  });
});

// --------------------------------------------------- client, real server

describe("WSManagerClient against the demo app", () => {
  let server;
  let port;
  const clients = [];
  const base = () => `ws://127.0.0.1:${port}/ws`;
  const stats = async () => (await fetch(`http://127.0.0.1:${port}/stats`)).json();
  const client = (url, options = {}) => {
    const c = new WSManagerClient(url, { readyOn: "welcome", baseDelay: 100, maxDelay: 500, ...options });
    clients.push(c);
    return c;
  };
  const event = (c, name) => new Promise((resolve) => c.addEventListener(name, (ev) => resolve(ev.detail), { once: true }));

  before(async () => {
    assert.equal(typeof WebSocket, "function", "node needs a WebSocket: run node >= 22 or pass --experimental-websocket");
    server = await startServer(
      "examples.lobby_chat.app:app",
      { LOBBY_CHAT_MAX_PER_LOBBY: "2", LOBBY_CHAT_PING_INTERVAL: "0.2", LOBBY_CHAT_PING_TIMEOUT: "2" },
      "/stats",
    );
    port = server.port;
  });

  after(async () => {
    for (const c of clients) c.close();
    await stopServer(server);
  });

  it("chats between two clients and answers the server's pings", async () => {
    const alice = client(`${base()}/js-chat?token=alice`);
    const bob = client(`${base()}/js-chat?token=bob`);
    const got = new Promise((resolve) => bob.on("chat", resolve));
    alice.connect();
    bob.connect();
    await Promise.all([event(alice, "ready"), event(bob, "ready")]);
    assert.equal(alice.send({ type: "chat", text: "hi from node" }), true);
    const message = await got;
    assert.equal(message.from, "alice");
    assert.equal(message.text, "hi from node");
    // silent for 0.2 s: the server pings; our pong gives it a round trip, reported back with the next ping
    await waitFor(() => typeof alice.latency === "number", "a latency from the server");
    assert.ok(alice.latency >= 0 && alice.latency < 10_000);
    assert.ok((await stats()).pongs_received >= 1);
    alice.close();
    bob.close();
  });

  it("gets 4001 for a bad token and does not retry", async () => {
    const c = client(`${base()}/js-auth?token=${encodeURIComponent("no!such name")}`);
    const closed = event(c, "close");
    c.connect();
    const detail = await closed;
    assert.equal(detail.code, 4001);
    assert.equal(detail.reason, "unauthorized");
    assert.equal(detail.willRetry, false);
    await new Promise((r) => setTimeout(r, 300)); // longer than any backoff configured here
    assert.equal(c.state, "closed");
    assert.equal(c.lastClose.code, 4001);
  });

  it("gets 4002 lobby_full in a full lobby, retries later and gets in when a seat frees", async () => {
    const a = client(`${base()}/js-full?token=a`);
    const b = client(`${base()}/js-full?token=b`);
    a.connect();
    b.connect();
    await Promise.all([event(a, "ready"), event(b, "ready")]);
    const c = client(`${base()}/js-full?token=c`, { retryLaterDelay: 300 });
    c.send({ type: "chat", text: "queued while refused" });
    const refused = event(c, "close");
    c.connect();
    const detail = await refused;
    assert.deepEqual([detail.code, detail.reason, detail.policy, detail.willRetry], [4002, "lobby_full", "later", true]);
    assert.ok(detail.delay >= 300);
    const got = new Promise((resolve) => a.on("chat", (m) => m.from === "c" && resolve(m)));
    b.close();
    await event(c, "ready");
    assert.equal((await got).text, "queued while refused", "the buffered message survived the refusal");
  });
});

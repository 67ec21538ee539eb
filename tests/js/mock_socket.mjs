// Fakes for the browser client's node tests: a mock WebSocket the test drives as the server,
// and a client on it with a fake clock and timers that run only when told to.

import assert from "node:assert/strict";

import { WSManagerClient } from "../../wsmanager/static/wsmanager.js";

export class MockSocket {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    MockSocket.instances.push(this);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    this.sent.push(data);
  }

  close(code, reason) {
    this.readyState = 3;
    this.closedWith = { code, reason };
  }

  // what the server does
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(message) {
    this.onmessage?.({ data: typeof message === "string" ? message : JSON.stringify(message) });
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }

  get json() {
    return this.sent.map((s) => JSON.parse(s));
  }
}

/** A client on mock sockets, a fake clock and timers that run only when told to. */
export function harness(options = {}) {
  MockSocket.instances = [];
  const timers = [];
  const clock = { now: 1_000_000 };
  const client = new WSManagerClient("ws://test/ws/lobby?token=alice", {
    WebSocket: MockSocket,
    random: () => 0.5,
    now: () => clock.now,
    setTimeout: (fn, ms) => {
      const t = { fn, ms, cancelled: false };
      timers.push(t);
      return t;
    },
    clearTimeout: (t) => {
      t.cancelled = true;
    },
    ...options,
  });
  const closes = [];
  client.addEventListener("close", (ev) => closes.push(ev.detail));
  return {
    client,
    timers,
    clock,
    closes,
    get socket() {
      return MockSocket.instances.at(-1);
    },
    get sockets() {
      return MockSocket.instances;
    },
    /** Run the pending reconnect timer; returns its delay. */
    fire() {
      const t = timers.filter((x) => !x.cancelled).at(-1);
      assert.ok(t, "a reconnect is scheduled");
      timers.splice(timers.indexOf(t), 1);
      t.fn();
      return t.ms;
    },
    pending() {
      return timers.filter((x) => !x.cancelled);
    },
  };
}

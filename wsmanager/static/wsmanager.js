// wsmanager browser client: an ES module, no build step, no dependencies.
//
//   import { WSManagerClient } from "/wsmanager/wsmanager.js";
//   const client = new WSManagerClient("/ws/lobby?token=alice");
//   client.on("chat", (msg) => show(msg));
//   client.addEventListener("close", (ev) => console.log(ev.detail.code, ev.detail.reason));
//   client.connect();
//   client.send({ type: "chat", text: "hi" });   // buffered (bounded) while reconnecting
//
// It answers the server's `health_ping` with `health_pong` echoing the timestamp,
// dispatches JSON messages by their `type`, and reconnects with exponential
// backoff and jitter according to the close code (see closePolicy).
//
// Lobbies (rooms) beyond the URL's, on a server whose serve() has an on_join hook:
//
//   const r = await client.join("game-42");     // {lobby, joined: true} or {lobby, joined: false, reason}
//   client.lobbies;                              // ["game-42"]: re-joined after every reconnect
//   client.addEventListener("presence", (ev) => render(ev.detail.lobby, ev.detail.members));
//   await client.leave("game-42");               // true if the server had it
//
// History and recovery, on a server with history_size set: the client keeps the position
// (epoch, offset) of the last message it saw of each lobby and sends it on every reconnect
// (the URL's lobby as ?wsm_since=<epoch>:<offset>, joined lobbies in their lobby_join), so the
// server replays what was missed, in order, before any live message.
//
//   client.on("chat", (msg, position) => show(msg));    // msg without "_pos"; position {lobby, epoch, offset}
//   client.addEventListener("recovery", (ev) => { if (!ev.detail.recovered) refetch(ev.detail.lobby); });
//   client.positions;                                    // {lobby: {epoch, offset}}

/** Close codes sent by wsmanager servers (wsmanager/codes.py). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  UNAUTHORIZED: 4001,
  CAPACITY: 4002,
  REPLACED: 4003,
  STALE: 4004,
  RATE_LIMITED: 4005,
  SLOW_CONSUMER: 4006,
  BAD_MESSAGE: 4007,
  FORBIDDEN_ORIGIN: 4008,
});

const STOP = new Set([
  CloseCode.NORMAL, // the server said goodbye on purpose
  CloseCode.UNSUPPORTED_DATA,
  CloseCode.POLICY_VIOLATION,
  CloseCode.UNAUTHORIZED, // retrying with the same credentials cannot succeed
  CloseCode.REPLACED, // a newer connection of this user took over: do not fight it
  CloseCode.FORBIDDEN_ORIGIN,
]);
const LATER = new Set([CloseCode.CAPACITY, CloseCode.TRY_AGAIN_LATER, CloseCode.RATE_LIMITED]);
const RESTART = new Set([CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART]);

/**
 * What to do after the server closed the connection with `code`:
 * "stop" (no retry: 1000, 1003, 1008, 4001, 4003, 4008),
 * "later" (retry after `retryLaterDelay` plus backoff: 4002 capacity, 1013, 4005),
 * "restart" (server shut down or restarts, 1001/1012: retry from the first backoff step),
 * "retry" (anything else, e.g. 1006 network loss or 4004 stale: exponential backoff).
 */
export function closePolicy(code) {
  if (STOP.has(code)) return "stop";
  if (LATER.has(code)) return "later";
  if (RESTART.has(code)) return "restart";
  return "retry";
}

/**
 * The delay (ms) before reconnect attempt number `attempt` (0 for the first):
 * min(maxDelay, baseDelay * factor**attempt), minus up to `jitter` (0..1) of it
 * at random, so it lies in [capped * (1 - jitter), capped].
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const { baseDelay = 500, maxDelay = 30000, factor = 2, jitter = 0.5 } = options;
  const n = Math.max(0, Math.floor(attempt));
  const capped = Math.min(maxDelay, baseDelay * Math.pow(factor, n));
  const j = Math.min(1, Math.max(0, jitter));
  return Math.round(capped * (1 - j * random()));
}

function toWebSocketURL(url) {
  if (/^wss?:\/\//i.test(url)) return url;
  const base = globalThis.location ? globalThis.location.href : undefined;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u.href;
}

const OPEN = 1;

// The query parameter naming the URL lobby's position (wsmanager/history.py SINCE_PARAM).
const SINCE_PARAM = "wsm_since";

/** A message's position, or null: `_pos` as the server adds it with history on. */
function positionOf(message) {
  const pos = message._pos;
  if (pos === null || typeof pos !== "object") return null;
  const { lobby, epoch, offset } = pos;
  if (typeof lobby !== "string" || typeof epoch !== "string" || !Number.isSafeInteger(offset)) return null;
  return { lobby, epoch, offset };
}

// Largest request reference sent: refs are integers the server echoes (it accepts JS safe integers).
const MAX_REF = Number.MAX_SAFE_INTEGER;

/**
 * A reconnecting JSON WebSocket client for wsmanager servers.
 *
 * Lifecycle events (EventTarget, `event.detail`): "state" ({state}),
 * "open" ({}), "ready" ({}), "close" ({code, reason, wasClean, policy, willRetry, delay}),
 * "latency" ({latency}), "lobbies" ({lobbies, lobby, joined, reason, rejoin}) whenever
 * `lobbies` changes, "presence" ({lobby, joins, leaves, state, members}),
 * "recovery" ({lobby, recovered, epoch, offset}) after the server replayed what a reconnect
 * missed (`recovered: false`: it could not; refetch the lobby's state).
 * Messages: `on(type, handler)`; `on("*", handler)` receives every message; a lobby message's
 * position comes as the handler's second argument (its `_pos` member is removed).
 */
export class WSManagerClient extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = {
      baseDelay: 500,
      maxDelay: 30000,
      factor: 2,
      jitter: 0.5,
      retryLaterDelay: 5000,
      stableAfter: 5000,
      maxBuffer: 100,
      requestTimeout: 10000,
      readyOn: null,
      protocols: undefined,
      policy: closePolicy,
      WebSocket: globalThis.WebSocket,
      random: Math.random,
      now: () => Date.now(),
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (id) => globalThis.clearTimeout(id),
      ...options,
    };
    /** "idle" | "connecting" | "open" | "reconnecting" | "closed" */
    this.state = "idle";
    /** {code, reason, wasClean, at} of the last close, or null. */
    this.lastClose = null;
    /** Round-trip time in ms reported by the server with its last health_ping, or null. */
    this.latency = null;
    /** Reconnect attempts since the last stable connection. */
    this.attempt = 0;
    /** Messages refused because the buffer was full. */
    this.dropped = 0;
    this.ready = false;
    this._ws = null;
    this._timer = null;
    this._openedAt = 0;
    this._buffer = [];
    this._handlers = new Map();
    this._lobbies = []; // memberships confirmed by the server, in join order
    this._joining = new Map(); // lobby -> pending join() request, in call order
    this._requests = new Map(); // ref -> request sent on the current socket
    this._ref = 0;
    this._presence = new Map(); // lobby -> Set of user ids
    this._positions = new Map(); // lobby -> {epoch, offset} of the last message seen
    this._urlLobby = null; // the URL's lobby, named by the first position message of a connection
    this._urlLobbySeen = false; // that message came on the current socket
  }

  /** The position of the last message seen in each lobby, `{lobby: {epoch, offset}}` (a copy).
   * Sent on every reconnect so that the server replays what was missed. */
  get positions() {
    const out = {};
    for (const [lobby, pos] of this._positions) {
      // an own property even for "__proto__" (an assignment would set the prototype instead)
      Object.defineProperty(out, lobby, { value: { ...pos }, enumerable: true, writable: true, configurable: true });
    }
    return out;
  }

  /** The lobbies joined with join() and confirmed by the server, in join order (a copy).
   * They are joined again, in this order, after every reconnect. */
  get lobbies() {
    return this._lobbies.slice();
  }

  /** The user ids present in `lobby` per the server's presence messages (empty when unknown). */
  members(lobby) {
    const set = this._presence.get(lobby);
    return set ? [...set] : [];
  }

  /**
   * Ask the server to add this connection to `lobby` (the server's on_join hook decides).
   * Resolves with {lobby, joined: true} once the server confirmed it (at once when already
   * joined), or {lobby, joined: false, reason} when it refused. Before the connection is
   * ready the request waits and is sent first thing once it is (before buffered sends); a
   * connection lost before the answer sends it again on the next one. Rejects with a
   * TypeError for a lobby that is not a non-empty string, and with an Error when the client
   * is closed for good or the server did not answer within `requestTimeout` ms.
   */
  join(lobby) {
    if (typeof lobby !== "string" || lobby === "") {
      return Promise.reject(new TypeError("wsmanager: a lobby is a non-empty string"));
    }
    if (this.state === "closed") return Promise.reject(new Error("wsmanager: the client is closed"));
    if (this._lobbies.includes(lobby)) return Promise.resolve({ lobby, joined: true });
    const pending = this._joining.get(lobby);
    if (pending) return pending.promise;
    const req = { kind: "join", lobby, ref: 0, timer: null };
    req.promise = new Promise((resolve, reject) => {
      req.resolve = resolve;
      req.reject = reject;
    });
    this._joining.set(lobby, req);
    if (this._live()) this._request(req);
    return req.promise;
  }

  /**
   * Leave `lobby`: it is no longer re-joined after a reconnect and its presence is forgotten
   * at once. Resolves with true if the server's connection was in it and left it (false: it was
   * not, or the server refused); while not connected, with whether it was in `lobbies` (or being
   * joined), without asking the server (the next connection simply does not join it).
   * A join() of it still waiting resolves with {joined: false, reason: "left"}.
   */
  leave(lobby) {
    if (typeof lobby !== "string" || lobby === "") {
      return Promise.reject(new TypeError("wsmanager: a lobby is a non-empty string"));
    }
    const index = this._lobbies.indexOf(lobby);
    let wasMember = index >= 0;
    const pending = this._joining.get(lobby);
    if (pending) {
      wasMember = true;
      this._joining.delete(lobby);
      this._settle(pending);
      pending.resolve({ lobby, joined: false, reason: "left" });
    }
    this._presence.delete(lobby);
    if (lobby !== this._urlLobby) this._positions.delete(lobby); // left on purpose: nothing to recover
    if (index >= 0) {
      this._lobbies.splice(index, 1);
      this._emit("lobbies", { lobbies: this.lobbies, lobby, joined: false, reason: "left", rejoin: false });
    }
    if (!this._live()) return Promise.resolve(wasMember);
    const req = { kind: "leave", lobby, ref: 0, timer: null, wasMember };
    req.promise = new Promise((resolve, reject) => {
      req.resolve = resolve;
      req.reject = reject;
    });
    this._request(req);
    return req.promise;
  }

  /** Messages waiting for the connection, oldest first (a copy). */
  get buffered() {
    return this._buffer.slice();
  }

  /** Register `handler(message, position)` for messages of `type` ("*": all); `position` is
   * {lobby, epoch, offset} for a lobby message of a server with history on (then removed from the
   * message as `_pos`), else undefined. Returns an unsubscribe function. */
  on(type, handler) {
    let set = this._handlers.get(type);
    if (!set) this._handlers.set(type, (set = new Set()));
    set.add(handler);
    return () => set.delete(handler);
  }

  /** Open the connection (again, also after a "stop" close such as 4001). */
  connect() {
    this._cancelTimer();
    if (this._ws) this._detach(this._ws, 1000, "reconnect");
    this._open();
    return this;
  }

  /**
   * Send `message` (JSON-encoded unless it is a string). While (re)connecting it
   * (or before connect()) it is buffered, up to `maxBuffer` messages; returns false when it was dropped
   * (buffer full, or the client is closed for good).
   */
  send(message) {
    const data = typeof message === "string" ? message : JSON.stringify(message);
    if (this.ready && this._ws && this._ws.readyState === OPEN) {
      this._ws.send(data);
      return true;
    }
    if (this.state === "closed" || this._buffer.length >= this.options.maxBuffer) {
      this.dropped += 1;
      return false;
    }
    this._buffer.push(data);
    return true;
  }

  /** Close for good (no reconnect); buffered messages are discarded, join() requests still
   * waiting reject. `lobbies` is kept: a later connect() joins them again. */
  close(code = 1000, reason = "") {
    this._cancelTimer();
    this._buffer = [];
    const ws = this._ws;
    this._setState("closed");
    if (ws) this._detach(ws, code, reason);
    this._dropRequests();
    this._rejectJoins("wsmanager: the client was closed");
  }

  // ------------------------------------------------------------------ internals

  _open() {
    const WS = this.options.WebSocket;
    if (typeof WS !== "function") throw new Error("wsmanager: no WebSocket implementation available");
    const url = this._withSince(toWebSocketURL(typeof this.url === "function" ? this.url() : this.url));
    const ws = this.options.protocols === undefined ? new WS(url) : new WS(url, this.options.protocols);
    this._ws = ws;
    this.ready = false;
    this._urlLobbySeen = false;
    this._setState("connecting");
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this._openedAt = this.options.now();
      this._setState("open");
      this._emit("open", {});
      if (!this.options.readyOn) this._becomeReady();
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._receive(ws, event.data);
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._closed(event);
    };
    ws.onerror = () => {}; // a close event always follows
  }

  /** `url` with the URL lobby's position as ?wsm_since=<epoch>:<offset> (when known). */
  _withSince(url) {
    const pos = this._urlLobby === null ? undefined : this._positions.get(this._urlLobby);
    if (!pos) return url;
    const u = new URL(url);
    u.searchParams.set(SINCE_PARAM, `${pos.epoch}:${pos.offset}`);
    return u.href;
  }

  _becomeReady() {
    if (this.ready) return;
    this.ready = true;
    // memberships first, in order, then the join() calls still waiting, then the app's sends
    for (const lobby of this._lobbies) this._request({ kind: "rejoin", lobby, ref: 0, timer: null });
    for (const req of this._joining.values()) this._request(req);
    const pending = this._buffer;
    this._buffer = [];
    for (const data of pending) this._ws.send(data);
    this._emit("ready", {});
  }

  _live() {
    return this.ready && this._ws !== null && this._ws.readyState === OPEN;
  }

  /** Send a lobby_join / lobby_leave for `req` on the current socket and wait for its answer. */
  _request(req) {
    this._ref = this._ref >= MAX_REF ? 1 : this._ref + 1;
    req.ref = this._ref;
    this._requests.set(req.ref, req);
    const type = req.kind === "leave" ? "lobby_leave" : "lobby_join";
    const message = { type, lobby: req.lobby, ref: req.ref };
    const pos = req.kind === "rejoin" ? this._positions.get(req.lobby) : undefined;
    if (pos) message.since = { epoch: pos.epoch, offset: pos.offset };
    this._ws.send(JSON.stringify(message));
    const ms = this.options.requestTimeout;
    if (ms && req.kind !== "rejoin") {
      req.timer = this.options.setTimeout(() => this._timedOut(req), ms);
    }
  }

  _settle(req) {
    if (req.timer !== null) {
      this.options.clearTimeout(req.timer);
      req.timer = null;
    }
    if (this._requests.get(req.ref) === req) this._requests.delete(req.ref);
  }

  _timedOut(req) {
    req.timer = null;
    this._settle(req);
    if (req.kind === "join" && this._joining.get(req.lobby) === req) this._joining.delete(req.lobby);
    req.reject(new Error(`wsmanager: no answer to ${req.kind} ${JSON.stringify(req.lobby)} within ${this.options.requestTimeout} ms`));
  }

  /** The socket is gone: answers to requests sent on it will never come. */
  _dropRequests() {
    for (const req of [...this._requests.values()]) {
      this._settle(req);
      // a leave took effect: the next connection does not join the lobby
      if (req.kind === "leave") req.resolve(req.wasMember);
    }
    this._requests.clear();
  }

  _rejectJoins(message) {
    const pending = [...this._joining.values()];
    this._joining.clear();
    for (const req of pending) {
      this._settle(req);
      req.reject(new Error(message));
    }
  }

  /** An answer to one of our lobby requests (matched by its ref). */
  _answer(message) {
    const req = this._requests.get(message.ref);
    if (!req || req.lobby !== message.lobby) return;
    this._settle(req);
    const lobby = req.lobby;
    if (req.kind === "leave") {
      req.resolve(message.type === "lobby_left" && message.was_member === true);
      return;
    }
    if (message.type === "lobby_joined") {
      if (req.kind === "join") {
        this._joining.delete(lobby);
        if (!this._lobbies.includes(lobby)) {
          this._lobbies.push(lobby);
          this._emit("lobbies", { lobbies: this.lobbies, lobby, joined: true, reason: "", rejoin: false });
        }
        req.resolve({ lobby, joined: true });
      }
      return;
    }
    // lobby_join_refused
    const reason = typeof message.reason === "string" ? message.reason : "refused";
    this._presence.delete(lobby);
    if (lobby !== this._urlLobby) this._positions.delete(lobby);
    if (req.kind === "join") {
      this._joining.delete(lobby);
      req.resolve({ lobby, joined: false, reason });
      return;
    }
    const index = this._lobbies.indexOf(lobby); // a re-join after a reconnect was refused
    if (index >= 0) {
      this._lobbies.splice(index, 1);
      this._emit("lobbies", { lobbies: this.lobbies, lobby, joined: false, reason, rejoin: true });
    }
  }

  _applyPresence(message) {
    const { lobby, joins, leaves } = message;
    if (typeof lobby !== "string") return;
    const state = message.state === true;
    let set = this._presence.get(lobby);
    if (!set || state) this._presence.set(lobby, (set = new Set()));
    const joined = Array.isArray(joins) ? joins.filter((u) => typeof u === "string") : [];
    const left = Array.isArray(leaves) ? leaves.filter((u) => typeof u === "string") : [];
    for (const user of joined) set.add(user);
    for (const user of left) set.delete(user);
    this._emit("presence", { lobby, joins: joined, leaves: left, state, members: [...set] });
  }

  _receive(ws, raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return; // not JSON: nothing a handler could dispatch on
    }
    if (message === null || typeof message !== "object" || Array.isArray(message)) return; // objects only
    if (message.type === "health_ping") {
      if (ws.readyState === OPEN) {
        ws.send(JSON.stringify({ type: "health_pong", timestamp: message.timestamp }));
      }
      if (typeof message.latency_ms === "number") {
        this.latency = message.latency_ms;
        this._emit("latency", { latency: this.latency });
      }
    }
    let position;
    if ("_pos" in message) {
      position = positionOf(message) || undefined;
      delete message._pos; // the app's object as it sent it
      if (position) this._positions.set(position.lobby, { epoch: position.epoch, offset: position.offset });
    }
    switch (message.type) {
      case "lobby_position":
      case "recovery":
        this._applyPosition(message);
        break;
      case "lobby_joined":
      case "lobby_join_refused":
      case "lobby_left":
      case "lobby_leave_refused":
        this._answer(message);
        break;
      case "presence":
        this._applyPresence(message);
        break;
    }
    if (this.options.readyOn && message.type === this.options.readyOn) this._becomeReady();
    this._dispatch(message.type, message, position);
    this._dispatch("*", message, position);
  }

  /** A lobby_position or recovery message: the lobby's position now (the first one of a
   * connection is its URL lobby's: serve() sends it before anything else). */
  _applyPosition(message) {
    const { lobby, epoch, offset } = message;
    if (typeof lobby !== "string" || typeof epoch !== "string" || !Number.isSafeInteger(offset)) return;
    if (!this._urlLobbySeen) {
      this._urlLobbySeen = true;
      this._urlLobby = lobby;
    }
    // history off on the server (epoch ""): nothing to resume from
    if (epoch === "") this._positions.delete(lobby);
    else this._positions.set(lobby, { epoch, offset });
    if (message.type === "recovery") {
      this._emit("recovery", { lobby, recovered: message.recovered === true, epoch, offset });
    }
  }

  _dispatch(type, message, position) {
    const set = this._handlers.get(type);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(message, position);
      } catch (err) {
        globalThis.setTimeout(() => {
          throw err;
        }, 0); // report without breaking the other handlers
      }
    }
  }

  _closed(event) {
    const code = event.code;
    const reason = event.reason || "";
    const o = this.options;
    const now = o.now();
    this._ws = null;
    this.ready = false;
    this._dropRequests();
    this.lastClose = { code, reason, wasClean: Boolean(event.wasClean), at: now };
    if (this._openedAt && now - this._openedAt >= o.stableAfter) this.attempt = 0;
    this._openedAt = 0;
    const policy = (o.policy && o.policy(code, reason)) || closePolicy(code);
    let delay = null;
    if (policy === "restart") this.attempt = 0;
    if (policy !== "stop") {
      delay = backoffDelay(this.attempt, o, o.random);
      if (policy === "later") delay += o.retryLaterDelay;
      this.attempt += 1;
    }
    if (delay === null) {
      this._buffer = [];
      this._setState("closed");
      this._rejectJoins(`wsmanager: closed with ${code} ${reason}`.trimEnd());
    } else {
      this._setState("reconnecting");
      this._timer = o.setTimeout(() => {
        this._timer = null;
        this._open();
      }, delay);
    }
    this._emit("close", { code, reason, wasClean: Boolean(event.wasClean), policy, willRetry: delay !== null, delay });
  }

  _detach(ws, code, reason) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (ws === this._ws) this._ws = null;
    this.ready = false;
    this._dropRequests();
    try {
      ws.close(code, reason);
    } catch {
      ws.close();
    }
  }

  _cancelTimer() {
    if (this._timer !== null) {
      this.options.clearTimeout(this._timer);
      this._timer = null;
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}

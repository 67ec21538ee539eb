// Type declarations for wsmanager.js (the wsmanager browser client).

/** Close codes sent by wsmanager servers. */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  UNSUPPORTED_DATA: 1003;
  ABNORMAL: 1006;
  POLICY_VIOLATION: 1008;
  MESSAGE_TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  SERVICE_RESTART: 1012;
  TRY_AGAIN_LATER: 1013;
  UNAUTHORIZED: 4001;
  CAPACITY: 4002;
  REPLACED: 4003;
  STALE: 4004;
  RATE_LIMITED: 4005;
  SLOW_CONSUMER: 4006;
  BAD_MESSAGE: 4007;
  FORBIDDEN_ORIGIN: 4008;
}>;

/** "stop": no retry; "later": retry after retryLaterDelay + backoff; "restart": retry from the first
 * backoff step; "retry": exponential backoff. */
export type ClosePolicy = "stop" | "later" | "restart" | "retry";

export declare function closePolicy(code: number): ClosePolicy;

export interface BackoffOptions {
  /** First delay in ms (default 500). */
  baseDelay?: number;
  /** Upper bound of the exponential part in ms (default 30000). */
  maxDelay?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Fraction (0..1) of the delay removed at random (default 0.5). */
  jitter?: number;
}

/** Delay in ms before attempt `attempt` (0-based): in [c * (1 - jitter), c], c = min(maxDelay, baseDelay * factor ** attempt). */
export declare function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;

export type ClientState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** A message from the server: a JSON object, dispatched on its `type`. */
export interface ServerMessage {
  type?: string;
  [key: string]: unknown;
}

export interface CloseInfo {
  code: number;
  reason: string;
  wasClean: boolean;
  /** Date.now() (or options.now()) when it closed. */
  at: number;
}

export interface CloseDetail {
  code: number;
  reason: string;
  wasClean: boolean;
  policy: ClosePolicy;
  willRetry: boolean;
  /** ms until the next attempt, or null when it will not retry. */
  delay: number | null;
}

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export interface ClientOptions extends BackoffOptions {
  /** Extra delay in ms after capacity (4002), 1013 and rate-limit (4005) refusals (default 5000). */
  retryLaterDelay?: number;
  /** A connection open this long (ms) resets the backoff (default 5000). */
  stableAfter?: number;
  /** Outgoing messages kept while not connected (default 100); more are dropped. */
  maxBuffer?: number;
  /** ms to wait for the server's answer to join() / leave() once sent (default 10000; 0: forever). */
  requestTimeout?: number;
  /** Message type that marks the connection usable (buffer flushed); null: the open event (default). */
  readyOn?: string | null;
  protocols?: string | string[];
  /** Override the policy for some codes; return undefined to keep the default. */
  policy?: (code: number, reason: string) => ClosePolicy | undefined;
  /** For tests and non-browser runtimes. */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocketLike;
  random?: () => number;
  now?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: unknown) => void;
}

/** What join() resolves with. `reason` (refusals only): the server's, e.g. "forbidden",
 * "lobby_full", "too_many_lobbies", "invalid_lobby", a reason of the app's on_join hook, or
 * "left" when leave() was called before the answer. */
export interface JoinResult {
  lobby: string;
  joined: boolean;
  reason?: string;
}

/** `lobbies` changed: `lobby` was joined (joined: true) or dropped (by leave(): reason "left";
 * or its re-join after a reconnect was refused: rejoin true, reason the server's). */
export interface LobbiesDetail {
  lobbies: string[];
  lobby: string;
  joined: boolean;
  reason: string;
  rejoin: boolean;
}

/** A presence message applied: `state` true when it replaced the lobby's member list (sent
 * after each join), else a diff. `members`: the user ids present afterwards. */
export interface PresenceDetail {
  lobby: string;
  joins: string[];
  leaves: string[];
  state: boolean;
  members: string[];
}

/** Where a lobby message stands in its lobby's history (a server with history_size set): `offset`
 * counts the lobby's messages from 1, `epoch` names the history (it changes when the history
 * was lost). */
export interface Position {
  lobby: string;
  epoch: string;
  offset: number;
}

/** The server replayed what a reconnect missed of `lobby` (before any live message), or could
 * not (`recovered: false`: refetch the lobby's state). `epoch` / `offset`: the lobby's position
 * now. */
export interface RecoveryDetail {
  lobby: string;
  recovered: boolean;
  epoch: string;
  offset: number;
}

export interface ClientEventMap {
  state: CustomEvent<{ state: ClientState }>;
  open: CustomEvent<Record<string, never>>;
  ready: CustomEvent<Record<string, never>>;
  close: CustomEvent<CloseDetail>;
  latency: CustomEvent<{ latency: number }>;
  lobbies: CustomEvent<LobbiesDetail>;
  presence: CustomEvent<PresenceDetail>;
  recovery: CustomEvent<RecoveryDetail>;
}

export declare class WSManagerClient extends EventTarget {
  /** A ws:, wss:, http(s): or page-relative URL, or a function returning one (called on every attempt). */
  constructor(url: string | (() => string), options?: ClientOptions);
  url: string | (() => string);
  readonly options: Required<Omit<ClientOptions, "protocols" | "policy">> & Pick<ClientOptions, "protocols" | "policy">;
  readonly state: ClientState;
  /** True once open (or once a `readyOn` message arrived): sends go straight out. */
  readonly ready: boolean;
  /** The last close code and reason, or null before any close. */
  readonly lastClose: CloseInfo | null;
  /** Round-trip time in ms reported by the server with its last health_ping, or null. */
  readonly latency: number | null;
  /** Reconnect attempts since the last stable connection. */
  readonly attempt: number;
  /** Messages refused because the buffer was full or the client was closed. */
  readonly dropped: number;
  /** A copy of the outgoing messages waiting for the connection (JSON text). */
  readonly buffered: string[];
  /** The lobbies joined with join() and confirmed by the server, in join order (a copy); joined
   * again, in this order and before buffered sends, after every reconnect. The URL's lobby and
   * lobbies the app joined on the server are not listed. */
  readonly lobbies: string[];
  /** The user ids present in `lobby` per the server's presence messages ([] when unknown). */
  members(lobby: string): string[];
  /** The position of the last message seen in each lobby (a copy), from lobby messages'
   * positions and the server's lobby_position / recovery messages. Sent on every reconnect: the
   * URL's lobby's as `?wsm_since=<epoch>:<offset>`, joined lobbies' in their lobby_join. */
  readonly positions: Record<string, { epoch: string; offset: number }>;
  /** Ask to join `lobby` (the server's on_join hook decides). Never rejects for a refusal (see
   * JoinResult); rejects with TypeError for a bad lobby, Error when closed for good or after
   * `requestTimeout` ms without an answer. */
  join(lobby: string): Promise<JoinResult>;
  /** Leave `lobby` (no re-join after reconnects). True if the server's connection was in it. */
  leave(lobby: string): Promise<boolean>;
  connect(): this;
  /** False when the message was dropped (buffer full, or closed for good). */
  send(message: unknown): boolean;
  close(code?: number, reason?: string): void;
  /** `position`: the lobby message's position (its `_pos` member, removed from `message`);
   * undefined for other messages or with history off. */
  on<T extends ServerMessage = ServerMessage>(
    type: string,
    handler: (message: T, position: Position | undefined) => void,
  ): () => void;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (ev: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
}

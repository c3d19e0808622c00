// LiveClient: one WebSocket connection at a time to a LiveEdge node, kept
// alive across disconnects. The behaviour mirrors the Go SDK (clientsdk/):
//
//   - connect with the token as a subprotocol (a static token or a callback
//     asked before every attempt; never in the URL) and ?batch=1; several
//     node URLs are tried in turn;
//   - reconnect with exponential backoff and full jitter after any close whose
//     code is below 4500; 45xx is terminal, except 4501 (token expired) when a
//     token callback can fetch a new token; a static token refused (HTTP 401,
//     or in a browser a failed attempt once the token's JWT exp has passed)
//     is terminal too;
//   - a connection is left (and another made) when a ping goes unanswered:
//     one goes out when nothing was written or nothing was read for the
//     heartbeat interval, and at once when a request times out; and when the
//     socket keeps more than MaxBufferedBytes unsent past the request timeout;
//   - joined rooms are re-joined after a reconnect, before "connected" is
//     reported and before waiting requests go out; a room whose pushes carried
//     offsets is re-joined with since {off, ep} (PROTOCOL §3);
//   - a joined room's numbered pushes pass an offset guard: one at or before
//     the room's position (a replay overlap) is dropped, and one after a hole
//     (an offset skipped, or a new epoch) is delivered after a "room_resync"
//     event, as after a re-join that could not recover;
//   - every push with ack:true is acknowledged (one ack frame per received
//     frame, a batch included) once a push listener had it — while there is
//     none, pushes are held (at most MaxHeld, beyond that neither delivered
//     nor acked: the node resends them) and delivered to the first listener
//     added; pushes are de-duplicated by mid within a bounded window, across
//     reconnects; a duplicate is acked again but not delivered again;
//   - a request in flight when its connection drops fails with
//     DisconnectedError and is never resent (requests need not be idempotent).
//
// Memory is bounded: the de-duplication window, the pending-request table
// (one entry per request in flight), the held pushes (MaxHeld) and the
// joined rooms are the only collections.

import {
  Close,
  MaxAckMids,
  reconnectable,
  type Hello,
  type JoinReply,
  type PushData,
  type PushFrame,
  type RefreshReply,
  type ReplyFrame,
  type Requests,
  type ServerFrame,
  type Since,
} from "./protocol.js";

/** The part of the WebSocket API the client uses (browsers and the ws package have it). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
  /** Bytes written but not yet sent (browsers and ws have it; without it the send-buffer check is off). */
  readonly bufferedAmount?: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
/**
 * A WebSocket constructor; protocols carries the token (see
 * TokenSubprotocolPrefix), so one that ignores it is refused (401).
 */
export type WebSocketCtor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** The subprotocol the client offers, which the node answers. */
export const Subprotocol = "liveedge.v1";
/**
 * The token travels as the subprotocol TokenSubprotocolPrefix + token offered
 * beside Subprotocol: a browser cannot set an Authorization header on a
 * WebSocket, and a token in the URL ends up in access logs and history.
 */
export const TokenSubprotocolPrefix = "liveedge.bearer.";

/** Why the token callback is asked. */
export type TokenReason = "connect" | "reconnect" | "expired" | "refresh";

export interface ClientOptions {
  /**
   * WebSocket URL(s) of the nodes: "ws://host:port/ws". Tried in turn, the
   * first from a random one (the clients of one page spread over the nodes,
   * as the Go SDK's), or from urls[0] with preferFirstUrl.
   */
  urls: string | string[];
  /** Start at urls[0] (a node nearer than the others, say); the rest are the fallback. Default false. */
  preferFirstUrl?: boolean;
  /**
   * A static token. With it, a 45xx close (4501 included) and an HTTP 401 on
   * the upgrade are terminal (UnauthorizedError). Browsers do not show the
   * 401: there (a WebSocket other than Node's ws), once the token's JWT `exp`
   * (read, not verified) has passed by this machine's clock by
   * tokenExpiryGraceMs and MinFailsForExpiry attempts in a row failed before
   * the hello, the failure is taken for it. On Node's ws, only the 401 is.
   */
  token?: string;
  /**
   * How long past a static token's exp by this machine's clock a browser's
   * failed attempts may be taken for the unseen 401 (see token): a device
   * clock running ahead must not end a client whose node still takes the
   * token. Default 300000 (5 minutes).
   */
  tokenExpiryGraceMs?: number;
  /**
   * Asked before every connection attempt; on 4501 the client reconnects with
   * its next answer ("expired"). Also asked ("refresh") shortly before the open
   * connection's token ends (a minute, or a quarter of a shorter token's life,
   * by the hello's expires_in_ms): the answer — a newly issued token, one
   * that ends later — is handed to the node in a refresh request and the
   * connection goes on. A refresh that fails is tried again at half the time
   * left while at least 2 s are left; after that the node closes 4501 as
   * above. (With this machine's clock past the last token's JWT exp the
   * reason is "expired" instead.)
   */
  getToken?: (reason: TokenReason) => string | Promise<string>;
  /** WebSocket implementation; default globalThis.WebSocket (the Node entry passes ws). */
  WebSocket?: WebSocketCtor;
  /** Ask for batch frames (?batch=1). Default true. */
  batch?: boolean;
  /** Default timeout of a request, including its wait for a connection, and of a connection attempt. Default 10000. */
  requestTimeoutMs?: number;
  /**
   * Reconnect backoff bounds: reconnect attempts go round the URL list; round k
   * starts after a random wait in [0, min(max, min·2^(k-1))], the next URL of a
   * round is tried after [min/2, min]. Defaults 100 and 5000.
   */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** How many recent push mids are remembered for de-duplication. Default 16384. */
  dedupWindow?: number;
  /**
   * Ping when nothing was sent, or nothing was read, for this long; a ping
   * unanswered within requestTimeoutMs closes the connection (and the client
   * reconnects). Default half the hello's heartbeat; negative disables these
   * pings and the send-buffer check (a request that times out still pings).
   */
  heartbeatMs?: number;
  onPush?: (p: Push) => void;
  onState?: (e: StateEvent) => void;
}

/** One push as delivered: d is the parsed JSON. */
export interface Push<B extends number = number> {
  mid: string;
  biz: B;
  room: number;
  d: B extends keyof PushData ? PushData[B] : unknown;
  ack: boolean;
  off?: number;
  ep?: string;
}

/** Type guard for a push of a known biz. */
export function isBiz<B extends keyof PushData>(p: Push, biz: B): p is Push<B> {
  return p.biz === biz;
}

export type StateEvent =
  | { state: "connected"; hello: Hello; url: string; attempt: number }
  | { state: "disconnected"; code: number; reason: string }
  /** About to wait delayMs, then make attempt; error is why the previous attempt failed (none before the first). */
  | { state: "reconnecting"; attempt: number; delayMs: number; error?: Error }
  | { state: "room_dropped"; room: number; error: Error }
  /**
   * Pushes of the room were missed: after a re-join that could not recover
   * them, or on a live connection (an offset skipped, a new epoch). since is
   * the last position seen before them; at is the position to re-read the
   * room's state as of (the re-join's, or just before the push that came
   * after the gap: the pushes delivered next follow it) — the Go SDK's
   * StateEvent Off/Ep, its Since being since.
   */
  | { state: "room_resync"; room: number; since: Since; at: Since }
  | { state: "closed"; error?: Error };

/** A reply with code ≠ 0 (PROTOCOL §7). */
export class ReplyError extends Error {
  constructor(
    readonly code: number,
    readonly msg: string,
  ) {
    super(`liveedge: ${code}: ${msg}`);
    this.name = "ReplyError";
  }
}
/** The connection dropped while the request was in flight (it may or may not have run). */
export class DisconnectedError extends Error {
  constructor() {
    super("liveedge: disconnected");
    this.name = "DisconnectedError";
  }
}
/** The client was closed, by close() or by a terminal close code (cause). */
export class ClosedError extends Error {
  constructor(readonly cause?: Error) {
    super("liveedge: client closed" + (cause ? ": " + cause.message : ""));
    this.name = "ClosedError";
  }
}
export class TimeoutError extends Error {
  constructor(what: string) {
    super(`liveedge: ${what} timed out`);
    this.name = "TimeoutError";
  }
}
/** The server closed the connection with this code. */
export class CloseError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
  ) {
    super(`liveedge: closed by server: ${code} ${reason}`);
    this.name = "CloseError";
  }
}
/**
 * The upgrade was refused with HTTP 401 (seen on Node), or — browsers only see
 * a failed connection — an attempt with a static token failed after the
 * token's exp.
 */
export class UnauthorizedError extends Error {
  constructor(why = "HTTP 401") {
    super(`liveedge: unauthorized (${why})`);
    this.name = "UnauthorizedError";
  }
}

export interface Stats {
  reconnects: number;
  pushesReceived: number;
  pushesDelivered: number;
  duplicates: number;
  /** Numbered room pushes dropped by the offset guard (at or before the room's position). */
  offsetDuplicates: number;
  /**
   * Room pushes dropped because leave() left their room (the node fanned them out before the
   * leave took effect; acked if ack:true).
   */
  notJoined: number;
  acksSent: number;
  requests: number;
  /**
   * Pushes read while no push listener existed and MaxHeld were held already:
   * neither delivered nor acked (a reliable one is resent by the node).
   */
  pushesNotHeld: number;
}

/** A bounded set of recent mids: the oldest is forgotten first. */
class Dedup {
  private set = new Set<string>();
  private ring: string[];
  private next = 0;
  constructor(private window: number) {
    this.ring = new Array(window);
  }
  /** seen records mid and reports whether it was already there. */
  seen(mid: string): boolean {
    if (this.set.has(mid)) return true;
    const old = this.ring[this.next];
    if (old !== undefined) this.set.delete(old);
    this.ring[this.next] = mid;
    this.next = (this.next + 1) % this.window;
    this.set.add(mid);
    return false;
  }
}

interface Pending {
  resolve: (d: unknown) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
  /** Runs on an OK reply as it is read, before the frames after it. */
  onOK?: (d: unknown) => void;
}

interface Waiter {
  resolve: () => void;
  reject: (e: Error) => void;
}

const OPEN = 1;


/** Bounds Client.left (rooms left on one connection); beyond it the set starts again empty. */
const MaxLeft = 4096;

/** How long a connection must last for its reconnect to start the backoff afresh. */
const STABLE_AFTER_MS = 30_000;

/**
 * Pushes held while no push listener exists (LiveClient.held). Beyond it a
 * push is neither delivered nor acked: the node keeps and resends it — it
 * keeps as many unacked per connection (the gateway's maxPendingAcks) before
 * it closes the connection 4408.
 */
const MaxHeld = 4096;

/**
 * Unsent bytes (ws.bufferedAmount) a connection may keep for longer than the
 * request timeout before it counts as dead: a node that stopped reading while
 * it still sends (its pushes keep the connection from looking silent, their
 * acks pile up here). 1 MiB is thousands of requests or ack frames.
 */
export const MaxBufferedBytes = 1 << 20;

/**
 * How many request timeouts after a ping a client still reading pushes waits
 * for a reply before it leaves the node (a slow link's replies come behind
 * the pushes the node queued first).
 */
export const ProbeGrace = 3;

/**
 * Attempts in a row that failed before their hello before a browser's failure
 * may be taken for the unseen 401 of an expired static token (see
 * ClientOptions.token): one node restart (a 503, a 1006) is not a refusal.
 */
export const MinFailsForExpiry = 3;

/** How long before the connection's token ends the client refreshes it (getToken("refresh")). */
export const RefreshLeadMs = 60_000;

/** With less than this left, a failed refresh is not tried again (the node is about to close 4501). */
export const RefreshRetryFloorMs = 2_000;

/** setTimeout's longest delay (a longer one fires at once). */
const MaxTimerMs = 2 ** 31 - 1;

export class LiveClient {
  private readonly o: Required<Omit<ClientOptions, "token" | "getToken" | "onPush" | "onState" | "heartbeatMs" | "preferFirstUrl">> & {
    heartbeatMs?: number;
    tokenExpiryGraceMs: number;
  };
  private readonly urls: string[];
  private urlIndex = 0;
  /** The token of the last attempt (its exp tells a reconnect's reason). */
  private lastToken: string | undefined;
  private ws: WebSocketLike | null = null;
  private ready = false;
  // When the current (or last) connection became ready, and how many in a
  // row ended within STABLE_AFTER_MS of it: their reconnects start that many
  // rounds up the backoff (a connection closed again at once — 4408, 4402, a
  // draining node — does not reconnect ten times a second).
  private upSince = 0;
  private shortLived = 0;
  private closed = false;
  private closeCause: Error | undefined;
  private waiters: Waiter[] = [];
  private pending = new Map<number, Pending>();
  private nextId = 1;
  private rooms = new Map<number, RoomState>();
  /**
   * Rooms whose join is in flight: a push of the room may come before the
   * join's reply, and its position is kept here (else the reply's older
   * position made the next push look like a gap).
   */
  private joining = new Map<number, RoomState>();
  /** The joins of each room waiting for their reply (joining is dropped when the last ends). */
  private joinsPending = new Map<number, number>();
  /**
   * Rooms leave() left on this connection (not joined since): a push of one, fanned out before
   * the leave took effect, is dropped. Rooms joined with a raw request() are in neither set: their
   * pushes pass. At most MaxLeft; cleared at each (re)connect.
   */
  private left = new Set<number>();
  private dedup: Dedup;
  private hb: ReturnType<typeof setInterval> | undefined;
  /** Ends the reconnect back-off's wait (close()). */
  private wake: (() => void) | undefined;
  /** Closes the socket waiting for its hello (close()). */
  private connecting: (() => void) | undefined;
  private lastSend = 0;
  /** When the current connection last read a frame (the liveness check: see startHeartbeat). */
  private lastRead = 0;
  /** When the last reply was read: the node reads this connection. */
  private lastReply = 0;
  /** Connection attempts in a row that failed before their hello (see staticTokenExpired). */
  private failsBeforeHello = 0;
  /** The socket a liveness ping is in flight on (one at a time). */
  private probing: WebSocketLike | undefined;
  /** Since when the socket has held more than MaxBufferedBytes unsent (0: not now). */
  private bufferedSince = 0;
  private pushListeners = new Set<(p: Push) => void>();
  // Pushes read while no push listener was registered (a user's waiting
  // pushes come with the hello, before the app's on("push") after `await
  // connect()`; or the app has none yet): held, neither delivered nor acked
  // — an ack tells the node the push was had — until the next on("push")
  // (released in a microtask). Once some are held every later one is too
  // until they are released (never a newer push before the held older
  // ones). At most MaxHeld; after a reconnect the node resends those
  // reliable ones, and the de-duplication delivers each mid once.
  private held: ServerFrame[] = [];
  // onFrames is handling a message of this socket: a close() from a push
  // handler leaves its closing to onFrames, after the acks of what was
  // delivered.
  private inFrames: WebSocketLike | null = null;
  private closeAfterFrames = false;
  /** getToken's time limits running (close() clears them). */
  private tokenTimers = new Set<ReturnType<typeof setTimeout>>();
  /** The refresh of the current connection's token (cleared with the heartbeat). */
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private stateListeners = new Set<(e: StateEvent) => void>();
  private helloFrame: Hello | undefined;
  private lastClose: { code: number; reason: string } | undefined;
  private readonly stats_: Stats = {
    reconnects: 0,
    pushesReceived: 0,
    pushesDelivered: 0,
    duplicates: 0,
    offsetDuplicates: 0,
    notJoined: 0,
    acksSent: 0,
    requests: 0,
    pushesNotHeld: 0,
  };

  private constructor(private readonly opts: ClientOptions) {
    const WS = opts.WebSocket ?? (globalThis as any).WebSocket;
    if (!WS) throw new Error("liveedge: no WebSocket implementation (pass options.WebSocket)");
    this.urls = Array.isArray(opts.urls) ? [...opts.urls] : [opts.urls];
    if (this.urls.length === 0) throw new Error("liveedge: options.urls is empty");
    if (opts.token === undefined && !opts.getToken) throw new Error("liveedge: options.token or options.getToken is required");
    if (!opts.preferFirstUrl) this.urlIndex = Math.floor(Math.random() * this.urls.length);
    this.o = {
      urls: this.urls,
      WebSocket: WS,
      batch: opts.batch ?? true,
      // Zero or less means the default, as in the Go SDK (0 ms would time
      // out every request, or reconnect in a tight loop).
      requestTimeoutMs: positive(opts.requestTimeoutMs, 10000),
      reconnectMinMs: positive(opts.reconnectMinMs, 100),
      reconnectMaxMs: Math.max(positive(opts.reconnectMaxMs, 5000), positive(opts.reconnectMinMs, 100)),
      dedupWindow: opts.dedupWindow && opts.dedupWindow > 0 ? opts.dedupWindow : 16384,
      heartbeatMs: opts.heartbeatMs,
      tokenExpiryGraceMs: opts.tokenExpiryGraceMs !== undefined && opts.tokenExpiryGraceMs >= 0 ? opts.tokenExpiryGraceMs : 300000,
    };
    this.dedup = new Dedup(this.o.dedupWindow);
    if (opts.onPush) this.pushListeners.add(opts.onPush);
    if (opts.onState) this.stateListeners.add(opts.onState);
  }

  /**
   * Connects (each URL is tried once, in order from a random one, or from
   * the first with preferFirstUrl) and resolves once the hello
   * arrived. After that the client reconnects by itself until close() or a
   * terminal close code.
   */
  static async connect(opts: ClientOptions): Promise<LiveClient> {
    const c = new LiveClient(opts);
    let last: Error | undefined;
    for (let i = 0; i < c.urls.length; i++) {
      try {
        // A token refused on the URL before (401, 4501): "expired" for the next.
        const refused = last instanceof UnauthorizedError || (last instanceof CloseError && last.code === Close.TokenExpired);
        await c.attempt(refused ? "expired" : "connect", 0);
        return c;
      } catch (e) {
        last = e as Error;
        c.urlIndex++;
        if (e instanceof UnauthorizedError && !opts.getToken) break;
        // Terminal (as the Go SDK's) — but 4501 (token expired) with a token callback: the next URL asks it again.
        if (e instanceof CloseError && !reconnectable(e.code) && !(e.code === Close.TokenExpired && opts.getToken)) break;
      }
    }
    c.closed = true;
    throw last ?? new Error("liveedge: connect failed");
  }

  /** Subscribes to pushes or state events; returns the unsubscribe function. */
  on(ev: "push", fn: (p: Push) => void): () => void;
  on(ev: "state", fn: (e: StateEvent) => void): () => void;
  on(ev: "push" | "state", fn: (x: any) => void): () => void {
    const set: Set<(x: any) => void> = ev === "push" ? this.pushListeners : this.stateListeners;
    set.add(fn);
    // The pushes held while nobody listened go to it — after the caller's
    // synchronous code (its other listeners), before any later frame.
    if (ev === "push" && this.held.length > 0) queueMicrotask(() => this.releaseHeld());
    return () => set.delete(fn);
  }

  /** The hello of the current (or last) connection. */
  get hello(): Hello | undefined {
    return this.helloFrame;
  }
  get connected(): boolean {
    return this.ready;
  }
  get stats(): Stats {
    return { ...this.stats_ };
  }
  /** Rooms joined (re-joined after every reconnect) and the last offset seen in each. */
  joinedRooms(): Map<number, Since | undefined> {
    return new Map([...this.rooms].map(([r, s]) => [r, s.since]));
  }

  /**
   * Sends a request and resolves with the reply's d, or rejects with a
   * ReplyError (code ≠ 0), TimeoutError, DisconnectedError or ClosedError.
   * While reconnecting, the request waits for the connection (within its timeout).
   */
  request<T extends keyof Requests>(type: T, data: Requests[T][0], o?: { timeout?: number }): Promise<Requests[T][1]>;
  request(type: string, data: unknown, o?: { timeout?: number }): Promise<unknown>;
  async request(type: string, data: unknown, o?: { timeout?: number }): Promise<unknown> {
    if (type === "join") {
      // A room joined raw after leave(): its pushes are the app's again.
      const room = (data as { room_id?: unknown } | null)?.room_id;
      if (typeof room === "number") this.left.delete(room);
    }
    const timeout = o?.timeout ?? this.o.requestTimeoutMs;
    const deadline = Date.now() + timeout;
    for (;;) {
      await this.waitReady(Math.max(1, deadline - Date.now()), type);
      const ws = this.ws;
      if (ws && ws.readyState === OPEN) return this.send(ws, type, data, Math.max(1, deadline - Date.now()));
      // The connection dropped after it was ready and before this request
      // was written: nothing was sent, so it waits for the next one.
    }
  }

  /** Joins a room; it is re-joined after every reconnect until leave(). */
  async join(roomId: number, o?: { timeout?: number }): Promise<JoinReply> {
    this.left.delete(roomId);
    this.joinsPending.set(roomId, (this.joinsPending.get(roomId) ?? 0) + 1);
    if (!this.joining.has(roomId) && !this.rooms.has(roomId)) this.joining.set(roomId, {});
    try {
      let r: JoinReply;
      try {
        r = await this.request("join", { room_id: roomId }, o);
      } catch (e) {
        if (e instanceof TimeoutError) this.undoJoin(roomId);
        throw e;
      }
      let st = this.rooms.get(roomId);
      if (!st) {
        // A leave() after this join was sent dropped the room from joining:
        // the node ran the leave after the join, so the room is not joined.
        const e = this.joining.get(roomId);
        if (!e) return r;
        st = { since: e.since }; // pushes that came before the reply
        this.rooms.set(roomId, st);
      }
      const s = sinceOf(r);
      if (s) merge(st, s);
      return r;
    } finally {
      const n = (this.joinsPending.get(roomId) ?? 1) - 1;
      if (n > 0) this.joinsPending.set(roomId, n);
      else {
        this.joinsPending.delete(roomId);
        this.joining.delete(roomId);
      }
    }
  }
  /**
   * Leaves a room whose join went unanswered in time: the node may have
   * joined it while the client does not track it (its pushes would come
   * until the next reconnect, then stop without a word). The leave is written
   * before join() rejects, so a join retried after it comes after the leave;
   * a room joined, or whose other join still waits for its reply (that
   * reply decides), is kept.
   */
  private undoJoin(roomId: number): void {
    if (this.rooms.has(roomId) || (this.joinsPending.get(roomId) ?? 0) > 1) return;
    if (this.left.size >= MaxLeft) this.left.clear();
    this.left.add(roomId);
    const ws = this.ws;
    if (ws && ws.readyState === OPEN) this.send(ws, "leave", { room_id: roomId }, this.o.requestTimeoutMs).catch(() => {});
  }
  async leave(roomId: number, o?: { timeout?: number }): Promise<void> {
    this.rooms.delete(roomId);
    this.joining.delete(roomId); // a join still waiting for its reply does not put it back
    if (this.left.size >= MaxLeft) this.left.clear();
    this.left.add(roomId);
    await this.request("leave", { room_id: roomId }, o);
  }
  /**
   * Sends a chat message. reqId (≤ 64 bytes) makes a retry post once: sent again with the same
   * reqId (after a disconnect or a timeout, through any node) within a couple of minutes, it
   * answers the first mid; 10409 while the first is still being sent (retry).
   */
  chat(roomId: number, text: string, o?: { timeout?: number; reqId?: string }) {
    const d: Requests["chat"][0] = { room_id: roomId, text };
    if (o?.reqId) d.req_id = o.reqId;
    return this.request("chat", d, o);
  }
  /**
   * Sends a gift; reqId makes it idempotent (a retry with the same reqId moves nothing again); pk
   * scores it in the room's PK. Without a reqId one is made (g is not changed: an object reused
   * for every tap sends a gift each time); the result and a failed call's error carry it as
   * `reqId` — retry a failure with it, never with a new one (a gift whose answer was lost may have
   * been debited, and a new reqId debits again).
   */
  gift(
    g: { roomId: number; giftId: number; receiverId: number; count?: number; reqId?: string; pk?: boolean },
    o?: { timeout?: number },
  ) {
    const d: Requests["gift"][0] = {
      room_id: g.roomId,
      gift_id: g.giftId,
      receiver_id: g.receiverId,
      count: g.count || 1, // 0 means 1, as in the Go SDK
      req_id: g.reqId || randomId(),
    };
    if (g.pk) d.pk = true;
    return this.request("gift", d, o).then(
      (r) => Object.assign(r, { reqId: d.req_id }),
      (e: unknown) => {
        if (e instanceof Error) Object.assign(e, { reqId: d.req_id });
        throw e;
      },
    );
  }
  /**
   * Grabs a packet of the red-packet rain `code` (biz 5560); you must be in its
   * room. Resolves once the grant and its credit are durable (biz 5570 follows);
   * rejects with ReplyError GrabError.NotStarted / AlreadyGrabbed / NoneLeft,
   * 10003 (not in the room) or 10429 (too fast).
   */
  grab(code: string, o?: { timeout?: number }) {
    return this.request("grab", { code }, o);
  }
  ping(o?: { timeout?: number }) {
    return this.request("ping", {}, o);
  }

  /** Closes the connection (1000) and stops reconnecting. */
  close(): void {
    if (this.closed) return;
    this.terminate(undefined);
  }

  // ---- connection ----

  private token(reason: TokenReason): Promise<string> {
    if (!this.opts.getToken) return Promise.resolve(this.opts.token!);
    // A token whose exp has passed is "expired" whatever ended the last
    // connection (a machine that slept past it sees no 4501; a browser sees
    // no 401).
    const exp = this.lastToken === undefined ? undefined : tokenExpiry(this.lastToken);
    if (reason !== "expired" && exp !== undefined && Date.now() >= exp * 1000) reason = "expired";
    // Bounded like a request: a callback that never settles (a hung fetch)
    // must not stop the reconnect loop for good. close() clears the timer.
    const ms = this.o.requestTimeoutMs;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<string>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`getToken did not answer within ${ms} ms`)), ms);
      this.tokenTimers.add(timer);
    });
    // Called inside the chain: a callback that throws at once rejects this
    // attempt (its timer cleared), not leaves a timer whose rejection nobody
    // hears (an unhandled rejection ends a Node process).
    const getToken = this.opts.getToken;
    return Promise.race([Promise.resolve().then(() => getToken(reason)), late]).finally(() => {
      clearTimeout(timer);
      this.tokenTimers.delete(timer!);
    });
  }

  /**
   * Delivers the pushes held while nobody listened, and acks them on the
   * current connection (none while reconnecting: the node resends the
   * reliable ones, acked then as duplicates). A listener gone meanwhile
   * leaves them held.
   */
  private releaseHeld(): void {
    if (this.closed || this.held.length === 0 || this.pushListeners.size === 0) return;
    const held = this.held;
    this.held = [];
    this.onFrames(this.ws, held);
  }

  /** One connection attempt to the current URL: dial, hello, re-join, ready. */
  private async attempt(reason: TokenReason, attemptNo: number): Promise<void> {
    const url = this.urls[this.urlIndex % this.urls.length];
    const tok = await this.token(reason);
    this.lastToken = tok;
    if (this.closed) throw new ClosedError(this.closeCause);
    const u = new URL(url);
    u.searchParams.delete("token"); // the token is the subprotocol's, never the URL's
    if (this.o.batch) u.searchParams.set("batch", "1");
    else u.searchParams.delete("batch");
    const ws = new this.o.WebSocket(u.toString(), [Subprotocol, TokenSubprotocolPrefix + tok]);
    const hello = await new Promise<Hello>((resolve, reject) => {
      let errMsg = "";
      const timer = setTimeout(() => {
        fail(new TimeoutError("connect"));
        try {
          ws.close();
        } catch {
          /* not open yet */
        }
      }, this.o.requestTimeoutMs);
      const fail = (e: Error) => {
        clearTimeout(timer);
        this.connecting = undefined;
        ws.onmessage = ws.onclose = null;
        // Not null: closing a socket still connecting makes Node's ws emit
        // an error, which with no listener is an uncaught exception.
        ws.onerror = () => {};
        reject(e);
      };
      // close() while this socket waits for its hello: closed at once, its
      // timer cleared (nothing keeps a Node process alive after close()).
      this.connecting = () => {
        fail(new ClosedError(this.closeCause));
        try {
          ws.close(Close.Normal);
        } catch {
          /* not open yet */
        }
      };
      ws.onerror = (ev: any) => {
        errMsg = String(ev?.message ?? ev?.error?.message ?? "");
        if (/\b401\b/.test(errMsg)) fail(new UnauthorizedError());
      };
      ws.onclose = (ev) => {
        this.failsBeforeHello++;
        if (ev.code >= 4000) fail(new CloseError(ev.code, ev.reason));
        else if (this.staticTokenExpired(ws)) fail(new UnauthorizedError(`token expired at ${new Date(tokenExpiry(tok)! * 1000).toISOString()}`));
        else fail(new Error(`liveedge: connect to ${redact(url)} failed (${ev.code}${errMsg ? " " + errMsg : ""})`));
      };
      ws.onmessage = (ev) => {
        let f: ServerFrame;
        try {
          f = JSON.parse(String(ev.data));
        } catch {
          return;
        }
        // The hello is the first frame; with batching it may open a batch.
        const frames: ServerFrame[] = f.t === "batch" && Array.isArray(f.d) ? f.d : [f];
        const i = frames.findIndex((x) => x && x.t === "hello");
        if (i < 0) return;
        clearTimeout(timer);
        this.connecting = undefined;
        this.failsBeforeHello = 0;
        const hello = (frames[i] as { d: Hello }).d;
        // Switch to the session's handlers now, not after an await: frames
        // that follow the hello in the same read are dispatched at once.
        this.helloFrame = hello;
        this.ws = ws;
        this.left.clear(); // a new connection is in no room it was not re-joined to
        this.lastSend = this.lastRead = Date.now();
        ws.onmessage = (e) => this.onMessage(ws, e.data);
        ws.onclose = (e) => this.dropped(ws, e.code, e.reason);
        // Not null: an 'error' without a listener is an uncaught exception on
        // Node's ws (a peer's bad frame); the close that follows reconnects.
        ws.onerror = () => {};
        if (i + 1 < frames.length) this.onFrames(ws, frames.slice(i + 1));
        resolve(hello);
      };
    });
    if (this.closed) {
      if (this.ws === ws) this.ws = null;
      ws.onmessage = ws.onclose = null;
      ws.close(Close.Normal);
      throw new ClosedError(this.closeCause);
    }
    this.startHeartbeat(ws, hello);
    const left = hello.expires_in_ms;
    if (left !== undefined && left > 0) this.scheduleRefresh(ws, Date.now() + left);
    await this.rejoin(ws).catch(() => undefined);
    if (this.ws !== ws) {
      // Dropped while re-joining: the caller's loop tries again.
      const lc = this.lastClose;
      throw lc && lc.code >= 4000 ? new CloseError(lc.code, lc.reason) : new DisconnectedError();
    }
    this.ready = true;
    this.upSince = Date.now();
    if (attemptNo > 0) this.stats_.reconnects++;
    this.emitState({ state: "connected", hello, url: redact(url), attempt: attemptNo });
    const ws_ = this.waiters;
    this.waiters = [];
    for (const w of ws_) w.resolve();
  }

  /** Re-joins every room on a new connection (since when offsets were seen). */
  private async rejoin(ws: WebSocketLike): Promise<void> {
    let transient = false;
    const joins = [...this.rooms].map(async ([room, st]) => {
      const sent = st.since;
      const d: Requests["join"][0] = { room_id: room };
      if (sent) d.since = sent;
      // The reply is taken as it is read (send's onOK), in frame order: the
      // pushes after it in its batch are checked against the position it
      // sets. Before, it was taken a microtask later, after them — pushes
      // numbered from a position that went back were dropped as
      // duplicates (acked, if reliable: never resent).
      const onJoined = (rep: unknown): void => {
        const r = rep as JoinReply;
        if (this.rooms.get(room) !== st) return; // left while it was re-joined: nothing to re-sync
        // Not recovered: report it — unless a live push that came before
        // the reply moved the position on (onPush reported its gap then),
        // but not when the reply is below the position sent in its epoch:
        // the room's numbering went back (a cluster's Redis), pushes read
        // before the reply may have been dropped as duplicates with no gap.
        const wentBack = sent !== undefined && r.recovered !== true && r.ep === sent.ep && (r.off ?? 0) < sent.off;
        if (sent && r.recovered !== true && (st.since === sent || wentBack))
          this.emitState({ state: "room_resync", room, since: sent, at: { off: r.off ?? 0, ep: r.ep ?? "" } });
        // Pushes read before the reply already moved since on.
        const s = sinceOf(r);
        if (s && st.since === sent && (!sent || r.recovered !== true || s.ep !== sent.ep)) st.since = s;
      };
      try {
        await this.send(ws, "join", d, this.o.requestTimeoutMs, onJoined);
      } catch (e) {
        if (!(e instanceof ReplyError) || e.code === 50000 || e.code === 10429) {
          // Not a refusal of the room: no answer in time (a late reply,
          // maybe recovered:false, would be thrown away: its gap never
          // reported), the connection dropped, or a Redis or NATS blip in
          // the node's join, or its rate. This connection is given up below
          // and the client reconnects with its back-off, the room kept and
          // joined again with the same since (as the Go SDK does) — never
          // "connected" with a room the node may not have joined.
          transient = true;
          return;
        }
        // Reported only if the app did not leave it meanwhile.
        if (this.rooms.delete(room)) this.emitState({ state: "room_dropped", room, error: e });
      }
    });
    await Promise.all(joins);
    if (transient && this.ws === ws) {
      this.dropped(ws, Close.Normal, "re-join failed, retrying");
      ws.close(Close.Normal);
    }
  }

  /**
   * Whether a failed attempt on ws is taken for the HTTP 401 that refuses an
   * expired static token. A browser cannot see that 401 (only a failed
   * connection), so without this it would retry forever; Node's ws shows it
   * (an EventEmitter whose error names the status: matched in attempt), so
   * there only the 401 counts — a 503 or a 1006 while a node restarts is
   * never taken for it. In a browser, the token's exp must have passed by
   * this machine's clock by tokenExpiryGraceMs (a clock running ahead, as
   * device clocks do, must not end a client whose node still takes the
   * token) and MinFailsForExpiry attempts in a row have failed before the
   * hello (one node restart is not a refusal). Checked after a failed
   * attempt, never before one.
   */
  private staticTokenExpired(ws: WebSocketLike): boolean {
    if (this.opts.getToken || this.opts.token === undefined) return false;
    if (typeof (ws as { on?: unknown }).on === "function") return false; // Node's ws: the 401 is seen
    if (this.failsBeforeHello < MinFailsForExpiry) return false;
    const exp = tokenExpiry(this.opts.token);
    return exp !== undefined && Date.now() >= exp * 1000 + this.o.tokenExpiryGraceMs;
  }

  /** The connection ws ended (close frame, network error or heartbeat failure). */
  private dropped(ws: WebSocketLike, code: number, reason: string): void {
    if (this.ws !== ws) return;
    const wasReady = this.ready;
    this.ws = null;
    this.ready = false;
    this.lastClose = { code, reason };
    ws.onmessage = ws.onclose = null;
    ws.onerror = () => {}; // (see attempt: never an uncaught 'error')
    this.stopHeartbeat();
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new DisconnectedError());
    }
    this.pending.clear();
    if (this.closed) return;
    this.emitState({ state: "disconnected", code, reason });
    if (!wasReady) return; // still activating: attempt() reports it to its loop
    if (!reconnectable(code)) {
      if (code === Close.TokenExpired && this.opts.getToken) {
        void this.reconnectLoop("expired");
        return;
      }
      this.terminate(new CloseError(code, reason));
      return;
    }
    void this.reconnectLoop("reconnect");
  }

  private async reconnectLoop(reason: TokenReason): Promise<void> {
    if (this.upSince > 0 && Date.now() - this.upSince < STABLE_AFTER_MS) this.shortLived = Math.min(this.shortLived + 1, 32);
    else this.shortLived = 0;
    // Another node first, chosen at random (as the Go SDK): the clients of a
    // node that died or is draining spread over the others rather than retry
    // it — or all move to the same next one.
    if (this.urls.length > 1) this.urlIndex += 1 + Math.floor(Math.random() * (this.urls.length - 1));
    const floor = this.shortLived;
    let error: Error | undefined; // why the previous attempt failed
    const urls = this.urls.length;
    for (let n = 1; !this.closed; n++) {
      // Rounds of the URL list, as the Go SDK: each round starts with the
      // backoff (round k: random [0, min(max, min·2^(k-1))]), and within a
      // round the next URL is tried after a short pause in [min/2, min] — a
      // dead node's clients reach a live one at once, not after a wait
      // that doubles with each URL tried.
      let delayMs: number;
      if ((n - 1) % urls === 0) {
        const round = Math.floor((n - 1) / urls) + 1;
        const cap = Math.min(this.o.reconnectMaxMs, this.o.reconnectMinMs * 2 ** Math.min(round - 1 + floor, 30));
        delayMs = Math.floor(Math.random() * cap);
      } else {
        const half = this.o.reconnectMinMs / 2;
        delayMs = Math.floor(half + Math.random() * half);
      }
      this.emitState(error ? { state: "reconnecting", attempt: n, delayMs, error } : { state: "reconnecting", attempt: n, delayMs });
      await this.backoff(delayMs);
      if (this.closed) return;
      try {
        await this.attempt(reason, n);
        return;
      } catch (e) {
        if (this.closed) return;
        error = e instanceof Error ? e : new Error(String(e));
        // The next attempt's reason: "expired" after a refused token (the
        // callback is told, not asked for the same token again), else
        // "reconnect" — a later 503 or 1006 is no reason to refresh.
        reason = "reconnect";
        if (e instanceof UnauthorizedError) {
          if (!this.opts.getToken) {
            this.terminate(e);
            return;
          }
          reason = "expired";
        }
        if (e instanceof CloseError && !reconnectable(e.code)) {
          if (!(e.code === Close.TokenExpired && this.opts.getToken)) {
            this.terminate(e);
            return;
          }
          reason = "expired";
        }
        this.urlIndex++;
      }
    }
  }

  /** Waits ms before a reconnect attempt; close() ends the wait at once. */
  private backoff(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = undefined;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        this.wake = undefined;
        resolve();
      };
    });
  }

  private terminate(cause: Error | undefined): void {
    this.closed = true;
    this.closeCause = cause;
    this.ready = false;
    this.stopHeartbeat();
    this.wake?.();
    this.connecting?.();
    for (const t of this.tokenTimers) clearTimeout(t);
    this.tokenTimers.clear();
    this.held = [];
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onmessage = ws.onclose = null;
      ws.onerror = () => {}; // see attempt's fail
      if (this.inFrames === ws) {
        this.closeAfterFrames = true; // a push handler closed: acks first (onFrames)
      } else {
        try {
          ws.close(Close.Normal);
        } catch {
          /* already closed */
        }
      }
    }
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new ClosedError(cause));
    }
    this.pending.clear();
    for (const w of this.waiters) w.reject(new ClosedError(cause));
    this.waiters = [];
    this.emitState({ state: "closed", error: cause });
  }

  /**
   * Checks ws every half interval: a ping (probe) when nothing was written
   * for the interval — the node must hear from the client within its
   * heartbeat — or nothing was read for it: writes alone prove nothing (a
   * wedged or half-open node takes them and answers none), so an app that
   * keeps sending would otherwise stay on a dead connection. And the send
   * buffer: above MaxBufferedBytes for longer than the request timeout, the
   * node is not reading — the connection is left.
   */
  private startHeartbeat(ws: WebSocketLike, hello: Hello): void {
    this.stopHeartbeat();
    this.bufferedSince = 0;
    let every = this.o.heartbeatMs;
    if (every === undefined || every === 0) {
      // heartbeat_ms when it is there and positive (exact), else heartbeat_s.
      const ms = hello.heartbeat_ms !== undefined && hello.heartbeat_ms > 0 ? hello.heartbeat_ms : hello.heartbeat_s * 1000;
      every = ms / 2;
    }
    if (!(every > 0)) return;
    this.hb = setInterval(() => {
      if (this.ws !== ws) return;
      const now = Date.now();
      const buffered = ws.bufferedAmount ?? 0;
      if (buffered <= MaxBufferedBytes) this.bufferedSince = 0;
      else if (this.bufferedSince === 0) this.bufferedSince = now;
      else if (now - this.bufferedSince >= this.o.requestTimeoutMs) {
        this.abandon(ws, `send buffer above ${MaxBufferedBytes} bytes for ${now - this.bufferedSince} ms`);
        return;
      }
      if (now - this.lastSend >= every! || now - this.lastRead >= every!) this.probe(ws);
    }, Math.max(10, Math.floor(every / 2)));
    (this.hb as any).unref?.();
  }

  /**
   * Pings ws (one such ping in flight at a time): unanswered within the
   * request timeout, and no reply read since it was sent, the connection is
   * dead even if no close came, and is left (the client reconnects). A
   * reply read meanwhile keeps it: a wedged node answers nothing, while one
   * applying backpressure (the gateway stops reading a connection with
   * gifts.max_inflight gifts in flight) answers the ping late but keeps
   * replying — leaving it would fail every request in flight (ambiguous for
   * a gift). It is pinged again if it falls silent (the heartbeat, or the
   * next request that times out). Pushes alone buy time, not the verdict:
   * a viewer on a slow link gets its replies behind the room's pushes the
   * node queued first, so while pushes come the client waits for a reply
   * up to ProbeGrace × the request timeout from the ping — but a node whose
   * reading of this connection died keeps fanning room pushes out to it
   * and never answers.
   */
  private probe(ws: WebSocketLike): void {
    if (this.probing === ws || this.ws !== ws) return;
    this.probing = ws;
    const pinged = Date.now();
    const done = () => {
      if (this.probing === ws) this.probing = undefined;
    };
    this.send(ws, "ping", {}, this.o.requestTimeoutMs).then(done, (e) => {
      if (!(e instanceof TimeoutError) || this.lastReply > pinged) return done();
      if (!(this.lastRead > pinged)) {
        done();
        return this.abandon(ws, "ping timeout");
      }
      const wait = pinged + ProbeGrace * this.o.requestTimeoutMs - Date.now();
      const t = setTimeout(() => {
        done();
        if (this.ws === ws && !(this.lastReply > pinged)) this.abandon(ws, "ping timeout");
      }, Math.max(0, wait));
      (t as any).unref?.();
    });
  }

  /** Leaves a connection found dead (its close handshake is not waited for). */
  private abandon(ws: WebSocketLike, why: string): void {
    try {
      ws.close();
    } catch {
      /* ignore */
    }
    this.dropped(ws, Close.Abnormal, why);
  }

  /**
   * With getToken, arranges the refresh of ws's token, which ends at end (ms
   * by this machine's clock): RefreshLeadMs before it (a quarter of the time
   * left for a shorter one), less a random part of half as much, so that
   * clients given tokens at once do not all ask at once.
   */
  private scheduleRefresh(ws: WebSocketLike, end: number): void {
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (!this.opts.getToken || this.ws !== ws) return;
    const left = end - Date.now();
    const lead = Math.min(RefreshLeadMs, left / 4);
    this.armRefresh(ws, end, end - lead - (Math.random() * lead) / 2);
  }

  /** Runs refresh(ws, end) at the time at (timers longer than setTimeout's limit are chained). */
  private armRefresh(ws: WebSocketLike, end: number, at: number): void {
    const wait = at - Date.now();
    this.refreshTimer = setTimeout(
      () => {
        this.refreshTimer = undefined;
        if (this.ws !== ws) return;
        if (Date.now() < at) this.armRefresh(ws, end, at);
        else void this.refresh(ws, end);
      },
      Math.max(0, Math.min(wait, MaxTimerMs)),
    );
    (this.refreshTimer as any).unref?.();
  }

  /**
   * Asks getToken for a token ("refresh") and hands it to ws's node. On
   * failure (getToken's, a refused token, no reply, a token that ends no
   * later than the last) it is tried again when half the time left has
   * passed, while at least RefreshRetryFloorMs is left; then the node
   * closes 4501 and the client reconnects ("expired").
   */
  private async refresh(ws: WebSocketLike, end: number): Promise<void> {
    try {
      const tok = await this.token("refresh");
      if (this.ws !== ws) return;
      const r = (await this.send(ws, "refresh", { token: tok }, this.o.requestTimeoutMs)) as RefreshReply;
      if (this.ws !== ws) return;
      if (!(typeof r?.expires_in_ms === "number" && r.expires_in_ms > 0)) throw new Error("refresh reply without expires_in_ms");
      this.lastToken = tok;
      const next = Date.now() + r.expires_in_ms;
      // The same token again (a getToken that caches it): tried again as
      // a failure is, not at a quarter of what is left — a burst of
      // refreshes towards the end.
      if (next <= end + 1000) throw new Error("the refreshed token ends no later than the one it replaces");
      this.scheduleRefresh(ws, next);
    } catch {
      if (this.ws !== ws || this.closed) return;
      const rest = end - Date.now();
      if (rest < RefreshRetryFloorMs) return;
      this.armRefresh(ws, end, Date.now() + rest / 2);
    }
  }

  /** Stops the heartbeat and the token refresh of the connection that ended. */
  private stopHeartbeat(): void {
    if (this.hb !== undefined) clearInterval(this.hb);
    this.hb = undefined;
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
  }

  private waitReady(timeout: number, what: string): Promise<void> {
    if (this.closed) return Promise.reject(new ClosedError(this.closeCause));
    // Ready, and its socket still open (a socket closing is not ready
    // though its close event has not been handled yet).
    if (this.ready && this.ws?.readyState === OPEN) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w: Waiter = {
        resolve: () => {
          clearTimeout(t);
          resolve();
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      };
      const t = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== w);
        reject(new TimeoutError(what + " (waiting for a connection)"));
      }, timeout);
      this.waiters.push(w);
    });
  }

  /**
   * Writes one request on ws and waits for its reply. onOK, if given, runs
   * with an OK reply's data as the reply is read — before the frames after
   * it in its batch (the promise settles only after them, in a microtask).
   */
  private send(ws: WebSocketLike, type: string, data: unknown, timeout: number, onOK?: (d: unknown) => void): Promise<unknown> {
    if (this.ws !== ws || ws.readyState !== OPEN) return Promise.reject(new DisconnectedError());
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TimeoutError(type));
        // No answer in time: a slow request, or a node that answers nothing
        // any more — a ping tells which (unanswered, the connection is left).
        this.probe(ws);
      }, timeout);
      this.pending.set(id, { resolve, reject, timer, onOK });
      try {
        ws.send(JSON.stringify({ t: type, id, d: data ?? {} }));
      } catch (e) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(new DisconnectedError());
        return;
      }
      this.lastSend = Date.now();
      this.stats_.requests++;
    });
  }

  // ---- frames ----

  private onMessage(ws: WebSocketLike, raw: unknown): void {
    if (this.ws !== ws) return;
    this.lastRead = Date.now();
    let f: ServerFrame;
    try {
      f = JSON.parse(String(raw));
    } catch {
      return; // the server only sends JSON text frames
    }
    this.onFrames(ws, f.t === "batch" ? (Array.isArray(f.d) ? f.d : []) : [f]);
  }

  /**
   * Handles the frames of one received message (or the held pushes), then
   * acks its pushes in one frame on ws (none when ws is null: reconnecting).
   */
  private onFrames(ws: WebSocketLike | null, frames: ServerFrame[]): void {
    const acks: string[] = [];
    this.inFrames = ws;
    try {
      for (const x of frames) {
        if (this.closed) break; // close() from a push handler: nothing more is delivered
        this.handle(x, acks);
      }
    } finally {
      this.inFrames = null;
    }
    for (let i = 0; ws && i < acks.length; i += MaxAckMids) {
      const mids = acks.slice(i, i + MaxAckMids);
      try {
        ws.send(JSON.stringify({ t: "ack", d: { mids } }));
        this.lastSend = Date.now();
        this.stats_.acksSent += mids.length;
      } catch {
        break; // closing: the connection's unacked pushes die with it
      }
    }
    if (this.closeAfterFrames) {
      this.closeAfterFrames = false;
      try {
        ws?.close(Close.Normal);
      } catch {
        /* already closed */
      }
    }
  }

  private handle(f: ServerFrame, acks: string[]): void {
    if (!f || typeof f !== "object") return;
    switch (f.t) {
      case "reply":
        this.lastReply = Date.now();
        this.onReply(f);
        return;
      case "push":
        // Held while nobody listens — and, once some are held, every later
        // one too until they are released (a listener added meanwhile must
        // not get a newer push before the held older ones). Never acked
        // here: an ack tells the node the push was had.
        if (this.pushListeners.size === 0 || this.held.length > 0) {
          if (this.held.length < MaxHeld) this.held.push(f);
          else this.stats_.pushesNotHeld++; // not acked: the node resends a reliable one
          return;
        }
        this.onPush(f);
        if (f.ack && typeof f.mid === "string" && f.mid !== "") acks.push(f.mid);
        return;
      case "hello":
        this.helloFrame = f.d;
        return;
    }
  }

  private onReply(f: ReplyFrame): void {
    const p = this.pending.get(f.id);
    if (!p) return; // timed out already
    this.pending.delete(f.id);
    clearTimeout(p.timer);
    if (f.code !== 0) {
      p.reject(new ReplyError(f.code, f.msg));
      return;
    }
    p.onOK?.(f.d ?? {});
    p.resolve(f.d ?? {});
  }

  private onPush(f: PushFrame): void {
    this.stats_.pushesReceived++;
    const numbered = typeof f.off === "number" && f.off > 0 && !!f.room;
    if (numbered) {
      const st = this.rooms.get(f.room) ?? this.joining.get(f.room);
      if (!st && this.left.has(f.room)) {
        // The room was left: a push the node fanned out before the leave
        // took effect is not the app's any more (a re-join with a since of
        // its own would see it twice). Acked if reliable (handle).
        this.stats_.notJoined++;
        return;
      }
      if (st) {
        const off = f.off!;
        const ep = f.ep ?? "";
        const p = st.since;
        if (p && ep === p.ep && off <= p.off) {
          this.stats_.offsetDuplicates++; // a replay overlap
          return;
        }
        st.since = { off, ep };
        // Numbered, nothing pushed yet: any epoch starts at 1.
        const fresh = !!p && p.off === 0 && p.ep === "";
        if (p && !(fresh && off === 1) && (ep !== p.ep || off > p.off + 1)) {
          // Pushes between the last seen and this one are lost on this
          // connection (the node could not fill a hole, or the room's
          // numbering restarted): the app re-syncs, as after a re-join that
          // could not recover.
          this.emitState({ state: "room_resync", room: f.room, since: p, at: { off: off - 1, ep } });
        }
      }
    }
    // Numbered room pushes are guarded by their offset above: only the
    // others, and reliable ones (resent, possibly when the room has no
    // position here), go through the mid ring, so a busy room cannot push a
    // user push's mid out of it before its resend arrives.
    // A push without a mid (the node always sends one) is delivered as the
    // Go SDK does: it cannot be de-duplicated, nor acked.
    const mid = typeof f.mid === "string" ? f.mid : "";
    if (mid !== "" && (!numbered || f.ack) && this.dedup.seen(mid)) {
      this.stats_.duplicates++;
      return;
    }
    this.stats_.pushesDelivered++;
    const p: Push = { mid, biz: f.biz, room: f.room, d: f.d as any, ack: !!f.ack };
    if (f.off !== undefined) p.off = f.off;
    if (f.ep !== undefined) p.ep = f.ep;
    for (const fn of this.pushListeners) {
      try {
        fn(p);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  private emitState(e: StateEvent): void {
    for (const fn of this.stateListeners) {
      try {
        fn(e);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }
}

/** A joined (or joining) room: the last position seen, when the server gave one. */
interface RoomState {
  since?: Since;
}

/** Moves st's position to s when s is newer: a later offset in the same epoch, or another epoch. */
function merge(st: RoomState, s: Since): void {
  if (!st.since || st.since.ep !== s.ep || s.off > st.since.off) st.since = s;
}

function sinceOf(r: JoinReply | undefined): Since | undefined {
  if (r && typeof r.off === "number" && typeof r.ep === "string") return { off: r.off, ep: r.ep };
  return undefined;
}

function redact(url: string): string {
  try {
    const u = new URL(url);
    u.search = "";
    u.username = u.password = "";
    return u.toString();
  } catch {
    return "?";
  }
}

/**
 * The exp (unix seconds) of a JWT — the node's tokens are HS256 JWTs with
 * exp (PROTOCOL §1) — read from its payload, not verified; undefined when tok
 * is not a JWT with a numeric exp.
 */
export function tokenExpiry(tok: string): number | undefined {
  const parts = tok.split(".");
  if (parts.length !== 3) return undefined;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const payload = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    return typeof payload?.exp === "number" && Number.isFinite(payload.exp) ? payload.exp : undefined;
  } catch {
    return undefined;
  }
}

/** A random request id (for gift req_id). */
export function randomId(): string {
  const c = (globalThis as any).crypto;
  if (c?.randomUUID) return c.randomUUID();
  return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12);
}

/** v if it is a positive number, else def. */
function positive(v: number | undefined, def: number): number {
  return v !== undefined && v > 0 ? v : def;
}

// Generated from clientsdk/ts/src by `npm run build` (esbuild). Do not edit.

// src/protocol.ts
var Biz = {
  Chat: 5555,
  Gift: 5556,
  GiftFailed: 5557,
  PKProgress: 5558,
  /** Extension: the room was closed by its anchor. */
  RoomClosed: 5559,
  RainStarted: 5560,
  RainFinished: 5561,
  /** Extension: a PK invitation to the invited room's anchor (ack). */
  PKInvite: 5562,
  WalletCredit: 5570,
  OrderStatus: 5580
};
var GrabError = {
  /** Unknown code, or the rain has not started. */
  NotStarted: 30001,
  /** You already got a packet of this rain. */
  AlreadyGrabbed: 30002,
  /** None left, or the rain is over. */
  NoneLeft: 30003
};
var Close = {
  Normal: 1e3,
  GoingAway: 1001,
  Abnormal: 1006,
  TooBig: 1009,
  Abuse: 4400,
  HeartbeatTimeout: 4402,
  SlowConsumer: 4408,
  Replaced: 4409,
  TokenExpired: 4501
};
function reconnectable(code) {
  return code < 4500;
}
var MaxAckMids = 1024;

// src/client.ts
var Subprotocol = "liveedge.v1";
var TokenSubprotocolPrefix = "liveedge.bearer.";
function isBiz(p, biz) {
  return p.biz === biz;
}
var ReplyError = class extends Error {
  constructor(code, msg) {
    super(`liveedge: ${code}: ${msg}`);
    this.code = code;
    this.msg = msg;
    this.name = "ReplyError";
  }
};
var DisconnectedError = class extends Error {
  constructor() {
    super("liveedge: disconnected");
    this.name = "DisconnectedError";
  }
};
var ClosedError = class extends Error {
  constructor(cause) {
    super("liveedge: client closed" + (cause ? ": " + cause.message : ""));
    this.cause = cause;
    this.name = "ClosedError";
  }
};
var TimeoutError = class extends Error {
  constructor(what) {
    super(`liveedge: ${what} timed out`);
    this.name = "TimeoutError";
  }
};
var CloseError = class extends Error {
  constructor(code, reason) {
    super(`liveedge: closed by server: ${code} ${reason}`);
    this.code = code;
    this.reason = reason;
    this.name = "CloseError";
  }
};
var UnauthorizedError = class extends Error {
  constructor(why = "HTTP 401") {
    super(`liveedge: unauthorized (${why})`);
    this.name = "UnauthorizedError";
  }
};
var Dedup = class {
  constructor(window) {
    this.window = window;
    this.set = /* @__PURE__ */ new Set();
    this.next = 0;
    this.ring = new Array(window);
  }
  /** seen records mid and reports whether it was already there. */
  seen(mid) {
    if (this.set.has(mid)) return true;
    const old = this.ring[this.next];
    if (old !== void 0) this.set.delete(old);
    this.ring[this.next] = mid;
    this.next = (this.next + 1) % this.window;
    this.set.add(mid);
    return false;
  }
};
var OPEN = 1;
var MaxLeft = 4096;
var STABLE_AFTER_MS = 3e4;
var MaxHeld = 4096;
var MaxBufferedBytes = 1 << 20;
var ProbeGrace = 3;
var MinFailsForExpiry = 3;
var RefreshLeadMs = 6e4;
var RefreshRetryFloorMs = 2e3;
var MaxTimerMs = 2 ** 31 - 1;
var LiveClient = class _LiveClient {
  constructor(opts) {
    this.opts = opts;
    this.urlIndex = 0;
    this.ws = null;
    this.ready = false;
    // When the current (or last) connection became ready, and how many in a
    // row ended within STABLE_AFTER_MS of it: their reconnects start that many
    // rounds up the backoff (a connection closed again at once — 4408, 4402, a
    // draining node — does not reconnect ten times a second).
    this.upSince = 0;
    this.shortLived = 0;
    this.closed = false;
    this.waiters = [];
    this.pending = /* @__PURE__ */ new Map();
    this.nextId = 1;
    this.rooms = /* @__PURE__ */ new Map();
    /**
     * Rooms whose join is in flight: a push of the room may come before the
     * join's reply, and its position is kept here (else the reply's older
     * position made the next push look like a gap).
     */
    this.joining = /* @__PURE__ */ new Map();
    /** The joins of each room waiting for their reply (joining is dropped when the last ends). */
    this.joinsPending = /* @__PURE__ */ new Map();
    /**
     * Rooms leave() left on this connection (not joined since): a push of one, fanned out before
     * the leave took effect, is dropped. Rooms joined with a raw request() are in neither set: their
     * pushes pass. At most MaxLeft; cleared at each (re)connect.
     */
    this.left = /* @__PURE__ */ new Set();
    this.lastSend = 0;
    /** When the current connection last read a frame (the liveness check: see startHeartbeat). */
    this.lastRead = 0;
    /** When the last reply was read: the node reads this connection. */
    this.lastReply = 0;
    /** Connection attempts in a row that failed before their hello (see staticTokenExpired). */
    this.failsBeforeHello = 0;
    /** Since when the socket has held more than MaxBufferedBytes unsent (0: not now). */
    this.bufferedSince = 0;
    this.pushListeners = /* @__PURE__ */ new Set();
    // Pushes read while no push listener was registered (a user's waiting
    // pushes come with the hello, before the app's on("push") after `await
    // connect()`; or the app has none yet): held, neither delivered nor acked
    // — an ack tells the node the push was had — until the next on("push")
    // (released in a microtask). Once some are held every later one is too
    // until they are released (never a newer push before the held older
    // ones). At most MaxHeld; after a reconnect the node resends those
    // reliable ones, and the de-duplication delivers each mid once.
    this.held = [];
    // onFrames is handling a message of this socket: a close() from a push
    // handler leaves its closing to onFrames, after the acks of what was
    // delivered.
    this.inFrames = null;
    this.closeAfterFrames = false;
    /** getToken's time limits running (close() clears them). */
    this.tokenTimers = /* @__PURE__ */ new Set();
    this.stateListeners = /* @__PURE__ */ new Set();
    this.stats_ = {
      reconnects: 0,
      pushesReceived: 0,
      pushesDelivered: 0,
      duplicates: 0,
      offsetDuplicates: 0,
      notJoined: 0,
      acksSent: 0,
      requests: 0,
      pushesNotHeld: 0
    };
    const WS = opts.WebSocket ?? globalThis.WebSocket;
    if (!WS) throw new Error("liveedge: no WebSocket implementation (pass options.WebSocket)");
    this.urls = Array.isArray(opts.urls) ? [...opts.urls] : [opts.urls];
    if (this.urls.length === 0) throw new Error("liveedge: options.urls is empty");
    if (opts.token === void 0 && !opts.getToken) throw new Error("liveedge: options.token or options.getToken is required");
    if (!opts.preferFirstUrl) this.urlIndex = Math.floor(Math.random() * this.urls.length);
    this.o = {
      urls: this.urls,
      WebSocket: WS,
      batch: opts.batch ?? true,
      // Zero or less means the default, as in the Go SDK (0 ms would time
      // out every request, or reconnect in a tight loop).
      requestTimeoutMs: positive(opts.requestTimeoutMs, 1e4),
      reconnectMinMs: positive(opts.reconnectMinMs, 100),
      reconnectMaxMs: Math.max(positive(opts.reconnectMaxMs, 5e3), positive(opts.reconnectMinMs, 100)),
      dedupWindow: opts.dedupWindow && opts.dedupWindow > 0 ? opts.dedupWindow : 16384,
      heartbeatMs: opts.heartbeatMs,
      tokenExpiryGraceMs: opts.tokenExpiryGraceMs !== void 0 && opts.tokenExpiryGraceMs >= 0 ? opts.tokenExpiryGraceMs : 3e5
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
  static async connect(opts) {
    const c = new _LiveClient(opts);
    let last;
    for (let i = 0; i < c.urls.length; i++) {
      try {
        const refused = last instanceof UnauthorizedError || last instanceof CloseError && last.code === Close.TokenExpired;
        await c.attempt(refused ? "expired" : "connect", 0);
        return c;
      } catch (e) {
        last = e;
        c.urlIndex++;
        if (e instanceof UnauthorizedError && !opts.getToken) break;
        if (e instanceof CloseError && !reconnectable(e.code) && !(e.code === Close.TokenExpired && opts.getToken)) break;
      }
    }
    c.closed = true;
    throw last ?? new Error("liveedge: connect failed");
  }
  on(ev, fn) {
    const set = ev === "push" ? this.pushListeners : this.stateListeners;
    set.add(fn);
    if (ev === "push" && this.held.length > 0) queueMicrotask(() => this.releaseHeld());
    return () => set.delete(fn);
  }
  /** The hello of the current (or last) connection. */
  get hello() {
    return this.helloFrame;
  }
  get connected() {
    return this.ready;
  }
  get stats() {
    return { ...this.stats_ };
  }
  /** Rooms joined (re-joined after every reconnect) and the last offset seen in each. */
  joinedRooms() {
    return new Map([...this.rooms].map(([r, s]) => [r, s.since]));
  }
  async request(type, data, o) {
    if (type === "join") {
      const room = data?.room_id;
      if (typeof room === "number") this.left.delete(room);
    }
    const timeout = o?.timeout ?? this.o.requestTimeoutMs;
    const deadline = Date.now() + timeout;
    for (; ; ) {
      await this.waitReady(Math.max(1, deadline - Date.now()), type);
      const ws = this.ws;
      if (ws && ws.readyState === OPEN) return this.send(ws, type, data, Math.max(1, deadline - Date.now()));
    }
  }
  /** Joins a room; it is re-joined after every reconnect until leave(). */
  async join(roomId, o) {
    this.left.delete(roomId);
    this.joinsPending.set(roomId, (this.joinsPending.get(roomId) ?? 0) + 1);
    if (!this.joining.has(roomId) && !this.rooms.has(roomId)) this.joining.set(roomId, {});
    try {
      let r;
      try {
        r = await this.request("join", { room_id: roomId }, o);
      } catch (e) {
        if (e instanceof TimeoutError) this.undoJoin(roomId);
        throw e;
      }
      let st = this.rooms.get(roomId);
      if (!st) {
        const e = this.joining.get(roomId);
        if (!e) return r;
        st = { since: e.since };
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
  undoJoin(roomId) {
    if (this.rooms.has(roomId) || (this.joinsPending.get(roomId) ?? 0) > 1) return;
    if (this.left.size >= MaxLeft) this.left.clear();
    this.left.add(roomId);
    const ws = this.ws;
    if (ws && ws.readyState === OPEN) this.send(ws, "leave", { room_id: roomId }, this.o.requestTimeoutMs).catch(() => {
    });
  }
  async leave(roomId, o) {
    this.rooms.delete(roomId);
    this.joining.delete(roomId);
    if (this.left.size >= MaxLeft) this.left.clear();
    this.left.add(roomId);
    await this.request("leave", { room_id: roomId }, o);
  }
  /**
   * Sends a chat message. reqId (≤ 64 bytes) makes a retry post once: sent again with the same
   * reqId (after a disconnect or a timeout, through any node) within a couple of minutes, it
   * answers the first mid; 10409 while the first is still being sent (retry).
   */
  chat(roomId, text, o) {
    const d = { room_id: roomId, text };
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
  gift(g, o) {
    const d = {
      room_id: g.roomId,
      gift_id: g.giftId,
      receiver_id: g.receiverId,
      count: g.count || 1,
      // 0 means 1, as in the Go SDK
      req_id: g.reqId || randomId()
    };
    if (g.pk) d.pk = true;
    return this.request("gift", d, o).then(
      (r) => Object.assign(r, { reqId: d.req_id }),
      (e) => {
        if (e instanceof Error) Object.assign(e, { reqId: d.req_id });
        throw e;
      }
    );
  }
  /**
   * Grabs a packet of the red-packet rain `code` (biz 5560); you must be in its
   * room. Resolves once the grant and its credit are durable (biz 5570 follows);
   * rejects with ReplyError GrabError.NotStarted / AlreadyGrabbed / NoneLeft,
   * 10003 (not in the room) or 10429 (too fast).
   */
  grab(code, o) {
    return this.request("grab", { code }, o);
  }
  ping(o) {
    return this.request("ping", {}, o);
  }
  /** Closes the connection (1000) and stops reconnecting. */
  close() {
    if (this.closed) return;
    this.terminate(void 0);
  }
  // ---- connection ----
  token(reason) {
    if (!this.opts.getToken) return Promise.resolve(this.opts.token);
    const exp = this.lastToken === void 0 ? void 0 : tokenExpiry(this.lastToken);
    if (reason !== "expired" && exp !== void 0 && Date.now() >= exp * 1e3) reason = "expired";
    const ms = this.o.requestTimeoutMs;
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`getToken did not answer within ${ms} ms`)), ms);
      this.tokenTimers.add(timer);
    });
    const getToken = this.opts.getToken;
    return Promise.race([Promise.resolve().then(() => getToken(reason)), late]).finally(() => {
      clearTimeout(timer);
      this.tokenTimers.delete(timer);
    });
  }
  /**
   * Delivers the pushes held while nobody listened, and acks them on the
   * current connection (none while reconnecting: the node resends the
   * reliable ones, acked then as duplicates). A listener gone meanwhile
   * leaves them held.
   */
  releaseHeld() {
    if (this.closed || this.held.length === 0 || this.pushListeners.size === 0) return;
    const held = this.held;
    this.held = [];
    this.onFrames(this.ws, held);
  }
  /** One connection attempt to the current URL: dial, hello, re-join, ready. */
  async attempt(reason, attemptNo) {
    const url = this.urls[this.urlIndex % this.urls.length];
    const tok = await this.token(reason);
    this.lastToken = tok;
    if (this.closed) throw new ClosedError(this.closeCause);
    const u = new URL(url);
    u.searchParams.delete("token");
    if (this.o.batch) u.searchParams.set("batch", "1");
    else u.searchParams.delete("batch");
    const ws = new this.o.WebSocket(u.toString(), [Subprotocol, TokenSubprotocolPrefix + tok]);
    const hello = await new Promise((resolve, reject) => {
      let errMsg = "";
      const timer = setTimeout(() => {
        fail(new TimeoutError("connect"));
        try {
          ws.close();
        } catch {
        }
      }, this.o.requestTimeoutMs);
      const fail = (e) => {
        clearTimeout(timer);
        this.connecting = void 0;
        ws.onmessage = ws.onclose = null;
        ws.onerror = () => {
        };
        reject(e);
      };
      this.connecting = () => {
        fail(new ClosedError(this.closeCause));
        try {
          ws.close(Close.Normal);
        } catch {
        }
      };
      ws.onerror = (ev) => {
        errMsg = String(ev?.message ?? ev?.error?.message ?? "");
        if (/\b401\b/.test(errMsg)) fail(new UnauthorizedError());
      };
      ws.onclose = (ev) => {
        this.failsBeforeHello++;
        if (ev.code >= 4e3) fail(new CloseError(ev.code, ev.reason));
        else if (this.staticTokenExpired(ws)) fail(new UnauthorizedError(`token expired at ${new Date(tokenExpiry(tok) * 1e3).toISOString()}`));
        else fail(new Error(`liveedge: connect to ${redact(url)} failed (${ev.code}${errMsg ? " " + errMsg : ""})`));
      };
      ws.onmessage = (ev) => {
        let f;
        try {
          f = JSON.parse(String(ev.data));
        } catch {
          return;
        }
        const frames = f.t === "batch" && Array.isArray(f.d) ? f.d : [f];
        const i = frames.findIndex((x) => x && x.t === "hello");
        if (i < 0) return;
        clearTimeout(timer);
        this.connecting = void 0;
        this.failsBeforeHello = 0;
        const hello2 = frames[i].d;
        this.helloFrame = hello2;
        this.ws = ws;
        this.left.clear();
        this.lastSend = this.lastRead = Date.now();
        ws.onmessage = (e) => this.onMessage(ws, e.data);
        ws.onclose = (e) => this.dropped(ws, e.code, e.reason);
        ws.onerror = () => {
        };
        if (i + 1 < frames.length) this.onFrames(ws, frames.slice(i + 1));
        resolve(hello2);
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
    if (left !== void 0 && left > 0) this.scheduleRefresh(ws, Date.now() + left);
    await this.rejoin(ws).catch(() => void 0);
    if (this.ws !== ws) {
      const lc = this.lastClose;
      throw lc && lc.code >= 4e3 ? new CloseError(lc.code, lc.reason) : new DisconnectedError();
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
  async rejoin(ws) {
    let transient = false;
    const joins = [...this.rooms].map(async ([room, st]) => {
      const sent = st.since;
      const d = { room_id: room };
      if (sent) d.since = sent;
      const onJoined = (rep) => {
        const r = rep;
        if (this.rooms.get(room) !== st) return;
        const wentBack = sent !== void 0 && r.recovered !== true && r.ep === sent.ep && (r.off ?? 0) < sent.off;
        if (sent && r.recovered !== true && (st.since === sent || wentBack))
          this.emitState({ state: "room_resync", room, since: sent, at: { off: r.off ?? 0, ep: r.ep ?? "" } });
        const s = sinceOf(r);
        if (s && st.since === sent && (!sent || r.recovered !== true || s.ep !== sent.ep)) st.since = s;
      };
      try {
        await this.send(ws, "join", d, this.o.requestTimeoutMs, onJoined);
      } catch (e) {
        if (!(e instanceof ReplyError) || e.code === 5e4 || e.code === 10429) {
          transient = true;
          return;
        }
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
  staticTokenExpired(ws) {
    if (this.opts.getToken || this.opts.token === void 0) return false;
    if (typeof ws.on === "function") return false;
    if (this.failsBeforeHello < MinFailsForExpiry) return false;
    const exp = tokenExpiry(this.opts.token);
    return exp !== void 0 && Date.now() >= exp * 1e3 + this.o.tokenExpiryGraceMs;
  }
  /** The connection ws ended (close frame, network error or heartbeat failure). */
  dropped(ws, code, reason) {
    if (this.ws !== ws) return;
    const wasReady = this.ready;
    this.ws = null;
    this.ready = false;
    this.lastClose = { code, reason };
    ws.onmessage = ws.onclose = null;
    ws.onerror = () => {
    };
    this.stopHeartbeat();
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new DisconnectedError());
    }
    this.pending.clear();
    if (this.closed) return;
    this.emitState({ state: "disconnected", code, reason });
    if (!wasReady) return;
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
  async reconnectLoop(reason) {
    if (this.upSince > 0 && Date.now() - this.upSince < STABLE_AFTER_MS) this.shortLived = Math.min(this.shortLived + 1, 32);
    else this.shortLived = 0;
    if (this.urls.length > 1) this.urlIndex += 1 + Math.floor(Math.random() * (this.urls.length - 1));
    const floor = this.shortLived;
    let error;
    const urls = this.urls.length;
    for (let n = 1; !this.closed; n++) {
      let delayMs;
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
  backoff(ms) {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = void 0;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        this.wake = void 0;
        resolve();
      };
    });
  }
  terminate(cause) {
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
      ws.onerror = () => {
      };
      if (this.inFrames === ws) {
        this.closeAfterFrames = true;
      } else {
        try {
          ws.close(Close.Normal);
        } catch {
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
  startHeartbeat(ws, hello) {
    this.stopHeartbeat();
    this.bufferedSince = 0;
    let every = this.o.heartbeatMs;
    if (every === void 0 || every === 0) {
      const ms = hello.heartbeat_ms !== void 0 && hello.heartbeat_ms > 0 ? hello.heartbeat_ms : hello.heartbeat_s * 1e3;
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
      if (now - this.lastSend >= every || now - this.lastRead >= every) this.probe(ws);
    }, Math.max(10, Math.floor(every / 2)));
    this.hb.unref?.();
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
  probe(ws) {
    if (this.probing === ws || this.ws !== ws) return;
    this.probing = ws;
    const pinged = Date.now();
    const done = () => {
      if (this.probing === ws) this.probing = void 0;
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
      t.unref?.();
    });
  }
  /** Leaves a connection found dead (its close handshake is not waited for). */
  abandon(ws, why) {
    try {
      ws.close();
    } catch {
    }
    this.dropped(ws, Close.Abnormal, why);
  }
  /**
   * With getToken, arranges the refresh of ws's token, which ends at end (ms
   * by this machine's clock): RefreshLeadMs before it (a quarter of the time
   * left for a shorter one), less a random part of half as much, so that
   * clients given tokens at once do not all ask at once.
   */
  scheduleRefresh(ws, end) {
    if (this.refreshTimer !== void 0) clearTimeout(this.refreshTimer);
    this.refreshTimer = void 0;
    if (!this.opts.getToken || this.ws !== ws) return;
    const left = end - Date.now();
    const lead = Math.min(RefreshLeadMs, left / 4);
    this.armRefresh(ws, end, end - lead - Math.random() * lead / 2);
  }
  /** Runs refresh(ws, end) at the time at (timers longer than setTimeout's limit are chained). */
  armRefresh(ws, end, at) {
    const wait = at - Date.now();
    this.refreshTimer = setTimeout(
      () => {
        this.refreshTimer = void 0;
        if (this.ws !== ws) return;
        if (Date.now() < at) this.armRefresh(ws, end, at);
        else void this.refresh(ws, end);
      },
      Math.max(0, Math.min(wait, MaxTimerMs))
    );
    this.refreshTimer.unref?.();
  }
  /**
   * Asks getToken for a token ("refresh") and hands it to ws's node. On
   * failure (getToken's, a refused token, no reply, a token that ends no
   * later than the last) it is tried again when half the time left has
   * passed, while at least RefreshRetryFloorMs is left; then the node
   * closes 4501 and the client reconnects ("expired").
   */
  async refresh(ws, end) {
    try {
      const tok = await this.token("refresh");
      if (this.ws !== ws) return;
      const r = await this.send(ws, "refresh", { token: tok }, this.o.requestTimeoutMs);
      if (this.ws !== ws) return;
      if (!(typeof r?.expires_in_ms === "number" && r.expires_in_ms > 0)) throw new Error("refresh reply without expires_in_ms");
      this.lastToken = tok;
      const next = Date.now() + r.expires_in_ms;
      if (next <= end + 1e3) throw new Error("the refreshed token ends no later than the one it replaces");
      this.scheduleRefresh(ws, next);
    } catch {
      if (this.ws !== ws || this.closed) return;
      const rest = end - Date.now();
      if (rest < RefreshRetryFloorMs) return;
      this.armRefresh(ws, end, Date.now() + rest / 2);
    }
  }
  /** Stops the heartbeat and the token refresh of the connection that ended. */
  stopHeartbeat() {
    if (this.hb !== void 0) clearInterval(this.hb);
    this.hb = void 0;
    if (this.refreshTimer !== void 0) clearTimeout(this.refreshTimer);
    this.refreshTimer = void 0;
  }
  waitReady(timeout, what) {
    if (this.closed) return Promise.reject(new ClosedError(this.closeCause));
    if (this.ready && this.ws?.readyState === OPEN) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w = {
        resolve: () => {
          clearTimeout(t);
          resolve();
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        }
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
  send(ws, type, data, timeout, onOK) {
    if (this.ws !== ws || ws.readyState !== OPEN) return Promise.reject(new DisconnectedError());
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TimeoutError(type));
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
  onMessage(ws, raw) {
    if (this.ws !== ws) return;
    this.lastRead = Date.now();
    let f;
    try {
      f = JSON.parse(String(raw));
    } catch {
      return;
    }
    this.onFrames(ws, f.t === "batch" ? Array.isArray(f.d) ? f.d : [] : [f]);
  }
  /**
   * Handles the frames of one received message (or the held pushes), then
   * acks its pushes in one frame on ws (none when ws is null: reconnecting).
   */
  onFrames(ws, frames) {
    const acks = [];
    this.inFrames = ws;
    try {
      for (const x of frames) {
        if (this.closed) break;
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
        break;
      }
    }
    if (this.closeAfterFrames) {
      this.closeAfterFrames = false;
      try {
        ws?.close(Close.Normal);
      } catch {
      }
    }
  }
  handle(f, acks) {
    if (!f || typeof f !== "object") return;
    switch (f.t) {
      case "reply":
        this.lastReply = Date.now();
        this.onReply(f);
        return;
      case "push":
        if (this.pushListeners.size === 0 || this.held.length > 0) {
          if (this.held.length < MaxHeld) this.held.push(f);
          else this.stats_.pushesNotHeld++;
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
  onReply(f) {
    const p = this.pending.get(f.id);
    if (!p) return;
    this.pending.delete(f.id);
    clearTimeout(p.timer);
    if (f.code !== 0) {
      p.reject(new ReplyError(f.code, f.msg));
      return;
    }
    p.onOK?.(f.d ?? {});
    p.resolve(f.d ?? {});
  }
  onPush(f) {
    this.stats_.pushesReceived++;
    const numbered = typeof f.off === "number" && f.off > 0 && !!f.room;
    if (numbered) {
      const st = this.rooms.get(f.room) ?? this.joining.get(f.room);
      if (!st && this.left.has(f.room)) {
        this.stats_.notJoined++;
        return;
      }
      if (st) {
        const off = f.off;
        const ep = f.ep ?? "";
        const p2 = st.since;
        if (p2 && ep === p2.ep && off <= p2.off) {
          this.stats_.offsetDuplicates++;
          return;
        }
        st.since = { off, ep };
        const fresh = !!p2 && p2.off === 0 && p2.ep === "";
        if (p2 && !(fresh && off === 1) && (ep !== p2.ep || off > p2.off + 1)) {
          this.emitState({ state: "room_resync", room: f.room, since: p2, at: { off: off - 1, ep } });
        }
      }
    }
    const mid = typeof f.mid === "string" ? f.mid : "";
    if (mid !== "" && (!numbered || f.ack) && this.dedup.seen(mid)) {
      this.stats_.duplicates++;
      return;
    }
    this.stats_.pushesDelivered++;
    const p = { mid, biz: f.biz, room: f.room, d: f.d, ack: !!f.ack };
    if (f.off !== void 0) p.off = f.off;
    if (f.ep !== void 0) p.ep = f.ep;
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
  emitState(e) {
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
};
function merge(st, s) {
  if (!st.since || st.since.ep !== s.ep || s.off > st.since.off) st.since = s;
}
function sinceOf(r) {
  if (r && typeof r.off === "number" && typeof r.ep === "string") return { off: r.off, ep: r.ep };
  return void 0;
}
function redact(url) {
  try {
    const u = new URL(url);
    u.search = "";
    u.username = u.password = "";
    return u.toString();
  } catch {
    return "?";
  }
}
function tokenExpiry(tok) {
  const parts = tok.split(".");
  if (parts.length !== 3) return void 0;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const payload = JSON.parse(atob(b64 + "=".repeat((4 - b64.length % 4) % 4)));
    return typeof payload?.exp === "number" && Number.isFinite(payload.exp) ? payload.exp : void 0;
  } catch {
    return void 0;
  }
}
function randomId() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12);
}
function positive(v, def) {
  return v !== void 0 && v > 0 ? v : def;
}

// src/index.ts
function connect(opts) {
  return LiveClient.connect(opts);
}
export {
  Biz,
  Close,
  CloseError,
  ClosedError,
  DisconnectedError,
  GrabError,
  LiveClient,
  MaxAckMids,
  MaxBufferedBytes,
  MinFailsForExpiry,
  ProbeGrace,
  RefreshLeadMs,
  RefreshRetryFloorMs,
  ReplyError,
  Subprotocol,
  TimeoutError,
  TokenSubprotocolPrefix,
  UnauthorizedError,
  connect,
  isBiz,
  randomId,
  reconnectable,
  tokenExpiry
};

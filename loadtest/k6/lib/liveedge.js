// LiveEdge protocol logic shared by the k6 scenarios and the Node test
// (shared/PROTOCOL.md, docs/protocol.md): knobs, the HTTP API with its
// envelope, WebSocket frame builders, a request/reply session, reply checks,
// the payment webhook body and signature, and the per-iteration flows.
//
// Plain ES2020 with no imports: everything that touches the outside world is
// injected — an HTTP function, a send function and timers for the socket, an
// HMAC function. lib/k6.js adapts k6's modules; test/node.mjs adapts Node's.
// Everything asynchronous is a Promise, which k6 (http.asyncRequest,
// k6/websockets, k6/timers) and Node both run.

/** Push business types (PROTOCOL §3). */
export const Biz = Object.freeze({
  Chat: 5555,
  Gift: 5556,
  GiftFailed: 5557,
  PK: 5558,
  RoomClosed: 5559,
  RainStarted: 5560,
  RainFinished: 5561,
  WalletCredit: 5570,
  OrderStatus: 5580,
});

/** Error codes (PROTOCOL §7). */
export const Code = Object.freeze({
  OK: 0,
  BadRequest: 10001,
  Unauthenticated: 10002,
  Forbidden: 10003,
  NotFound: 10004,
  Conflict: 10409,
  RateLimited: 10429,
  InsufficientBalance: 20001,
  GiftNotFound: 20002,
  RedPacketNotStarted: 30001,
  RedPacketAlreadyGrabbed: 30002,
  RedPacketGone: 30003,
  ProductNotFound: 40001,
  OrderState: 40002,
  SoldOut: 40003,
  TicketLimit: 40004,
  CouponNotUsable: 40005,
  Internal: 50000,
});

/**
 * The published development values of configs/single.yaml (dev mode only;
 * the test checks they still match). `make cluster` (configs/cluster-local.yaml)
 * has its own: pass PAY_SECRET there.
 */
export const DEV = Object.freeze({
  baseUrl: "http://127.0.0.1:8080",
  wsUrl: "ws://127.0.0.1:8081/ws",
  paySecret: "liveedge-dev-pay-secret-change-me",
});

/** Default limits (PROTOCOL §6, docs/payments.md) the scenarios stay under. */
export const LIMITS = Object.freeze({
  chatPerSecond: 5,
  giftPerSecond: 20,
  grabEveryMs: 500,
  maxOpenOrdersPerUser: 5,
  ordersPerMinute: 10,
});

// ---------------------------------------------------------------- knobs

/** @typedef {{ [name: string]: string | undefined }} Env */

/**
 * A string knob.
 * @param {Env} env
 * @param {string} name
 * @param {string} def
 * @returns {string}
 */
export function str(env, name, def) {
  const v = env[name];
  return v === undefined || v === "" ? def : v;
}

/**
 * A numeric knob; a value that is not a finite number throws (a typo must not
 * silently run another test).
 * @param {Env} env
 * @param {string} name
 * @param {number} def
 * @returns {number}
 */
export function num(env, name, def) {
  const v = env[name];
  if (v === undefined || v === "") return def;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v}: not a number`);
  return n;
}

/**
 * A comma-separated list knob (several nodes of a cluster).
 * @param {Env} env
 * @param {string} name
 * @param {string} def
 * @returns {string[]}
 */
export function list(env, name, def) {
  return str(env, name, def)
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

/**
 * Element i (wrapping) of a list: VU n talks to node (n-1) mod N.
 * @template T
 * @param {T[]} xs
 * @param {number} i
 * @returns {T}
 */
export function pick(xs, i) {
  if (xs.length === 0) throw new Error("pick from an empty list");
  return xs[((i % xs.length) + xs.length) % xs.length];
}

/**
 * @typedef {object} Common
 * @property {string[]} baseUrls HTTP bases (BASE_URL, comma-separated for a cluster)
 * @property {string[]} wsUrls WebSocket URLs (WS_URL, comma-separated)
 * @property {number} vus VUS
 * @property {string} duration DURATION (k6 duration string)
 * @property {number} room ROOM (0 = setup opens one with ANCHOR_ID)
 * @property {number} anchorId ANCHOR_ID
 * @property {number} userBase USER_BASE (0 = derived from the start time: new users every run)
 * @property {number} sessionS SESSION_S: how long one iteration keeps its connection
 * @property {number} timeoutMs TIMEOUT_MS: a request without a reply by then is an error
 * @property {number} p95 P95_MS threshold on the reply time
 * @property {number} p99 P99_MS threshold on the reply time
 */

/**
 * The knobs every scenario has.
 * @param {Env} env
 * @returns {Common}
 */
export function common(env) {
  return {
    baseUrls: list(env, "BASE_URL", DEV.baseUrl).map((u) => u.replace(/\/+$/, "")),
    wsUrls: list(env, "WS_URL", DEV.wsUrl),
    vus: num(env, "VUS", 50),
    duration: str(env, "DURATION", "1m"),
    room: num(env, "ROOM", 0),
    anchorId: num(env, "ANCHOR_ID", 1),
    userBase: num(env, "USER_BASE", 0),
    sessionS: num(env, "SESSION_S", 30),
    timeoutMs: num(env, "TIMEOUT_MS", 5000),
    p95: num(env, "P95_MS", 250),
    p99: num(env, "P99_MS", 1000),
  };
}

/**
 * A base for user ids that no earlier run used (so per-user limits, balances
 * and idempotency keys start fresh): 1e9 × (1 + seconds since the epoch mod
 * 1e6), below 2^53. User ids are base + VU × 1e5 + n.
 * @param {number} nowMs
 * @returns {number}
 */
export function runUserBase(nowMs) {
  return 1e9 * (1 + (Math.floor(nowMs / 1000) % 1e6));
}

/**
 * A user id unique per (run, VU, n) for n < 1e5 and VU < 1e4.
 * @param {number} base
 * @param {number} vu
 * @param {number} n
 * @returns {number}
 */
export function userId(base, vu, n) {
  return base + vu * 1e5 + n;
}

// ---------------------------------------------------------------- HTTP API

/**
 * @typedef {object} HttpResult
 * @property {number} status
 * @property {string} body
 */

/**
 * The injected HTTP client. `name` is a stable label for metrics (no ids).
 * @callback HttpFn
 * @param {string} method
 * @param {string} url
 * @param {string | null} body
 * @param {Record<string, string>} headers
 * @param {string} name
 * @returns {Promise<HttpResult>}
 */

/**
 * An answer of the HTTP API: the envelope unpacked (code -1 when the body is
 * not an envelope, e.g. the webhook's `success`).
 * @typedef {object} ApiResult
 * @property {number} status
 * @property {number} code
 * @property {string} msg
 * @property {Record<string, unknown>} data
 * @property {string} raw
 */

/** A failed API call (code ≠ 0), with what came back. */
export class ApiError extends Error {
  /**
   * @param {string} what
   * @param {ApiResult} r
   */
  constructor(what, r) {
    super(`${what}: HTTP ${r.status} code ${r.code} ${r.msg || r.raw.slice(0, 200)}`);
    this.name = "ApiError";
    this.status = r.status;
    this.code = r.code;
    this.result = r;
  }
}

/**
 * Unpacks a reply body in the envelope {"code","msg","data"} (PROTOCOL §2).
 * @param {HttpResult} r
 * @returns {ApiResult}
 */
export function envelope(r) {
  /** @type {ApiResult} */
  const out = { status: r.status, code: -1, msg: "", data: {}, raw: r.body };
  try {
    const v = JSON.parse(r.body);
    if (v && typeof v === "object" && typeof v.code === "number") {
      out.code = v.code;
      out.msg = typeof v.msg === "string" ? v.msg : "";
      out.data = obj(v.data);
    }
  } catch (_) {
    // not JSON: raw only
  }
  return out;
}

/**
 * @typedef {object} Program
 * @property {string} name
 * @property {{category_id: number, name: string, price: number, rows: number, cols: number}[]} categories
 * @property {number} per_order_max
 * @property {number} per_user_max
 */

/** The HTTP API of one node (prefix /api/v1). */
export class Api {
  /**
   * @param {string} baseUrl e.g. http://127.0.0.1:8080
   * @param {HttpFn} http
   */
  constructor(baseUrl, http) {
    this.base = baseUrl.replace(/\/+$/, "") + "/api/v1";
    this.http = http;
  }

  /**
   * One call; the body is sent as JSON (a string is sent as is).
   * @param {string} method
   * @param {string} path below /api/v1
   * @param {string} name metric label
   * @param {string} [token]
   * @param {unknown} [body]
   * @param {Record<string, string>} [extraHeaders]
   * @returns {Promise<ApiResult>}
   */
  async call(method, path, name, token, body, extraHeaders) {
    /** @type {Record<string, string>} */
    const headers = { "Content-Type": "application/json", ...(extraHeaders || {}) };
    if (token) headers.Authorization = "Bearer " + token;
    const raw = body === undefined ? null : typeof body === "string" ? body : JSON.stringify(body);
    return envelope(await this.http(method, this.base + path, raw, headers, name));
  }

  /**
   * Like call, but an answer other than code 0 throws an ApiError.
   * @param {string} method
   * @param {string} path
   * @param {string} name
   * @param {string} [token]
   * @param {unknown} [body]
   * @returns {Promise<Record<string, unknown>>} the envelope's data
   */
  async must(method, path, name, token, body) {
    const r = await this.call(method, path, name, token, body);
    if (r.code !== 0) throw new ApiError(name, r);
    return r.data;
  }

  /**
   * POST /dev/token (dev mode only).
   * @param {number} user
   * @param {"viewer" | "anchor" | "admin"} [role]
   * @returns {Promise<string>}
   */
  async devToken(user, role = "viewer") {
    const d = await this.must("POST", "/dev/token", "dev/token", "", { user_id: user, role });
    if (typeof d.token !== "string" || d.token === "") throw new Error("dev/token: no token in " + JSON.stringify(d));
    return d.token;
  }

  /**
   * POST /dev/credit (dev mode only); idempotent with a req_id.
   * @param {number} user
   * @param {number} amount
   * @param {string} [reqId]
   * @returns {Promise<number>} the balance
   */
  async devCredit(user, amount, reqId) {
    /** @type {Record<string, unknown>} */
    const body = { user_id: user, amount };
    if (reqId) body.req_id = reqId;
    const d = await this.must("POST", "/dev/credit", "dev/credit", "", body);
    return Number(d.balance);
  }

  /**
   * POST /rooms as an anchor: opens a room (an anchor with an open room gets it back).
   * @param {string} anchorToken
   * @param {number} [type]
   * @returns {Promise<number>} room id
   */
  async openRoom(anchorToken, type = 1) {
    const d = await this.must("POST", "/rooms", "rooms", anchorToken, { type });
    return Number(d.room_id);
  }

  /**
   * GET /rooms/{id}
   * @param {string} token
   * @param {number} room
   */
  room(token, room) {
    return this.must("GET", `/rooms/${room}`, "rooms/{id}", token);
  }

  /**
   * GET /wallet → balance.
   * @param {string} token
   * @returns {Promise<number>}
   */
  async balance(token) {
    const d = await this.must("GET", "/wallet", "wallet", token);
    return Number(d.balance);
  }

  /** GET /gifts → the catalogue. */
  async gifts() {
    const d = await this.must("GET", "/gifts", "gifts");
    return /** @type {{gift_id: number, price: number, status: number}[]} */ (d.gifts || []);
  }

  /** GET /pay/products */
  async products() {
    const d = await this.must("GET", "/pay/products", "pay/products");
    return /** @type {{product_id: number, price: number, coins: number}[]} */ (d.products || []);
  }

  /**
   * POST /pay/orders: a recharge order in PAYING (the same req_id returns the same order).
   * @param {string} token
   * @param {number} productId
   * @param {string} reqId
   * @param {string} [channel]
   * @returns {Promise<ApiResult>} data: {order_id, status, amount, coins, ...}
   */
  createOrder(token, productId, reqId, channel = "mock") {
    return this.call("POST", "/pay/orders", "pay/orders", token, { product_id: productId, channel, req_id: reqId });
  }

  /**
   * GET /pay/orders/{id}
   * @param {string} token
   * @param {string} orderId
   */
  order(token, orderId) {
    return this.must("GET", `/pay/orders/${orderId}`, "pay/orders/{id}", token);
  }

  /**
   * POST /pay/notify/{channel} with a raw body and its signature header.
   * @param {string} channel
   * @param {string} rawBody
   * @param {string} signature X-Pay-Signature value
   * @returns {Promise<ApiResult>} raw "success" on 200
   */
  notify(channel, rawBody, signature) {
    return this.call("POST", `/pay/notify/${channel}`, "pay/notify", "", rawBody, { "X-Pay-Signature": signature });
  }

  // Red packets (PROTOCOL §4), anchor of the room only.

  /**
   * @param {string} anchorToken
   * @param {number} room
   * @param {{total_amount: number, total_count: number, duration_s: number}} p
   * @returns {Promise<ApiResult>} data: {code}
   */
  createRedPacket(anchorToken, room, p) {
    return this.call("POST", `/rooms/${room}/redpackets`, "rooms/{id}/redpackets", anchorToken, p);
  }

  /**
   * POST /redpackets/{code}/prepare or /start.
   * @param {string} anchorToken
   * @param {string} code
   * @param {"prepare" | "start"} step
   */
  redPacketStep(anchorToken, code, step) {
    return this.call("POST", `/redpackets/${encodeURIComponent(code)}/${step}`, `redpackets/{code}/${step}`, anchorToken, {});
  }

  /**
   * GET /redpackets/{code} (stats).
   * @param {string} token
   * @param {string} code
   */
  redPacketStats(token, code) {
    return this.call("GET", `/redpackets/${encodeURIComponent(code)}`, "redpackets/{code}", token);
  }

  // Tickets (PROTOCOL §4, seed 003).

  /**
   * POST /admin/programs
   * @param {string} adminToken
   * @param {Program} p
   * @returns {Promise<number>} program id
   */
  async createProgram(adminToken, p) {
    const d = await this.must("POST", "/admin/programs", "admin/programs", adminToken, p);
    return Number(d.program_id);
  }

  /**
   * GET /programs/{id}
   * @param {string} token
   * @param {number} id
   */
  program(token, id) {
    return this.call("GET", `/programs/${id}`, "programs/{id}", token);
  }

  /**
   * POST /tickets/orders
   * @param {string} token
   * @param {Record<string, unknown>} body {program_id, seat_ids | category_id+count, req_id, pay?, coupon_id?}
   */
  ticketOrder(token, body) {
    return this.call("POST", "/tickets/orders", "tickets/orders", token, body);
  }
}

// ---------------------------------------------------------------- webhook

/**
 * HMAC-SHA256(secret, message) as lower-case hex: k6/crypto's
 * `hmac("sha256", secret, message, "hex")` or node:crypto's
 * `createHmac("sha256", secret).update(message).digest("hex")`.
 * @callback HmacHex
 * @param {string} secret
 * @param {string} message
 * @returns {string}
 */

/**
 * @typedef {object} Notify
 * @property {string} event_id
 * @property {string} order_id
 * @property {number} amount in cents, the order's amount
 * @property {"SUCCESS" | "FAILED"} status
 * @property {number} paid_at unix ms
 */

/**
 * The raw webhook body (the exact bytes that are signed and sent).
 * @param {Notify} n
 * @returns {string}
 */
export function notifyBody(n) {
  return JSON.stringify({
    event_id: n.event_id,
    order_id: n.order_id,
    amount: n.amount,
    status: n.status,
    paid_at: n.paid_at,
  });
}

/**
 * `X-Pay-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
 * @param {HmacHex} hmac
 * @param {string} secret
 * @param {string} rawBody
 * @param {number} tSec unix seconds
 * @returns {string}
 */
export function paySignature(hmac, secret, rawBody, tSec) {
  const t = String(Math.floor(tSec));
  return `t=${t},v1=${hmac(secret, t + "." + rawBody)}`;
}

/**
 * A signed notify ready to post.
 * @param {HmacHex} hmac
 * @param {string} secret
 * @param {Notify} n
 * @param {number} nowMs
 * @returns {{body: string, signature: string}}
 */
export function signedNotify(hmac, secret, n, nowMs) {
  const body = notifyBody(n);
  return { body, signature: paySignature(hmac, secret, body, nowMs / 1000) };
}

/**
 * @typedef {object} WebhookResult
 * @property {number} user
 * @property {string} orderId
 * @property {number} coins what the product credits
 * @property {number} before balance before
 * @property {number} after balance after every copy was answered
 * @property {ApiResult} created the order creation answer
 * @property {ApiResult[]} posts the answers to the copies of the notify
 * @property {string} status the order's status afterwards
 */

/**
 * One iteration of the webhook storm, for a user who has no orders yet (per
 * user, at most 5 open orders and 10 creations a minute): token, balance,
 * create an order, sign a SUCCESS notify for it, post `copies` identical
 * copies at once (a provider retrying), read the balance and the order.
 * `checkWebhook` says whether it was credited exactly once.
 * @param {object} o
 * @param {Api} o.api
 * @param {HmacHex} o.hmac
 * @param {string} o.secret
 * @param {number} o.user
 * @param {{product_id: number, coins: number}} o.product
 * @param {string} o.reqId order req_id (unique per user)
 * @param {number} o.copies how many times the same notify is posted (≥ 1)
 * @param {() => number} o.now unix ms
 * @param {string} [o.channel]
 * @returns {Promise<WebhookResult>}
 */
export async function webhookIteration(o) {
  const channel = o.channel || "mock";
  const token = await o.api.devToken(o.user, "viewer");
  const before = await o.api.balance(token);
  const created = await o.api.createOrder(token, o.product.product_id, o.reqId, channel);
  if (created.code !== 0) throw new ApiError("pay/orders", created);
  const orderId = String(created.data.order_id);
  const n = signedNotify(
    o.hmac,
    o.secret,
    { event_id: "k6-" + orderId, order_id: orderId, amount: Number(created.data.amount), status: "SUCCESS", paid_at: o.now() },
    o.now(),
  );
  /** @type {Promise<ApiResult>[]} */
  const copies = [];
  for (let i = 0; i < Math.max(1, o.copies); i++) copies.push(o.api.notify(channel, n.body, n.signature));
  const posts = await Promise.all(copies);
  const after = await o.api.balance(token);
  const ord = await o.api.order(token, orderId);
  return { user: o.user, orderId, coins: o.product.coins, before, after, created, posts, status: String(ord.status) };
}

/** Checks of one webhook iteration (usable with k6's check()). */
export const webhookChecks = Object.freeze({
  /** @param {WebhookResult} r */
  "order created PAYING": (r) => r.created.code === 0 && r.created.data.status === "PAYING",
  /** @param {WebhookResult} r */
  "every copy answered 200 success": (r) => r.posts.every((p) => p.status === 200 && p.raw === "success"),
  /** @param {WebhookResult} r */
  "credited exactly once": (r) => r.after - r.before === r.coins,
  /** @param {WebhookResult} r */
  "order PAYED": (r) => r.status === "PAYED",
});

// ---------------------------------------------------------------- WebSocket frames

/**
 * A client request frame `{"t":TYPE,"id":N,"d":{...}}`.
 * @param {string} type
 * @param {number} id
 * @param {object} d
 * @returns {string}
 */
export function frame(type, id, d) {
  return JSON.stringify({ t: type, id, d });
}

/** The `d` of each client request (PROTOCOL §3 table). */
export const req = Object.freeze({
  ping: () => ({}),
  /**
   * @param {number} room
   * @param {{off: number, ep: string}} [since]
   */
  join: (room, since) => (since ? { room_id: room, since } : { room_id: room }),
  /** @param {number} room */
  leave: (room) => ({ room_id: room }),
  /**
   * @param {number} room
   * @param {string} text ≤ 500 characters
   */
  chat: (room, text) => ({ room_id: room, text }),
  /**
   * @param {number} room
   * @param {number} giftId
   * @param {number} receiver
   * @param {number} count
   * @param {string} reqId unique per sender
   */
  gift: (room, giftId, receiver, count, reqId) => ({ room_id: room, gift_id: giftId, receiver_id: receiver, count, req_id: reqId }),
  /** @param {string} code */
  grab: (code) => ({ code }),
});

/**
 * The ack frame for reliable pushes (no id, no reply).
 * @param {string[]} mids
 * @returns {string}
 */
export function ackFrame(mids) {
  return JSON.stringify({ t: "ack", d: { mids } });
}

/**
 * A chat text that carries its send time, so a viewer measures delivery.
 * @param {number} nowMs
 * @param {string} [tag]
 * @returns {string}
 */
export function stampedText(nowMs, tag = "k6") {
  return `${tag} @${nowMs}`;
}

/**
 * The send time in a stamped text, or -1.
 * @param {unknown} text
 * @returns {number}
 */
export function stampOf(text) {
  if (typeof text !== "string") return -1;
  const m = /@(\d{10,})$/.exec(text);
  return m ? Number(m[1]) : -1;
}

/**
 * @typedef {object} Hello
 * @property {number} user_id
 * @property {string} node
 * @property {number} heartbeat_s
 * @property {number} [heartbeat_ms]
 */

/**
 * @typedef {object} Push
 * @property {string} mid
 * @property {number} biz
 * @property {number} [room]
 * @property {Record<string, unknown>} d
 * @property {boolean} ack
 * @property {number} [off]
 * @property {string} [ep]
 */

/**
 * A reply to one request, with the time it took.
 * @typedef {object} Reply
 * @property {string} type the request's type
 * @property {number} id
 * @property {number} code 0 = ok
 * @property {string} msg
 * @property {Record<string, unknown>} d
 * @property {number} ms from send to reply
 */

/**
 * v when it is a JSON object, else {} (the `d` of a frame, the `data` of an envelope).
 * @param {unknown} v
 * @returns {Record<string, unknown>}
 */
export function obj(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v) ? /** @type {Record<string, unknown>} */ (v) : {};
}

/**
 * v when it is an integer, else NaN (which fails every comparison).
 * @param {unknown} v
 * @returns {number}
 */
export function int(v) {
  return typeof v === "number" && Number.isInteger(v) ? v : NaN;
}

/**
 * Server frames in a text message: one frame, or the frames of a batch
 * (`{"t":"batch","d":[...]}`). Throws on a message that is not JSON.
 * @param {string} text
 * @returns {Record<string, unknown>[]}
 */
export function parseFrames(text) {
  const f = JSON.parse(text);
  if (!f || typeof f !== "object") throw new Error("frame is not an object");
  if (f.t === "batch" && Array.isArray(f.d)) return f.d;
  return [f];
}

/**
 * A one-shot timer (k6/timers in k6, the globals in Node): runs fn after ms
 * and returns a function that cancels it.
 * @callback After
 * @param {() => void} fn
 * @param {number} ms
 * @returns {() => void}
 */

/**
 * @typedef {object} SessionOptions
 * @property {(text: string) => void} send writes one text frame
 * @property {After} after one-shot timers
 * @property {() => number} [now] ms clock for reply times (Date.now)
 * @property {number} [timeoutMs] a request unanswered this long rejects (5000)
 * @property {(p: Push) => void} [onPush] each push once (de-duplicated by mid; acks are sent first)
 */

/**
 * @typedef {object} SessionStats
 * @property {number} requests
 * @property {number} replies
 * @property {number} timeouts
 * @property {number} pushes distinct pushes
 * @property {number} duplicates pushes seen again (resends)
 * @property {number} acks ack frames sent
 * @property {number} bad messages that were not frames
 */

/**
 * The protocol state of one WebSocket connection, independent of the socket:
 * feed it every text message (`onText`) and it resolves the hello and the
 * replies (matched by id, timed), acks `ack:true` pushes, and hands each push
 * to `onPush` once. `close()` rejects what is still pending.
 */
export class Session {
  /** @param {SessionOptions} o */
  constructor(o) {
    this.send = o.send;
    this.after = o.after;
    this.now = o.now || Date.now;
    this.timeoutMs = o.timeoutMs || 5000;
    this.onPush = o.onPush || (() => {});
    this.nextId = 1;
    /** @type {Map<number, {type: string, sentAt: number, resolve: (r: Reply) => void, reject: (e: Error) => void, cancel: () => void}>} */
    this.pending = new Map();
    /** @type {Hello | null} */
    this.hello = null;
    /** @type {Map<string, true>} */
    this.seen = new Map();
    this.closed = false;
    this.closedWhy = "";
    /** @type {SessionStats} */
    this.stats = { requests: 0, replies: 0, timeouts: 0, pushes: 0, duplicates: 0, acks: 0, bad: 0 };
    /** @type {((h: Hello | null, err?: Error) => void)[]} */
    this.helloWaiters = [];
  }

  /**
   * Resolves with the hello (the server's first frame).
   * @returns {Promise<Hello>}
   */
  waitHello() {
    const h = this.hello;
    if (h) return Promise.resolve(h);
    if (this.closed) return Promise.reject(new Error(`no hello: ${this.closedWhy}`));
    return new Promise((resolve, reject) => {
      const cancel = this.after(() => reject(new Error(`no hello within ${this.timeoutMs} ms`)), this.timeoutMs);
      this.helloWaiters.push((hello, err) => {
        cancel();
        if (hello) resolve(hello);
        else reject(err);
      });
    });
  }

  /**
   * Sends a request and resolves with its reply (any code; see replyChecks),
   * or rejects on timeout or close.
   * @param {string} type
   * @param {object} d
   * @returns {Promise<Reply>}
   */
  request(type, d) {
    // (notSent: the request never left — no reply time to charge it)
    if (this.closed) return Promise.reject(Object.assign(new Error(`${type}: session closed`), { notSent: true }));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const cancel = this.after(() => {
        if (this.pending.delete(id)) {
          this.stats.timeouts++;
          reject(new Error(`${type} #${id}: no reply within ${this.timeoutMs} ms`));
        }
      }, this.timeoutMs);
      this.pending.set(id, { type, sentAt: this.now(), resolve, reject, cancel });
      this.stats.requests++;
      try {
        this.send(frame(type, id, d));
      } catch (e) {
        this.pending.delete(id);
        cancel();
        reject(e instanceof Error ? e : new Error(String(e)));
      }
    });
  }

  /**
   * Feed one text message from the socket.
   * @param {string} text
   */
  onText(text) {
    let frames;
    try {
      frames = parseFrames(text);
    } catch (_) {
      this.stats.bad++;
      return;
    }
    for (const f of frames) this.onFrame(f);
  }

  /** @param {Record<string, unknown>} f */
  onFrame(f) {
    switch (f.t) {
      case "hello": {
        this.hello = /** @type {Hello} */ (f.d || {});
        const ws = this.helloWaiters;
        this.helloWaiters = [];
        for (const w of ws) w(this.hello);
        return;
      }
      case "reply": {
        const id = int(f.id);
        const p = this.pending.get(id);
        if (!p) return; // late reply after a timeout
        this.pending.delete(id);
        p.cancel();
        this.stats.replies++;
        p.resolve({ type: p.type, id, code: int(f.code), msg: String(f.msg || ""), d: obj(f.d), ms: this.now() - p.sentAt });
        return;
      }
      case "push": {
        const push = /** @type {Push} */ (f);
        if (push.ack) {
          this.stats.acks++;
          this.send(ackFrame([push.mid]));
        }
        if (this.seen.has(push.mid)) {
          this.stats.duplicates++;
          return;
        }
        this.seen.set(push.mid, true);
        if (this.seen.size > 10000) {
          const first = this.seen.keys().next();
          if (!first.done) this.seen.delete(first.value);
        }
        this.stats.pushes++;
        this.onPush(push);
        return;
      }
      default:
        this.stats.bad++;
    }
  }

  /**
   * The socket closed (or is being closed): reject every pending request.
   * @param {string} [why]
   */
  close(why = "closed") {
    this.closed = true;
    this.closedWhy = why;
    // A connection closed before its hello (an upgrade refused: 429, 503, a
    // close code) fails its waiters now, with the cause — not after the
    // timeout as "no hello".
    const ws = this.helloWaiters;
    this.helloWaiters = [];
    for (const w of ws) w(null, new Error(`no hello: ${why}`));
    for (const [id, p] of this.pending) {
      p.cancel();
      p.reject(new Error(`${p.type} #${id}: ${why}`));
    }
    this.pending.clear();
  }
}

// ---------------------------------------------------------------- reply checks

/**
 * Check sets for replies: name → predicate, as k6's check() takes them;
 * `failedChecks` evaluates one outside k6.
 */
export const replyChecks = Object.freeze({
  join: {
    /** @param {Reply} r */
    "join: code 0": (r) => r.code === 0,
    /** @param {Reply} r */
    "join: online ≥ 1": (r) => Number(r.d.online) >= 1,
  },
  chat: {
    /** @param {Reply} r */
    "chat: code 0": (r) => r.code === 0,
    /** @param {Reply} r */
    "chat: has mid": (r) => typeof r.d.mid === "string" && r.d.mid !== "",
  },
  gift: {
    /** @param {Reply} r */
    "gift: code 0": (r) => r.code === 0,
    /** @param {Reply} r */
    "gift: has order_id": (r) => typeof r.d.order_id === "string" && r.d.order_id !== "",
    /** @param {Reply} r */
    "gift: balance ≥ 0": (r) => int(r.d.balance) >= 0,
  },
  grab: {
    /** @param {Reply} r  a grab either wins an amount or finds none left / the rain over */
    "grab: amount or none left": (r) =>
      (r.code === 0 && int(r.d.amount) > 0) ||
      r.code === Code.RedPacketGone ||
      r.code === Code.RedPacketNotStarted ||
      r.code === Code.RedPacketAlreadyGrabbed,
    /** @param {Reply} r */
    "grab: not rate limited": (r) => r.code !== Code.RateLimited,
  },
  ping: {
    /** @param {Reply} r */
    "ping: code 0": (r) => r.code === 0 && typeof r.d.ts === "number",
  },
});

/**
 * The names of the checks in `set` that `v` fails (outside k6).
 * @template T
 * @param {Record<string, (v: T) => boolean>} set
 * @param {T} v
 * @returns {string[]}
 */
export function failedChecks(set, v) {
  return Object.keys(set).filter((k) => !set[k](v));
}

/**
 * Sends a gift; a 10409 ("still being processed, retry with the same
 * req_id", shared wallet) is retried with the same req_id after `waitMs`.
 * @param {Session} s
 * @param {ReturnType<typeof req.gift>} d
 * @param {(ms: number) => Promise<void>} sleep
 * @param {number} [retries]
 * @param {number} [waitMs]
 * @returns {Promise<Reply>} the last reply (its ms counts from the first send)
 */
export async function giftSettled(s, d, sleep, retries = 3, waitMs = 200) {
  const t0 = s.now();
  let r = await s.request("gift", d);
  for (let i = 0; i < retries && r.code === Code.Conflict; i++) {
    await sleep(waitMs);
    r = await s.request("gift", d);
  }
  return { ...r, ms: s.now() - t0 };
}

// ---------------------------------------------------------------- tickets

/**
 * A program of `categories` with rows × cols seats each (seat ids
 * "<category_id>-<row>-<col>").
 * @param {string} name
 * @param {number} categories
 * @param {number} rows
 * @param {number} cols
 * @param {number} price
 * @param {number} perOrderMax
 * @param {number} perUserMax
 * @returns {Program}
 */
export function programSpec(name, categories, rows, cols, price, perOrderMax, perUserMax) {
  const cats = [];
  for (let c = 1; c <= categories; c++) cats.push({ category_id: c, name: "C" + c, price, rows, cols });
  return { name, categories: cats, per_order_max: perOrderMax, per_user_max: perUserMax };
}

/**
 * Seat counts by status of a GET /programs/{id} answer: every seat must be
 * 1 unsold, 2 locked or 3 sold, and each category's `remaining` must be its
 * unsold seats.
 * @param {Record<string, unknown>} p the program (envelope data)
 * @returns {{unsold: number, locked: number, sold: number, other: number, remainingMismatch: number}}
 */
export function seatTally(p) {
  const t = { unsold: 0, locked: 0, sold: 0, other: 0, remainingMismatch: 0 };
  /** @type {Record<string, number>} */
  const unsoldBy = {};
  for (const s of Array.isArray(p.seats) ? p.seats : []) {
    if (s.status === 1) {
      t.unsold++;
      unsoldBy[s.category_id] = (unsoldBy[s.category_id] || 0) + 1;
    } else if (s.status === 2) t.locked++;
    else if (s.status === 3) t.sold++;
    else t.other++;
  }
  for (const c of Array.isArray(p.categories) ? p.categories : []) {
    if (Number(c.remaining) !== (unsoldBy[c.category_id] || 0)) t.remainingMismatch++;
  }
  return t;
}

/**
 * Whether `got` (an order's seat_ids) are the seats `asked` (the
 * POST /tickets/orders body) asked for: distinct ids, exactly as many as
 * asked — the very ids of a manual order (`seat_ids`, in any order), or
 * `count` adjacent seats of `category_id` ("<category_id>-<row>-<col>": one
 * row, consecutive columns). Ids are compared as strings: the node takes
 * only canonical ones (no leading zeros) and answers them as given.
 * @param {Record<string, unknown>} asked
 * @param {unknown} got
 * @returns {boolean}
 */
export function seatsAsAsked(asked, got) {
  if (!Array.isArray(got) || !got.every((id) => typeof id === "string")) return false;
  const ids = new Set(got);
  if (ids.size !== got.length) return false;
  if (Array.isArray(asked.seat_ids) && asked.seat_ids.length > 0) {
    const want = asked.seat_ids;
    return got.length === want.length && want.every((id) => ids.has(id));
  }
  const count = Number(asked.count);
  const category = Number(asked.category_id);
  if (!Number.isSafeInteger(count) || count <= 0 || !Number.isSafeInteger(category) || category <= 0) return false;
  const ofCategory = new RegExp(`^${category}-([1-9][0-9]*)-([1-9][0-9]*)$`);
  if (got.length !== count) return false;
  /** @type {{row: number, col: number}[]} */
  const places = [];
  for (const id of got) {
    const m = ofCategory.exec(id);
    if (!m) return false;
    places.push({ row: Number(m[1]), col: Number(m[2]) });
  }
  // Adjacent: one row, consecutive columns (in any order in the answer).
  places.sort((a, b) => a.col - b.col);
  return places.every((p, i) => p.row === places[0].row && p.col === places[0].col + i);
}

/**
 * Checks of the answer to the ticket order `asked` (its request body) in a
 * rush: sold, or sold out — never anything else; and sold means the seats
 * asked for (seatsAsAsked), no fewer, no more.
 * @param {Record<string, unknown>} asked
 */
export function ticketChecks(asked) {
  return Object.freeze({
    /** @param {ApiResult} r */
    "ticket: PAID / PENDING_PAY or sold out": (r) =>
      (r.code === 0 && (r.data.status === "PAID" || r.data.status === "PENDING_PAY")) || r.code === Code.SoldOut,
    /** @param {ApiResult} r */
    "ticket: seats as asked": (r) => r.code !== 0 || seatsAsAsked(asked, r.data.seat_ids),
  });
}

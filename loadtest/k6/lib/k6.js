// The thin k6 side of lib/liveedge.js: k6's HTTP, WebSocket, crypto, timers
// and metrics behind the functions the protocol module takes. Nothing about
// the protocol lives here.
import http from "k6/http";
import { WebSocket } from "k6/websockets";
import { hmac } from "k6/crypto";
import { setTimeout, clearTimeout } from "k6/timers";
import { Trend, Rate, Counter } from "k6/metrics";
import { Api, Session, pick } from "./liveedge.js";

/** Reply time of every WebSocket request, tagged type:<request type>. */
export const replyMs = new Trend("le_reply_ms", true);
/** Room push delivery time (chat texts carry their send time). */
export const pushMs = new Trend("le_push_ms", true);
/** 1 per failed operation (request timed out, socket error, unexpected code), 0 per good one. */
export const errors = new Rate("le_errors");
/** Pushes received, tagged biz:<biz>. */
export const pushes = new Counter("le_pushes");

/** @type {import("./liveedge.js").After} */
export const after = (fn, ms) => {
  const id = setTimeout(fn, ms);
  return () => clearTimeout(id);
};

/**
 * @param {number} ms
 * @returns {Promise<void>}
 */
export function sleepMs(ms) {
  return new Promise((resolve) => {
    setTimeout(resolve, ms);
  });
}

/** @type {import("./liveedge.js").HmacHex} */
export const hmacHex = (secret, message) => hmac("sha256", secret, message, "hex");

/**
 * An HTTP function for Api over http.asyncRequest; `expected` statuses do not
 * count as http_req_failed (e.g. 409 sold out in a rush).
 * @param {number[]} [expected]
 * @returns {import("./liveedge.js").HttpFn}
 */
export function httpFn(expected = []) {
  const cb = http.expectedStatuses({ min: 200, max: 399 }, ...expected);
  return async (method, url, body, headers, name) => {
    const r = await http.asyncRequest(method, url, body, { headers, tags: { name }, responseCallback: cb });
    return { status: r.status, body: typeof r.body === "string" ? r.body : "" };
  };
}

/**
 * The Api of the node VU n talks to (BASE_URL list, round robin).
 * @param {string[]} baseUrls
 * @param {number} vu
 * @param {number[]} [expected]
 * @returns {Api}
 */
export function apiFor(baseUrls, vu, expected) {
  return new Api(pick(baseUrls, vu - 1), httpFn(expected));
}

/**
 * @typedef {object} Conn
 * @property {Session} session
 * @property {import("./liveedge.js").Hello} hello
 * @property {() => void} close
 * @property {Promise<void>} closed resolves when the socket has closed
 */

/**
 * Opens a WebSocket with the token in the Authorization header (not in the
 * URL: the url tag stays one value) and resolves once the hello arrived.
 * Pushes are counted (le_pushes{biz}) and handed to onPush.
 * @param {string} url
 * @param {string} token
 * @param {object} [o]
 * @param {number} [o.timeoutMs]
 * @param {(p: import("./liveedge.js").Push) => void} [o.onPush]
 * @returns {Promise<Conn>}
 */
export function connect(url, token, o = {}) {
  const ws = new WebSocket(url, null, { headers: { Authorization: "Bearer " + token }, tags: { name: "ws" } });
  const onPush = o.onPush || (() => {});
  const session = new Session({
    send: (text) => ws.send(text),
    after,
    timeoutMs: o.timeoutMs,
    onPush: (p) => {
      pushes.add(1, { biz: String(p.biz) });
      onPush(p);
    },
  });
  /** @type {() => void} */
  let markClosed = () => {};
  /** @type {Promise<void>} */
  const closed = new Promise((resolve) => {
    markClosed = resolve;
  });
  ws.onmessage = (e) => {
    if (e && typeof e.data === "string") session.onText(e.data);
  };
  ws.onerror = (e) => {
    errors.add(1, { op: "ws" });
    session.close("socket error: " + (e ? e.error : ""));
  };
  ws.onclose = () => {
    session.close("socket closed");
    markClosed();
  };
  return session.waitHello().then(
    (hello) => ({ session, hello, close: () => ws.close(), closed }),
    (err) => {
      ws.close();
      throw err;
    },
  );
}

/**
 * Records a reply (time, check outcome) and returns it; a rejected request
 * (timeout, closed socket) counts as an error and resolves to null — and,
 * given its type, is charged the time it took (a timeout its whole wait) in
 * that type's le_reply_ms: left out, a node stalling some requests past the
 * timeout would show the percentiles of the ones it answered.
 * @param {Promise<import("./liveedge.js").Reply>} p
 * @param {(r: import("./liveedge.js").Reply) => boolean} [ok] what counts as success (code 0)
 * @param {string} [type] the request's type, for the time of a rejected one
 * @returns {Promise<import("./liveedge.js").Reply | null>}
 */
export async function track(p, ok, type) {
  const t0 = Date.now();
  try {
    const r = await p;
    replyMs.add(r.ms, { type: r.type });
    errors.add(ok ? !ok(r) : r.code !== 0, { op: r.type });
    return r;
  } catch (e) {
    // Sent and unanswered (a timeout, a close with it in flight): charged.
    if (type && !(/** @type {{notSent?: boolean}} */ (e)).notSent) replyMs.add(Date.now() - t0, { type });
    errors.add(1, { op: type ?? "request" });
    console.warn(String(e));
    return null;
  }
}

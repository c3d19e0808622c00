// The Node side of lib/liveedge.js (the test's counterpart of lib/k6.js):
// fetch for HTTP, node:crypto for the webhook HMAC, `ws` for the socket.
import { createHmac } from "node:crypto";
import WebSocket from "ws";
import { Api, Session } from "../lib/liveedge.js";

/** @type {import("../lib/liveedge.js").HttpFn} */
export async function httpFn(method, url, body, headers) {
  const r = await fetch(url, { method, headers, body: body ?? undefined });
  return { status: r.status, body: await r.text() };
}

/** @type {import("../lib/liveedge.js").HmacHex} */
export const hmacHex = (secret, message) => createHmac("sha256", secret).update(message).digest("hex");

export const after = (fn, ms) => {
  const t = setTimeout(fn, ms);
  return () => clearTimeout(t);
};

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export const apiFor = (baseUrl) => new Api(baseUrl, httpFn);

/**
 * A WebSocket with the token in the Authorization header, its Session, and
 * every push it received; resolves once the hello arrived.
 */
export async function connect(url, token, { timeoutMs = 5000, onPush } = {}) {
  const ws = new WebSocket(url, { headers: { Authorization: "Bearer " + token } });
  const pushes = [];
  const session = new Session({
    send: (text) => ws.send(text),
    after,
    timeoutMs,
    onPush: (p) => {
      pushes.push(p);
      onPush?.(p);
    },
  });
  const closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)));
  ws.on("message", (data, isBinary) => {
    if (!isBinary) session.onText(data.toString());
  });
  ws.on("close", () => session.close("socket closed"));
  const failed = new Promise((_, reject) => ws.once("error", reject));
  const hello = await Promise.race([session.waitHello(), failed]);
  return { ws, session, hello, pushes, closed, close: () => ws.close() };
}

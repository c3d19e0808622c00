// Room chat: VUS viewers in one room, the first TALKERS of them talking at
// CHAT_RATE messages/s each (under the 5/s per-user limit). Measures the chat
// and join reply times and how long a chat takes to reach the viewers (the
// text carries its send time). See README.md for the knobs.
import { check } from "k6";
import { setInterval, clearInterval } from "k6/timers";
import { Biz, LIMITS, common, num, pick, replyChecks, req, runUserBase, stampOf, stampedText, userId } from "./lib/liveedge.js";
import { apiFor, connect, errors, pushMs, sleepMs, track } from "./lib/k6.js";

const k = common(__ENV);
const TALKERS = num(__ENV, "TALKERS", 5);
const CHAT_RATE = num(__ENV, "CHAT_RATE", 2);
const PUSH_P95 = num(__ENV, "PUSH_P95_MS", 500);
const PUSH_P99 = num(__ENV, "PUSH_P99_MS", 2000);
if (CHAT_RATE <= 0 || CHAT_RATE > LIMITS.chatPerSecond) {
  throw new Error(`CHAT_RATE=${CHAT_RATE}: must be in (0, ${LIMITS.chatPerSecond}] (limits.chat_per_second)`);
}

/** @type {import("k6/options").Options} */
export const options = {
  scenarios: {
    chat: {
      executor: "constant-vus",
      vus: k.vus,
      duration: k.duration,
      gracefulStop: `${k.sessionS + 10}s`,
    },
  },
  thresholds: {
    checks: ["rate>0.99"],
    le_errors: ["rate<0.01"],
    "le_reply_ms{type:chat}": [`p(95)<${k.p95}`, `p(99)<${k.p99}`],
    "le_reply_ms{type:join}": [`p(95)<${k.p95}`, `p(99)<${k.p99}`],
    le_push_ms: [`p(95)<${PUSH_P95}`, `p(99)<${PUSH_P99}`],
    // A fan-out that delivers nothing gives le_push_ms no samples, and a
    // threshold on a metric without samples passes: chats must arrive.
    "le_pushes{biz:5555}": ["count>0"],
    http_req_failed: ["rate<0.01"],
  },
};

/**
 * @typedef {{room: number, userBase: number}} Data
 */

/** Opens the room (ROOM=0) as ANCHOR_ID and picks this run's users. */
export async function setup() {
  const api = apiFor(k.baseUrls, 1);
  const room = k.room || (await api.openRoom(await api.devToken(k.anchorId, "anchor")));
  /** @type {Data} */
  const data = { room, userBase: k.userBase || runUserBase(Date.now()) };
  console.info(`chat: room ${data.room}, ${k.vus} viewers, ${Math.min(TALKERS, k.vus)} talking at ${CHAT_RATE}/s`);
  return data;
}

/** One viewer session of SESSION_S seconds. @param {Data} data */
export default async function (data) {
  try {
    const api = apiFor(k.baseUrls, __VU);
    const token = await api.devToken(userId(data.userBase, __VU, 0));
    const conn = await connect(pick(k.wsUrls, __VU - 1), token, {
      timeoutMs: k.timeoutMs,
      onPush: (p) => {
        if (p.biz !== Biz.Chat || p.room !== data.room) return;
        const sent = stampOf(p.d.text);
        if (sent > 0) pushMs.add(Date.now() - sent);
      },
    });
    const joined = await track(conn.session.request("join", req.join(data.room)), undefined, "join");
    if (!joined || !check(joined, replyChecks.join)) {
      conn.close();
      return;
    }
    const intervals = [];
    if (__VU <= TALKERS) {
      intervals.push(
        setInterval(() => {
          const text = stampedText(Date.now(), `vu${__VU}`);
          track(conn.session.request("chat", req.chat(data.room, text)), undefined, "chat").then((r) => {
            if (r) check(r, replyChecks.chat);
          });
        }, 1000 / CHAT_RATE),
      );
    }
    const beatMs = conn.hello.heartbeat_ms || conn.hello.heartbeat_s * 1000;
    intervals.push(
      setInterval(() => {
        track(conn.session.request("ping", req.ping())).then((r) => {
          if (r) check(r, replyChecks.ping);
        });
      }, beatMs / 2),
    );
    await sleepMs(k.sessionS * 1000);
    for (const t of intervals) clearInterval(t);
    conn.close();
    await conn.closed;
  } catch (e) {
    errors.add(1, { op: "session" });
    console.warn(`chat VU ${__VU}: ${e}`);
  }
}

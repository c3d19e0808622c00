// Red-packet grab storm (written to shared/PROTOCOL.md §3–§4; needs the red
// packet feature on the node). setup opens the room and creates and prepares
// a red packet of TOTAL_AMOUNT coins in TOTAL_COUNT packets lasting RAIN_S;
// VUS viewers connect and join; START_AFTER seconds in, the anchor starts the
// rain; each viewer, told by push 5560, grabs over WebSocket every
// GRAB_EVERY_MS (≥ 500 ms: the per-user, per-code limit) until it wins an
// amount, none is left, or the rain is over. Nothing may be handed out beyond
// the totals (thresholds on the summed grabs, and the stats in teardown).
import { check } from "k6";
import { Counter } from "k6/metrics";
import { setInterval, clearInterval } from "k6/timers";
import { Biz, Code, LIMITS, int, common, num, pick, replyChecks, req, runUserBase, userId } from "./lib/liveedge.js";
import { apiFor, connect, errors, sleepMs, track } from "./lib/k6.js";

const k = common(__ENV);
const TOTAL_AMOUNT = num(__ENV, "TOTAL_AMOUNT", 10000);
const TOTAL_COUNT = num(__ENV, "TOTAL_COUNT", 1000);
const RAIN_S = num(__ENV, "RAIN_S", 30);
const START_AFTER = num(__ENV, "START_AFTER", 10);
const GRAB_EVERY_MS = Math.max(LIMITS.grabEveryMs, num(__ENV, "GRAB_EVERY_MS", 600));
const END_S = START_AFTER + RAIN_S + 15;

const grantedAmount = new Counter("le_granted_amount");
const grantedCount = new Counter("le_granted_count");

/** @type {import("k6/options").Options} */
export const options = {
  scenarios: {
    viewers: { executor: "per-vu-iterations", exec: "viewer", vus: k.vus, iterations: 1, maxDuration: `${END_S}s` },
    anchor: { executor: "per-vu-iterations", exec: "startRain", vus: 1, iterations: 1, startTime: `${START_AFTER}s`, maxDuration: "30s" },
  },
  thresholds: {
    checks: ["rate>0.99"],
    le_errors: ["rate<0.01"],
    "le_reply_ms{type:grab}": [`p(95)<${k.p95}`, `p(99)<${k.p99}`],
    // Never more than the totals — and something granted at all: a run in
    // which every grab is refused (30001, 30003) must not pass.
    le_granted_amount: [`count<=${TOTAL_AMOUNT}`, "count>0"],
    le_granted_count: [`count<=${TOTAL_COUNT}`, "count>0"],
    http_req_failed: ["rate<0.01"],
  },
};

/** @typedef {{room: number, code: string, anchorToken: string, userBase: number}} Data */

/** Opens the room (ROOM=0) as ANCHOR_ID, creates and prepares the red packet. */
export async function setup() {
  const api = apiFor(k.baseUrls, 1);
  const anchorToken = await api.devToken(k.anchorId, "anchor");
  const room = k.room || (await api.openRoom(anchorToken));
  // Preparing debits the anchor the whole total (refunded what nobody grabs).
  await api.devCredit(k.anchorId, TOTAL_AMOUNT, `k6-rain-${Date.now()}`);
  const created = await api.createRedPacket(anchorToken, room, { total_amount: TOTAL_AMOUNT, total_count: TOTAL_COUNT, duration_s: RAIN_S });
  if (created.code !== 0) throw new Error(`create red packet: HTTP ${created.status} ${created.raw}`);
  const code = String(created.data.code);
  const prepared = await api.redPacketStep(anchorToken, code, "prepare");
  if (prepared.code !== 0) throw new Error(`prepare: HTTP ${prepared.status} ${prepared.raw}`);
  console.info(`redpacket: room ${room}, ${TOTAL_AMOUNT} coins in ${TOTAL_COUNT} packets, starts in ${START_AFTER}s for ${RAIN_S}s`);
  /** @type {Data} */
  const data = { room, code, anchorToken, userBase: k.userBase || runUserBase(Date.now()) };
  return data;
}

/** The anchor starts the rain (retrying while the 1-per-10-s anchor limit answers 10429). @param {Data} data */
export async function startRain(data) {
  const api = apiFor(k.baseUrls, 1);
  for (let i = 0; i < 15; i++) {
    const r = await api.redPacketStep(data.anchorToken, data.code, "start");
    if (r.code !== Code.RateLimited) {
      check(r, { "start: code 0": (x) => x.code === 0 });
      errors.add(r.code !== 0, { op: "start" });
      return;
    }
    await sleepMs(1000);
  }
  errors.add(1, { op: "start" });
}

/** One viewer: join, wait for the rain, grab until done. @param {Data} data */
export async function viewer(data) {
  /** @type {ReturnType<typeof setInterval> | undefined} */
  let beat;
  try {
    const api = apiFor(k.baseUrls, __VU);
    const token = await api.devToken(userId(data.userBase, __VU, 0));
    let started = false;
    let finished = false;
    const conn = await connect(pick(k.wsUrls, __VU - 1), token, {
      timeoutMs: k.timeoutMs,
      onPush: (p) => {
        if (p.d.code !== data.code) return;
        if (p.biz === Biz.RainStarted) started = true;
        if (p.biz === Biz.RainFinished) finished = true;
      },
    });
    const joined = await track(conn.session.request("join", req.join(data.room)), undefined, "join");
    if (!joined || !check(joined, replyChecks.join)) {
      conn.close();
      return;
    }
    const t0 = Date.now();
    // Silent until the rain: a heartbeat every half period, or the node
    // closes the connection (4402) before a long START_AFTER is over.
    const beatMs = conn.hello.heartbeat_ms || conn.hello.heartbeat_s * 1000;
    beat = setInterval(() => {
      track(conn.session.request("ping", req.ping())).then((r) => {
        if (r) check(r, replyChecks.ping);
      });
    }, beatMs / 2);
    // Told by push 5560; a viewer that joined late starts on its own after START_AFTER + 5 s.
    while (!started && Date.now() - t0 < (START_AFTER + 5) * 1000) await sleepMs(100);
    check(started, { "rain: 5560 pushed to the room": (s) => s });
    const deadline = t0 + (START_AFTER + RAIN_S + 5) * 1000;
    while (!finished && Date.now() < deadline) {
      const r = await track(conn.session.request("grab", req.grab(data.code)), (x) => replyChecks.grab["grab: amount or none left"](x), "grab");
      if (r) {
        check(r, replyChecks.grab);
        if (r.code === 0) {
          grantedAmount.add(int(r.d.amount));
          grantedCount.add(1);
          break;
        }
        if (r.code === Code.RedPacketGone || r.code === Code.RedPacketAlreadyGrabbed) break;
      }
      await sleepMs(GRAB_EVERY_MS);
    }
    conn.close();
    await conn.closed;
  } catch (e) {
    errors.add(1, { op: "session" });
    console.warn(`redpacket VU ${__VU}: ${e}`);
  } finally {
    if (beat !== undefined) clearInterval(beat);
  }
}

/** The red packet's stats: never more granted than its totals. @param {Data} data */
export async function teardown(data) {
  const r = await apiFor(k.baseUrls, 1).redPacketStats(data.anchorToken, data.code);
  console.info(`redpacket stats: ${r.raw}`);
  check(r, {
    "stats: code 0": (x) => x.code === 0,
    "stats: granted_amount ≤ total_amount": (x) => Number(x.data.granted_amount) <= TOTAL_AMOUNT,
    "stats: granted_count ≤ total_count": (x) => Number(x.data.granted_count) <= TOTAL_COUNT,
    // Every packet granted when there were at least as many grabbers.
    "stats: granted_count > 0 (all when VUS ≥ total_count)": (x) =>
      Number(x.data.granted_count) > 0 && (k.vus < TOTAL_COUNT || Number(x.data.granted_count) === TOTAL_COUNT),
  });
}

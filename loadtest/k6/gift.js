// Gift storm: VUS senders in one room send GIFT_ID to the room's anchor at
// GIFT_RATE gifts/s each (under the 20/s per-user limit), every gift with its
// own req_id; every DUP_EVERY-th gift is sent again with the same req_id and
// must answer the same order (idempotency). Each session first gets enough
// dev credit. See README.md for the knobs.
import { check } from "k6";
import { setInterval, clearInterval } from "k6/timers";
import { Code, LIMITS, common, giftSettled, num, pick, replyChecks, req, runUserBase, userId } from "./lib/liveedge.js";
import { apiFor, connect, errors, sleepMs, track } from "./lib/k6.js";

const k = common(__ENV);
const GIFT_ID = num(__ENV, "GIFT_ID", 24);
const GIFT_RATE = num(__ENV, "GIFT_RATE", 10);
const COUNT = num(__ENV, "COUNT", 1);
const DUP_EVERY = num(__ENV, "DUP_EVERY", 50);
if (GIFT_RATE <= 0 || GIFT_RATE > LIMITS.giftPerSecond) {
  throw new Error(`GIFT_RATE=${GIFT_RATE}: must be in (0, ${LIMITS.giftPerSecond}] (limits.gift_per_second)`);
}

/** @type {import("k6/options").Options} */
export const options = {
  scenarios: {
    gift: {
      executor: "constant-vus",
      vus: k.vus,
      duration: k.duration,
      gracefulStop: `${k.sessionS + 10}s`,
    },
  },
  thresholds: {
    checks: ["rate>0.99"],
    le_errors: ["rate<0.01"],
    "le_reply_ms{type:gift}": [`p(95)<${k.p95}`, `p(99)<${k.p99}`],
    http_req_failed: ["rate<0.01"],
  },
};

/**
 * @typedef {{room: number, anchor: number, price: number, userBase: number}} Data
 */

/** Opens the room (ROOM=0) as ANCHOR_ID, looks up the gift's price, picks this run's users. */
export async function setup() {
  const api = apiFor(k.baseUrls, 1);
  const room = k.room || (await api.openRoom(await api.devToken(k.anchorId, "anchor")));
  const gift = (await api.gifts()).find((g) => g.gift_id === GIFT_ID);
  if (!gift) throw new Error(`GIFT_ID=${GIFT_ID} is not in the catalogue`);
  /** @type {Data} */
  const data = { room, anchor: k.anchorId, price: gift.price, userBase: k.userBase || runUserBase(Date.now()) };
  console.info(`gift: room ${room}, ${k.vus} senders × ${GIFT_RATE}/s of gift ${GIFT_ID} (price ${gift.price}) to anchor ${k.anchorId}`);
  return data;
}

/** One sender session of SESSION_S seconds. @param {Data} data */
export default async function (data) {
  try {
    const api = apiFor(k.baseUrls, __VU);
    const me = userId(data.userBase, __VU, 0);
    const runTag = `${data.userBase}-${__VU}-${__ITER}`;
    // Enough coins for the whole session, with a margin; idempotent per session.
    const need = Math.ceil(GIFT_RATE * k.sessionS * COUNT * data.price * 1.2) + 10;
    await api.devCredit(me, need, `k6-credit-${runTag}`);
    const token = await api.devToken(me);
    const conn = await connect(pick(k.wsUrls, __VU - 1), token, { timeoutMs: k.timeoutMs });
    const joined = await track(conn.session.request("join", req.join(data.room)), undefined, "join");
    if (!joined || !check(joined, replyChecks.join)) {
      conn.close();
      return;
    }
    let n = 0;
    const timer = setInterval(() => {
      const d = req.gift(data.room, GIFT_ID, data.anchor, COUNT, `k6-${runTag}-${n++}`);
      const dup = DUP_EVERY > 0 && n % DUP_EVERY === 0;
      track(giftSettled(conn.session, d, sleepMs), undefined, "gift").then(async (r) => {
        if (!r) return;
        check(r, replyChecks.gift);
        if (dup && r.code === Code.OK) {
          const again = await track(conn.session.request("gift", d), undefined, "gift");
          if (again) check(again, { "gift: same req_id, same order": (a) => a.code === 0 && a.d.order_id === r.d.order_id });
        }
      });
    }, 1000 / GIFT_RATE);
    await sleepMs(k.sessionS * 1000);
    clearInterval(timer);
    await sleepMs(Math.min(k.timeoutMs, 2000)); // let the last replies come in
    conn.close();
    await conn.closed;
  } catch (e) {
    errors.add(1, { op: "session" });
    console.warn(`gift VU ${__VU}: ${e}`);
  }
}

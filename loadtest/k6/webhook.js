// Payment webhook storm. Every iteration is a new user (a user may hold at
// most pay.max_open_orders_per_user = 5 unpaid orders and create
// pay.orders_per_minute = 10 a minute): create a recharge order, sign a
// SUCCESS notify with k6/crypto's HMAC, post COPIES identical copies at once
// (a provider retrying), and check that the wallet was credited exactly once
// and the order is PAYED. RATE > 0 runs a constant arrival rate (iterations/s)
// instead of VUS looping. See README.md for the knobs.
import { check } from "k6";
import { Rate } from "k6/metrics";
import { DEV, common, num, runUserBase, str, userId, webhookChecks, webhookIteration } from "./lib/liveedge.js";
import { apiFor, errors, hmacHex } from "./lib/k6.js";

const k = common(__ENV);
const PRODUCT_ID = num(__ENV, "PRODUCT_ID", 1);
const COPIES = num(__ENV, "COPIES", 2);
const RATE = num(__ENV, "RATE", 0);
const PAY_SECRET = str(__ENV, "PAY_SECRET", DEV.paySecret);
const CHANNEL = str(__ENV, "CHANNEL", "mock");

/** 1 per iteration whose wallet moved by exactly the product's coins. */
const creditedOnce = new Rate("le_credited_once");

/** @type {import("k6/options").Scenario} */
const scenario =
  RATE > 0
    ? // maxVUs: room to keep the rate when replies slow down; an iteration k6 still drops
      // (dropped_iterations) fails the run — the rate offered was not met.
      { executor: "constant-arrival-rate", rate: RATE, timeUnit: "1s", duration: k.duration, preAllocatedVUs: k.vus, maxVUs: 4 * k.vus }
    : { executor: "constant-vus", vus: k.vus, duration: k.duration };

/** @type {import("k6/options").Options} */
export const options = {
  scenarios: { webhook: scenario },
  thresholds: {
    checks: ["rate>0.99"],
    le_errors: ["rate<0.01"],
    le_credited_once: ["rate==1"],
    "http_req_duration{name:pay/notify}": [`p(95)<${k.p95}`, `p(99)<${k.p99}`],
    "http_req_duration{name:pay/orders}": [`p(95)<${k.p95}`, `p(99)<${k.p99}`],
    http_req_failed: ["rate<0.01"],
    ...(RATE > 0 ? { dropped_iterations: ["count==0"] } : {}),
  },
};

/** @typedef {{userBase: number, product: {product_id: number, coins: number}}} Data */

export async function setup() {
  const api = apiFor(k.baseUrls, 1);
  const product = (await api.products()).find((p) => p.product_id === PRODUCT_ID);
  if (!product) throw new Error(`PRODUCT_ID=${PRODUCT_ID} is not a product`);
  /** @type {Data} */
  const data = { userBase: k.userBase || runUserBase(Date.now()), product };
  console.info(`webhook: product ${PRODUCT_ID} (${product.coins} coins), ${COPIES} copies per notify`);
  return data;
}

/** @param {Data} data */
export default async function (data) {
  try {
    const r = await webhookIteration({
      api: apiFor(k.baseUrls, __VU),
      hmac: hmacHex,
      secret: PAY_SECRET,
      user: userId(data.userBase, __VU, __ITER),
      product: data.product,
      reqId: `k6-order-${__ITER}`,
      copies: COPIES,
      now: Date.now,
      channel: CHANNEL,
    });
    const ok = check(r, webhookChecks);
    creditedOnce.add(r.after - r.before === r.coins);
    errors.add(!ok, { op: "webhook" });
  } catch (e) {
    errors.add(1, { op: "webhook" });
    console.warn(`webhook VU ${__VU}: ${e}`);
  }
}

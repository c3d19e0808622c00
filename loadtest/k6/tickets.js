// Ticket rush (written to shared/PROTOCOL.md §4 "Tickets / flash sale"; needs
// the tickets feature on the node). setup creates, as an admin, a program of
// CATEGORIES × ROWS × COLS seats; ITERATIONS buyers (each a new user) share
// VUS and each asks for SEATS adjacent seats of a random category, paid with
// coins (PAY=coins: the saga, after dev credit) or by the provider (PAY=mock:
// PENDING_PAY), and asks again with the same req_id (same order). Every answer
// must be an order of exactly the SEATS asked (distinct, adjacent in one row of the category) or
// sold out (40003); never more seats sold than exist
// (threshold), and in teardown every seat's status adds up.
import { check } from "k6";
import { Counter } from "k6/metrics";
import { Code, common, num, programSpec, runUserBase, seatTally, str, ticketChecks, userId } from "./lib/liveedge.js";
import { apiFor, errors } from "./lib/k6.js";

const k = common(__ENV);
const CATEGORIES = num(__ENV, "CATEGORIES", 2);
const ROWS = num(__ENV, "ROWS", 10);
const COLS = num(__ENV, "COLS", 20);
const PRICE = num(__ENV, "PRICE", 380);
const SEATS = num(__ENV, "SEATS", 2);
const PER_USER_MAX = num(__ENV, "PER_USER_MAX", 6);
const PAY = str(__ENV, "PAY", "coins");
const ADMIN_ID = num(__ENV, "ADMIN_ID", 2);
const CAPACITY = CATEGORIES * ROWS * COLS;
const ITERATIONS = num(__ENV, "ITERATIONS", Math.ceil((CAPACITY / SEATS) * 1.5));

const seatsSold = new Counter("le_seats_sold");

/** @type {import("k6/options").Options} */
export const options = {
  scenarios: {
    rush: { executor: "shared-iterations", vus: k.vus, iterations: ITERATIONS, maxDuration: k.duration },
  },
  thresholds: {
    checks: ["rate>0.99"],
    le_errors: ["rate<0.01"],
    le_seats_sold: [`count<=${CAPACITY}`],
    "http_req_duration{name:tickets/orders}": [`p(95)<${k.p95}`, `p(99)<${k.p99}`],
    http_req_failed: ["rate<0.01"],
  },
};

/** @typedef {{programId: number, adminToken: string, userBase: number}} Data */

export async function setup() {
  const api = apiFor(k.baseUrls, 1);
  const adminToken = await api.devToken(ADMIN_ID, "admin");
  const spec = programSpec(`k6 rush ${Date.now()}`, CATEGORIES, ROWS, COLS, PRICE, Math.max(SEATS, 1), PER_USER_MAX);
  const programId = await api.createProgram(adminToken, spec);
  console.info(`tickets: program ${programId}, ${CAPACITY} seats, ${ITERATIONS} buyers of ${SEATS} (pay ${PAY})`);
  /** @type {Data} */
  const data = { programId, adminToken, userBase: k.userBase || runUserBase(Date.now()) };
  return data;
}

/** One buyer (a new user). @param {Data} data */
export default async function (data) {
  try {
    // 409 is an expected answer here (40003 sold out).
    const api = apiFor(k.baseUrls, __VU, [409]);
    const user = userId(data.userBase, __VU, __ITER);
    if (PAY === "coins") await api.devCredit(user, PRICE * SEATS, `k6-tickets-${user}`);
    const token = await api.devToken(user);
    /** @type {Record<string, unknown>} */
    const body = {
      program_id: data.programId,
      category_id: 1 + Math.floor(Math.random() * CATEGORIES),
      count: SEATS,
      req_id: `k6-rush-${user}`,
    };
    if (PAY !== "mock") body.pay = PAY;
    const r = await api.ticketOrder(token, body);
    const ok = check(r, ticketChecks(body));
    errors.add(!ok, { op: "ticket" });
    if (r.code !== Code.OK) return;
    seatsSold.add(Array.isArray(r.data.seat_ids) ? r.data.seat_ids.length : 0);
    const again = await api.ticketOrder(token, body);
    check(again, { "ticket: same req_id, same order": (a) => a.code === 0 && a.data.order_id === r.data.order_id });
  } catch (e) {
    errors.add(1, { op: "ticket" });
    console.warn(`tickets VU ${__VU}: ${e}`);
  }
}

/** Every seat unsold, locked or sold, and each category's remaining = its unsold seats. @param {Data} data */
export async function teardown(data) {
  const p = await apiFor(k.baseUrls, 1).program(data.adminToken, data.programId);
  const t = seatTally(p.data);
  console.info(`tickets: ${JSON.stringify(t)} of ${CAPACITY}`);
  check(t, {
    "program: every seat has a status": (x) => x.other === 0 && x.unsold + x.locked + x.sold === CAPACITY,
    "program: remaining = unsold seats": (x) => x.remainingMismatch === 0,
    "program: no seat left locked (coins)": (x) => PAY !== "coins" || x.locked === 0,
  });
}

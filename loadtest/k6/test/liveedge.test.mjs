// The k6 scenarios' protocol module (lib/liveedge.js) under Node: its pure
// parts on their own, then its flows against a real LiveEdge node (the
// binary in $LIVEEDGE_BIN, started the way clientsdk/ts's tests start it).
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Node, eventually } from "../../../clientsdk/ts/test/node.mjs";
import {
  Biz, Code, DEV, LIMITS, Session, ackFrame, common, failedChecks, frame, giftSettled, list, notifyBody, num, parseFrames,
  paySignature, pick, programSpec, replyChecks, req, runUserBase, seatTally, signedNotify, stampOf, stampedText,
  ticketChecks, userId, webhookChecks, webhookIteration,
} from "../lib/liveedge.js";
import { after as afterMs, apiFor, connect, hmacHex, sleep } from "./node.mjs";

describe("protocol module, no node", () => {
  test("webhook signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, t.body)> (a vector computed elsewhere)", () => {
    const body = notifyBody({ event_id: "e-1", order_id: "123", amount: 3000, status: "SUCCESS", paid_at: 1700000000123 });
    assert.equal(body, '{"event_id":"e-1","order_id":"123","amount":3000,"status":"SUCCESS","paid_at":1700000000123}');
    assert.equal(
      paySignature(hmacHex, DEV.paySecret, body, 1700000000.9),
      "t=1700000000,v1=4fcb388fe17cb87f9945067135b53c4536ba1cd90d9513dfe833074bdd5f3611",
    );
    const s = signedNotify(hmacHex, DEV.paySecret, JSON.parse(body), 1700000000123);
    assert.equal(s.body, body);
    assert.match(s.signature, /^t=1700000000,v1=4fcb38/);
  });

  test("the dev defaults are configs/single.yaml's", () => {
    const yaml = readFileSync(fileURLToPath(new URL("../../../configs/single.yaml", import.meta.url)), "utf8");
    const secrets = /^pay:\n(?:  .*\n)*?  secrets: \[([^\]]*)\]/m.exec(yaml);
    assert.ok(secrets, "pay.secrets in single.yaml");
    assert.ok(secrets[1].split(",").map((s) => s.trim()).includes(DEV.paySecret));
    assert.match(yaml, new RegExp(`^http:\\n  addr: ${DEV.baseUrl.replace("http://", "")}$`, "m"));
    assert.match(yaml, new RegExp(`^ws:\\n  addr: ${DEV.wsUrl.replace("ws://", "").replace("/ws", "")}$`, "m"));
    assert.match(yaml, new RegExp(`chat_per_second: ${LIMITS.chatPerSecond}$`, "m"));
    assert.match(yaml, new RegExp(`gift_per_second: ${LIMITS.giftPerSecond}$`, "m"));
    assert.match(yaml, new RegExp(`max_open_orders_per_user: ${LIMITS.maxOpenOrdersPerUser}$`, "m"));
    assert.match(yaml, new RegExp(`orders_per_minute: ${LIMITS.ordersPerMinute}$`, "m"));
  });

  test("knobs: lists, round robin, numbers, run-unique user ids", () => {
    const k = common({ BASE_URL: "http://a:1/, http://b:2", WS_URL: "", VUS: "7" });
    assert.deepEqual(k.baseUrls, ["http://a:1", "http://b:2"]);
    assert.deepEqual(k.wsUrls, [DEV.wsUrl]);
    assert.equal(k.vus, 7);
    assert.equal(pick(k.baseUrls, 0), "http://a:1");
    assert.equal(pick(k.baseUrls, 3), "http://b:2");
    assert.deepEqual(list({ X: "a,,b" }, "X", ""), ["a", "b"]);
    assert.throws(() => num({ VUS: "ten" }, "VUS", 1), /VUS=ten/);
    const base = runUserBase(Date.UTC(2026, 0, 1));
    assert.ok(Number.isSafeInteger(userId(base, 9999, 99999)));
    assert.notEqual(userId(base, 1, 99999), userId(base, 2, 0));
    assert.equal(stampOf(stampedText(1700000000123, "vu1")), 1700000000123);
    assert.equal(stampOf("hi"), -1);
  });

  test("Session: replies by id with their time, batch frames, acks and de-duplication, timeouts, close", async () => {
    const sent = [];
    let now = 1000;
    const pushes = [];
    const s = new Session({ send: (t) => sent.push(JSON.parse(t)), after: afterMs, now: () => now, timeoutMs: 50, onPush: (p) => pushes.push(p) });
    const hello = s.waitHello();
    s.onText('{"t":"hello","d":{"user_id":7,"node":"gw-1","heartbeat_s":30}}');
    assert.equal((await hello).user_id, 7);
    const p1 = s.request("chat", req.chat(3, "hi"));
    const p2 = s.request("ping", req.ping());
    assert.deepEqual(sent[0], { t: "chat", id: 1, d: { room_id: 3, text: "hi" } });
    now += 12;
    const push = { t: "push", mid: "m1", biz: Biz.WalletCredit, d: { balance: 1 }, ack: true };
    s.onText(JSON.stringify({ t: "batch", d: [{ t: "reply", id: 2, code: 0, msg: "ok", d: { ts: 5 } }, push, { t: "reply", id: 1, code: 0, msg: "ok", d: { mid: "x" } }] }));
    s.onText(JSON.stringify(push)); // a resend
    const [r1, r2] = await Promise.all([p1, p2]);
    assert.deepEqual([r1.type, r1.ms, r1.d.mid, r2.type], ["chat", 12, "x", "ping"]);
    assert.deepEqual(failedChecks(replyChecks.chat, r1), []);
    assert.deepEqual(failedChecks(replyChecks.ping, r2), []);
    assert.equal(pushes.length, 1);
    assert.equal(s.stats.duplicates, 1);
    assert.deepEqual(sent.slice(2), [JSON.parse(ackFrame(["m1"])), JSON.parse(ackFrame(["m1"]))]); // every copy acked
    await assert.rejects(s.request("ping", {}), /no reply within 50 ms/);
    s.onText("not json");
    assert.equal(s.stats.bad, 1);
    const p3 = s.request("ping", {});
    s.close("bye");
    await assert.rejects(p3, /bye/);
    await assert.rejects(s.request("ping", {}), /closed/);
    assert.deepEqual(parseFrames(frame("x", 1, {})), [{ t: "x", id: 1, d: {} }]);
  });

  test("Session: a connection closed before its hello (an upgrade refused) fails waitHello at once, with the cause", async () => {
    const s = new Session({ send: () => {}, after: afterMs, now: () => 0, timeoutMs: 60_000 });
    const hello = s.waitHello();
    const t0 = Date.now();
    s.close("socket closed");
    await assert.rejects(hello, /no hello: socket closed/);
    assert.ok(Date.now() - t0 < 1000, "rejected only after the timeout");
    await assert.rejects(s.waitHello(), /no hello: socket closed/);
  });

  test("checks: failing replies are named", () => {
    const bad = { type: "gift", id: 1, code: Code.InsufficientBalance, msg: "", d: {}, ms: 1 };
    assert.deepEqual(failedChecks(replyChecks.gift, bad), ["gift: code 0", "gift: has order_id", "gift: balance ≥ 0"]);
    assert.deepEqual(failedChecks(replyChecks.grab, { ...bad, type: "grab", code: Code.RedPacketGone }), []);
    assert.deepEqual(failedChecks(replyChecks.grab, { ...bad, type: "grab", code: Code.RateLimited }).length, 2);
    const t = seatTally({
      categories: [{ category_id: 1, remaining: 1 }],
      seats: [{ category_id: 1, status: 1 }, { category_id: 1, status: 3 }, { category_id: 1, status: 2 }],
    });
    assert.deepEqual(t, { unsold: 1, locked: 1, sold: 1, other: 0, remainingMismatch: 0 });
  });

  test("ticket checks: an order holds exactly the seats asked for (count adjacent in one row of the category, or the named ids), distinct", () => {
    const order = (seat_ids) => ({ status: 200, code: 0, msg: "ok", data: { status: "PAID", seat_ids }, raw: "" });
    const seats = "ticket: seats as asked";
    const byCount = ticketChecks({ program_id: 1, category_id: 1, count: 2, req_id: "r" });
    assert.deepEqual(failedChecks(byCount, order(["1-3-4", "1-3-5"])), []);
    assert.deepEqual(failedChecks(byCount, order(["1-3-4"])), [seats], "fewer seats than asked");
    assert.deepEqual(failedChecks(byCount, order(["1-3-4", "1-3-5", "1-3-6"])), [seats], "more seats than asked");
    assert.deepEqual(failedChecks(byCount, order(["1-3-4", "1-3-4"])), [seats], "a seat twice");
    assert.deepEqual(failedChecks(byCount, order(["2-3-4", "2-3-5"])), [seats], "another category");
    assert.deepEqual(failedChecks(byCount, order(["1-3-4", 7])), [seats], "not a seat id");
    assert.deepEqual(failedChecks(byCount, order(undefined)), [seats], "no seat_ids");
    assert.deepEqual(failedChecks(byCount, order(["1-3-5", "1-3-4"])), [], "adjacent, in any order");
    assert.deepEqual(failedChecks(byCount, order(["1-3-4", "1-3-6"])), [seats], "not adjacent");
    assert.deepEqual(failedChecks(byCount, order(["1-3-4", "1-4-5"])), [seats], "two rows");
    const soldOut = { status: 409, code: Code.SoldOut, msg: "sold out", data: {}, raw: "" };
    assert.deepEqual(failedChecks(byCount, soldOut), []);
    const byIds = ticketChecks({ program_id: 1, seat_ids: ["1-3-4", "1-3-5"], req_id: "r" });
    assert.deepEqual(failedChecks(byIds, order(["1-3-5", "1-3-4"])), []);
    assert.deepEqual(failedChecks(byIds, order(["1-3-4"])), [seats], "fewer seats than named");
    assert.deepEqual(failedChecks(byIds, order(["1-3-4", "1-3-6"])), [seats], "not the seats named");
    assert.deepEqual(failedChecks(byIds, order(["1-3-4", "1-3-4"])), [seats], "a seat twice");
  });
});

describe("protocol module against a real node", () => {
  let node;
  let api;
  const clients = [];
  const base = runUserBase(Date.now());

  before(async () => {
    // The dev config (configs/single.yaml embedded) with its chat limit and
    // dev pay secret: the scenarios' defaults are tested as they ship.
    node = new Node({ LIVEEDGE_LIMITS_CHAT_PER_SECOND: "5" });
    await node.start();
    api = apiFor(node.http);
  });
  after(async () => {
    for (const c of clients) c.close();
    await node?.destroy();
  });

  async function open(user) {
    const c = await connect(node.ws, await api.devToken(user));
    clients.push(c);
    return c;
  }

  test("chat: dev token, an anchor opens a room, viewers join, a chat reply passes its checks and reaches the other viewer", async () => {
    const anchor = userId(base, 1, 0);
    const room = await api.openRoom(await api.devToken(anchor, "anchor"));
    assert.ok(room > 0);
    const talker = await open(userId(base, 1, 1));
    const viewer = await open(userId(base, 1, 2));
    assert.equal(talker.hello.user_id, userId(base, 1, 1));
    for (const c of [talker, viewer]) {
      const j = await c.session.request("join", req.join(room));
      assert.deepEqual(failedChecks(replyChecks.join, j), [], JSON.stringify(j));
      assert.equal(j.d.room_id, room);
    }
    const sentAt = Date.now();
    const r = await talker.session.request("chat", req.chat(room, stampedText(sentAt, "t")));
    assert.deepEqual(failedChecks(replyChecks.chat, r), [], JSON.stringify(r));
    assert.ok(r.ms >= 0 && r.ms < 5000);
    const got = await eventually(() => viewer.pushes.find((p) => p.biz === Biz.Chat && p.room === room), 5000, "chat push");
    assert.equal(stampOf(got.d.text), sentAt);
    assert.equal(got.d.from, userId(base, 1, 1));
    // The checks see a failure: chat in a room not joined.
    const other = await api.openRoom(await api.devToken(userId(base, 1, 3), "anchor"));
    const no = await viewer.session.request("chat", req.chat(other, "x"));
    assert.equal(no.code, Code.Forbidden);
    assert.deepEqual(failedChecks(replyChecks.chat, no), ["chat: code 0", "chat: has mid"]);
  });

  test("gift: after dev credit, a gift to the anchor passes its checks; the same req_id answers the same order and debits once", async () => {
    const anchor = userId(base, 2, 0);
    const room = await api.openRoom(await api.devToken(anchor, "anchor"));
    const sender = userId(base, 2, 1);
    const gift = (await api.gifts()).find((g) => g.gift_id === 24);
    assert.ok(gift, "gift 24 in the catalogue (gift.js's default GIFT_ID)");
    assert.equal(await api.devCredit(sender, 100, "k6-credit-test"), 100);
    assert.equal(await api.devCredit(sender, 100, "k6-credit-test"), 100, "dev credit with a req_id is idempotent");
    const c = await open(sender);
    await c.session.request("join", req.join(room));
    const d = req.gift(room, 24, anchor, 3, "k6-gift-1");
    const r = await giftSettled(c.session, d, sleep);
    assert.deepEqual(failedChecks(replyChecks.gift, r), [], JSON.stringify(r));
    assert.equal(r.d.balance, 100 - 3 * gift.price);
    const again = await c.session.request("gift", d);
    assert.equal(again.d.order_id, r.d.order_id);
    assert.equal(await api.balance(await api.devToken(sender)), 100 - 3 * gift.price);
    // Too poor: the checks fail, and the sender gets the reliable 5557 (acked by the Session).
    const poor = await c.session.request("gift", req.gift(room, 24, anchor, 99, "k6-gift-2"));
    assert.equal(poor.code, Code.InsufficientBalance);
    assert.ok(failedChecks(replyChecks.gift, poor).length > 0);
    await eventually(() => c.pushes.some((p) => p.biz === Biz.GiftFailed && p.d.req_id === "k6-gift-2"), 5000, "5557");
    assert.ok(c.session.stats.acks >= 1);
  });

  test("webhook: create an order, sign the notify with node:crypto, post it twice: 200 success twice, credited once, PAYED", async () => {
    const product = (await api.products()).find((p) => p.product_id === 1);
    assert.ok(product, "product 1 (webhook.js's default PRODUCT_ID)");
    for (let i = 0; i < 3; i++) {
      const r = await webhookIteration({
        api, hmac: hmacHex, secret: DEV.paySecret, user: userId(base, 3, i), product,
        reqId: `k6-order-${i}`, copies: 2, now: Date.now,
      });
      assert.deepEqual(failedChecks(webhookChecks, r), [], JSON.stringify(r));
      assert.equal(r.posts.length, 2);
      assert.equal(r.after - r.before, product.coins);
      // A third copy, later: still success, still nothing more.
      const token = await api.devToken(r.user);
      const n = signedNotify(hmacHex, DEV.paySecret, { event_id: "k6-" + r.orderId, order_id: r.orderId, amount: Number(r.created.data.amount), status: "SUCCESS", paid_at: Date.now() }, Date.now());
      const late = await api.notify("mock", n.body, n.signature);
      assert.deepEqual([late.status, late.raw], [200, "success"]);
      assert.equal(await api.balance(token), r.after);
    }
  });

  test("webhook: a wrong secret or a stale t is refused (401) and credits nothing", async () => {
    const user = userId(base, 4, 0);
    const token = await api.devToken(user);
    const o = await api.createOrder(token, 1, "k6-order-bad");
    assert.equal(o.code, 0, JSON.stringify(o));
    const n = { event_id: "k6-bad", order_id: String(o.data.order_id), amount: Number(o.data.amount), status: "SUCCESS", paid_at: Date.now() };
    const wrong = signedNotify(hmacHex, "not-the-secret", n, Date.now());
    const stale = signedNotify(hmacHex, DEV.paySecret, n, Date.now() - 301_000);
    for (const s of [wrong, stale]) {
      const r = await api.notify("mock", s.body, s.signature);
      assert.deepEqual([r.status, r.code], [401, Code.Unauthenticated], r.raw);
    }
    assert.equal(await api.balance(token), 0);
    assert.equal((await api.order(token, n.order_id)).status, "PAYING");
  });

  test("red packets (redpacket.js): create, prepare, start, viewers grab over WebSocket", async (t) => {
    const anchor = userId(base, 5, 0);
    const anchorToken = await api.devToken(anchor, "anchor");
    const room = await api.openRoom(anchorToken);
    const viewer = await open(userId(base, 5, 1));
    await viewer.session.request("join", req.join(room));
    const created = await api.createRedPacket(anchorToken, room, { total_amount: 100, total_count: 10, duration_s: 10 });
    if (created.status === 404 && created.code === Code.NotFound) {
      t.skip("this node has no red packets yet (POST /rooms/{id}/redpackets is 404)");
      return;
    }
    assert.equal(created.code, 0, created.raw);
    const code = String(created.data.code);
    // Preparing debits the anchor the total (as redpacket.js's setup does).
    await api.devCredit(anchor, 100, "k6-rain-seed");
    assert.equal((await api.redPacketStep(anchorToken, code, "prepare")).code, 0);
    await eventually(async () => (await api.redPacketStep(anchorToken, code, "start")).code === 0, 15000, "start (1 per 10 s per anchor)");
    await eventually(() => viewer.pushes.some((p) => p.biz === Biz.RainStarted && p.d.code === code), 5000, "5560");
    const g = await viewer.session.request("grab", req.grab(code));
    assert.deepEqual(failedChecks(replyChecks.grab, g), [], JSON.stringify(g));
    const stats = await api.redPacketStats(anchorToken, code);
    assert.equal(stats.code, 0, stats.raw);
  });

  test("tickets (tickets.js): a program, an order paid with coins, the same req_id, the seat tally", async (t) => {
    const admin = await api.devToken(userId(base, 6, 0), "admin");
    const spec = programSpec("k6 test", 1, 2, 5, 10, 4, 6);
    const r = await api.call("POST", "/admin/programs", "admin/programs", admin, spec);
    if (r.status === 404 && r.code === Code.NotFound) {
      t.skip("this node has no tickets yet (POST /admin/programs is 404)");
      return;
    }
    assert.equal(r.code, 0, r.raw);
    const programId = Number(r.data.program_id);
    const buyer = userId(base, 6, 1);
    await api.devCredit(buyer, 100, "k6-t-credit");
    const token = await api.devToken(buyer);
    const body = { program_id: programId, category_id: 1, count: 2, req_id: "k6-t-1", pay: "coins" };
    const o = await api.ticketOrder(token, body);
    assert.deepEqual(failedChecks(ticketChecks(body), o), [], o.raw);
    const again = await api.ticketOrder(token, body);
    assert.equal(again.data.order_id, o.data.order_id);
    const p = await api.program(token, programId);
    const tally = seatTally(p.data);
    assert.deepEqual(tally, { unsold: 8, locked: 0, sold: 2, other: 0, remainingMismatch: 0 });
  });
});

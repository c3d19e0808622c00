// The SDK against a real node in cluster mode (real redis-server and
// nats-server, the node binary): reconnect after the node is killed and
// restarted, with recovery by offset from the room history kept in Redis.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { connect, Biz, isBiz } from "../dist/node.js";
import { Node, eventually, startRedis, startNats, clusterEnv, redisCommand } from "./node.mjs";

let redis, nats, node;
const clients = [];

before(async () => {
  [redis, nats] = await Promise.all([startRedis(), startNats()]);
  node = new Node(clusterEnv(redis, nats));
  await node.start();
});
after(async () => {
  for (const c of clients) c.close();
  await node?.destroy();
  await Promise.all([redis?.stop(), nats?.stop()]);
});

/** A ws WebSocket that records every frame sent and received (batches flattened). */
function spySocket(log) {
  return class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.on("message", (b) => {
        const f = JSON.parse(String(b));
        for (const x of f.t === "batch" ? f.d : [f]) log.received.push(x);
      });
    }
    send(data) {
      log.sent.push(JSON.parse(data));
      super.send(data);
    }
  };
}

/** An SDK client of user; getToken may hold reconnects (hold() returns a promise to wait for). */
async function client(userId, { hold } = {}) {
  const log = { pushes: [], states: [], sent: [], received: [] };
  const c = await connect({
    urls: node.ws,
    getToken: async (reason) => {
      if (reason !== "connect" && hold) await hold();
      return node.token(userId);
    },
    WebSocket: spySocket(log),
    reconnectMinMs: 20,
    reconnectMaxMs: 200,
    onPush: (p) => log.pushes.push(p),
    onState: (s) => log.states.push(s),
  });
  clients.push(c);
  return Object.assign(c, { log });
}

const chatsOf = (c, room) => c.log.pushes.filter((p) => isBiz(p, Biz.Chat) && p.room === room);
const reconnected = (c) => c.log.states.some((s) => s.state === "connected" && s.attempt > 0);

/** The reply frames to the joins of room the client sent with since. */
function sinceJoins(c, room) {
  return c.log.sent
    .filter((f) => f.t === "join" && f.d.room_id === room && f.d.since)
    .map((f) => ({ since: f.d.since, reply: c.log.received.find((r) => r.t === "reply" && r.id === f.id) }));
}

async function chat(c, room, from, to) {
  for (let i = from; i <= to; i++) await c.chat(room, "m" + i);
}

test("reconnect after the node restarts (kill -9) with recovery by offset: exactly the missed pushes, in order", async () => {
  const room = await node.openRoom(500);
  let release;
  const gate = new Promise((r) => (release = r));
  const a = await client(501, { hold: () => gate }); // held away until the missed chats are out
  const b = await client(502);
  await a.join(room);
  await b.join(room);
  await chat(b, room, 1, 3);
  await eventually(() => chatsOf(a, room).length === 3, 5000, "a got chats 1..3");
  const ep = chatsOf(a, room)[0].ep;
  assert.ok(ep, "room pushes carry an epoch");

  await node.kill();
  await node.start(); // same ports, same data; the history is in Redis
  await eventually(() => reconnected(b), 10000, "b reconnected");
  assert.ok(!reconnected(a), "a held away");
  await chat(b, room, 4, 8); // missed by a
  release();
  await eventually(() => reconnected(a), 10000, "a reconnected");
  await chat(b, room, 9, 10);
  await eventually(() => chatsOf(a, room).length >= 10, 5000, "a got 10 chats");
  await a.ping(); // a duplicate would be in by now

  const got = chatsOf(a, room);
  assert.deepEqual(
    got.map((p) => p.d.text),
    Array.from({ length: 10 }, (_, i) => "m" + (i + 1)),
  );
  const first = got[0].off;
  assert.deepEqual(
    got.map((p) => p.off),
    Array.from({ length: 10 }, (_, i) => first + i),
    "consecutive offsets",
  );
  assert.ok(got.every((p) => p.ep === ep), "one epoch");
  assert.equal(new Set(got.map((p) => p.mid)).size, 10, "no duplicate mids");
  assert.equal(a.stats.duplicates, 0);
  // The re-join carried the last offset seen and the node recovered.
  const sj = sinceJoins(a, room);
  assert.equal(sj.length, 1);
  assert.deepEqual(sj[0].since, { off: first + 2, ep });
  assert.equal(sj[0].reply?.d?.recovered, true, JSON.stringify(sj[0].reply));
  assert.ok(!a.log.states.some((s) => s.state === "room_resync"));
  assert.deepEqual(a.joinedRooms().get(room), { off: first + 9, ep });
});

test("history gone while the node was down: the re-join reports room_resync, then the new epoch flows", async () => {
  const room = await node.openRoom(600);
  const a = await client(601);
  const b = await client(602);
  await a.join(room);
  await b.join(room);
  await chat(b, room, 1, 2);
  await eventually(() => chatsOf(a, room).length === 2, 5000, "a got chats 1..2");
  const old = { off: chatsOf(a, room)[1].off, ep: chatsOf(a, room)[1].ep };

  await node.kill();
  // The room's history and numbering are lost (e.g. Redis lost them): the
  // next push starts a new epoch.
  const k = (s) => `le:r:{${room}}:${s}`;
  assert.match(await redisCommand(redis.port, "DEL", k("seq"), k("ep"), k("h")), /^:3\r\n$/);
  await node.start();
  await eventually(() => a.log.states.some((s) => s.state === "room_resync"), 10000, "room_resync");
  const rs = a.log.states.find((s) => s.state === "room_resync");
  const sj = sinceJoins(a, room);
  const reply = sj.at(-1).reply?.d;
  assert.equal(reply?.recovered, false, JSON.stringify(sj.at(-1).reply));
  // since: the last position seen; at: the re-join's (the new epoch's).
  assert.deepEqual(rs, { state: "room_resync", room, since: old, at: { off: reply.off, ep: reply.ep } });
  assert.deepEqual([...a.joinedRooms().keys()], [room], "the room stays joined");

  await eventually(() => reconnected(b), 10000, "b reconnected");
  await chat(b, room, 3, 4);
  await eventually(() => chatsOf(a, room).length === 4, 5000, "a got chats 3..4");
  const now = chatsOf(a, room).slice(2);
  assert.deepEqual(
    now.map((p) => p.d.text),
    ["m3", "m4"],
  );
  assert.notEqual(now[0].ep, old.ep, "a new epoch");
  assert.equal(now[0].ep, rs.at.ep, "the re-sync's position is in the new epoch");
  assert.deepEqual(
    now.map((p) => p.off),
    [1, 2],
  );
});

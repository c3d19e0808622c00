// The live-room demo page: the TypeScript SDK's browser bundle over the
// node's HTTP API (same origin) and WebSocket (the port from config.json).
import { connect, Biz, isBiz, ReplyError, randomId } from "./liveedge.js";

const $ = (id) => document.getElementById(id);
const icons = { 22: "👼", 23: "👑", 24: "💗", 25: "🏎️", 27: "🚀", 28: "🎃", 29: "🧞" };

const s = {
  cfg: null, // /demo/config.json
  user: 0,
  role: "viewer",
  token: "",
  client: null,
  room: 0,
  anchor: 0,
  gifts: new Map(), // gift_id -> row
  rain: null, // the red-packet rain falling now: {code, total, endsAt, timer, tick, grabbing}
};

// ---- HTTP ----

async function api(method, path, body, token = s.token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch("/api/v1" + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let env;
  try {
    env = await r.json();
  } catch {
    throw new Error(`${method} ${path}: HTTP ${r.status}`);
  }
  if (env.code !== 0) throw new ReplyError(env.code, env.msg);
  return env.data;
}

async function devToken() {
  const d = await api("POST", "/dev/token", { user_id: s.user, role: s.role }, "");
  s.token = d.token;
  return d.token;
}

// ---- lobby ----

function readWho() {
  s.user = Number($("user").value);
  s.role = $("role").value;
  if (!(s.user > 0)) throw new Error("enter a user id > 0");
}

async function listRooms() {
  try {
    const tok = s.token || (await api("POST", "/dev/token", { user_id: 1, role: "viewer" }, "")).token;
    const d = await api("GET", "/rooms?type=1&page=1&page_size=20", undefined, tok);
    const box = $("rooms");
    box.replaceChildren();
    for (const r of d.rooms) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.room = r.room_id;
      b.textContent = `room ${r.room_id} · anchor ${r.anchor_id} · ${r.online} online`;
      b.onclick = () => {
        $("room-input").value = r.room_id;
        $("role").value = "viewer";
        guard($("lobby-error"), joinAsViewer)();
      };
      box.append(b);
    }
  } catch {
    /* the list is a convenience */
  }
}

async function openAsAnchor() {
  $("role").value = "anchor";
  readWho();
  await devToken();
  const d = await api("POST", "/rooms", { type: 1 });
  await enterRoom(d.room_id);
}

async function joinAsViewer() {
  readWho();
  const room = Number($("room-input").value);
  if (!(room > 0)) throw new Error("enter a room id");
  await devToken();
  await enterRoom(room);
}

// ---- the room ----

// enterRoom runs once at a time: a double click (or a room button, then
// Join) made two clients, the first never closed — every chat shown twice.
async function enterRoom(room) {
  if (s.entering) throw new Error("already entering a room");
  s.entering = true;
  try {
    await enterRoomOnce(room);
  } finally {
    s.entering = false;
  }
}

async function enterRoomOnce(room) {
  const info = await api("GET", `/rooms/${room}`);
  s.room = room;
  s.anchor = info.anchor_id;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${proto}//${location.hostname}:${s.cfg.ws_port}${s.cfg.ws_path}`;
  s.client?.close(); // a retry from the lobby: one connection, not one per try
  s.client = null; // until this connect succeeds: no request goes to the closed one
  s.client = await connect({
    urls: [url],
    getToken: (reason) => (reason === "connect" ? s.token : devToken()),
    onPush,
    onState,
  });
  let j;
  try {
    j = await s.client.join(room);
  } catch (e) {
    s.client.close();
    s.client = null;
    throw e;
  }
  $("lobby").hidden = true;
  $("live").hidden = false;
  $("room-id").textContent = room;
  $("anchor-id").textContent = s.anchor;
  $("me").textContent = s.user;
  $("my-role").textContent = s.role;
  $("online").textContent = j.online;
  $("pk-start").hidden = s.role !== "anchor";
  $("rain-start").hidden = s.role !== "anchor";
  clearInterval(s.refresh);
  s.refresh = setInterval(refreshOnline, 2000);
  if (info.pk_opponent) $("pk").hidden = false;
  s.pkLive = !!info.pk_opponent;
  if (info.redpacket_code) joinRunningRain(info.redpacket_code).catch(() => {});
  system(`joined room ${room} as ${s.role}`);
  // In the room now: a failure loading its panels is shown there (the
  // lobby's error line is hidden), and the rest still loads.
  const loads = await Promise.allSettled([loadGifts(), loadProducts(), refreshWallet()]);
  const failed = loads.find((r) => r.status === "rejected");
  if (failed) {
    const e = failed.reason;
    $("gift-error").textContent = e instanceof ReplyError ? `${e.code}: ${e.msg}` : String(e?.message ?? e);
  }
}

async function refreshOnline() {
  try {
    const info = await api("GET", `/rooms/${s.room}`);
    $("online").textContent = info.online;
  } catch {
    /* next tick */
  }
}

async function refreshWallet() {
  const w = await api("GET", "/wallet");
  $("balance").textContent = w.balance;
  $("received").textContent = w.received ?? 0;
}

async function loadGifts() {
  const d = await api("GET", "/gifts");
  const box = $("gifts");
  box.replaceChildren();
  for (const g of d.gifts) {
    s.gifts.set(g.gift_id, g);
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.gift = g.gift_id;
    b.innerHTML = `${icons[g.gift_id] ?? "🎁"} <span></span> <small>${g.price}</small>`;
    b.querySelector("span").textContent = g.name;
    b.disabled = s.user === s.anchor; // no gifts to yourself (20003)
    b.onclick = guard($("gift-error"), () => sendGift(g));
    box.append(b);
  }
}

// The gifts whose outcome is unknown (timed out, the connection dropped,
// 10409 in progress, 50000 retry, 10429 too fast — which does not say nothing
// was debited), by gift: the next click on the same gift retries it with its
// req_id, so that it moves coins at most once; another gift's outcome leaves
// it be.
const giftRetry = new Map();

async function sendGift(g) {
  const key = `${s.room}/${g.gift_id}/${s.anchor}`;
  const retry = giftRetry.get(key); // retried as it was first sent (the wallet replays by req_id alone)
  const pk = retry ? retry.pk : !!s.pkLive; // the room is in a PK: the gift scores for it
  const reqId = retry ? retry.reqId : randomId();
  try {
    const r = await s.client.gift({ roomId: s.room, giftId: g.gift_id, receiverId: s.anchor, count: 1, reqId, pk });
    giftRetry.delete(key);
    $("balance").textContent = r.balance;
  } catch (e) {
    const unknown = typeof e?.code !== "number" || e.code === 10409 || e.code === 50000 || e.code === 10429;
    if (unknown) giftRetry.set(key, { reqId, pk });
    else giftRetry.delete(key);
    throw e;
  }
}

async function loadProducts() {
  const d = await api("GET", "/pay/products");
  const sel = $("product");
  sel.replaceChildren();
  for (const p of d.products) {
    const o = document.createElement("option");
    o.value = p.product_id;
    o.dataset.coins = p.coins;
    o.textContent = `${p.name} (${(p.price / 100).toFixed(2)})`;
    sel.append(o);
  }
}

// Recharge through the mock provider (cmd/mockpay) when it answers: an order,
// then the provider's pay_url; the balance moves when its webhook reaches the
// node (biz 5570). Without a provider: dev credit, and the page says so. The
// order's req_id is kept until the recharge went through, so a press after a
// failure (a timeout, a 5xx) finds the same order rather than making another;
// the dev credit's req_id is the order's, so it credits once per order.
let recharging = null; // { product, reqId }

async function recharge() {
  const opt = $("product").selectedOptions[0];
  const note = $("pay-note");
  const product = Number(opt.value);
  if (recharging?.product !== product) recharging = { product, reqId: randomId() };
  let order = null;
  try {
    order = await api("POST", "/pay/orders", { product_id: product, channel: "mock", req_id: recharging.reqId });
    if (!order.pay_url) throw new Error("no pay_url: the node has no pay.provider_url");
    await fetch(order.pay_url, { method: "POST", mode: "no-cors" });
    recharging = null;
    note.textContent = `order ${order.order_id}: paid at the mock provider, waiting for its webhook…`;
    note.dataset.path = "provider";
  } catch (e) {
    // An order whose outcome is unknown (a timeout, a 5xx): press again,
    // the same order. Else dev credit (dev only: it needs auth.dev_tokens;
    // a provider refusing the connection did not pay; an order refused —
    // too many unpaid ones while no provider runs — was not made), once per
    // recharge (its req_id).
    if (!order && !(e instanceof ReplyError && e.code !== 50000)) throw e;
    const why = order?.pay_url ? "the mock provider is not running" : e.message;
    const d = await api("POST", "/dev/credit", { user_id: s.user, amount: Number(opt.dataset.coins), req_id: `demo-recharge-${recharging.reqId}` });
    recharging = null;
    $("balance").textContent = d.balance;
    note.textContent = `${why}: credited ${opt.dataset.coins} coins with dev credit instead.`;
    note.dataset.path = "dev";
  }
}

// An anchor's PK is an invitation: the bar shows once the other room's anchor
// accepts (the first 5558 push). An admin's pairing runs at once.
async function startPK() {
  const other = Number($("pk-room").value);
  const d = await api("POST", "/pk", { room_a: s.room, room_b: other, duration_s: 60 });
  const note = $("pk-note");
  note.dataset.pkId = d.pk_id;
  note.dataset.status = d.status;
  note.textContent = d.status === "invited"
    ? `invited room ${other}: waiting for its anchor to accept (${Math.round((d.expires_at - Date.now()) / 1000)} s)`
    : `PK with room ${other} running`;
}

function showInvite(d) {
  const box = $("pk-invite");
  box.dataset.pkId = d.pk_id;
  $("pk-invite-text").textContent = `room ${d.rooms[0]} (anchor ${d.inviter}) invites this room to a ${d.duration_s} s PK`;
  box.hidden = false;
}

async function answerInvite(verb) {
  const box = $("pk-invite");
  await api("POST", `/pk/${encodeURIComponent(box.dataset.pkId)}/${verb}`, {});
  box.hidden = true;
}

// ---- red-packet rain ----

// The anchor's control: create, prepare (debits the coins) and start a rain
// for this room; every page in the room then gets biz 5560. A rain created but
// refused at prepare (not enough coins) is kept and retried by the next press
// with the same numbers, so it does not stay behind as a stray unprepared rain.
async function makeRain() {
  const want = {
    total_amount: Number($("rain-total").value),
    total_count: Number($("rain-count").value),
    duration_s: Number($("rain-seconds").value),
  };
  const note = $("rain-note");
  const pending = s.pendingRain;
  let code;
  if (pending && JSON.stringify(pending.want) === JSON.stringify(want)) code = pending.code;
  else {
    if (pending) {
      // Other numbers: the rain left behind is cancelled first (its coins
      // back if it was prepared) — unless it started after all (its start's
      // reply lost) or is over.
      try {
        await api("POST", `/redpackets/${pending.code}/cancel`, {});
      } catch (e) {
        const v = await api("GET", `/redpackets/${encodeURIComponent(pending.code)}`);
        if (v.state !== "RUNNING" && v.state !== "FINISHED") throw e;
      }
      s.pendingRain = null;
      await refreshWallet();
    }
    code = (await api("POST", `/rooms/${s.room}/redpackets`, want)).code;
    s.pendingRain = { code, want };
  }
  note.dataset.code = code;
  try {
    await api("POST", `/redpackets/${code}/prepare`, {}); // again for a prepared rain: its answer, nothing debited twice
  } catch (e) {
    if (e instanceof ReplyError && e.code === 20001) {
      throw new Error(`not enough coins for a ${want.total_amount}-coin rain: recharge, then press again`);
    }
    throw e;
  }
  await refreshWallet(); // the debit has no push: read the balance
  // Pending until it started: a start refused (another rain running) or
  // unanswered is tried again with this rain by the next press, never a new
  // rain prepared (debited) on top of it.
  const r = await api("POST", `/redpackets/${code}/start`, {});
  s.pendingRain = null;
  note.dataset.state = r.state;
  if (r.state !== "RUNNING") {
    note.textContent = `the rain is ${r.state.toLowerCase()} (cancelled or over elsewhere)`;
    return;
  }
  note.textContent = `raining: ${want.total_count} packets, ${want.total_amount} coins, ${want.duration_s} s`;
}

// A page that joins while a rain runs learns its code from room info.
async function joinRunningRain(code) {
  const r = await api("GET", `/redpackets/${encodeURIComponent(code)}`);
  if (r.state === "RUNNING" && r.ends_at > Date.now()) startRain({ code: r.code, total_count: r.total_count, ends_at: r.ends_at });
}

const maxPackets = 24; // elements on screen; a bigger rain recycles them

function startRain(d) {
  if (s.rain?.code === d.code) return;
  stopRain();
  const box = $("rain");
  const n = Math.min(d.total_count, maxPackets);
  for (let i = 0; i < n; i++) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "packet";
    b.textContent = "🧧";
    b.setAttribute("aria-label", `red packet ${i + 1} of ${n}: grab it`);
    const fall = 2.8 + Math.random() * 1.6;
    b.style.left = `${4 + ((i + Math.random()) * 88) / n}%`;
    b.style.setProperty("--fall", `${fall.toFixed(2)}s`);
    b.style.setProperty("--delay", `${(-Math.random() * fall).toFixed(2)}s`); // already on its way
    b.style.setProperty("--rest", `${20 + Math.round(Math.random() * 100)}px`);
    b.onclick = () => grabPacket(b);
    box.append(b);
  }
  box.hidden = false;
  const result = $("rain-result");
  result.textContent = "";
  delete result.dataset.outcome;
  delete result.dataset.amount;
  const st = $("rain-status");
  st.dataset.code = d.code;
  st.dataset.state = "running";
  const tick = () => {
    const left = Math.max(0, Math.ceil((d.ends_at - Date.now()) / 1000));
    st.textContent = `🧧 Red-packet rain: ${d.total_count} packets, tap one! ${left} s left`;
  };
  tick();
  s.rain = {
    code: d.code,
    total: d.total_count,
    grabbing: false,
    tick: setInterval(tick, 1000),
    // 5561 ends it; should that push not come (a reconnect lost it), stop a little after ends_at.
    timer: setTimeout(() => finishRain(null), Math.max(0, d.ends_at - Date.now()) + 5000),
  };
}

function stopRain() {
  if (!s.rain) return;
  clearInterval(s.rain.tick);
  clearTimeout(s.rain.timer);
  s.rain = null;
  $("rain").replaceChildren();
  $("rain").hidden = true;
}

const grabOutcomes = {
  30001: ["notstarted", "not started yet"],
  30002: ["taken", "already grabbed: one packet each"],
  30003: ["empty", "none left"],
  10429: ["slow", "too fast: try again"],
};

async function grabPacket(btn) {
  const rain = s.rain;
  if (!rain || rain.grabbing) return;
  rain.grabbing = true;
  const result = $("rain-result");
  try {
    const r = await s.client.grab(rain.code);
    result.dataset.outcome = "granted";
    result.dataset.amount = r.amount;
    result.textContent = `+${r.amount} coins!`;
    btn.remove();
  } catch (e) {
    const [outcome, text] = (e instanceof ReplyError && grabOutcomes[e.code]) || ["error", e instanceof ReplyError ? `${e.code}: ${e.msg}` : e.message];
    if (!(result.dataset.outcome === "granted" && outcome === "taken")) {
      result.dataset.outcome = outcome;
      result.textContent = text;
    }
    if (outcome !== "slow") btn.remove();
  } finally {
    rain.grabbing = false;
  }
}

function finishRain(d) {
  if (d && s.rain && s.rain.code !== d.code) return;
  const total = s.rain?.total;
  stopRain();
  const st = $("rain-status");
  if (!d) {
    if (st.dataset.state === "running") {
      st.dataset.state = "over";
      st.textContent = "the rain is over";
    }
    return;
  }
  st.dataset.code = d.code;
  st.dataset.state = "over";
  st.dataset.granted = d.granted_amount;
  const of = total ? ` of ${total}` : "";
  const back = d.refunded ? `, ${d.refunded} back to the anchor` : "";
  st.textContent = `Rain over: ${d.granted_count}${of} packets grabbed, ${d.granted_amount} coins${back}`;
  if ($("rain-note").dataset.code === d.code) $("rain-note").textContent = "the rain is over";
}

// ---- pushes ----

function onPush(p) {
  if (isBiz(p, Biz.Chat) && p.room === s.room) chatLine(p.d.from, p.d.text);
  else if (isBiz(p, Biz.Gift) && p.room === s.room && p.ack === false) showEffect(p.d);
  else if (isBiz(p, Biz.Gift) && p.d.to === s.user) refreshWallet().catch(() => {});
  else if (isBiz(p, Biz.GiftFailed)) $("gift-error").textContent = `gift failed: ${p.d.code} ${p.d.msg}`;
  else if (isBiz(p, Biz.WalletCredit)) {
    $("balance").textContent = p.d.balance;
    $("credit-note").textContent = `+${p.d.delta} coins (${p.d.reason})`;
  } else if (isBiz(p, Biz.PKProgress)) showPK(p.d);
  else if (isBiz(p, Biz.PKInvite)) showInvite(p.d);
  else if (isBiz(p, Biz.RainStarted) && p.room === s.room) startRain(p.d);
  else if (isBiz(p, Biz.RainFinished) && p.room === s.room) finishRain(p.d);
  else if (isBiz(p, Biz.RoomClosed) && p.d.room_id === s.room) {
    clearInterval(s.refresh); // nothing to poll in a closed room
    system(`the room was closed (${p.d.reason})`);
  }
}

function onState(e) {
  const el = $("state");
  if (e.state === "connected") {
    el.textContent = `connected to ${e.hello.node} as user ${e.hello.user_id}`;
    el.className = "state ok";
  } else if (e.state === "reconnecting") {
    el.textContent = `reconnecting (attempt ${e.attempt})…`;
    el.className = "state bad";
  } else if (e.state === "closed") {
    el.textContent = "closed" + (e.error ? `: ${e.error.message}` : "");
    el.className = "state bad";
  } else if (e.state === "room_dropped") system(`room ${e.room} is gone: ${e.error.message}`);
  else if (e.state === "room_resync" && e.room === s.room) resync().catch(() => {});
}

// resync reloads what pushes carry after some were missed (a re-join that
// could not recover them, or a gap): the online count, the PK, a running
// rain, the wallet.
async function resync() {
  system("some pushes were missed: reloading the room");
  const info = await api("GET", `/rooms/${s.room}`);
  $("online").textContent = info.online;
  if (info.pk_opponent) $("pk").hidden = false;
  s.pkLive = !!info.pk_opponent;
  if (info.redpacket_code) await joinRunningRain(info.redpacket_code).catch(() => {});
  await refreshWallet();
}

function chatLine(from, text) {
  const li = document.createElement("li");
  li.className = from === s.user ? "mine" : "";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = from === s.anchor ? `anchor ${from}` : `user ${from}`;
  li.append(who, document.createTextNode(text));
  const log = $("chat-log");
  log.append(li);
  while (log.children.length > 200) log.firstChild.remove();
  log.scrollTop = log.scrollHeight;
}

function system(text) {
  const li = document.createElement("li");
  li.className = "sys";
  li.textContent = text;
  $("chat-log").append(li);
}

function showEffect(d) {
  const g = s.gifts.get(d.gift_id);
  const div = document.createElement("div");
  div.className = "effect";
  div.dataset.gift = d.gift_id;
  div.dataset.from = d.from;
  const n = d.combo && d.combo > 1 ? ` combo ×${d.combo}` : "";
  div.innerHTML = `<span class="icon">${icons[d.gift_id] ?? "🎁"}</span> <span class="text"></span>`;
  div.querySelector(".text").textContent = `user ${d.from} → ${g ? g.name : "gift " + d.gift_id} ×${d.count}${n}`;
  const box = $("effects");
  box.append(div);
  while (box.children.length > 6) box.firstChild.remove();
}

// pkSeq is the highest seq shown per PK: a late 5558 (pushes of one PK may
// come through different nodes) must not show older scores or undo "over".
const pkSeq = new Map();

function showPK(d) {
  if (typeof d.seq === "number") {
    if (d.seq < (pkSeq.get(d.pk_id) ?? -1)) return; // lower: older (the end may repeat the last seq)
    pkSeq.set(d.pk_id, d.seq);
  }
  $("pk").hidden = false;
  s.pkLive = !d.over; // the bar keeps the final score; gifts after it do not claim the PK
  if (d.pk_id === $("pk-note").dataset.pkId) $("pk-note").textContent = d.over ? "PK over" : "PK running";
  const ours = d.scores[String(s.room)] ?? 0;
  const other = Object.entries(d.scores).find(([r]) => r !== String(s.room));
  const theirs = other ? other[1] : 0;
  const total = ours + theirs;
  $("pk-ours").style.width = total ? `${(100 * ours) / total}%` : "50%";
  $("pk-left").textContent = `this room ${ours}`;
  $("pk-right").textContent = other ? `room ${other[0]} ${theirs}` : "";
}

// ---- wiring ----

function guard(errEl, fn) {
  let busy = false;
  return async (ev) => {
    ev?.preventDefault?.();
    // One at a time: a second click while the first runs is ignored (two
    // clicks on Recharge made two orders and paid both; on "Make it rain",
    // a stray rain).
    if (busy) return;
    busy = true;
    errEl.textContent = "";
    try {
      await fn();
    } catch (e) {
      errEl.textContent = e instanceof ReplyError ? `${e.code}: ${e.msg}` : e.message;
    } finally {
      busy = false;
    }
  };
}

async function main() {
  try {
    s.cfg = (await (await fetch("config.json")).json()).data;
  } catch (e) {
    $("lobby-error").textContent = `the node's config could not be loaded: ${e.message}; reload the page`;
    return;
  }
  const q = new URLSearchParams(location.search);
  $("user").value = q.get("user") ?? String(1000 + Math.floor(Math.random() * 9000));
  if (q.get("role")) $("role").value = q.get("role");
  if (q.get("room")) $("room-input").value = q.get("room");
  $("open").onclick = guard($("lobby-error"), openAsAnchor);
  $("join").onclick = guard($("lobby-error"), joinAsViewer);
  $("who").onsubmit = (e) => e.preventDefault();
  $("chat-form").onsubmit = guard($("gift-error"), async () => {
    const text = $("chat-input").value.trim();
    if (!text) return;
    // The text stays in the box until it is sent, and a retry of the same
    // text (after a timeout, a reconnect) carries the same req_id: posted once.
    if (s.chatPending?.text !== text) s.chatPending = { text, reqId: randomId() };
    await s.client.chat(s.room, text, { reqId: s.chatPending.reqId });
    s.chatPending = null;
    if ($("chat-input").value.trim() === text) $("chat-input").value = "";
  });
  $("recharge").onclick = guard($("pay-note"), recharge);
  $("pk-go").onclick = guard($("gift-error"), startPK);
  $("pk-accept").onclick = guard($("gift-error"), () => answerInvite("accept"));
  $("pk-decline").onclick = guard($("gift-error"), () => answerInvite("decline"));
  $("rain-start").onsubmit = guard($("rain-note"), makeRain);
  if (!s.cfg.dev_tokens) $("lobby-error").textContent = "this node has dev tokens off: the demo needs auth.dev_tokens";
  await listRooms();
  document.body.dataset.ready = "1";
}

main();

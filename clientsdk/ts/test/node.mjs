// Test helpers: a real LiveEdge node as a subprocess (the binary in
// $LIVEEDGE_BIN, else built once from ../../cmd/liveedge into a temp dir) on
// free 127.0.0.1 ports with a temp data dir, plus polling and HTTP helpers.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer, connect as netConnect } from "node:net";
import { fileURLToPath } from "node:url";

const repo = fileURLToPath(new URL("../../../", import.meta.url));

let built;
export function binary() {
  if (process.env.LIVEEDGE_BIN && existsSync(process.env.LIVEEDGE_BIN)) return process.env.LIVEEDGE_BIN;
  if (!built) {
    const dir = mkdtempSync(join(tmpdir(), "liveedge-bin-"));
    built = join(dir, "liveedge");
    execFileSync("go", ["build", "-o", built, "./cmd/liveedge"], { cwd: repo, stdio: "inherit" });
  }
  return built;
}

/**
 * A free 127.0.0.1 port below the kernel's ephemeral range (32768–60999 by
 * default): a port from that range (listen on 0) can be taken meanwhile by
 * any outgoing connection — a node restarted on its ports, or a server
 * started on one, then finds it in use.
 */
export async function freePort() {
  const from = 12000, n = 20000;
  const start = Math.floor(Math.random() * n);
  for (let i = 0; i < 200; i++) {
    const port = from + ((start + i) % n);
    const ok = await new Promise((resolve) => {
      const s = createServer();
      s.once("error", () => resolve(false));
      s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
    });
    if (ok) return port;
  }
  throw new Error("no free port");
}

/** Polls cond (sync or async) every 10 ms until it is truthy or timeoutMs passes. */
export async function eventually(cond, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let v;
    try {
      v = await cond();
    } catch (e) {
      v = false;
      if (Date.now() > deadline) throw e;
    }
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A LiveEdge node process: start, stop (SIGTERM: drain, close 1001), restart on the same ports and data. */
export class Node {
  constructor(env = {}) {
    this.env = env;
    this.dir = mkdtempSync(join(tmpdir(), "liveedge-ts-"));
    this.proc = null;
    this.out = "";
  }
  async start() {
    if (!this.httpPort) {
      this.httpPort = await freePort();
      do this.wsPort = await freePort();
      while (this.wsPort === this.httpPort);
    }
    this.http = `http://127.0.0.1:${this.httpPort}`;
    this.ws = `ws://127.0.0.1:${this.wsPort}/ws`;
    const env = {
      ...process.env,
      LIVEEDGE_HTTP_ADDR: `127.0.0.1:${this.httpPort}`,
      LIVEEDGE_WS_ADDR: `127.0.0.1:${this.wsPort}`,
      LIVEEDGE_NODE_DATA_DIR: this.dir,
      LIVEEDGE_ROOMS_OPEN_CLOSE_INTERVAL: "0s",
      LIVEEDGE_LIMITS_CHAT_PER_SECOND: "0",
      LIVEEDGE_SHUTDOWN_DRAIN_TIMEOUT: "2s",
      LIVEEDGE_PAY_PROVIDER_URL: "",
      LIVEEDGE_LOG_LEVEL: "warn",
      ...this.env,
    };
    const p = spawn(binary(), [], { env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = p;
    this.exited = new Promise((r) => p.on("exit", (code, sig) => r({ code, sig })));
    p.stdout.on("data", (b) => (this.out += b));
    p.stderr.on("data", (b) => (this.out += b));
    let dead = false;
    this.exited.then(() => (dead = true));
    await eventually(
      async () => {
        if (dead) throw new Error("node exited:\n" + this.out);
        const r = await fetch(this.http + "/readyz");
        return r.status === 200;
      },
      30000,
      "node ready",
    );
  }
  async stop() {
    if (!this.proc) return;
    this.proc.kill("SIGTERM");
    const r = await this.exited;
    this.proc = null;
    return r;
  }
  async restart() {
    await this.stop();
    await this.start();
  }
  /** SIGKILL (no drain, no close frames: the connections just break); start() again on the same ports and data. */
  async kill() {
    if (!this.proc) return;
    this.proc.kill("SIGKILL");
    const r = await this.exited;
    this.proc = null;
    return r;
  }
  async destroy() {
    if (this.proc) {
      this.proc.kill("SIGKILL");
      await this.exited;
      this.proc = null;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** POST/GET JSON with an optional bearer token; returns {status, body}. */
  async api(method, path, token, body) {
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const r = await fetch(this.http + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    return { status: r.status, body: await r.json() };
  }
  async token(userId, role = "viewer") {
    const r = await this.api("POST", "/api/v1/dev/token", "", { user_id: userId, role });
    if (r.status !== 200) throw new Error("dev token: " + JSON.stringify(r));
    return r.body.data.token;
  }
  async openRoom(anchorId) {
    const r = await this.api("POST", "/api/v1/rooms", await this.token(anchorId, "anchor"), { type: 1 });
    if (r.status !== 200) throw new Error("open room: " + JSON.stringify(r));
    return r.body.data.room_id;
  }
  /** The value of a Prometheus counter on /metrics (0 when absent). */
  async metric(name) {
    const text = await (await fetch(this.http + "/metrics")).text();
    const m = text.match(new RegExp("^" + name + "(?:\\{[^}]*\\})? (\\S+)$", "m"));
    return m ? Number(m[1]) : 0;
  }
}

/** Connects to 127.0.0.1:port; resolves true when it accepts, false when refused. */
function canConnect(port) {
  return new Promise((resolve) => {
    const s = netConnect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/** Runs one Redis command (RESP) on 127.0.0.1:port and resolves with the raw reply. */
export function redisCommand(port, ...args) {
  return new Promise((resolve, reject) => {
    const s = netConnect(port, "127.0.0.1");
    let out = "";
    s.once("error", reject);
    s.on("data", (b) => {
      out += b;
      if (out.endsWith("\r\n")) {
        s.destroy();
        resolve(out);
      }
    });
    s.write(`*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`).join(""));
  });
}

/** A throwaway server process (redis-server, nats-server) on a free port, killed by stop(). */
class Service {
  constructor(name, args) {
    this.name = name;
    this.args = args;
    this.out = "";
  }
  async start() {
    // A port taken between choosing and binding it: the server exits, and
    // another port is tried (a binary that cannot be run is not retried).
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.startOnce();
      } catch (e) {
        if (attempt === 3 || e.spawnFailed) throw e;
        await this.stop();
      }
    }
  }
  async startOnce() {
    this.port = await freePort();
    this.dir = mkdtempSync(join(tmpdir(), `liveedge-${this.name}-`));
    const p = spawn(this.name, this.args(this), { stdio: ["ignore", "pipe", "pipe"] });
    this.proc = p;
    p.stdout.on("data", (b) => (this.out += b));
    p.stderr.on("data", (b) => (this.out += b));
    let dead = false;
    let spawnErr;
    this.exited = new Promise((r) => {
      p.on("exit", () => r((dead = true)));
      // Not started (ENOENT...): no "exit" follows an "error" then.
      p.on("error", (e) => {
        this.out += String(e);
        spawnErr = e;
        r((dead = true));
      });
    });
    const deadline = Date.now() + 10000;
    for (;;) {
      if (dead) {
        const e = new Error(`${this.name} exited:\n${this.out}`);
        e.spawnFailed = !!spawnErr;
        throw e;
      }
      if (await canConnect(this.port)) {
        // The listener may be another process's: ours must still run.
        await new Promise((r) => setTimeout(r, 100));
        if (!dead) return this;
        continue;
      }
      if (Date.now() > deadline) throw new Error(`${this.name} not listening on ${this.port} within 10 s:\n${this.out}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  async stop() {
    if (this.proc) {
      this.proc.kill("SIGKILL");
      await this.exited;
      this.proc = null;
    }
    if (this.dir) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A real redis-server on a free port, no persistence. */
export function startRedis() {
  return new Service("redis-server", (s) => ["--port", String(s.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).start();
}

/** A real nats-server on a free port, JetStream in a temp dir. */
export function startNats() {
  return new Service("nats-server", (s) => ["-a", "127.0.0.1", "-p", String(s.port), "-js", "-sd", s.dir]).start();
}

/** The environment of a cluster-mode node (PROTOCOL §8) on redis and nats. */
export function clusterEnv(redis, nats, nodeId = "gw-1") {
  return {
    LIVEEDGE_NODE_ID: nodeId,
    LIVEEDGE_CLUSTER_ENABLED: "true",
    LIVEEDGE_NATS_EMBEDDED: "false",
    LIVEEDGE_NATS_URL: `nats://127.0.0.1:${nats.port}`,
    LIVEEDGE_WALLET_MODE: "shared",
    LIVEEDGE_WALLET_NODES: nodeId,
    LIVEEDGE_REDIS_ADDR: `127.0.0.1:${redis.port}`,
  };
}

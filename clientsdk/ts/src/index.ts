// LiveEdge client SDK (browser entry: uses globalThis.WebSocket, no dependencies).
export * from "./protocol.js";
export * from "./client.js";

import { LiveClient, type ClientOptions } from "./client.js";

/** Connects (see LiveClient.connect) with the browser's WebSocket. */
export function connect(opts: ClientOptions): Promise<LiveClient> {
  return LiveClient.connect(opts);
}

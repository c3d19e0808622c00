// LiveEdge client SDK, Node entry: the same API with the ws package as the
// default WebSocket implementation.
import WebSocket from "ws";
import { LiveClient, type ClientOptions, type WebSocketCtor } from "./client.js";

export * from "./protocol.js";
export * from "./client.js";

/** Connects like LiveClient.connect, with ws unless options.WebSocket is given. */
export function connect(opts: ClientOptions): Promise<LiveClient> {
  return LiveClient.connect({ WebSocket: WebSocket as unknown as WebSocketCtor, ...opts });
}

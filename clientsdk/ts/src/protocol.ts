// The wire format of LiveEdge's WebSocket API (shared/PROTOCOL.md §3,
// docs/protocol.md), as gateway/proto implements it. Types only: this file
// emits no code.

/** The first frame of every connection. */
export interface Hello {
  user_id: number;
  node: string;
  heartbeat_s: number;
  /** Extension: the exact heartbeat. */
  heartbeat_ms?: number;
  /** Extension: the server will send batch frames. */
  batch?: boolean;
  session_id?: string;
  /**
   * Extension: how long the connection's token had left when the hello was
   * written (a refresh request hands it a later one).
   */
  expires_in_ms?: number;
}

/** Client → server: {"t":TYPE,"id":N,"d":{...}}. */
export interface RequestFrame {
  t: string;
  id: number;
  d: unknown;
}

/** Server reply: {"t":"reply","id":N,"code":0,"msg":"ok","d":{...}}. */
export interface ReplyFrame {
  t: "reply";
  id: number;
  code: number;
  msg: string;
  d: unknown;
}

/** Server push: {"t":"push","mid":"...","biz":B,"room":R,"d":{...},"ack":bool}. */
export interface PushFrame {
  t: "push";
  mid: string;
  biz: number;
  room: number;
  d: unknown;
  ack: boolean;
  /** Room offset (1, 2, 3, … per room) when the server numbers room pushes. */
  off?: number;
  /** Epoch of the room's numbering. */
  ep?: string;
}

export interface HelloFrame {
  t: "hello";
  d: Hello;
}

/** Extension (?batch=1): several server frames in one text frame. */
export interface BatchFrame {
  t: "batch";
  d: ServerFrame[];
}

export type ServerFrame = HelloFrame | ReplyFrame | PushFrame | BatchFrame;

/** Push biz codes. */
export const Biz = {
  Chat: 5555,
  Gift: 5556,
  GiftFailed: 5557,
  PKProgress: 5558,
  /** Extension: the room was closed by its anchor. */
  RoomClosed: 5559,
  RainStarted: 5560,
  RainFinished: 5561,
  /** Extension: a PK invitation to the invited room's anchor (ack). */
  PKInvite: 5562,
  WalletCredit: 5570,
  OrderStatus: 5580,
} as const;

export interface ChatPush {
  from: number;
  text: string;
}
export interface GiftPush {
  from: number;
  to: number;
  gift_id: number;
  count: number;
  effect_url: string;
  /** Extension: gifts merged into this effect. */
  combo?: number;
  order_id?: string;
}
export interface GiftFailedPush {
  req_id: string;
  code: number;
  msg: string;
}
export interface PKProgressPush {
  pk_id: string;
  scores: Record<string, number>;
  seq: number;
  /** When the contest ends (unix ms). */
  ends_at?: number;
  /** The end: comes once, with the winner. */
  over?: boolean;
  /** With over: the winning room, 0 = a draw. */
  winner?: number;
}
/** Extension: a PK invitation, to the invited room's anchor. */
export interface PKInvitePush {
  pk_id: string;
  status: "invited";
  rooms: [number, number];
  inviter: number;
  duration_s: number;
  expires_at: number;
}
export interface RoomClosedPush {
  room_id: number;
  reason: string;
}
export interface RainStartedPush {
  code: string;
  total_count: number;
  ends_at: number;
}
export interface RainFinishedPush {
  code: string;
  granted_count: number;
  granted_amount: number;
  /** Extension: coins returned to the anchor (T − granted_amount). */
  refunded?: number;
}
export interface WalletCreditPush {
  balance: number;
  delta: number;
  reason: string;
}
export interface OrderStatusPush {
  order_id: string;
  status: string;
}

/** The d of each known biz. */
export interface PushData {
  5555: ChatPush;
  5556: GiftPush;
  5557: GiftFailedPush;
  5558: PKProgressPush;
  5559: RoomClosedPush;
  5560: RainStartedPush;
  5561: RainFinishedPush;
  5562: PKInvitePush;
  5570: WalletCreditPush;
  5580: OrderStatusPush;
}

/** Room position of PROTOCOL §3 (room offsets). */
export interface Since {
  off: number;
  ep: string;
}

export interface JoinReply {
  room_id: number;
  online: number;
  off?: number;
  ep?: string;
  /** Set when the join carried since: true = the missed pushes follow. */
  recovered?: boolean;
}
export interface ChatReply {
  mid: string;
}
export interface GiftReply {
  order_id: string;
  balance: number;
}
export interface PingReply {
  ts: number;
}
/** A packet grabbed: its amount, credited (durably) before this reply. */
export interface GrabReply {
  amount: number;
  msg: string;
}

/** Reply codes of a grab that got nothing (docs/protocol.md). */
export const GrabError = {
  /** Unknown code, or the rain has not started. */
  NotStarted: 30001,
  /** You already got a packet of this rain. */
  AlreadyGrabbed: 30002,
  /** None left, or the rain is over. */
  NoneLeft: 30003,
} as const;

/** Requests and their reply d. */
export interface Requests {
  ping: [Record<string, never>, PingReply];
  join: [{ room_id: number; since?: Since }, JoinReply];
  leave: [{ room_id: number }, Record<string, never>];
  /** req_id (extension): a retry with the same req_id posts once and answers the first mid. */
  chat: [{ room_id: number; text: string; req_id?: string }, ChatReply];
  /** pk (extension): count the gift towards the room's running PK score. */
  gift: [{ room_id: number; gift_id: number; receiver_id: number; count: number; req_id: string; pk?: boolean }, GiftReply];
  grab: [{ code: string }, GrabReply];
  /** Extension: a new token for the open connection (the clients send it themselves with getToken). */
  refresh: [{ token: string }, RefreshReply];
}

/** Reply d of refresh: how long the connection's token now has left. */
export interface RefreshReply {
  expires_in_ms: number;
}

/** WebSocket close codes (gateway/proto/close.go). */
export const Close = {
  Normal: 1000,
  GoingAway: 1001,
  Abnormal: 1006,
  TooBig: 1009,
  Abuse: 4400,
  HeartbeatTimeout: 4402,
  SlowConsumer: 4408,
  Replaced: 4409,
  TokenExpired: 4501,
} as const;

/** Whether a client should reconnect after this close code (45xx are terminal). */
export function reconnectable(code: number): boolean {
  return code < 4500;
}

/** Limits of client frames. */
export const MaxAckMids = 1024;

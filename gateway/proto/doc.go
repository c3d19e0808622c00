// Package proto is LiveEdge's wire contract (../shared/PROTOCOL.md, docs/protocol.md):
// frame types, reply and close codes, push biz codes, and the encoders and
// decoders of WebSocket frames. It holds no state and is safe for concurrent use.
//
// The gateway, the router (which encodes a room push once for all its viewers),
// the business packages and the client SDK all speak through this package, so a
// frame has exactly one definition.
package proto

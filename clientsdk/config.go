package clientsdk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"time"
)

// Defaults applied to zero fields of Config.
const (
	DefaultRequestTimeout = 10 * time.Second
	DefaultReconnectMin   = 100 * time.Millisecond
	DefaultReconnectMax   = 5 * time.Second
	DefaultDedupWindow    = 16384
	DefaultEventBuffer    = 1024
)

// Config configures a Client. The zero value of every field but URL (or
// URLs) is usable.
type Config struct {
	// URL of the gateway's WebSocket endpoint: "ws://host:port/ws" (wss works
	// too). Query parameters already in it are kept; batch is set by the
	// client (the token goes in an Authorization header, never in the URL). URL alone is the same as URLs with one entry.
	URL string

	// URLs are the WebSocket endpoints of several nodes of one cluster (each
	// ws:// or wss://, like URL). When both are set, URL comes first in the
	// list; duplicates are ignored. Dial tries them in turn, starting at a
	// random one, until one connects; after a disconnect the client moves on
	// to another URL chosen at random, then round the list (so the clients
	// of a node that went away spread over the others), see ReconnectMin.
	URLs []string

	// PreferURL makes Dial try URL first, then URLs in list order, instead
	// of starting at a random one: a client that prefers one node (the
	// nearest, or the one a load balancer or a test assigned) and falls
	// back on the others. After a disconnect the client still moves on to
	// another URL, as without it.
	PreferURL bool

	// Token is sent in the upgrade request's Authorization header (not in
	// the URL, which access logs keep) at every (re)connect. Ignored when TokenFunc is
	// set. With a static Token an HTTP 401 on reconnect is terminal.
	Token string

	// TokenFunc, when set, is called before every (re)connect for a fresh
	// token; an error from it counts as a failed connection attempt. With a
	// TokenFunc an HTTP 401 on reconnect is retried with backoff (the next call
	// may return a valid token); on the first connect the next URL is tried
	// with a new token (TokenExpired), and Dial fails once every URL
	// refused. With a
	// TokenFunc a close 4501 (the gateway closes a connection when its token
	// expires) is not terminal either: the client reconnects, asking
	// TokenFunc for a new token. With a static Token 4501 stops the client.
	// It is also called shortly before an open connection's token ends (a
	// minute, or a quarter of a shorter token's life, with jitter): the
	// new token — newly issued, ending later than the last — is handed to
	// the node in a refresh request and the connection goes on; a refresh
	// that fails (or ends no later) is tried again at half the time left
	// while at least 2 s are left, then the node closes 4501 as above.
	// TokenReason(ctx) says why it is called (connect, reconnect, expired:
	// the last token was refused or ended, refresh). It may run beside the
	// app's own calls: make it safe for concurrent use, and return when
	// ctx ends (Close waits for a call under way).
	TokenFunc func(ctx context.Context) (string, error)

	// NoBatch, when true, does not ask for batch frames. The zero value asks
	// for them (?batch=1).
	NoBatch bool

	// RequestTimeout bounds a request whose context has no deadline (including
	// the wait for a connection), each connection attempt (dial, upgrade and
	// hello) and each frame write. A request returns when its context ends,
	// even while its frame is being written (a write blocks only while the
	// server reads nothing), but the write itself goes on in the background:
	// a frame cut off half-way would end the connection, so a short context
	// does not cut it. A frame not written within RequestTimeout fails, and
	// the connection is closed (the client reconnects). Zero means
	// DefaultRequestTimeout (10 s).
	RequestTimeout time.Duration

	// ReconnectMin and ReconnectMax bound the reconnect backoff. Reconnect
	// attempts go in rounds, one attempt per URL, starting with the URL after
	// the one that was connected. Round n starts after a uniformly random wait
	// in [0, min(ReconnectMax, ReconnectMin·2^(n-1))] ("full jitter"); within a
	// round, each further URL is tried after a random wait in
	// [ReconnectMin/2, ReconnectMin] (no full backoff before trying another
	// node, but a bounded attempt rate). With one URL every attempt is a
	// round of its own. Zero means 100 ms and 5 s.
	ReconnectMin time.Duration
	ReconnectMax time.Duration

	// DedupWindow is how many recent push mids are remembered for
	// de-duplication. Zero means DefaultDedupWindow (16384). The memory
	// grows with the mids seen, up to the window (an idle client holds
	// none of it).
	DedupWindow int

	// EventBuffer is the capacity of the queue between the connection's reader
	// and the callback goroutine. Zero means DefaultEventBuffer (1024). When it
	// is full the reader blocks (see the package documentation). An empty
	// slot costs a pointer (8 KiB for 1024).
	EventBuffer int

	// OnPush receives each push once, from one goroutine, in arrival order.
	// Nil discards pushes (they are still acknowledged).
	OnPush func(Push)

	// OnState receives connection state changes, from the same goroutine as
	// OnPush. Nil discards them.
	OnState func(StateEvent)

	// Logger receives diagnostics. Nil discards them. Tokens are never logged.
	Logger *slog.Logger

	// HeartbeatInterval is how often the client makes sure it has sent
	// something (a ping request when idle) so that the gateway does not close
	// it as silent, and that it has read something: it pings too when nothing
	// came from the node for half an interval, however much it wrote (a node
	// that keeps the TCP connection but answers nothing is left). Zero means
	// half the heartbeat_s of the server's hello (no heartbeat if the hello
	// has none); a negative value disables heartbeats. Whatever this is, a
	// request that times out makes the client ping at once. A ping unanswered
	// within RequestTimeout closes the connection (and the client reconnects)
	// unless a reply was read since it went out (a node applying
	// backpressure answers late but keeps replying: it is kept); while only
	// pushes come, a reply is waited for up to 3 × RequestTimeout from the
	// ping (a slow link's replies come behind the room's queued pushes).
	HeartbeatInterval time.Duration

	// LocalAddr, when set, is the local address every connection is dialed
	// from (e.g. &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}: a load generator
	// spreads its connections over several source addresses so that the
	// ephemeral ports of one do not run out). Nil lets the system choose.
	LocalAddr net.Addr

	urls []string // URL then URLs, validated, without duplicates (withDefaults)
}

func (cfg Config) withDefaults() (Config, error) {
	cfg.urls = nil
	for i, raw := range append([]string{cfg.URL}, cfg.URLs...) {
		field := "Config.URL"
		if i > 0 {
			field = fmt.Sprintf("Config.URLs[%d]", i-1)
		} else if raw == "" {
			continue // URLs only
		}
		u, err := url.Parse(raw)
		if err != nil {
			return cfg, fmt.Errorf("clientsdk: %s: %w", field, err)
		}
		if u.Scheme != "ws" && u.Scheme != "wss" {
			return cfg, fmt.Errorf("clientsdk: %s: scheme must be ws or wss, not %q", field, u.Scheme)
		}
		if u.Host == "" {
			return cfg, fmt.Errorf("clientsdk: %s: no host", field)
		}
		if !slices.Contains(cfg.urls, raw) {
			cfg.urls = append(cfg.urls, raw)
		}
	}
	if len(cfg.urls) == 0 {
		return cfg, errors.New("clientsdk: Config.URL and Config.URLs are empty")
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = DefaultReconnectMin
	}
	if cfg.ReconnectMax <= 0 {
		cfg.ReconnectMax = DefaultReconnectMax
	}
	if cfg.ReconnectMax < cfg.ReconnectMin {
		cfg.ReconnectMax = cfg.ReconnectMin
	}
	if cfg.DedupWindow <= 0 {
		cfg.DedupWindow = DefaultDedupWindow
	}
	if cfg.EventBuffer <= 0 {
		cfg.EventBuffer = DefaultEventBuffer
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg, nil
}

// dialURL is URL i of the list with the batch parameter set (a token put in
// it by hand is dropped: the token is the Authorization header's).
func (cfg *Config) dialURL(i int) (string, error) {
	u, err := url.Parse(cfg.urls[i])
	if err != nil {
		return "", err
	}
	q := u.Query()
	q.Del("token")
	if cfg.NoBatch {
		q.Del("batch")
	} else {
		q.Set("batch", "1")
	}
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// redactedURL is URL i of the list without its query (which may carry a
// token put there by hand), for errors, logs and state events.
func (cfg *Config) redactedURL(i int) string {
	u, err := url.Parse(cfg.urls[i])
	if err != nil {
		return "?"
	}
	u.RawQuery, u.User = "", nil
	return u.String()
}

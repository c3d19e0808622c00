// Package configs holds LiveEdge's node configuration: the YAML files beside this
// file (single.yaml is the embedded default) and the Config struct they load into.
//
// Precedence: built-in defaults (Default) < YAML file < environment variables named
// LIVEEDGE_<SECTION>_<KEY> (e.g. LIVEEDGE_WS_ADDR, LIVEEDGE_AUTH_DEV_TOKENS=false).
package configs

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

//go:embed single.yaml
var singleYAML []byte

// Duration is a time.Duration written as "30s" in YAML and env.
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML parses "30s" style durations.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*d = Duration(v)
	return nil
}

// Config is one node's configuration. Zero values are replaced by Default's.
type Config struct {
	Node     Node     `yaml:"node"`
	HTTP     HTTP     `yaml:"http"`
	WS       WS       `yaml:"ws"`
	Auth     Auth     `yaml:"auth"`
	NATS     NATS     `yaml:"nats"`
	Rooms    Rooms    `yaml:"rooms"`
	Cluster  Cluster  `yaml:"cluster"`
	Limits   Limits   `yaml:"limits"`
	Gifts    Gifts    `yaml:"gifts"`
	Wallet   Wallet   `yaml:"wallet"`
	Pay      Pay      `yaml:"pay"`
	Tickets  Tickets  `yaml:"tickets"`
	Redis    Redis    `yaml:"redis"`
	Shutdown Shutdown `yaml:"shutdown"`
	Log      Log      `yaml:"log"`

	RedPacket RedPacket `yaml:"redpacket"` // red-packet rains
}

// Node identifies the node and where it keeps its files.
type Node struct {
	ID      string `yaml:"id"`       // node name in hello frames and metrics
	DataDir string `yaml:"data_dir"` // Pebble (DataDir/pebble) and JetStream (DataDir/nats)
	// GOGC is the process's garbage-collector target percentage (0 = leave
	// the runtime's, i.e. the GOGC environment variable or 100). A gateway's
	// live heap is small and its allocation rate high: collecting less often
	// buys throughput for a heap a few times its live size.
	GOGC int `yaml:"gogc"`
	// BlockCacheMB is the ledger's (Pebble's) cache for table blocks, in
	// MiB, beside its two 32 MiB memtables (0 = 128).
	BlockCacheMB int `yaml:"block_cache_mb"`
	// WALMinSync is the least time between two fsyncs of the ledger's WAL
	// (0 = each as soon as asked, up to 10ms): a commit asked for sooner
	// waits and shares the next fsync — fewer fsyncs and hand-offs per gift
	// for up to that much more latency (docs/performance.md, session 25).
	// An op is still answered only once its fsync is done.
	WALMinSync Duration `yaml:"wal_min_sync"`
	// IdleRelease: once the garbage collector has not run for this long (the
	// node is idle) and a collection could give back ≥ 4 MiB and ≥ a quarter
	// of the live heap (at most what was allocated since the last one, plus
	// free pages), the node collects once and returns the free pages to the
	// OS (0 = never); a release that no collection of the runtime's own
	// follows doubles the wait for the next (up to 16×). With gogc 400 an
	// idle node would otherwise keep a ramp's or a reconnect storm's garbage
	// resident for as long as it stays idle (the runtime's 2-minute forced
	// collection frees the objects but keeps their pages, up to about five
	// times the live heap).
	IdleRelease Duration `yaml:"idle_release"`
}

// HTTP is the Hertz API listener.
type HTTP struct {
	Addr         string `yaml:"addr"`
	MaxBodyBytes int    `yaml:"max_body_bytes"` // request bodies above this get 413
	Demo         bool   `yaml:"demo"`           // serve the demo page at /demo/ (off in production configs)
	// ReadTimeout bounds the read of a whole request, headers and body,
	// from its first byte (the connection's accept for the first one): past
	// it the connection is closed — a request trickled in a byte at a time
	// never holds a handler longer.
	ReadTimeout Duration `yaml:"read_timeout"`
	// MaxHeaderBytes bounds a request's headers (request line included):
	// more is answered 431 (10001) and the connection closed, before any
	// handler. Hertz's own default is 1 MiB, read (and buffered several
	// times over) before a token is looked at.
	MaxHeaderBytes int `yaml:"max_header_bytes"`
	// MaxConns bounds the API's open connections (each holds buffers for
	// its headers and body; the WebSocket listener has ws.max_conns): at
	// the bound the one idle longest makes room (closed), and when none is
	// idle a new one waits in the listen backlog.
	MaxConns int `yaml:"max_conns"`
	// MetricsToken, when set, is a bearer token that reads /metrics (a
	// Prometheus scraper's bearer token), beside an admin's JWT. With dev
	// tokens off /metrics answers no one else: its counts (rooms,
	// connections, errors) are the node's internals. With dev tokens on it
	// is open (make run, the tests, the load tools). Dev tokens off, a token
	// must be at least MinSecretBytes long and not a published value.
	MetricsToken string `yaml:"metrics_token"`
	// MetricsTokenFile, when set, names a file whose content (surrounding
	// white space trimmed) replaces MetricsToken; Load reads it.
	MetricsTokenFile string `yaml:"metrics_token_file"`
}

// WS is the WebSocket listener and per-connection limits.
type WS struct {
	Addr              string   `yaml:"addr"`
	Heartbeat         Duration `yaml:"heartbeat"`            // sent in hello; silent for 2× → close 4402
	SendQueueBytes    int      `yaml:"send_queue_bytes"`     // per-connection queue bound; overflow → close 4408
	WriteTimeout      Duration `yaml:"write_timeout"`        // one socket write blocked longer → close
	MaxFrameHardBytes int      `yaml:"max_frame_hard_bytes"` // frames above this close the connection (1009); 64 KiB..hard get 10001
	AbuseLimit        int      `yaml:"abuse_limit"`          // bad frames per minute before close 4400
	ResendAfter       Duration `yaml:"resend_after"`         // first resend of an unacked reliable push; doubles each try
	ResendMaxTries    int      `yaml:"resend_max_tries"`     // resends before giving up on a push (≥ 3)
	MaxRoomsPerConn   int      `yaml:"max_rooms_per_conn"`
	// OfflineMax reliable pushes are kept per user who is connected
	// nowhere, for OfflineTTL, and delivered when they connect (memory on
	// one node, Redis in a cluster; 0 = none kept).
	OfflineMax       int      `yaml:"offline_max"`
	OfflineTTL       Duration `yaml:"offline_ttl"`
	MaxConns         int      `yaml:"max_conns"`          // upgrades beyond this get 503
	MaxConnsPerUser  int      `yaml:"max_conns_per_user"` // one user's upgrades beyond this get 429 (code 10429)
	SocketSendBuffer int      `yaml:"socket_send_buffer"` // SO_SNDBUF per connection (0 = kernel autotuning)
	// ReadParkAfter: a connection silent this long has no reader goroutine;
	// its socket waits in the node's epoll until bytes arrive (Linux;
	// 0 = a reader goroutine for the connection's whole life).
	ReadParkAfter Duration `yaml:"read_park_after"`
	// HandshakeTimeout bounds the reading of an upgrade request's line and
	// headers from its first byte's wait (and the writing of a refusal): a
	// client slower than this is answered 408 and closed.
	HandshakeTimeout Duration `yaml:"handshake_timeout"`
}

// Auth configures tokens.
type Auth struct {
	// JWTSecret signs and verifies every token. With dev tokens off it must
	// be at least MinSecretBytes long and not a published value (DevSecret);
	// give it in LIVEEDGE_AUTH_JWT_SECRET or in a file (JWTSecretFile).
	JWTSecret string `yaml:"jwt_secret"`
	// JWTSecretFile, when set, names a file whose content (surrounding
	// white space trimmed) replaces JWTSecret; Load reads it.
	JWTSecretFile string `yaml:"jwt_secret_file"`
	DevTokens     bool   `yaml:"dev_tokens"` // enables /api/v1/dev/token (off in cluster.yaml, on in cluster-local.yaml)
	// MaxTokenTTL refuses a token whose exp is further than this from now
	// (0 = any exp): a leaked long-lived token, an admin's above all, would
	// otherwise stay good for as long as its issuer wrote (there is no
	// revocation list).
	MaxTokenTTL Duration `yaml:"max_token_ttl"`
}

// NATS configures the event bus.
type NATS struct {
	Embedded bool   `yaml:"embedded"` // run nats-server in process (JetStream under DataDir/nats)
	URL      string `yaml:"url"`      // external NATS when not embedded (tls://… for TLS)
	Listen   string `yaml:"listen"`   // embedded: also listen on this host:port ("" = in-process only)
	// The external server's credentials (at most one way): User and
	// Password, a Token, or a CredsFile (a NATS .creds file: JWT and NKey
	// seed). Nodes of a cluster trust what reaches them through NATS (a
	// forwarded request names its user), so a production NATS must admit
	// only them.
	User      string `yaml:"user"`
	Password  string `yaml:"password"`
	Token     string `yaml:"token"`
	CredsFile string `yaml:"creds_file"`
}

// Authenticated reports whether NATS credentials are configured (a user
// needs its password: a server without authorization admits any user name).
func (n NATS) Authenticated() bool {
	return n.User != "" && n.Password != "" || n.Token != "" || n.CredsFile != ""
}

// Rooms configures living rooms.
type Rooms struct {
	OpenCloseInterval Duration `yaml:"open_close_interval"` // per-anchor rate limit of open/close (0 = off)
	// HistorySize and HistoryTTL bound the pushes each room keeps for
	// `join` with `since` (per node in memory; in a cluster also in Redis).
	HistorySize int      `yaml:"history_size"`
	HistoryTTL  Duration `yaml:"history_ttl"`
}

// Cluster makes the node one of many sharing NATS and Redis (PROTOCOL §8):
// room pushes are numbered in Redis and carried between nodes by NATS,
// presence is in Redis. Needs redis.addr and an external NATS.
type Cluster struct {
	Enabled     bool     `yaml:"enabled"`
	GapWait     Duration `yaml:"gap_wait"`     // wait for a missing room offset before reading it from history
	PresenceTTL Duration `yaml:"presence_ttl"` // a dead node's presence stops counting within this
	Linger      Duration `yaml:"linger"`       // a room's subscription outlives its last local member by this
	// TrustedNetwork lets a production node (dev tokens off) reach a shared
	// Redis or NATS without credentials, for a network that alone keeps
	// everyone else out of them: every node runs what reaches it through
	// them (a forwarded refund, a rain started as any anchor, pushes to any
	// room). Off, such a node refuses to start.
	TrustedNetwork bool `yaml:"trusted_network"`
}

// Limits are per-user rate limits (PROTOCOL.md §6); 0 turns a limit off.
type Limits struct {
	ChatPerSecond int `yaml:"chat_per_second"` // chat frames per user per second (burst = same)
	GiftPerSecond int `yaml:"gift_per_second"` // gifts per user per second (burst = same)
}

// Gifts configures gift sending.
type Gifts struct {
	EffectWindow Duration `yaml:"effect_window"` // combo merging window of room gift effects
	// RoomEffectsPerSecond caps the effect pushes (biz 5556) one room gets
	// per second: when more distinct effects pile up, the room's merging
	// window stretches so that each push carries more (0 = no cap).
	RoomEffectsPerSecond int `yaml:"room_effects_per_second"`
	MaxInflight          int `yaml:"max_inflight"` // gift requests one connection may have in flight
}

// Wallet chooses where balances live.
type Wallet struct {
	// Mode is "local" (Pebble only, single node) or "shared" (balances in
	// Redis shared by every node; each node's ledger in its Pebble).
	Mode string `yaml:"mode"`
	// Nodes lists every node id whose ledger holds wallet trades (shared
	// mode): after Redis loses its data, money moves again only when all of
	// them have contributed. Required in shared mode (Validate).
	Nodes []string `yaml:"nodes"`
	// IdemMemoryBytes bounds the memory of the local ledger's index of the
	// last 25 h of requests (~21 B per request; beyond it duplicate checks
	// read the disk, never a wrong answer). 0 = 64 MiB.
	IdemMemoryBytes int64 `yaml:"idem_memory_bytes"`
}

// Pay configures recharge payments and the provider webhook.
type Pay struct {
	// Secrets are the webhook HMAC secrets accepted (several during
	// rotation); with dev tokens off each must be at least MinSecretBytes
	// long and not a published value. Env: LIVEEDGE_PAY_SECRETS=a,b.
	Secrets []string `yaml:"secrets"`
	// SecretsFile, when set, names a file with one secret per line (blank
	// lines and lines starting with # skipped) that replaces Secrets; Load
	// reads it.
	SecretsFile    string   `yaml:"secrets_file"`
	OrderTimeout   Duration `yaml:"order_timeout"`   // unpaid orders close (IN_VALID) after this
	ProviderURL    string   `yaml:"provider_url"`    // provider base URL (pay_url, active query); "" = none
	PublicURL      string   `yaml:"public_url"`      // how the provider reaches this node ("" = http://<http.addr>)
	ReconcileAfter Duration `yaml:"reconcile_after"` // PAYING longer than this → active query
	ReconcileEvery Duration `yaml:"reconcile_every"` // reconciler period
	WorkerID       int      `yaml:"worker_id"`       // snowflake worker 0..31 (-1 = derived: local mode fnv(node.id) % 32; shared mode leased in Redis: the id it held last, else one no node ever held); shared mode refuses to start when another node holds it
	// MaxOpenOrdersPerUser bounds a user's unpaid orders (WAITING_PAY /
	// PAYING): one more → 10429 (0 = no bound).
	MaxOpenOrdersPerUser int `yaml:"max_open_orders_per_user"`
	OrdersPerMinute      int `yaml:"orders_per_minute"` // order creations per user per minute, more → 10429 (0 = no bound)
	// UnaskedRetention bounds how long an order closed here without being
	// closed at the provider (the provider not answering; rec/payunasked)
	// is asked to close there after its close: past it (by the order's
	// close time), still unanswered, it is logged for an operator (warn,
	// its order id), counted (liveedge_pay_unasked_dropped_total) and
	// dropped.
	UnaskedRetention Duration `yaml:"unasked_retention"`
}

// RedPacket configures red-packet rains (edge/redpacket). Zero numbers mean
// the package defaults; zero intervals turn a limit off.
type RedPacket struct {
	// Pool is where running rains' packets wait: "memory" (this node's
	// memory) or "redis-list" (the seed's design, a Redis list per code;
	// needs redis.addr; in a cluster a rain's grabs go to its owner — the
	// benchmark baseline).
	Pool         string   `yaml:"pool"`
	OnePerUser   bool     `yaml:"one_per_user"`   // a user gets at most one packet per rain (30002)
	MaxCount     int      `yaml:"max_count"`      // packets per rain (≤ 1,000,000)
	MaxTotal     int64    `yaml:"max_total"`      // coins per rain (≤ 10^12)
	MaxDuration  Duration `yaml:"max_duration"`   // longest rain
	MaxPerAnchor int      `yaml:"max_per_anchor"` // rains not finished per anchor; one more create → 10409
	// PrepareInterval / StartInterval: one prepare / one start per anchor
	// per interval (a repeat of an already prepared/started code is free).
	PrepareInterval Duration `yaml:"prepare_interval"`
	StartInterval   Duration `yaml:"start_interval"`
	GrabInterval    Duration `yaml:"grab_interval"` // one grab per user per code per interval
	// GrabsPerSecond bounds a user's grabs on a node over every code (a
	// grab of a code no rain has still costs a lookup, in a cluster a NATS
	// request); more → 10429 (0 = off).
	GrabsPerSecond int `yaml:"grabs_per_second"`
}

// Tickets configures ticket sales (edge/ticket).
type Tickets struct {
	PayTimeout Duration `yaml:"pay_timeout"` // unpaid (PENDING_PAY) orders close and release their seats after this
	// OrdersPerMinute bounds the ticket orders a user places per minute (a
	// replay of a req_id is free), more → 10429 (0 = no bound).
	OrdersPerMinute int `yaml:"orders_per_minute"`
	MaxPrograms     int `yaml:"max_programs"` // programs kept in memory; one more → 10001
	MaxSeats        int `yaml:"max_seats"`    // seats of one program (Σ rows × cols); more → 10001
	// AskBudget bounds one sweep's asking the provider to close its due
	// provider-paid orders before it closes them (edge/ticket
	// Config.AskBudget): past it the sweep's other due orders close without
	// asking, the pay centre's reconciler closing them at the provider
	// after (rec/payunasked).
	AskBudget Duration `yaml:"ask_budget"`
}

// Redis is the shared hot-state store (cluster / shared mode).
type Redis struct {
	Addr string `yaml:"addr"` // host:port; "" = no Redis
	// Username (ACL user; "" = default) and Password (AUTH), or
	// PasswordFile holding it; TLS dials Redis over TLS (system roots).
	// Redis holds the cluster's balances: a production Redis must admit
	// only the nodes.
	Username     string `yaml:"username"`
	Password     string `yaml:"password"`
	PasswordFile string `yaml:"password_file"`
	TLS          bool   `yaml:"tls"`
	// MaxFlushDelay holds each pipeline flush of the client back this long
	// so that concurrent commands share one write (rueidis); 20 µs measured
	// best for the cluster sequencer (docs/cluster.md).
	MaxFlushDelay Duration `yaml:"max_flush_delay"`
}

// Shutdown configures graceful shutdown.
type Shutdown struct {
	DrainTimeout Duration `yaml:"drain_timeout"` // max time to flush send queues after close 1001
}

// Log configures slog.
type Log struct {
	Level string `yaml:"level"` // debug | info | warn | error
}

// Default returns the embedded single-node configuration.
func Default() Config {
	var c Config
	if err := yaml.Unmarshal(singleYAML, &c); err != nil {
		panic("configs: embedded single.yaml: " + err.Error())
	}
	return c
}

// Load reads path (empty = the embedded default) over the defaults, then applies
// environment overrides, then validates.
func Load(path string) (Config, error) {
	c := Default()
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return c, err
		}
		if err := decodeStrict(b, &c); err != nil {
			return c, fmt.Errorf("%s: %w", path, err)
		}
	}
	if err := ApplyEnv(&c, os.Environ()); err != nil {
		return c, err
	}
	if err := c.ReadSecretFiles(); err != nil {
		return c, err
	}
	return c, c.Validate()
}

// decodeStrict decodes a config file over c, refusing a key no setting has
// (a misspelt one — `cluster: {enable: true}` — was ignored: the node
// started with the default, unclustered).
func decodeStrict(b []byte, c *Config) error {
	d := yaml.NewDecoder(bytes.NewReader(b))
	d.KnownFields(true)
	if err := d.Decode(c); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// MinSecretBytes is the shortest JWT or webhook secret a node with dev tokens
// off accepts.
const MinSecretBytes = 32

// devSecrets are secret values that were published (in this repository's
// configs, past or present): whoever reads the repository can sign with
// them, so a node with dev tokens off refuses them whatever their length.
var devSecrets = map[string]bool{
	"liveedge-dev-secret-change-me":       true, // single.yaml auth.jwt_secret
	"liveedge-dev-pay-secret-change-me":   true, // single.yaml pay.secrets
	"change-me-cluster-secret-32-bytes":   true, // an old cluster.yaml auth.jwt_secret
	"liveedge-cluster-local-dev-secret-0": true, // cluster-local.yaml auth.jwt_secret
	"liveedge-cluster-local-pay-secret-0": true, // cluster-local.yaml pay.secrets
}

// DevSecret reports whether s is a published development value (or says
// "change-me"), which a node with dev tokens off must not use.
func DevSecret(s string) bool {
	return devSecrets[s] || strings.Contains(strings.ToLower(s), "change-me")
}

// ReadSecretFiles replaces Auth.JWTSecret, HTTP.MetricsToken,
// Redis.Password and Pay.Secrets by the content of Auth.JWTSecretFile,
// HTTP.MetricsTokenFile, Redis.PasswordFile and Pay.SecretsFile where those
// are set. A file that cannot be read or holds no secret is an error.
func (c *Config) ReadSecretFiles() error {
	if f := c.Auth.JWTSecretFile; f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("auth.jwt_secret_file: %w", err)
		}
		if c.Auth.JWTSecret = strings.TrimSpace(string(b)); c.Auth.JWTSecret == "" {
			return fmt.Errorf("auth.jwt_secret_file %s: empty", f)
		}
	}
	if f := c.HTTP.MetricsTokenFile; f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("http.metrics_token_file: %w", err)
		}
		if c.HTTP.MetricsToken = strings.TrimSpace(string(b)); c.HTTP.MetricsToken == "" {
			return fmt.Errorf("http.metrics_token_file %s: empty", f)
		}
	}
	if f := c.Redis.PasswordFile; f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("redis.password_file: %w", err)
		}
		if c.Redis.Password = strings.TrimSpace(string(b)); c.Redis.Password == "" {
			return fmt.Errorf("redis.password_file %s: empty", f)
		}
	}
	if f := c.Pay.SecretsFile; f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("pay.secrets_file: %w", err)
		}
		var secrets []string
		for _, line := range strings.Split(string(b), "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				secrets = append(secrets, line)
			}
		}
		if len(secrets) == 0 {
			return fmt.Errorf("pay.secrets_file %s: no secret in it", f)
		}
		c.Pay.Secrets = secrets
	}
	return nil
}

// Unprotected lists, for a production node (dev tokens off) that shares
// Redis or NATS with other nodes, which of them it reaches without
// credentials, since a node trusts what other nodes send it through them:
// refused at start unless cluster.trusted_network says the network alone
// protects them (then a warning).
func (c *Config) Unprotected() []string {
	if c.Auth.DevTokens {
		return nil
	}
	var out []string
	if c.Redis.Addr != "" && c.Redis.Password == "" {
		out = append(out, "redis (no redis.password)")
	}
	if c.Cluster.Enabled && !c.NATS.Authenticated() {
		out = append(out, "nats (no nats.user/password, token or creds_file)")
	}
	return out
}

// LoopbackHost reports whether host (no port) is this machine only: a
// loopback IP (127.0.0.0/8, ::1) or "localhost" — an empty host or 0.0.0.0
// is every interface. (The load generator's targets are held to it too.)
func LoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// loopbackAddr reports whether addr (host:port) listens on this machine only.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	return err == nil && LoopbackHost(host)
}

// checkSecrets validates the JWT and webhook secrets. With dev tokens on (a
// development node, which mints tokens for anyone anyway) the published dev
// values are fine; with dev tokens off every secret must be long and private.
func (c *Config) checkSecrets(check func(bool, string)) {
	const how = " (set LIVEEDGE_AUTH_JWT_SECRET or auth.jwt_secret_file)"
	const payHow = " (set LIVEEDGE_PAY_SECRETS or pay.secrets_file)"
	check(len(c.Pay.Secrets) > 0, "pay.secrets needs at least one secret"+payHow)
	if c.Auth.DevTokens {
		// Dev tokens let anyone mint an admin token and credit coins: a
		// development node listens on this machine only — a config that
		// opens a port to others without turning them off is refused, not
		// started as an open bank.
		for _, a := range []struct{ name, addr string }{{"http.addr", c.HTTP.Addr}, {"ws.addr", c.WS.Addr}} {
			check(a.addr == "" || loopbackAddr(a.addr), a.name+" "+a.addr+" is not a loopback address while auth.dev_tokens is on "+
				"(anyone who reaches it could mint admin tokens and credit coins): turn auth.dev_tokens off with a private auth.jwt_secret"+how+
				", or listen on 127.0.0.1")
		}
		check(len(c.Auth.JWTSecret) >= 16, "auth.jwt_secret must be at least 16 bytes")
		for _, s := range c.Pay.Secrets {
			check(s != "", "pay.secrets has an empty secret")
		}
		return
	}
	switch {
	case c.Auth.JWTSecret == "":
		check(false, "auth.jwt_secret is empty"+how)
	case DevSecret(c.Auth.JWTSecret):
		check(false, "auth.jwt_secret is a published development value; with auth.dev_tokens off use a private one"+how)
	case len(c.Auth.JWTSecret) < MinSecretBytes:
		check(false, fmt.Sprintf("auth.jwt_secret must be at least %d bytes with auth.dev_tokens off", MinSecretBytes)+how)
	}
	for i, s := range c.Pay.Secrets {
		switch {
		case s == "":
			check(false, fmt.Sprintf("pay.secrets[%d] is empty", i)+payHow)
		case DevSecret(s):
			check(false, fmt.Sprintf("pay.secrets[%d] is a published development value; with auth.dev_tokens off use a private one", i)+payHow)
		case len(s) < MinSecretBytes:
			check(false, fmt.Sprintf("pay.secrets[%d] must be at least %d bytes with auth.dev_tokens off", i, MinSecretBytes)+payHow)
		}
	}
	// The metrics token is optional (an admin's JWT reads /metrics too);
	// one that is set guards the node's internals as the others do.
	const metricsHow = " (set LIVEEDGE_HTTP_METRICS_TOKEN or http.metrics_token_file)"
	switch m := c.HTTP.MetricsToken; {
	case m == "":
	case DevSecret(m):
		check(false, "http.metrics_token is a published development value; with auth.dev_tokens off use a private one"+metricsHow)
	case len(m) < MinSecretBytes:
		check(false, fmt.Sprintf("http.metrics_token must be at least %d bytes with auth.dev_tokens off", MinSecretBytes)+metricsHow)
	}
}

// otherEnv are the LIVEEDGE_ names a node reads that are no setting
// (cmd/liveedge: profiling).
var otherEnv = map[string]bool{"LIVEEDGE_PPROF_ADDR": true, "LIVEEDGE_MEMPROFILERATE": true}

// UnknownEnv lists the LIVEEDGE_ names in env that are no setting (and no
// other name a node reads): a misspelt override does nothing, so a node
// warns of them at start.
func UnknownEnv(env []string) []string {
	known := map[string]bool{}
	rt := reflect.TypeOf(Config{})
	for i := 0; i < rt.NumField(); i++ {
		sec := rt.Field(i)
		for j := 0; j < sec.Type.NumField(); j++ {
			known["LIVEEDGE_"+strings.ToUpper(sec.Tag.Get("yaml")+"_"+sec.Type.Field(j).Tag.Get("yaml"))] = true
		}
	}
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "LIVEEDGE_") && !known[k] && !otherEnv[k] {
			out = append(out, k)
		}
	}
	return out
}

// ApplyEnv applies LIVEEDGE_<SECTION>_<KEY>=value overrides from env.
func ApplyEnv(c *Config, env []string) error {
	vals := map[string]string{}
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, "LIVEEDGE_") {
			vals[k] = v
		}
	}
	rv := reflect.ValueOf(c).Elem()
	for i := 0; i < rv.NumField(); i++ {
		sec := rv.Type().Field(i)
		sv := rv.Field(i)
		for j := 0; j < sv.NumField(); j++ {
			f := sv.Type().Field(j)
			name := "LIVEEDGE_" + strings.ToUpper(sec.Tag.Get("yaml")+"_"+f.Tag.Get("yaml"))
			v, ok := vals[name]
			if !ok {
				continue
			}
			if err := setField(sv.Field(j), v); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
	}
	return nil
}

func setField(f reflect.Value, v string) error {
	if f.Type() == reflect.TypeOf(Duration(0)) {
		d, err := time.ParseDuration(v)
		if err != nil {
			return err
		}
		f.SetInt(int64(d))
		return nil
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(v)
	case reflect.Bool:
		b, err := strconv.ParseBool(v)
		if err != nil {
			return err
		}
		f.SetBool(b)
	case reflect.Slice:
		if f.Type().Elem().Kind() != reflect.String {
			return fmt.Errorf("unsupported slice of %s", f.Type().Elem().Kind())
		}
		var items []string
		for _, x := range strings.Split(v, ",") {
			if x = strings.TrimSpace(x); x != "" {
				items = append(items, x)
			}
		}
		f.Set(reflect.ValueOf(items))
	case reflect.Int, reflect.Int64:
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return err
		}
		f.SetInt(n)
	default:
		return fmt.Errorf("unsupported kind %s", f.Kind())
	}
	return nil
}

// Validate checks ranges and fills nothing: a bad config fails at start.
func (c *Config) Validate() error {
	var errs []string
	check := func(ok bool, msg string) {
		if !ok {
			errs = append(errs, msg)
		}
	}
	check(c.Node.ID != "", "node.id is empty")
	check(c.Node.DataDir != "", "node.data_dir is empty")
	check(c.HTTP.Addr != "", "http.addr is empty")
	check(c.WS.Addr != "", "ws.addr is empty")
	check(c.WS.Heartbeat.D() >= 100*time.Millisecond && c.WS.Heartbeat.D() <= 10*time.Minute, "ws.heartbeat must be 100ms..10m")
	check(c.WS.SendQueueBytes >= 4096 && c.WS.SendQueueBytes <= 64<<20, "ws.send_queue_bytes must be 4096..67108864 (each connection may hold it)")
	// Every Redis write waits up to it: a typo (20ms for 20us) slows every
	// call, a second or more times them all out.
	check(c.Redis.MaxFlushDelay.D() >= 0 && c.Redis.MaxFlushDelay.D() <= time.Millisecond, "redis.max_flush_delay must be 0..1ms")
	check(c.WS.WriteTimeout.D() > 0, "ws.write_timeout must be > 0")
	check(c.WS.ReadParkAfter.D() >= 0, "ws.read_park_after must be >= 0")
	check(c.WS.HandshakeTimeout.D() >= 100*time.Millisecond && c.WS.HandshakeTimeout.D() <= time.Minute, "ws.handshake_timeout must be between 100ms and 1m")
	check(c.WS.MaxFrameHardBytes >= 64<<10, "ws.max_frame_hard_bytes must be >= 65536")
	check(c.WS.AbuseLimit > 0, "ws.abuse_limit must be > 0")
	check(c.WS.ResendAfter.D() > 0, "ws.resend_after must be > 0")
	check(c.WS.ResendMaxTries >= 3, "ws.resend_max_tries must be >= 3")
	check(c.WS.OfflineMax >= 0 && c.WS.OfflineMax <= 10000, "ws.offline_max must be 0..10000")
	check(c.WS.MaxRoomsPerConn > 0, "ws.max_rooms_per_conn must be > 0")
	check(c.WS.MaxConns > 0, "ws.max_conns must be > 0")
	check(c.WS.MaxConnsPerUser > 0, "ws.max_conns_per_user must be > 0")
	c.checkSecrets(check)
	check(c.NATS.Embedded || c.NATS.URL != "", "nats.url is required when nats.embedded is false")
	check(c.Wallet.Mode == "local" || c.Wallet.Mode == "shared", "wallet.mode must be local or shared")
	check(c.Wallet.Mode != "shared" || c.Redis.Addr != "", "redis.addr is required when wallet.mode is shared")
	check(!c.Cluster.Enabled || c.Redis.Addr != "", "redis.addr is required when cluster.enabled")
	check(!c.Cluster.Enabled || !c.NATS.Embedded, "cluster.enabled needs an external NATS (nats.embedded: false)")
	check(!c.Cluster.Enabled || c.Wallet.Mode == "shared", "cluster.enabled needs wallet.mode shared")
	if c.Wallet.Mode == "shared" {
		// The shared wallet's rebuild after a Redis loss waits for this many
		// nodes' ledgers: a list without this node, or with a name twice,
		// finished a rebuild without a node's money — or never.
		seen := map[string]bool{}
		for _, n := range c.Wallet.Nodes {
			check(n != "" && !seen[n], fmt.Sprintf("wallet.nodes: %q is empty or listed twice", n))
			seen[n] = true
		}
		check(seen[c.Node.ID], fmt.Sprintf("wallet.nodes must list every node of the cluster, this one (node.id %q) included", c.Node.ID))
	}
	ways := 0
	for _, set := range []bool{c.NATS.User != "" || c.NATS.Password != "", c.NATS.Token != "", c.NATS.CredsFile != ""} {
		if set {
			ways++
		}
	}
	check(ways <= 1, "nats: set at most one of user/password, token and creds_file")
	check(c.NATS.Password == "" || c.NATS.User != "", "nats.password needs nats.user")
	check(c.NATS.User == "" || c.NATS.Password != "", "nats.user needs nats.password")
	if c.NATS.Embedded && c.NATS.Listen != "" && !loopbackAddr(c.NATS.Listen) {
		// Reachable by other machines: anyone there could purge the room
		// events stream, flood the subjects the node trusts, or fill the
		// disk the ledger shares with streams of their own.
		check(c.NATS.User != "" && c.NATS.Password != "" || c.NATS.Token != "",
			"nats.listen "+c.NATS.Listen+" is not a loopback address: set nats.user and nats.password, or nats.token "+
				"(the embedded server then requires them), or listen on 127.0.0.1")
	}
	// Limits where 0 means off: a negative is a typo, never "off" by
	// accident (a negative red-packet grab limit turned it off).
	for _, v := range []struct {
		name string
		ok   bool
	}{
		{"rooms.open_close_interval", c.Rooms.OpenCloseInterval.D() >= 0},
		{"limits.chat_per_second", c.Limits.ChatPerSecond >= 0},
		{"limits.gift_per_second", c.Limits.GiftPerSecond >= 0},
		{"cluster.presence_ttl", c.Cluster.PresenceTTL.D() >= 0},
		{"redpacket.prepare_interval", c.RedPacket.PrepareInterval.D() >= 0},
		{"redpacket.start_interval", c.RedPacket.StartInterval.D() >= 0},
		{"redpacket.grab_interval", c.RedPacket.GrabInterval.D() >= 0},
		{"redpacket.grabs_per_second", c.RedPacket.GrabsPerSecond >= 0},
		// Where 0 means the built-in default: a negative is a typo too,
		// not the default by accident.
		{"ws.offline_ttl", c.WS.OfflineTTL.D() >= 0},
		{"ws.socket_send_buffer", c.WS.SocketSendBuffer >= 0},
		{"rooms.history_ttl", c.Rooms.HistoryTTL.D() >= 0},
		{"cluster.gap_wait", c.Cluster.GapWait.D() >= 0},
		{"cluster.linger", c.Cluster.Linger.D() >= 0},
		{"pay.order_timeout", c.Pay.OrderTimeout.D() >= 0},
		{"pay.reconcile_after", c.Pay.ReconcileAfter.D() >= 0},
		{"pay.reconcile_every", c.Pay.ReconcileEvery.D() >= 0},
		{"gifts.effect_window", c.Gifts.EffectWindow.D() >= 0},
	} {
		check(v.ok, v.name+" must be >= 0")
	}
	// The alive key is refreshed every third of it (at least 10 ms apart) and
	// set with a whole-millisecond TTL: below a second the key lapses between
	// refreshes (or Redis refuses PX 0), the node's presence stops counting
	// and a second process under its node.id is not refused.
	check(c.Cluster.PresenceTTL.D() == 0 || c.Cluster.PresenceTTL.D() >= time.Second,
		"cluster.presence_ttl must be 0 (the default, 10s) or >= 1s")
	check(c.RedPacket.MaxDuration.D() == 0 || c.RedPacket.MaxDuration.D() >= time.Second,
		"redpacket.max_duration must be 0 (the default) or >= 1s (a rain lasts whole seconds)")
	// A production node bounds how often an anchor opens and closes a room:
	// each cycle leaves a record (a Pebble row, or a Redis key for a week).
	check(c.Auth.DevTokens || c.Rooms.OpenCloseInterval.D() >= time.Second,
		"rooms.open_close_interval must be >= 1s with auth.dev_tokens off (each open/close leaves a record)")
	check(c.Rooms.HistorySize >= 1 && c.Rooms.HistorySize <= 100000, "rooms.history_size must be 1..100000 (the room offsets and since need a history)")
	check(c.Wallet.IdemMemoryBytes >= 0, "wallet.idem_memory_bytes must be >= 0")
	check(c.Pay.WorkerID >= -1 && c.Pay.WorkerID < 32, "pay.worker_id must be -1..31")
	check(c.Pay.MaxOpenOrdersPerUser >= 0, "pay.max_open_orders_per_user must be >= 0")
	check(c.Pay.OrdersPerMinute >= 0, "pay.orders_per_minute must be >= 0")
	check(c.Tickets.PayTimeout.D() >= time.Second, "tickets.pay_timeout must be >= 1s")
	check(c.Tickets.OrdersPerMinute >= 0, "tickets.orders_per_minute must be >= 0")
	check(c.Tickets.MaxPrograms > 0, "tickets.max_programs must be > 0")
	check(c.Tickets.MaxSeats > 0 && c.Tickets.MaxSeats <= 1_000_000, "tickets.max_seats must be 1..1000000")
	check(c.Tickets.AskBudget.D() > 0 && c.Tickets.AskBudget.D() <= time.Minute, "tickets.ask_budget must be > 0 and <= 1m")
	check(c.Pay.UnaskedRetention.D() >= time.Hour, "pay.unasked_retention must be >= 1h")
	check(c.Node.GOGC >= 0, "node.gogc must be >= 0")
	check(c.Node.IdleRelease.D() >= 0, "node.idle_release must be >= 0")
	check(c.Node.BlockCacheMB >= 0 && c.Node.BlockCacheMB <= 1<<20, "node.block_cache_mb must be between 0 and 1048576")
	check(c.Node.WALMinSync >= 0 && c.Node.WALMinSync.D() <= 10*time.Millisecond, "node.wal_min_sync must be between 0 and 10ms")
	check(c.RedPacket.Pool == "memory" || c.RedPacket.Pool == "redis-list", "redpacket.pool must be memory or redis-list")
	check(c.RedPacket.Pool != "redis-list" || c.Redis.Addr != "", "redis.addr is required when redpacket.pool is redis-list")
	check(c.RedPacket.MaxCount >= 0 && c.RedPacket.MaxCount <= 1_000_000, "redpacket.max_count must be 0..1000000")
	check(c.RedPacket.MaxTotal >= 0 && c.RedPacket.MaxTotal <= 1_000_000_000_000, "redpacket.max_total must be 0..10^12")
	check(c.RedPacket.MaxPerAnchor >= 0, "redpacket.max_per_anchor must be >= 0")
	check(c.Gifts.MaxInflight > 0, "gifts.max_inflight must be > 0")
	check(c.Gifts.RoomEffectsPerSecond >= 0, "gifts.room_effects_per_second must be >= 0")
	check(c.HTTP.MaxBodyBytes > 0, "http.max_body_bytes must be > 0")
	check(c.HTTP.ReadTimeout.D() > 0, "http.read_timeout must be > 0")
	check(c.HTTP.MaxHeaderBytes >= 1024, "http.max_header_bytes must be >= 1024")
	check(c.HTTP.MaxConns > 0, "http.max_conns must be > 0")
	check(c.Auth.MaxTokenTTL.D() >= 0, "auth.max_token_ttl must be >= 0")
	// 0 (any exp) only for development: a leaked token, an admin's above
	// all, would stay good as long as its issuer wrote — no revocation list.
	check(c.Auth.DevTokens || c.Auth.MaxTokenTTL.D() > 0, "auth.max_token_ttl must be > 0 with auth.dev_tokens off")
	if bare := c.Unprotected(); len(bare) > 0 && !c.Cluster.TrustedNetwork {
		check(false, "shared backends without credentials: "+strings.Join(bare, ", ")+
			" — every node trusts what reaches it through them; give the credentials, or set cluster.trusted_network: true where the network alone keeps others out")
	}
	check(c.Shutdown.DrainTimeout.D() > 0, "shutdown.drain_timeout must be > 0")
	if len(errs) > 0 {
		return fmt.Errorf("config: %s", strings.Join(errs, "; "))
	}
	return nil
}

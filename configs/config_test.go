package configs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

const (
	goodJWT = "0123456789abcdef0123456789abcdef-jwt"
	goodPay = "0123456789abcdef0123456789abcdef-pay"
)

// backendCreds are what a production cluster node needs besides its
// secrets: credentials of the shared Redis and NATS (TestBackendCredentials).
var backendCreds = []string{"LIVEEDGE_REDIS_PASSWORD=redis-pw", "LIVEEDGE_NATS_TOKEN=nats-token"}

// loadCluster loads cluster.yaml with env as the whole environment override.
func loadCluster(t *testing.T, env ...string) (Config, error) {
	t.Helper()
	c := Default()
	b, err := os.ReadFile("cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	if err := ApplyEnv(&c, env); err != nil {
		return c, err
	}
	if err := c.ReadSecretFiles(); err != nil {
		return c, err
	}
	return c, c.Validate()
}

func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("want an error mentioning %q, got none", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("error %q does not mention %q", err, p)
		}
	}
}

func TestDefaultConfigValid(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

// The production cluster config carries no secret: without one supplied it
// does not validate, and the dev defaults of single.yaml do not leak into it.
func TestClusterConfigNeedsSecrets(t *testing.T) {
	c, err := loadCluster(t)
	wantErr(t, err, "auth.jwt_secret is empty", "pay.secrets needs at least one secret")
	if c.Auth.DevTokens {
		t.Fatal("cluster.yaml must have dev tokens off")
	}
	if _, err := loadCluster(t, append(backendCreds, "LIVEEDGE_AUTH_JWT_SECRET="+goodJWT, "LIVEEDGE_PAY_SECRETS="+goodPay)...); err != nil {
		t.Fatal(err)
	}
}

func TestClusterLocalConfigValid(t *testing.T) {
	c := Default()
	b, err := os.ReadFile("cluster-local.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if !c.Auth.DevTokens {
		t.Fatal("cluster-local.yaml has dev tokens on")
	}
}

func TestSecretsRejectedWithDevTokensOff(t *testing.T) {
	base := func() Config {
		c := Default()
		c.Auth.DevTokens = false
		c.Auth.JWTSecret = goodJWT
		c.Pay.Secrets = []string{goodPay}
		return c
	}
	c := base()
	if err := c.Validate(); err != nil {
		t.Fatalf("good secrets: %v", err)
	}
	cases := []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"jwt default", func(c *Config) { c.Auth.JWTSecret = Default().Auth.JWTSecret }, "auth.jwt_secret is a published development value"},
		{"jwt old cluster value", func(c *Config) { c.Auth.JWTSecret = "change-me-cluster-secret-32-bytes" }, "auth.jwt_secret is a published"},
		{"jwt change-me", func(c *Config) { c.Auth.JWTSecret = "please-CHANGE-ME-0123456789abcdef0123" }, "auth.jwt_secret is a published"},
		{"jwt empty", func(c *Config) { c.Auth.JWTSecret = "" }, "auth.jwt_secret is empty"},
		{"jwt short", func(c *Config) { c.Auth.JWTSecret = strings.Repeat("x", MinSecretBytes-1) }, "auth.jwt_secret must be at least 32 bytes"},
		{"pay default", func(c *Config) { c.Pay.Secrets = Default().Pay.Secrets }, "pay.secrets[0] is a published development value"},
		{"pay default in rotation", func(c *Config) { c.Pay.Secrets = append([]string{goodPay}, Default().Pay.Secrets...) }, "pay.secrets[1] is a published"},
		{"pay none", func(c *Config) { c.Pay.Secrets = nil }, "pay.secrets needs at least one secret"},
		{"pay empty", func(c *Config) { c.Pay.Secrets = []string{""} }, "pay.secrets[0] is empty"},
		{"pay short", func(c *Config) { c.Pay.Secrets = []string{"short-secret"} }, "pay.secrets[0] must be at least 32 bytes"},
		{"metrics token short", func(c *Config) { c.HTTP.MetricsToken = "scrape-me" }, "http.metrics_token must be at least 32 bytes"},
		{"metrics token change-me", func(c *Config) { c.HTTP.MetricsToken = "change-me-metrics-token-0123456789abcdef" }, "http.metrics_token is a published"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.edit(&c)
			wantErr(t, c.Validate(), tc.want)
			c.Auth.DevTokens = true // a dev node accepts the dev values (not empty ones)
			if tc.name == "jwt default" || tc.name == "pay default" {
				if err := c.Validate(); err != nil {
					t.Fatalf("dev tokens on: %v", err)
				}
			}
		})
	}
}

func TestSecretsFromEnv(t *testing.T) {
	c, err := loadCluster(t, append(backendCreds, "LIVEEDGE_AUTH_JWT_SECRET="+goodJWT, "LIVEEDGE_PAY_SECRETS="+goodPay+"-new, "+goodPay+"-old")...)
	if err != nil {
		t.Fatal(err)
	}
	if c.Auth.JWTSecret != goodJWT || len(c.Pay.Secrets) != 2 || c.Pay.Secrets[0] != goodPay+"-new" || c.Pay.Secrets[1] != goodPay+"-old" {
		t.Fatalf("secrets not taken from env: %q %q", c.Auth.JWTSecret, c.Pay.Secrets)
	}
	_, err = loadCluster(t, "LIVEEDGE_AUTH_JWT_SECRET=too-short", "LIVEEDGE_PAY_SECRETS="+goodPay)
	wantErr(t, err, "auth.jwt_secret must be at least 32 bytes")

	// The metrics token (optional) from the environment or a file.
	c, err = loadCluster(t, append(backendCreds, "LIVEEDGE_AUTH_JWT_SECRET="+goodJWT, "LIVEEDGE_PAY_SECRETS="+goodPay,
		"LIVEEDGE_HTTP_METRICS_TOKEN="+goodPay+"-metrics")...)
	if err != nil || c.HTTP.MetricsToken != goodPay+"-metrics" {
		t.Fatalf("metrics token from env: %q, %v", c.HTTP.MetricsToken, err)
	}
	f := filepath.Join(t.TempDir(), "metrics")
	if err := os.WriteFile(f, []byte(goodPay+"-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err = loadCluster(t, append(backendCreds, "LIVEEDGE_AUTH_JWT_SECRET="+goodJWT, "LIVEEDGE_PAY_SECRETS="+goodPay,
		"LIVEEDGE_HTTP_METRICS_TOKEN_FILE="+f)...)
	if err != nil || c.HTTP.MetricsToken != goodPay+"-file" {
		t.Fatalf("metrics token from a file: %q, %v", c.HTTP.MetricsToken, err)
	}
}

func TestSecretsFromFiles(t *testing.T) {
	dir := t.TempDir()
	jwtFile, payFile := filepath.Join(dir, "jwt"), filepath.Join(dir, "pay")
	if err := os.WriteFile(jwtFile, []byte(goodJWT+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(payFile, []byte("# current first\n"+goodPay+"-new\n\n  "+goodPay+"-old  \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := loadCluster(t, append(backendCreds, "LIVEEDGE_AUTH_JWT_SECRET_FILE="+jwtFile, "LIVEEDGE_PAY_SECRETS_FILE="+payFile)...)
	if err != nil {
		t.Fatal(err)
	}
	if c.Auth.JWTSecret != goodJWT || len(c.Pay.Secrets) != 2 || c.Pay.Secrets[0] != goodPay+"-new" || c.Pay.Secrets[1] != goodPay+"-old" {
		t.Fatalf("secrets not taken from files: %q %q", c.Auth.JWTSecret, c.Pay.Secrets)
	}

	// The file wins over an inline value (a dev default included).
	c = Default()
	c.Auth.DevTokens = false
	c.Auth.JWTSecretFile, c.Pay.SecretsFile = jwtFile, payFile
	if err := c.ReadSecretFiles(); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}

	_, err = loadCluster(t, "LIVEEDGE_AUTH_JWT_SECRET_FILE="+filepath.Join(dir, "missing"), "LIVEEDGE_PAY_SECRETS="+goodPay)
	wantErr(t, err, "auth.jwt_secret_file")
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n# nothing\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = loadCluster(t, "LIVEEDGE_AUTH_JWT_SECRET="+goodJWT, "LIVEEDGE_PAY_SECRETS_FILE="+empty)
	wantErr(t, err, "pay.secrets_file", "no secret")
	blank := filepath.Join(dir, "blank")
	if err := os.WriteFile(blank, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = loadCluster(t, "LIVEEDGE_AUTH_JWT_SECRET_FILE="+blank, "LIVEEDGE_PAY_SECRETS="+goodPay)
	wantErr(t, err, "auth.jwt_secret_file", "empty")
}

// node.block_cache_mb: the default config sets 128, an override is taken
// from the environment, a negative size is refused.
func TestBlockCacheSize(t *testing.T) {
	c := Default()
	if c.Node.BlockCacheMB != 128 {
		t.Fatalf("default block_cache_mb %d, want 128", c.Node.BlockCacheMB)
	}
	if err := ApplyEnv(&c, []string{"LIVEEDGE_NODE_BLOCK_CACHE_MB=16"}); err != nil || c.Node.BlockCacheMB != 16 {
		t.Fatalf("env override: %d, %v", c.Node.BlockCacheMB, err)
	}
	c.Node.BlockCacheMB = -1
	wantErr(t, c.Validate(), "node.block_cache_mb")
}

// Redis and NATS credentials: taken from env and files, at most one way for
// NATS; a production cluster node without them is refused (every node runs
// what reaches it through them: a forwarded refund, a rain started as any
// anchor) unless cluster.trusted_network says the network alone protects
// them — then it is listed as unprotected (a warning at start); a
// development one is neither.
func TestBackendCredentials(t *testing.T) {
	secrets := []string{"LIVEEDGE_AUTH_JWT_SECRET=" + goodJWT, "LIVEEDGE_PAY_SECRETS=" + goodPay}
	_, err := loadCluster(t, secrets...)
	wantErr(t, err, "without credentials", "redis", "nats", "cluster.trusted_network")
	_, err = loadCluster(t, append(secrets, "LIVEEDGE_NATS_TOKEN=nats-token")...)
	wantErr(t, err, "without credentials", "redis (no redis.password)")
	c, err := loadCluster(t, append(secrets, "LIVEEDGE_CLUSTER_TRUSTED_NETWORK=true")...)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Unprotected(); len(got) != 2 {
		t.Fatalf("cluster.yaml without credentials on a trusted network: unprotected %q, want redis and nats", got)
	}
	pw := filepath.Join(t.TempDir(), "redis")
	if err := os.WriteFile(pw, []byte("redis-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err = loadCluster(t, append(secrets, "LIVEEDGE_REDIS_PASSWORD_FILE="+pw, "LIVEEDGE_NATS_TOKEN=nats-token")...)
	if err != nil {
		t.Fatal(err)
	}
	if c.Redis.Password != "redis-pw" || c.NATS.Token != "nats-token" || len(c.Unprotected()) != 0 {
		t.Fatalf("credentials %q %q, unprotected %q", c.Redis.Password, c.NATS.Token, c.Unprotected())
	}
	_, err = loadCluster(t, append(secrets, "LIVEEDGE_NATS_TOKEN=t", "LIVEEDGE_NATS_USER=u", "LIVEEDGE_NATS_PASSWORD=p")...)
	wantErr(t, err, "at most one of user/password, token and creds_file")
	_, err = loadCluster(t, append(secrets, "LIVEEDGE_NATS_PASSWORD=p")...)
	wantErr(t, err, "nats.password needs nats.user")
	// A user without its password: a NATS server without authorization
	// admits any user name, so this is no credential (it once passed).
	_, err = loadCluster(t, append(secrets, "LIVEEDGE_NATS_USER=u")...)
	wantErr(t, err, "nats.user needs nats.password")
	if (NATS{User: "u"}).Authenticated() {
		t.Fatal("a NATS user without a password counted as credentials")
	}
	dev := Default()
	dev.Redis.Addr = "127.0.0.1:6379"
	if got := dev.Unprotected(); len(got) != 0 {
		t.Fatalf("a development node: unprotected %q, want none (dev tokens on)", got)
	}
}

// Settings that broke a node quietly are refused at start: a config file's
// misspelt key (ignored: `cluster: {enable: true}` started an unclustered
// node), a shared wallet's node list without this node or with a name twice
// (a rebuild after a Redis loss finished without a node's ledger, or never),
// rooms.history_size 0 (taken for the default 256).
func TestMisconfigurationsRefused(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("cluster:\n  enable: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(bad)
	wantErr(t, err, "enable")
	secrets := append([]string{"LIVEEDGE_AUTH_JWT_SECRET=" + goodJWT, "LIVEEDGE_PAY_SECRETS=" + goodPay}, backendCreds...)
	_, err = loadCluster(t, append(secrets, "LIVEEDGE_NODE_ID=gw-3")...)
	wantErr(t, err, "wallet.nodes", "gw-3")
	_, err = loadCluster(t, append(secrets, "LIVEEDGE_WALLET_NODES=gw-1,gw-1,gw-2")...)
	wantErr(t, err, "wallet.nodes", "twice")
	c := Default()
	c.Rooms.HistorySize = 0
	wantErr(t, c.Validate(), "rooms.history_size")
}

// Every shipped config file has only known keys (Load refuses others).
func TestShippedConfigsStrict(t *testing.T) {
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("config files: %v %v", files, err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		c := Default()
		if err := decodeStrict(b, &c); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// A misspelt environment override is reported (it changes nothing); the
// settings' own names and the profiling ones are not.
func TestUnknownEnv(t *testing.T) {
	got := UnknownEnv([]string{"LIVEEDGE_CLUSTER_ENABLE=true", "LIVEEDGE_CLUSTER_ENABLED=true", "LIVEEDGE_WS_ADDR=x", "LIVEEDGE_PPROF_ADDR=x", "PATH=/bin", "LIVEEDGE_WALLET_NODE=gw-1"})
	if strings.Join(got, ",") != "LIVEEDGE_CLUSTER_ENABLE,LIVEEDGE_WALLET_NODE" {
		t.Fatalf("unknown names %v", got)
	}
}

// tickets.ask_budget (the ticket sweep's asking the provider to close its
// due orders, edge/ticket Config.AskBudget) and pay.unasked_retention (how
// long an order the provider did not answer the close of is asked again)
// are settings: defaults 3s and 72h, set in a file or the environment,
// out-of-range values refused. Before, ask_budget was no key at all — a
// file setting it was refused as unknown, the budget fixed at 3 s.
func TestAskBudgetAndUnaskedRetentionSettings(t *testing.T) {
	c := Default()
	if c.Tickets.AskBudget.D() != 3*time.Second || c.Pay.UnaskedRetention.D() != 72*time.Hour {
		t.Fatalf("defaults: ask_budget %v, unasked_retention %v; want 3s, 72h", c.Tickets.AskBudget.D(), c.Pay.UnaskedRetention.D())
	}
	f := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(f, []byte("tickets:\n  ask_budget: 500ms\npay:\n  unasked_retention: 24h\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(f)
	if err != nil {
		t.Fatal(err)
	}
	if c.Tickets.AskBudget.D() != 500*time.Millisecond || c.Pay.UnaskedRetention.D() != 24*time.Hour {
		t.Fatalf("from the file: ask_budget %v, unasked_retention %v; want 500ms, 24h", c.Tickets.AskBudget.D(), c.Pay.UnaskedRetention.D())
	}
	c = Default()
	if err := ApplyEnv(&c, []string{"LIVEEDGE_TICKETS_ASK_BUDGET=1s"}); err != nil || c.Tickets.AskBudget.D() != time.Second {
		t.Fatalf("from the environment: %v %v", c.Tickets.AskBudget.D(), err)
	}
	c = Default()
	c.Tickets.AskBudget = 0
	wantErr(t, c.Validate(), "tickets.ask_budget")
	c = Default()
	c.Pay.UnaskedRetention = Duration(time.Minute)
	wantErr(t, c.Validate(), "pay.unasked_retention")
}

// Dev tokens (anyone mints an admin token, credits coins) on a port others
// can reach are refused: the shipped default is a development node on
// 127.0.0.1, and a config or environment that opens its ports without
// turning dev tokens off no longer starts one as an open bank.
func TestDevTokensOnlyOnLoopback(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.2:9"} {
		c := Default()
		c.HTTP.Addr, c.WS.Addr = addr, addr
		if err := c.Validate(); err != nil {
			t.Errorf("%s: %v", addr, err)
		}
	}
	for _, addr := range []string{":8080", "0.0.0.0:8080", "[::]:8080", "10.0.0.5:8080", "example.com:8080", "8080"} {
		for _, field := range []string{"http.addr", "ws.addr"} {
			c := Default()
			if field == "http.addr" {
				c.HTTP.Addr = addr
			} else {
				c.WS.Addr = addr
			}
			wantErr(t, c.Validate(), field+" "+addr+" is not a loopback address while auth.dev_tokens is on")
		}
	}
	// Off, with private secrets: any address.
	c := Default()
	c.HTTP.Addr, c.WS.Addr = "0.0.0.0:8080", ":8081"
	c.Auth.DevTokens, c.Auth.JWTSecret, c.Pay.Secrets = false, goodJWT, []string{goodPay}
	if err := c.Validate(); err != nil {
		t.Fatalf("dev tokens off on every interface: %v", err)
	}
}

// The embedded NATS listening beyond loopback needs credentials (anyone
// reaching it could purge the room events stream or fill the ledger's disk);
// limits where 0 is off refuse a negative; a production node bounds the
// rooms an anchor opens and closes.
func TestEmbeddedNATSListenAndLimits(t *testing.T) {
	c := Default()
	c.NATS.Listen = "0.0.0.0:4222"
	wantErr(t, c.Validate(), "nats.listen 0.0.0.0:4222 is not a loopback address")
	c.NATS.Token = "a-token-of-some-length"
	if err := c.Validate(); err != nil {
		t.Fatalf("with a token: %v", err)
	}
	c = Default()
	c.NATS.Listen = "127.0.0.1:4222"
	if err := c.Validate(); err != nil {
		t.Fatalf("loopback: %v", err)
	}
	for _, edit := range []struct {
		name string
		set  func(*Config)
	}{
		{"rooms.open_close_interval", func(c *Config) { c.Rooms.OpenCloseInterval = Duration(-time.Second) }},
		{"limits.chat_per_second", func(c *Config) { c.Limits.ChatPerSecond = -1 }},
		{"limits.gift_per_second", func(c *Config) { c.Limits.GiftPerSecond = -1 }},
		{"cluster.presence_ttl", func(c *Config) { c.Cluster.PresenceTTL = Duration(-10 * time.Second) }},
		// Before, these passed: a negative grab limit was no limit, a
		// negative duration the built-in default.
		{"redpacket.prepare_interval", func(c *Config) { c.RedPacket.PrepareInterval = Duration(-time.Second) }},
		{"redpacket.start_interval", func(c *Config) { c.RedPacket.StartInterval = Duration(-time.Second) }},
		{"redpacket.grab_interval", func(c *Config) { c.RedPacket.GrabInterval = Duration(-time.Second) }},
		{"redpacket.grabs_per_second", func(c *Config) { c.RedPacket.GrabsPerSecond = -5 }},
		{"ws.offline_ttl", func(c *Config) { c.WS.OfflineTTL = Duration(-time.Second) }},
		{"ws.socket_send_buffer", func(c *Config) { c.WS.SocketSendBuffer = -1 }},
		{"rooms.history_ttl", func(c *Config) { c.Rooms.HistoryTTL = Duration(-time.Second) }},
		{"cluster.gap_wait", func(c *Config) { c.Cluster.GapWait = Duration(-time.Second) }},
		{"cluster.linger", func(c *Config) { c.Cluster.Linger = Duration(-time.Second) }},
		{"pay.order_timeout", func(c *Config) { c.Pay.OrderTimeout = Duration(-time.Second) }},
		{"pay.reconcile_after", func(c *Config) { c.Pay.ReconcileAfter = Duration(-time.Second) }},
		{"pay.reconcile_every", func(c *Config) { c.Pay.ReconcileEvery = Duration(-time.Second) }},
		{"gifts.effect_window", func(c *Config) { c.Gifts.EffectWindow = Duration(-time.Second) }},
	} {
		c := Default()
		edit.set(&c)
		wantErr(t, c.Validate(), edit.name+" must be >= 0")
	}
	for _, ttl := range []time.Duration{500 * time.Microsecond, 5 * time.Millisecond, 999 * time.Millisecond} {
		c := Default()
		c.Cluster.PresenceTTL = Duration(ttl)
		wantErr(t, c.Validate(), "cluster.presence_ttl must be 0 (the default, 10s) or >= 1s")
	}
	c = Default()
	c.RedPacket.MaxDuration = Duration(500 * time.Millisecond)
	wantErr(t, c.Validate(), "redpacket.max_duration must be 0 (the default) or >= 1s")
	c = Default()
	c.Auth.DevTokens, c.Auth.JWTSecret, c.Pay.Secrets = false, goodJWT, []string{goodPay}
	c.Rooms.OpenCloseInterval = 0
	wantErr(t, c.Validate(), "rooms.open_close_interval must be >= 1s")
	c.Rooms.OpenCloseInterval = Duration(time.Second)
	c.Auth.MaxTokenTTL = 0
	wantErr(t, c.Validate(), "auth.max_token_ttl must be > 0 with auth.dev_tokens off")
}

package gateway_test

import (
	"crypto/rand"
	"encoding/hex"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// privateSecret is a random secret a node with dev tokens off accepts.
func privateSecret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// productionConfig is nodetest.Config with dev tokens off (and so private
// secrets, no demo page).
func productionConfig(t *testing.T) configs.Config {
	cfg := nodetest.Config(t)
	cfg.Auth.DevTokens = false
	cfg.HTTP.Demo = false
	cfg.Auth.JWTSecret = privateSecret(t)
	cfg.Pay.Secrets = []string{privateSecret(t)}
	cfg.Rooms.OpenCloseInterval = configsDuration(time.Second) // bounded on a production node
	return cfg
}

// getMetrics GETs /metrics with an optional bearer token: the status, the
// content type and the body.
func getMetrics(t *testing.T, n *gateway.Node, token string) (int, string, string) {
	t.Helper()
	req, err := http.NewRequest("GET", nodetest.HTTPURL(n)+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Content-Type"), string(body)
}

// With dev tokens off, /metrics (the node's rooms, connections, error
// rates) answers only http.metrics_token or an admin's JWT: no token or a
// wrong one is 401 10002, another role's token 403 10003, each in the
// envelope. It was served to anyone who could reach the API.
func TestMetricsNeedAnAdminOrTheMetricsToken(t *testing.T) {
	cfg := productionConfig(t)
	cfg.HTTP.MetricsToken = privateSecret(t)
	n := nodetest.Start(t, cfg)
	cases := []struct {
		name, token  string
		status, code int
	}{
		{"no token", "", 401, proto.CodeUnauthenticated},
		{"a wrong metrics token", privateSecret(t), 401, proto.CodeUnauthenticated},
		{"the metrics token with one byte more", cfg.HTTP.MetricsToken + "x", 401, proto.CodeUnauthenticated},
		{"a viewer", nodetest.Token(t, n, 1, gateway.RoleViewer), 403, proto.CodeForbidden},
		{"an anchor", nodetest.Token(t, n, 2, gateway.RoleAnchor), 403, proto.CodeForbidden},
		{"the metrics token", cfg.HTTP.MetricsToken, 200, 0},
		{"an admin", nodetest.Token(t, n, 3, gateway.RoleAdmin), 200, 0},
	}
	for _, tc := range cases {
		st, ct, body := getMetrics(t, n, tc.token)
		if st != tc.status {
			t.Errorf("%s: %d %q, want %d", tc.name, st, body[:min(len(body), 200)], tc.status)
			continue
		}
		if tc.status == 200 {
			if !strings.Contains(body, "liveedge_connections") {
				t.Errorf("%s: 200 without the metrics: %q", tc.name, body[:min(len(body), 200)])
			}
			continue
		}
		var env struct {
			Code int    `json:"code"`
			Msg  string `json:"msg"`
		}
		if !strings.HasPrefix(ct, "application/json") || proto.Unmarshal([]byte(body), &env) != nil || env.Code != tc.code {
			t.Errorf("%s: %d %q %q, want the envelope with code %d", tc.name, st, ct, body[:min(len(body), 200)], tc.code)
		}
		if strings.Contains(body, "liveedge_") {
			t.Errorf("%s: the refusal carries metrics: %q", tc.name, body[:min(len(body), 200)])
		}
	}

	// Without a metrics token configured, an admin still reads them and a
	// bearer token that is no JWT is refused.
	cfg = productionConfig(t)
	n = nodetest.Start(t, cfg)
	if st, _, body := getMetrics(t, n, "anything"); st != 401 {
		t.Errorf("no metrics token configured, a made-up one: %d %q", st, body[:min(len(body), 200)])
	}
	if st, _, _ := getMetrics(t, n, nodetest.Token(t, n, 3, gateway.RoleAdmin)); st != 200 {
		t.Errorf("no metrics token configured, an admin: %d", st)
	}
}

// With dev tokens on (make run, the tests and load tools), /metrics stays
// open.
func TestMetricsOpenWithDevTokens(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	if st, _, body := getMetrics(t, n, ""); st != 200 || !strings.Contains(body, "liveedge_connections") {
		t.Fatalf("dev node /metrics without a token: %d %q", st, body[:min(len(body), 200)])
	}
}

// metricRegistration finds the names the node's code registers metrics
// under: liveedge_<name> with Namespace "liveedge" (edge/, persist/), and
// through gateway's opts helpers f, stat, cstat and opts.
var (
	metricNamespaced = regexp.MustCompile(`Namespace:\s*"liveedge",\s*Name:\s*"([a-z0-9_]+)"`)
	metricGateway    = regexp.MustCompile(`\b(?:f|stat|cstat|opts)\(\s*"([a-z0-9_]+)"`)
	metricFamily     = regexp.MustCompile(`(?m)^# TYPE (liveedge_[a-z0-9_]+) `)
)

// README's metrics table lists every liveedge_ metric the node registers:
// the names registered in the code (counters with labels and the cluster's
// and shared wallet's, which a single node's scrape does not show), and
// every family a dev node's /metrics shows (whatever code registered it).
func TestREADMEListsEveryMetric(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	registered := map[string]bool{}
	err = filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "node_modules" || strings.HasPrefix(d.Name(), ".")) && path != ".." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil || !strings.Contains(string(src), "prometheus") {
			return err
		}
		for _, m := range metricNamespaced.FindAllStringSubmatch(string(src), -1) {
			registered["liveedge_"+m[1]] = true
		}
		if filepath.Dir(path) == filepath.Join("..", "gateway") {
			for _, m := range metricGateway.FindAllStringSubmatch(string(src), -1) {
				registered["liveedge_"+m[1]] = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(registered) < 30 || !registered["liveedge_cluster_subscribed_rooms"] || !registered["liveedge_ticket_orders_total"] {
		t.Fatalf("the scan of the code found %d metrics (%v): it no longer matches how they are registered", len(registered), registered)
	}
	n := nodetest.Start(t, nodetest.Config(t))
	_, _, body := getMetrics(t, n, "")
	scraped := metricFamily.FindAllStringSubmatch(body, -1)
	if len(scraped) < 20 {
		t.Fatalf("a dev node's /metrics shows %d liveedge_ families", len(scraped))
	}
	for _, m := range scraped {
		if !registered[m[1]] {
			t.Errorf("%s is on /metrics but the scan of the code did not find it: extend the scan", m[1])
		}
		registered[m[1]] = true
	}
	for name := range registered {
		if !strings.Contains(string(readme), "`"+name+"`") && !strings.Contains(string(readme), "`"+name+"{") {
			t.Errorf("README.md does not list the metric %s", name)
		}
	}
}

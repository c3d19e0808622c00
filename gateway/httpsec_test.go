package gateway_test

import (
	"crypto/rand"
	"encoding/hex"
	"io"
	"net/http"
	"strings"
	"testing"

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

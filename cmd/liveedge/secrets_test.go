package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
)

// waitExit waits for p to exit and returns its output; it fails the test if p
// is still running after timeout or exited 0.
func waitExit(t *testing.T, p *proc, timeout time.Duration) string {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("node started although its secrets are not acceptable\n%s", p.stdout)
	}
	if p.err == nil {
		t.Fatalf("node exited 0, want a failure\n%s", p.stdout)
	}
	return p.stdout.String()
}

// With dev tokens off a node refuses to start on the published dev secrets,
// and the production cluster config (which carries no secret) refuses to
// start until secrets are supplied; given private secrets from the
// environment or files it starts, without the dev endpoints.
func TestNodeRefusesDevSecretsWithDevTokensOff(t *testing.T) {
	bin := binary(t)

	// The single-node default with dev tokens switched off: its dev secrets.
	httpAddr, wsAddr := freeAddr(t), freeAddr(t)
	p := start(t, "", nodeEnv(httpAddr, wsAddr, t.TempDir(), "LIVEEDGE_AUTH_DEV_TOKENS=false"), bin)
	out := waitExit(t, p, 30*time.Second)
	for _, want := range []string{"auth.jwt_secret is a published development value", "pay.secrets[0] is a published development value"} {
		if !strings.Contains(out, want) {
			t.Fatalf("output does not say %q:\n%s", want, out)
		}
	}

	// The production cluster config as committed: no secret at all.
	cluster, err := filepath.Abs("../../configs/cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p = start(t, "", nodeEnv(freeAddr(t), freeAddr(t), t.TempDir()), bin, "-config", cluster)
	out = waitExit(t, p, 30*time.Second)
	for _, want := range []string{"auth.jwt_secret is empty", "pay.secrets needs at least one secret"} {
		if !strings.Contains(out, want) {
			t.Fatalf("output does not say %q:\n%s", want, out)
		}
	}

	// A short secret from the environment.
	p = start(t, "", nodeEnv(freeAddr(t), freeAddr(t), t.TempDir(), "LIVEEDGE_AUTH_DEV_TOKENS=false",
		"LIVEEDGE_AUTH_JWT_SECRET=only-twenty-bytes-xx", "LIVEEDGE_PAY_SECRETS="+strings.Repeat("p", 32)), bin)
	if out = waitExit(t, p, 30*time.Second); !strings.Contains(out, "auth.jwt_secret must be at least 32 bytes") {
		t.Fatalf("output does not name the short secret:\n%s", out)
	}

	// Private secrets: the JWT one from a file, the webhook ones from env.
	dir := t.TempDir()
	jwtFile := filepath.Join(dir, "jwt")
	if err := os.WriteFile(jwtFile, []byte(strings.Repeat("j", 40)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	httpAddr, wsAddr = freeAddr(t), freeAddr(t)
	p = start(t, "", nodeEnv(httpAddr, wsAddr, t.TempDir(), "LIVEEDGE_AUTH_DEV_TOKENS=false",
		"LIVEEDGE_AUTH_JWT_SECRET_FILE="+jwtFile, "LIVEEDGE_PAY_SECRETS="+strings.Repeat("p", 32),
		"LIVEEDGE_ROOMS_OPEN_CLOSE_INTERVAL=1s"), bin) // (a production node bounds it)
	waitReady(t, p, httpAddr)
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/dev/token", "", `{"user_id":1,"role":"admin"}`, nil); st != 404 {
		t.Fatalf("dev token with dev tokens off: %d, want 404", st)
	}
}

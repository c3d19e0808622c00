package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// dialAll upgrades len(tokens) connections at once, one per token, and
// returns the clients that got in and the HTTP statuses of those refused.
func dialAll(t *testing.T, n *gateway.Node, tokens []string) (ok []*nodetest.Raw, refused map[int]int) {
	t.Helper()
	var mu sync.Mutex
	refused = map[int]int{}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for _, tok := range tokens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			r, resp, err := nodetest.DialRaw(t, nodetest.WSURL(n), tok, nodetest.RawOptions{})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok = append(ok, r)
			case resp != nil:
				refused[resp.StatusCode]++
			default:
				refused[-1]++ // no HTTP answer at all
			}
		}()
	}
	close(start)
	wg.Wait()
	return ok, refused
}

// upgradeEnvelope asks for /ws with tok without upgrading and decodes the
// JSON envelope of the refusal.
func upgradeEnvelope(t *testing.T, n *gateway.Node, tok string) (status, code int) {
	t.Helper()
	var env struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	}
	status = nodetest.DoJSON(t, "GET", "http://"+n.WS.Addr()+"/ws?token="+tok, "", "", &env)
	return status, env.Code
}

// One token, 40 concurrent upgrades: exactly ws.max_conns_per_user (8) get in,
// every other one is refused with 429 / 10429; another user is not affected;
// closing one frees one slot; when all are closed no per-user entry is left.
func TestPerUserConnCapExactUnderConcurrency(t *testing.T) {
	cfg := nodetest.Config(t)
	if cfg.WS.MaxConnsPerUser != 8 {
		t.Fatalf("default ws.max_conns_per_user = %d, want 8", cfg.WS.MaxConnsPerUser)
	}
	n := nodetest.Start(t, cfg)
	tok := nodetest.Token(t, n, 42, gateway.RoleViewer)
	tokens := make([]string, 40)
	for i := range tokens {
		tokens[i] = tok
	}
	ok, refused := dialAll(t, n, tokens)
	if len(ok) != 8 || refused[http.StatusTooManyRequests] != 32 {
		t.Fatalf("%d upgrades accepted (want 8), refused by status %v (want 32 × 429)", len(ok), refused)
	}
	if st, code := upgradeEnvelope(t, n, tok); st != http.StatusTooManyRequests || code != proto.CodeRateLimited {
		t.Fatalf("over the per-user cap: HTTP %d code %d, want 429 / %d", st, code, proto.CodeRateLimited)
	}
	// Another user still gets in.
	dial(t, n, 43, nodetest.RawOptions{})

	// One closed: exactly one more fits.
	ok[0].Close()
	<-ok[0].Closed()
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.Conns() == 8 }, "closed connection not released")
	again, refused := dialAll(t, n, tokens[:5])
	if len(again) != 1 || refused[http.StatusTooManyRequests] != 4 {
		t.Fatalf("after one close: %d accepted (want 1), refused %v", len(again), refused)
	}
	for _, r := range append(ok[1:], again...) {
		r.Close()
	}
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.Conns() == 1 }, "connections not released: %d", n.WS.Conns())
	if u := n.WS.ConnUsers(); u != 1 {
		t.Fatalf("per-user map holds %d users, want 1 (only user 43 is connected)", u)
	}
}

// ws.max_conns is exact under concurrency: 40 users upgrading at once on a
// node with room for 10 — exactly 10 get in, 30 get 503.
func TestGlobalConnCapExactUnderConcurrency(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.MaxConns = 10
	n := nodetest.Start(t, cfg)
	tokens := make([]string, 40)
	for i := range tokens {
		tokens[i] = nodetest.Token(t, n, int64(100+i), gateway.RoleViewer)
	}
	ok, refused := dialAll(t, n, tokens)
	if len(ok) != 10 || refused[http.StatusServiceUnavailable] != 30 {
		t.Fatalf("%d upgrades accepted (want 10), refused by status %v (want 30 × 503)", len(ok), refused)
	}
	if n.WS.Conns() != 10 {
		t.Fatalf("Conns = %d, want 10", n.WS.Conns())
	}
	if st, code := upgradeEnvelope(t, n, tokens[0]); st != http.StatusServiceUnavailable || code != proto.CodeInternal {
		t.Fatalf("node full: HTTP %d code %d, want 503 / %d", st, code, proto.CodeInternal)
	}
	for _, r := range ok {
		r.Close()
	}
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.Conns() == 0 && n.WS.ConnUsers() == 0 },
		"slots not released: conns %d users %d", n.WS.Conns(), n.WS.ConnUsers())
}

// A live connection does not outlive its token: it is closed with 4501 once
// the token's exp passes (checked by the node-wide sweep, not at upgrade only).
func TestTokenExpiryCloses4501(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	tok, err := n.Auth.Issue(7, gateway.RoleViewer, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ident, err := n.Auth.Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	r := nodetest.MustDialRaw(t, nodetest.WSURL(n), tok, nodetest.RawOptions{})
	if h := r.Next(5 * time.Second); h.T != proto.TypeHello {
		t.Fatalf("first frame %q, want hello", h.T)
	}
	select {
	case <-r.Closed():
	case <-time.After(time.Until(ident.Expires) + 10*time.Second):
		t.Fatalf("connection still open 10 s after its token expired")
	}
	if at := time.Now(); at.Before(ident.Expires) {
		t.Fatalf("closed at %v, before the token's exp %v", at, ident.Expires)
	}
	if code := r.CloseCode(); code != proto.CloseTokenExpired {
		t.Fatalf("close code %d, want %d", code, proto.CloseTokenExpired)
	}
}

// A refresh request hands an open connection a later token: it outlives
// the one it was opened with, and the hello and the reply say how long the
// token has left. A token of another user or role, or one that does not
// verify, is refused with its code and changes nothing: that connection is
// closed 4501 at its first token's exp.
func TestRefreshKeepsTheConnectionPastItsToken(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	tok, exp := shortToken(t, n, 7, 5*time.Second)
	dial := func() *nodetest.Raw {
		r := nodetest.MustDialRaw(t, nodetest.WSURL(n), tok, nodetest.RawOptions{})
		h := r.Next(5 * time.Second)
		if h.T != proto.TypeHello {
			t.Fatalf("first frame %q, want hello", h.T)
		}
		var hello proto.Hello
		if err := proto.Unmarshal(h.D, &hello); err != nil {
			t.Fatal(err)
		}
		if hello.ExpiresInMS <= 0 || hello.ExpiresInMS > 5000 {
			t.Fatalf("hello expires_in_ms %d, want within (0, 5000]", hello.ExpiresInMS)
		}
		return r
	}
	refresh := func(r *nodetest.Raw, id int, tok string) proto.ServerFrame {
		t.Helper()
		if err := r.Send(`{"t":"refresh","id":` + strconv.Itoa(id) + `,"d":{"token":"` + tok + `"}}`); err != nil {
			t.Fatal(err)
		}
		f := r.NextOfType(proto.TypeReply, 5*time.Second)
		if f.ID != int64(id) {
			t.Fatalf("reply to %d, want %d", f.ID, id)
		}
		return f
	}
	issue := func(user int64, role string, ttl time.Duration) string {
		tk, err := n.Auth.Issue(user, role, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return tk
	}
	otherSecret, err := gateway.NewAuth(strings.Repeat("k", 32)).Issue(7, gateway.RoleViewer, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	kept, refused, late := dial(), dial(), dial()
	for i, c := range []struct {
		tok  string
		code int
	}{
		{issue(8, gateway.RoleViewer, time.Hour), proto.CodeForbidden},
		{issue(7, gateway.RoleAnchor, time.Hour), proto.CodeForbidden},
		{"not.a.token", proto.CodeUnauthenticated},
		{otherSecret, proto.CodeUnauthenticated},
	} {
		if f := refresh(refused, i+1, c.tok); f.Code != c.code {
			t.Fatalf("refresh %d answered %d %q, want %d", i+1, f.Code, f.Msg, c.code)
		}
	}
	f := refresh(kept, 9, issue(7, gateway.RoleViewer, time.Hour))
	var rep proto.RefreshReply
	if err := proto.Unmarshal(f.D, &rep); f.Code != proto.CodeOK || err != nil {
		t.Fatalf("refresh answered %d %q (%v)", f.Code, f.Msg, err)
	}
	if rep.ExpiresInMS < 3_500_000 || rep.ExpiresInMS > 3_600_000 {
		t.Fatalf("refresh reply expires_in_ms %d, want about an hour", rep.ExpiresInMS)
	}
	for outcome, want := range map[string]float64{"ok": 1, "forbidden": 2, "refused": 2} {
		if got := metricValue(t, n, "liveedge_token_refreshes_total", `outcome="`+outcome+`"`); got != want {
			t.Fatalf("liveedge_token_refreshes_total{outcome=%q} %v, want %v", outcome, got, want)
		}
	}
	// Past exp a refresh does not revive a connection: refused, or the
	// connection already closed 4501 by the sweep.
	time.Sleep(time.Until(exp) + 20*time.Millisecond)
	if err := late.Send(`{"t":"refresh","id":11,"d":{"token":"` + issue(7, gateway.RoleViewer, time.Hour) + `"}}`); err == nil {
		select {
		case f := <-late.Frames():
			if f.T != proto.TypeReply || f.ID != 11 || f.Code != proto.CodeUnauthenticated {
				t.Fatalf("a refresh after exp answered %s %d %d %q, want 10002", f.T, f.ID, f.Code, f.Msg)
			}
		case <-late.Closed():
		case <-time.After(5 * time.Second):
			t.Fatal("no answer to a refresh after exp, and no close")
		}
	}
	for _, r := range []*nodetest.Raw{refused, late} {
		select {
		case <-r.Closed():
		case <-time.After(time.Until(exp) + 10*time.Second):
			t.Fatal("connection not refreshed still open 10 s after its token expired")
		}
		if code := r.CloseCode(); code != proto.CloseTokenExpired {
			t.Fatalf("close code %d, want %d", code, proto.CloseTokenExpired)
		}
	}
	time.Sleep(2 * time.Second) // two sweeps more (one a second at most)
	select {
	case <-kept.Closed():
		t.Fatalf("refreshed connection closed %d", kept.CloseCode())
	default:
	}
	if err := kept.Send(`{"t":"ping","id":10,"d":{}}`); err != nil {
		t.Fatal(err)
	}
	if f := kept.NextOfType(proto.TypeReply, 5*time.Second); f.ID != 10 || f.Code != proto.CodeOK {
		t.Fatalf("ping on the refreshed connection answered %d %d", f.ID, f.Code)
	}
}

// The SDK with a TokenFunc treats 4501 as "get a new token and reconnect": it
// asks for a fresh token and is connected again with it, rooms re-joined —
// here its refreshes before the token's end fail (TokenFunc refuses them),
// as with a token issuer that is down for the token's last minute.
// With a static token 4501 stays terminal.
func TestSDKTokenFuncRenewsAfter4501(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 1, 0)
	var (
		calls, refreshes atomic.Int32
		mu               sync.Mutex
		reasons          []string
	)
	c := sdkDial(t, n, 8, nil, func(cfg *clientsdk.Config) {
		cfg.TokenFunc = func(ctx context.Context) (string, error) {
			if clientsdk.TokenReason(ctx) == clientsdk.TokenRefresh {
				refreshes.Add(1)
				return "", errors.New("token issuer down")
			}
			mu.Lock()
			reasons = append(reasons, clientsdk.TokenReason(ctx))
			mu.Unlock()
			ttl := time.Hour
			if calls.Add(1) == 1 {
				ttl = 3 * time.Second // the first token expires while connected
			}
			return n.Auth.Issue(8, gateway.RoleViewer, ttl)
		}
	})
	if _, err := c.Join(context.Background(), room); err != nil {
		t.Fatal(err)
	}
	nodetest.Eventually(t, 20*time.Second, func() bool { return c.Stats().Reconnects == 1 },
		"no reconnect after the token expired (token calls %d, last close %v)", calls.Load(), c.Err())
	if code, _ := c.LastClose(); code != proto.CloseTokenExpired {
		t.Fatalf("last close %d, want %d", code, proto.CloseTokenExpired)
	}
	if got := calls.Load(); got != 2 {
		t.Fatalf("TokenFunc called %d times for a connection, want 2", got)
	}
	mu.Lock()
	got := strings.Join(reasons, ",")
	mu.Unlock()
	if got != clientsdk.TokenConnect+","+clientsdk.TokenExpired {
		t.Fatalf("TokenFunc reasons %s, want connect then expired", got)
	}
	if refreshes.Load() == 0 {
		t.Fatal("no refresh tried before the token ended")
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Fatalf("ping on the renewed connection: %v", err)
	}
	if rooms := c.Rooms(); len(rooms) != 1 || rooms[0] != room {
		t.Fatalf("rooms after renewal: %v", rooms)
	}

	// Static token: 4501 is terminal.
	tok, err := n.Auth.Issue(9, gateway.RoleViewer, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s := sdkDial(t, n, 9, nil, func(cfg *clientsdk.Config) { cfg.Token = tok })
	select {
	case <-s.Closed():
	case <-time.After(20 * time.Second):
		t.Fatal("static-token client still running 20 s after its token expired")
	}
	var ce *clientsdk.CloseError
	if !errors.As(s.Err(), &ce) || ce.Code != proto.CloseTokenExpired {
		t.Fatalf("static-token client stopped with %v, want close %d", s.Err(), proto.CloseTokenExpired)
	}
}

// With a TokenFunc the SDK refreshes the connection's token before it ends:
// tokens of 8 s (7 to 8: exp has whole seconds), the connection outlives
// two of them without a 4501 or a reconnect, its room kept.
func TestSDKRefreshesItsTokenBeforeItEnds(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 1, 0)
	var refreshes atomic.Int32
	var drops atomic.Int32
	c := sdkDial(t, n, 8, nil, func(cfg *clientsdk.Config) {
		cfg.TokenFunc = func(ctx context.Context) (string, error) {
			if clientsdk.TokenReason(ctx) == clientsdk.TokenRefresh {
				refreshes.Add(1)
			}
			return n.Auth.Issue(8, gateway.RoleViewer, 8*time.Second)
		}
		cfg.OnState = func(ev clientsdk.StateEvent) {
			if ev.State == clientsdk.StateDisconnected {
				drops.Add(1)
			}
		}
	})
	if _, err := c.Join(context.Background(), room); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	nodetest.Eventually(t, 60*time.Second, func() bool { return refreshes.Load() >= 2 && time.Since(start) > 9*time.Second },
		"refreshes %d", refreshes.Load())
	if r, d := c.Stats().Reconnects, drops.Load(); r != 0 || d != 0 {
		code, reason := c.LastClose()
		t.Fatalf("%d reconnects, %d disconnects (last close %d %s) with refreshed tokens", r, d, code, reason)
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rooms := c.Rooms(); len(rooms) != 1 || rooms[0] != room {
		t.Fatalf("rooms: %v", rooms)
	}
}

// A token valid past 2262 (its exp in nanoseconds overflows int64) is not
// taken as expired: the connection stays open through the sweeps (it was
// closed with 4501, which clients treat as final, at the first one).
func TestFarFutureTokenIsNotExpired(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.Heartbeat = configsDuration(200 * time.Millisecond)
	cfg.Auth.MaxTokenTTL = 0 // any exp (the default refuses one this far away: TestTokenLifetimeBounded)
	n := nodetest.Start(t, cfg)
	tok, err := n.Auth.Issue(7, gateway.RoleViewer, 250*365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	r := nodetest.MustDialRaw(t, nodetest.WSURL(n), tok, nodetest.RawOptions{})
	if h := r.Next(5 * time.Second); h.T != proto.TypeHello {
		t.Fatalf("first frame %q, want hello", h.T)
	}
	for deadline := time.Now().Add(1500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if err := r.Send(`{"t":"ping","id":1}`); err != nil { // keeps it from the silence timeout
			t.Fatal(err)
		}
		select {
		case <-r.Closed():
			t.Fatalf("closed with %d: a token valid until the 23rd century taken as expired", r.CloseCode())
		default:
		}
	}
}

// A connection's joins are rate limited (JoinsPerSecond, bursts of
// JoinBurst): each may read the room's history and subscribe the node to
// the room, so a join/leave loop was a free amplifier. Another connection —
// of the same user too (a reconnect re-joins on each) — is not held back.
func TestJoinLoopIsRateLimited(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 1, 0)
	r := dial(t, n, 9, nodetest.RawOptions{})
	// Join and leave frames sent at once (no wait for the replies: the
	// limit's refill, 10 a second, must not keep up with a slow machine).
	const rounds = gateway.JoinBurst + 20
	for i := range rounds {
		if err := r.Send(fmt.Sprintf(`{"t":"join","id":%d,"d":{"room_id":%d}}`, i+1, room)); err != nil {
			t.Fatal(err)
		}
		if err := r.Send(fmt.Sprintf(`{"t":"leave","id":%d,"d":{"room_id":%d}}`, 10_000+i, room)); err != nil {
			t.Fatal(err)
		}
	}
	ok, limited := 0, 0
	for range 2 * rounds {
		f := r.NextOfType(proto.TypeReply, 5*time.Second)
		switch {
		case f.ID >= 10_000:
		case f.Code == proto.CodeOK:
			ok++
		case f.Code == proto.CodeRateLimited:
			limited++
		default:
			t.Fatalf("join %d: code %d", f.ID, f.Code)
		}
	}
	if ok < gateway.JoinBurst || limited == 0 {
		t.Fatalf("%d joins at once: %d ok, %d refused 10429; want the burst of %d ok and the rest refused", rounds, ok, limited, gateway.JoinBurst)
	}
	other := dial(t, n, 9, nodetest.RawOptions{})
	if err := other.Send(fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)); err != nil {
		t.Fatal(err)
	}
	if f := other.NextOfType(proto.TypeReply, 5*time.Second); f.Code != proto.CodeOK {
		t.Fatalf("another connection's join: %d", f.Code)
	}
}

// A frame whose handler panics (a bug) closes its connection with 1011 and
// nothing else: the node, and every other connection, go on. Before, the
// panic ended the process (HTTP handlers had a recovery, WebSocket's not).
func TestFrameHandlerPanicClosesOnlyItsConnection(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	n.WS.PanicOnFrame(proto.TypeChat)
	other := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, 61, gateway.RoleViewer), nodetest.RawOptions{})
	if h := other.Next(5 * time.Second); h.T != proto.TypeHello {
		t.Fatalf("first frame %q, want hello", h.T)
	}
	r := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, 62, gateway.RoleViewer), nodetest.RawOptions{})
	if h := r.Next(5 * time.Second); h.T != proto.TypeHello {
		t.Fatalf("first frame %q, want hello", h.T)
	}
	if err := r.Send(`{"t":"chat","id":1,"d":{"room_id":1,"text":"hi"}}`); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.Closed():
	case <-time.After(5 * time.Second):
		t.Fatal("the connection whose frame panicked is still open")
	}
	if code := r.CloseCode(); code != proto.CloseInternal {
		t.Fatalf("close code %d, want %d", code, proto.CloseInternal)
	}
	if err := other.Send(`{"t":"ping","id":7}`); err != nil {
		t.Fatal(err)
	}
	if f := other.NextOfType(proto.TypeReply, 5*time.Second); f.ID != 7 || f.Code != proto.CodeOK {
		t.Fatalf("the other connection's ping: %+v", f)
	}
}

// A chat whose req_id claim fails after its rate was checked (a cluster's
// Redis that stops answering between the two) sent nothing and spends none
// of the user's rate (protocol.md: a Redis failure spends none): the next
// chat goes out at once. Before, it was 10429 until the rate refilled.
func TestChatNotSentSpendsNoRate(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.Limits.ChatPerSecond = 1 // one a second, no burst
	n := nodetest.Start(t, cfg)
	n.WS.FailChatClaims(proto.Errorf(proto.CodeInternal, "temporarily unavailable, retry"))
	room := nodetest.OpenRoom(t, n, 1, 3)
	c := sdkDial(t, n, 10, nil, nil)
	ctx := context.Background()
	if _, err := c.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := c.ChatOnce(ctx, room, "hi", fmt.Sprintf("r%d", i)); proto.AsError(err) == nil || proto.AsError(err).Code != proto.CodeInternal {
			t.Fatalf("claim %d failing: %v, want 50000", i, err)
		}
	}
	if _, err := c.Chat(ctx, room, "after"); err != nil {
		t.Fatalf("a chat after the ones not sent: %v, want sent (no rate spent)", err)
	}
	if _, err := c.Chat(ctx, room, "again"); proto.AsError(err) == nil || proto.AsError(err).Code != proto.CodeRateLimited {
		t.Fatalf("a second chat within the second: %v, want 10429 (the rate still holds)", err)
	}
}

// auth.max_token_ttl: a token whose exp is further than that from now, or
// whose iat is more than a minute ahead of the node's clock, is refused —
// an admin token an issuer wrote for 170 years was good until 2200.
func TestTokenLifetimeBounded(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.Auth.MaxTokenTTL = configsDuration(24 * time.Hour)
	n := nodetest.Start(t, cfg)
	sign := func(claims jwt.MapClaims) string {
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(cfg.Auth.JWTSecret))
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	now := time.Now()
	for _, tc := range []struct {
		name   string
		claims jwt.MapClaims
		ok     bool
	}{
		{"within the bound", jwt.MapClaims{"sub": "42", "role": "admin", "exp": now.Add(23 * time.Hour).Unix()}, true},
		{"within the bound, iat now", jwt.MapClaims{"sub": "42", "role": "admin", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}, true},
		{"exp beyond the bound", jwt.MapClaims{"sub": "42", "role": "admin", "exp": now.Add(170 * 365 * 24 * time.Hour).Unix()}, false},
		{"exp just beyond the bound", jwt.MapClaims{"sub": "42", "role": "admin", "exp": now.Add(25 * time.Hour).Unix()}, false},
		{"iat in the future", jwt.MapClaims{"sub": "42", "role": "admin", "iat": now.Add(100 * 24 * time.Hour).Unix(), "exp": now.Add(time.Hour).Unix()}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n)+"/api/v1/wallet", sign(tc.claims), "", nil)
			if got := status != http.StatusUnauthorized; got != tc.ok {
				t.Fatalf("GET /api/v1/wallet: %d, want accepted %v", status, tc.ok)
			}
			_, resp, err := nodetest.DialRaw(t, nodetest.WSURL(n), sign(tc.claims), nodetest.RawOptions{})
			if got := err == nil; got != tc.ok {
				t.Fatalf("upgrade: %v (response %v), want accepted %v", err, resp, tc.ok)
			}
		})
	}
}

// A dev token (auth.dev_tokens) lives no longer than auth.max_token_ttl:
// minted for 24 h under a 1 h bound, every one was refused 401 by the node
// that minted it.
func TestDevTokenWithinTheTokenBound(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.Auth.MaxTokenTTL = configsDuration(time.Hour)
	n := nodetest.Start(t, cfg)
	var out struct {
		Code int `json:"code"`
		Data struct {
			Token string `json:"token"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/dev/token", "", `{"user_id":42,"role":"viewer"}`, &out); st != 200 || out.Code != 0 || out.Data.Token == "" {
		t.Fatalf("dev token: %d %+v", st, out)
	}
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n)+"/api/v1/wallet", out.Data.Token, "", nil); st != http.StatusOK {
		t.Fatalf("GET /api/v1/wallet with the dev token: %d, want 200", st)
	}
}

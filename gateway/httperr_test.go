package gateway_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/room"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// httpEnvelope performs a request and decodes the JSON error envelope.
func httpEnvelope(t *testing.T, method, url, contentType string, body io.Reader) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("%s %s: %d content type %q body %q, want the JSON envelope", method, url, resp.StatusCode, ct, raw)
	}
	var env map[string]any
	if err := proto.Unmarshal(raw, &env); err != nil {
		t.Fatalf("%s %s: body %q: %v", method, url, raw, err)
	}
	for _, k := range []string{"code", "msg", "data"} {
		if _, ok := env[k]; !ok {
			t.Fatalf("%s %s: envelope %q lacks %q", method, url, raw, k)
		}
	}
	return resp.StatusCode, env
}

// chunkedEnvelope POSTs body chunked, the whole request in one write, and
// decodes the JSON error envelope. (net/http's client writes the headers and
// each chunk separately; in one CI run Hertz answered that valid stream with
// "empty hex number" and closed while the client was still writing — a
// broken pipe, a flake that has nothing to do with the body limit this case
// is about. Cause not found; one write keeps the case deterministic.)
func chunkedEnvelope(t *testing.T, base, path, body string) (int, map[string]any) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: liveedge\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n",
		path, len(body), body)
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("POST %s chunked: %v", path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("POST %s chunked: %d content type %q body %q, want the JSON envelope", path, resp.StatusCode, ct, raw)
	}
	var env map[string]any
	if err := proto.Unmarshal(raw, &env); err != nil {
		t.Fatalf("POST %s chunked: body %q: %v", path, raw, err)
	}
	return resp.StatusCode, env
}

// Unknown route, unknown method on a known path, a body over the limit and
// a rejected webhook each answer in the JSON envelope with their status.
func TestHTTPErrorsUseEnvelope(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.HTTP.MaxBodyBytes = 4 << 10
	n := nodetest.Start(t, cfg)
	base := nodetest.HTTPURL(n)
	big := `{"user_id":1,"role":"viewer","pad":"` + strings.Repeat("x", 8<<10) + `"}`
	cases := []struct {
		name, method, path, body string
		chunked                  bool
		status, code             int
	}{
		{"unknown route", "GET", "/api/v1/nope", "", false, 404, proto.CodeNotFound},
		{"unknown route outside the API", "GET", "/nope", "", false, 404, proto.CodeNotFound},
		{"unknown method", "DELETE", "/api/v1/gifts", "", false, 405, proto.CodeBadRequest},
		{"a route with a trailing slash", "GET", "/api/v1/gifts/", "", false, 404, proto.CodeNotFound},
		{"a POST route with a trailing slash", "POST", "/api/v1/rooms/", "{}", false, 404, proto.CodeNotFound},
		{"unknown method on a webhook", "GET", "/api/v1/pay/notify/mock", "", false, 405, proto.CodeBadRequest},
		{"body too large", "POST", "/api/v1/dev/token", big, false, 413, proto.CodeBadRequest},
		{"chunked body too large", "POST", "/api/v1/dev/token", big, true, 413, proto.CodeBadRequest},
		{"webhook without signature", "POST", "/api/v1/pay/notify/mock", `{"event_id":"e","order_id":"1","amount":1,"status":"SUCCESS"}`, false, 401, proto.CodeUnauthenticated},
	}
	for _, tc := range cases {
		var st int
		var env map[string]any
		if tc.chunked {
			st, env = chunkedEnvelope(t, base, tc.path, tc.body)
		} else {
			st, env = httpEnvelope(t, tc.method, base+tc.path, "application/json", strings.NewReader(tc.body))
		}
		if st != tc.status {
			t.Errorf("%s: status %d, want %d (%v)", tc.name, st, tc.status, env)
		}
		if code, _ := env["code"].(float64); int(code) != tc.code {
			t.Errorf("%s: code %v, want %d", tc.name, env["code"], tc.code)
		}
	}
	// A body within the limit still works, on the same server.
	var out struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", base+"/api/v1/dev/token", "", `{"user_id":1,"role":"viewer"}`, &out); st != 200 || out.Code != 0 {
		t.Fatalf("small body: %d %d", st, out.Code)
	}
}

// Numbers a client sends that are out of range are refused with 10001 —
// never a panic, nor a wrapped value taken as a valid one: a huge page
// wrapped (page-1) × page_size to a negative offset and panicked; a huge PK
// duration_s wrapped to 60 s; an order's source had no bound.
func TestHTTPOutOfRangeInputIs10001(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	base := nodetest.HTTPURL(n) + "/api/v1"
	const anchorA, anchorB = 800, 801
	roomA := nodetest.OpenRoom(t, n, anchorA, 1)
	roomB := nodetest.OpenRoom(t, n, anchorB, 1)
	viewer := nodetest.Token(t, n, 802, "viewer")
	anchor := nodetest.Token(t, n, anchorA, "anchor")
	// 36028797018964028 s × 1e9 ns wraps modulo 2^64 to exactly 60 s.
	wrapping := 36028797018964028
	if d := time.Duration(wrapping) * time.Second; d != time.Minute {
		t.Fatalf("the wrapping duration_s is %v here, not 60 s", d)
	}
	cases := []struct {
		name, method, path, token, body string
	}{
		{"page past the bound", "GET", "/rooms?page=9223372036854775807&page_size=100", viewer, ""},
		{"page just past the bound", "GET", fmt.Sprintf("/rooms?page=%d", room.MaxPage+1), viewer, ""},
		{"PK duration that wraps", "POST", "/pk", anchor, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":36028797018964028}`, roomA, roomB)},
		{"order source too long", "POST", "/pay/orders", viewer, fmt.Sprintf(`{"product_id":1,"channel":"mock","req_id":"r1","source":%q}`, strings.Repeat("s", pay.MaxSourceBytes+1))},
	}
	for _, tc := range cases {
		var out struct {
			Code int    `json:"code"`
			Msg  string `json:"msg"`
		}
		if st := nodetest.DoJSON(t, tc.method, base+tc.path, tc.token, tc.body, &out); st != 400 || out.Code != proto.CodeBadRequest {
			t.Errorf("%s: %d %d %q, want 400 10001", tc.name, st, out.Code, out.Msg)
		}
	}
	// In range, the same requests work.
	var out struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "GET", base+fmt.Sprintf("/rooms?page=%d", room.MaxPage), viewer, "", &out); st != 200 || out.Code != 0 {
		t.Errorf("the last page: %d %d", st, out.Code)
	}
	if st := nodetest.DoJSON(t, "POST", base+"/pay/orders", viewer, fmt.Sprintf(`{"product_id":1,"channel":"mock","req_id":"r2","source":%q}`, strings.Repeat("s", pay.MaxSourceBytes)), &out); st != 200 || out.Code != 0 {
		t.Errorf("an order with the longest source: %d %d", st, out.Code)
	}
}

// A request trickled in (a byte every 300 ms, each read well within the
// read timeout) holds its connection at most http.read_timeout from its
// first byte, headers or body: then the connection is closed. Before, the
// timeout bounded each read (Hertz's netpoll transport), so a body of
// 1,000 bytes sent that way held it for five minutes, and headers for as
// long as the client liked.
func TestHTTPRequestTrickledInIsCutOff(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.HTTP.ReadTimeout = configs.Duration(time.Second)
	n := nodetest.Start(t, cfg)
	for name, start := range map[string]string{
		"body":    "POST /api/v1/dev/token HTTP/1.1\r\nHost: liveedge\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
		"headers": "GET /healthz HTTP/1.1\r\nHost: liveedge\r\nX-Slow: ",
	} {
		t.Run(name, func(t *testing.T) {
			conn, err := net.Dial("tcp", n.API.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			begin := time.Now()
			if _, err := io.WriteString(conn, start); err != nil {
				t.Fatal(err)
			}
			ended := make(chan time.Time, 1)
			var answer bytes.Buffer
			go func() {
				_, _ = io.Copy(&answer, conn) // until the node closes
				ended <- time.Now()
			}()
			tick := time.NewTicker(300 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case at := <-ended:
					if d := at.Sub(begin); d > 4*time.Second {
						t.Fatalf("the connection ended after %v, want about the read timeout (1s)", d)
					}
					// A body not read whole in time: 408, as documented (it was 400).
					if name == "body" && !strings.HasPrefix(answer.String(), "HTTP/1.1 408") {
						t.Fatalf("answer %q, want 408", answer.String())
					}
					return
				case <-tick.C:
					if time.Since(begin) > 8*time.Second {
						t.Fatal("a request trickled in held the connection for 8s (read timeout 1s)")
					}
					_, _ = conn.Write([]byte("x"))
				}
			}
		})
	}
}

// A request that arrives on a kept-alive connection once the API is shutting
// down is answered 503 in the envelope with the connection closed — the
// standard transport keeps idle connections, and a request served then
// would run while the node's backends close.
func TestHTTPRequestDuringShutdownTurnedAway(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	conn, err := net.Dial("tcp", n.API.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(conn)
	get := func() *http.Response {
		t.Helper()
		if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: liveedge\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	if r := get(); r.StatusCode != 200 {
		t.Fatalf("before the shutdown: %d", r.StatusCode)
	}
	done := make(chan struct{})
	go func() {
		n.API.Shutdown(context.Background())
		close(done)
	}()
	time.Sleep(100 * time.Millisecond) // the shutdown has begun
	r := get()
	if r.StatusCode != 503 || !r.Close {
		t.Fatalf("during the shutdown: %d close=%v, want 503 and the connection closed", r.StatusCode, r.Close)
	}
	<-done
}

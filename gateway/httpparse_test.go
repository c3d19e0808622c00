package gateway_test

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudwego/hertz/pkg/common/hlog"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// rawEnvelope sends req as it is on a new connection to addr (writing in
// the background: the node may answer and close before reading it all) and
// reads one answer: its status, its envelope's code (-1: not the JSON
// envelope), whether it closes the connection, and the raw answer for
// messages.
func rawEnvelope(t *testing.T, addr, req string) (status, code int, closed bool, raw string) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	go func() { _, _ = io.WriteString(conn, req) }()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("request %q: no answer: %v", req[:min(len(req), 60)], err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	raw = resp.Status + " " + resp.Header.Get("Content-Type") + " " + string(body)
	var env struct {
		Code *int    `json:"code"`
		Msg  *string `json:"msg"`
		Data any     `json:"data"`
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") ||
		proto.Unmarshal(body, &env) != nil || env.Code == nil || env.Msg == nil || env.Data == nil {
		return resp.StatusCode, -1, resp.Close, raw
	}
	return resp.StatusCode, *env.Code, resp.Close, raw
}

// Requests Hertz cannot read are answered in the envelope with 10001 and
// Hertz's status (400; 431 for headers above http.max_header_bytes; 408 for
// a request not read within http.read_timeout), the connection closed —
// not Hertz's plain-text "Error when parsing request" — and so is an
// HTTP/1.1 request without a Host header (which Hertz reads but refuses to
// route). Well-formed requests are served as before, kept alive, an
// "Expect: 100-continue" one included.
func TestHTTPMalformedRequestsGetTheEnvelope(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.HTTP.ReadTimeout = configs.Duration(time.Second)
	n := nodetest.Start(t, cfg)
	addr := n.API.Addr()
	cases := []struct {
		name, req string
		status    int
		closes    bool // Hertz could not read it: the connection ends
	}{
		{"not a request line", "HELLO\r\n\r\n", 400, true},
		{"a request line without a version", "GET /healthz\r\nHost: liveedge\r\n\r\n", 400, true},
		{"a bad Content-Length", "POST /api/v1/dev/token HTTP/1.1\r\nHost: liveedge\r\nContent-Length: abc\r\n\r\n{}", 400, true},
		{"a bad chunk size", "POST /api/v1/dev/token HTTP/1.1\r\nHost: liveedge\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400, true},
		{"headers above the bound", "GET /healthz HTTP/1.1\r\nHost: liveedge\r\nX-Pad: " + strings.Repeat("x", 2*cfg.HTTP.MaxHeaderBytes) + "\r\n\r\n", 431, true},
		{"headers not read in time", "GET /healthz HTTP/1.1\r\nHost: liveedge\r\nX-Slow: ", 408, true},
		{"no Host header", "GET /healthz HTTP/1.1\r\n\r\n", 400, false},
	}
	for _, tc := range cases {
		st, code, closed, raw := rawEnvelope(t, addr, tc.req)
		if st != tc.status || code != proto.CodeBadRequest {
			t.Errorf("%s: %q, want %d in the envelope with %d", tc.name, raw, tc.status, proto.CodeBadRequest)
		}
		if tc.closes && !closed {
			t.Errorf("%s: answered %q without closing the connection", tc.name, raw)
		}
	}

	// Well-formed requests, on one kept-alive connection: served.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(conn)
	for i := range 2 {
		if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: liveedge\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "ok" || resp.Close {
			t.Fatalf("kept-alive request %d: %s %q close=%v", i, resp.Status, body, resp.Close)
		}
	}
	// Expect: 100-continue: the interim answer, then the answer once the
	// body is sent.
	body := `{"user_id":1,"role":"viewer"}`
	if _, err := io.WriteString(conn, "POST /api/v1/dev/token HTTP/1.1\r\nHost: liveedge\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: "+
		strconv.Itoa(len(body))+"\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100") {
		t.Fatalf("Expect: 100-continue: %q, %v", line, err)
	}
	if _, err := br.ReadString('\n'); err != nil { // the blank line ending the interim answer
		t.Fatal(err)
	}
	if _, err := io.WriteString(conn, body); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(raw), `"token"`) {
		t.Fatalf("after 100 Continue: %s %q", resp.Status, raw)
	}
	// A malformed request after those, on the same connection: the
	// envelope.
	if _, err := io.WriteString(conn, "HELLO\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if resp, err = http.ReadResponse(br, nil); err != nil {
		t.Fatal(err)
	}
	raw, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !resp.Close || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") || !strings.Contains(string(raw), `"code":10001`) {
		t.Fatalf("a malformed request on a kept-alive connection: %s close=%v %q", resp.Status, resp.Close, raw)
	}
}

// A flood of requests Hertz cannot read does not flood the log: Hertz's own
// error log of each (with the client's bytes) is muted; each is counted by
// reason in liveedge_http_refused_total.
func TestMalformedRequestsCountedNotLogged(t *testing.T) {
	var logged syncBuffer
	hlog.SetOutput(&logged)
	defer hlog.SetOutput(os.Stderr)
	cfg := nodetest.Config(t)
	n := nodetest.Start(t, cfg)
	const floods = 20
	for i := range floods {
		req := "HELLO-CLIENT-BYTES-" + strconv.Itoa(i) + "\r\n\r\n"
		if st, code, _, raw := rawEnvelope(t, n.API.Addr(), req); st != 400 || code != proto.CodeBadRequest {
			t.Fatalf("answer %q", raw)
		}
	}
	big := "GET /healthz HTTP/1.1\r\nHost: liveedge\r\nX-Pad: " + strings.Repeat("x", 2*cfg.HTTP.MaxHeaderBytes) + "\r\n\r\n"
	if st, _, _, raw := rawEnvelope(t, n.API.Addr(), big); st != 431 {
		t.Fatalf("answer %q", raw)
	}
	if got := metricValue(t, n, "liveedge_http_refused_total", `reason="malformed"`); got != floods {
		t.Errorf("refused malformed = %v, want %d", got, floods)
	}
	if got := metricValue(t, n, "liveedge_http_refused_total", `reason="headers_too_large"`); got != 1 {
		t.Errorf("refused headers_too_large = %v, want 1", got)
	}
	if s := logged.String(); strings.Contains(s, "HELLO-CLIENT-BYTES") || strings.Contains(s, "xxxxxxxx") {
		t.Errorf("the client's bytes were logged:\n%.2000s", s)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Command bareserver is the baseline of the idle-memory measurement
// (docs/performance.md): a bare gws server that speaks just enough of the
// LiveEdge protocol for cmd/loadgen's idle scenario — dev tokens and a room
// over HTTP, a hello, join and ping replies over WebSocket — with gws's own
// upgrade (net/http, hijack) and a goroutine per connection running gws's
// ReadLoop. Nothing else: no queues, no router, no heartbeat sweep.
//
//	bareserver -http 127.0.0.1:18170 -ws 127.0.0.1:18171 -gogc 400
//	loadgen -scenario idle -http http://127.0.0.1:18170 -ws ws://127.0.0.1:18171/ws \
//	    -conns 10000 -node-pid $(pgrep -n bareserver)
//
// Loopback addresses only.
package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

func main() {
	httpAddr := flag.String("http", "127.0.0.1:18170", "HTTP address (dev tokens, rooms)")
	wsAddr := flag.String("ws", "127.0.0.1:18171", "WebSocket address (/ws)")
	gogc := flag.Int("gogc", 0, "GOGC percentage (0: the runtime's); give the node's node.gogc to compare like with like")
	flag.Parse()
	for _, a := range []string{*httpAddr, *wsAddr} {
		if h, _, err := net.SplitHostPort(a); err != nil || !net.ParseIP(h).IsLoopback() {
			fmt.Fprintln(os.Stderr, "bareserver: loopback addresses only:", a)
			os.Exit(2)
		}
	}
	if *gogc > 0 {
		debug.SetGCPercent(*gogc)
	}
	s := &server{conns: map[*gws.Conn]struct{}{}}
	s.up = gws.NewUpgrader(s, &gws.ServerOption{CheckUtf8Enabled: false})

	api := http.NewServeMux()
	api.HandleFunc("POST /api/v1/dev/token", devToken)
	api.HandleFunc("POST /api/v1/rooms", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]int64{"room_id": 1})
	})
	go func() { fail(http.ListenAndServe(*httpAddr, api)) }()
	fmt.Printf("bareserver: HTTP http://%s, WebSocket ws://%s/ws\n", *httpAddr, *wsAddr)
	fail(http.ListenAndServe(*wsAddr, s))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "bareserver:", err)
	os.Exit(1)
}

func reply(w http.ResponseWriter, d any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"code": 0, "msg": "ok", "data": d})
}

// devToken answers {"user_id":N} with the token "N" (no signature: a baseline).
func devToken(w http.ResponseWriter, r *http.Request) {
	var req struct {
		UserID int64 `json:"user_id"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.UserID <= 0 {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	reply(w, map[string]string{"token": strconv.FormatInt(req.UserID, 10)})
}

// server is the WebSocket side: one room, every joined connection in a map.
type server struct {
	up *gws.Upgrader

	mu    sync.Mutex
	conns map[*gws.Conn]struct{}
}

// tokenUser is the user of a token: "N" from devToken, or a JWT signed by the
// load generator (-token-secret), whose "sub" is read without checking the
// signature (a baseline: no auth work beyond reading the claim).
func tokenUser(tok string) (int64, error) {
	if u, err := strconv.ParseInt(tok, 10, 64); err == nil {
		return u, nil
	}
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return 0, errors.New("not a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return 0, err
	}
	var c struct {
		Sub string `json:"sub"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return 0, err
	}
	return strconv.ParseInt(c.Sub, 10, 64)
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/ws" {
		http.NotFound(w, r)
		return
	}
	user, err := tokenUser(r.URL.Query().Get("token"))
	if err != nil {
		http.Error(w, "bad token", http.StatusUnauthorized)
		return
	}
	socket, err := s.up.Upgrade(w, r)
	if err != nil {
		return
	}
	socket.Session().Store("user", user)
	go socket.ReadLoop()
}

func (s *server) OnOpen(c *gws.Conn) {
	user, _ := c.Session().Load("user")
	id, _ := user.(int64)
	_ = c.WriteMessage(gws.OpcodeText, proto.EncodeHello(proto.Hello{UserID: id, Node: "bare", HeartbeatS: 30}))
}

func (s *server) OnClose(c *gws.Conn, _ error) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *server) OnPing(c *gws.Conn, p []byte) { _ = c.WritePong(p) }
func (s *server) OnPong(*gws.Conn, []byte)     {}

type joinReply struct {
	RoomID int64  `json:"room_id"`
	Online int    `json:"online"`
	Off    int64  `json:"off"`
	Ep     string `json:"ep"`
}

// OnMessage answers ping and join; any other request gets an empty ok.
func (s *server) OnMessage(c *gws.Conn, msg *gws.Message) {
	defer msg.Close()
	f, perr := proto.DecodeClientFrame(msg.Bytes())
	if perr != nil {
		_ = c.WriteMessage(gws.OpcodeText, proto.EncodeErrorReply(f.ID, perr))
		return
	}
	var d any
	switch f.T {
	case proto.TypePing:
		d = map[string]int64{"ts": time.Now().UnixMilli()}
	case proto.TypeJoin:
		var r proto.RoomReq
		if e := f.DecodeData(&r); e != nil {
			_ = c.WriteMessage(gws.OpcodeText, proto.EncodeErrorReply(f.ID, e))
			return
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		n := len(s.conns)
		s.mu.Unlock()
		d = joinReply{RoomID: r.RoomID, Online: n, Ep: "bare"}
	}
	_ = c.WriteMessage(gws.OpcodeText, proto.EncodeReply(f.ID, proto.CodeOK, "ok", d))
}

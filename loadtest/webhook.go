package loadtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

//go:embed wrk/webhook.lua
var webhookLua []byte

// WebhookConfig describes a webhook run with wrk.
type WebhookConfig struct {
	HTTP      string        // the node's HTTP base (loopback)
	Secret    string        // one of the node's pay.secrets
	Orders    int           // orders created beforehand, each notified once (default 50,000)
	Users     int           // buyers the orders are spread over (default Orders/100)
	ProductID int64         // default 1 (300 coins)
	Threads   int           // wrk threads (default 2)
	Conns     int           // wrk connections (default 64)
	MaxTime   time.Duration // wrk -d: the run stops here at the latest (default 60 s)
	Wrk       string        // the wrk binary (default "wrk")
	Dir       string        // where the bodies and the script go ("" = a temp dir)
	NodePID   int           // the node's process (0: unknown, its CPU is not measured)
	Log       io.Writer
}

// WebhookResult is what RunWebhook measured and checked (the -json file of
// cmd/wrkwebhook, read by the benchmark report).
type WebhookResult struct {
	Orders        int     `json:"orders"`
	Requests      int64   `json:"requests"`    // wrk's completed requests (notifies + fillers)
	Seconds       float64 `json:"seconds"`     // first notify sent → last answered (timed in webhook.lua)
	WrkSeconds    float64 `json:"wrk_seconds"` // wrk's own run time (until interrupted)
	NotifiesPerS  float64 `json:"notifies_per_sec"`
	Answered      int64   `json:"notifies_answered_success"`
	Bad           int64   `json:"notifies_answered_otherwise"`
	Filler        int64   `json:"filler_requests"` // GET /healthz while the last notifies were in flight
	Non2xx        int64   `json:"non_2xx"`
	SocketErrors  int64   `json:"socket_errors"`
	Paid          int     `json:"paid"`           // orders PAYED after the run
	CreditedCoins int64   `json:"credited_coins"` // Σ buyers' balances (fresh users)
	ExpectedCoins int64   `json:"expected_coins"` // Σ coins of the orders
	ExactlyOnce   bool    `json:"exactly_once"`
	LatencyP50Ms  float64 `json:"latency_p50_ms"`
	LatencyP99Ms  float64 `json:"latency_p99_ms"`
	LatencyMaxMs  float64 `json:"latency_max_ms"`
	Conns         int     `json:"connections"`
	Threads       int     `json:"threads"`
	CreateSeconds float64 `json:"create_seconds"` // creating the orders over HTTP (not measured by wrk)
	// CPU per notify while wrk ran (the node from /proc, wrk from its
	// rusage): on a machine shared with other work the rate moves with the
	// load, the CPU a notify costs much less.
	NodeCPUus float64 `json:"node_cpu_us_per_notify,omitempty"`
	WrkCPUus  float64 `json:"wrk_cpu_us_per_notify,omitempty"`
	Error     string  `json:"error,omitempty"`
}

// SignNotify is the X-Pay-Signature value for body at t (docs/payments.md):
// t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>.
func SignNotify(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(ts + "."))
	m.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(m.Sum(nil))
}

type order struct {
	ID     string `json:"order_id"`
	Amount int64  `json:"amount"`
	Coins  int64  `json:"coins"`
	Status string `json:"status"`
	user   int
}

// RunWebhook creates Orders real orders over the HTTP API, writes one signed
// SUCCESS notify per order, has wrk post each exactly once (webhook.lua),
// then checks that every order is PAYED and every buyer's balance is the sum
// of its orders' coins: each notify verified and credited exactly once.
func RunWebhook(ctx context.Context, cfg WebhookConfig) (*WebhookResult, error) {
	if err := CheckLoopback(cfg.HTTP); err != nil {
		return nil, err
	}
	if cfg.Orders <= 0 {
		cfg.Orders = 50_000
	}
	if cfg.Users <= 0 {
		cfg.Users = max(cfg.Orders/100, 1)
	}
	if cfg.ProductID <= 0 {
		cfg.ProductID = 1
	}
	if cfg.Threads <= 0 {
		cfg.Threads = 2
	}
	if cfg.Conns <= 0 {
		cfg.Conns = 64
	}
	if cfg.MaxTime <= 0 {
		cfg.MaxTime = time.Minute
	}
	if cfg.Wrk == "" {
		cfg.Wrk = "wrk"
	}
	logf := func(format string, args ...any) {
		if cfg.Log != nil {
			fmt.Fprintf(cfg.Log, "webhook: "+format+"\n", args...)
		}
	}
	if cfg.Dir == "" {
		d, err := os.MkdirTemp("", "wrkwebhook-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		cfg.Dir = d
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64}}
	defer hc.CloseIdleConnections()

	// Buyers: fresh user ids, a token each.
	userBase := 2_000_000_000 + time.Now().UnixNano()/1000%1_000_000_000
	tokens := make([]string, cfg.Users)
	if err := parallel(ctx, cfg.Users, 32, func(i int) error {
		t, err := DevToken(ctx, hc, cfg.HTTP, userBase+int64(i), "viewer")
		tokens[i] = t
		return err
	}); err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	// Orders, 64 in flight (their fsyncs group-commit).
	t0 := time.Now()
	orders := make([]order, cfg.Orders)
	if err := parallel(ctx, cfg.Orders, 64, func(i int) error {
		u := i % cfg.Users
		o, err := call[order](ctx, hc, "POST", cfg.HTTP+"/api/v1/pay/orders", tokens[u],
			fmt.Sprintf(`{"product_id":%d,"channel":"mock","req_id":"wk-%d"}`, cfg.ProductID, i))
		o.user = u
		orders[i] = o
		return err
	}); err != nil {
		return nil, fmt.Errorf("orders: %w", err)
	}
	res := &WebhookResult{Orders: cfg.Orders, Conns: cfg.Conns, Threads: cfg.Threads, CreateSeconds: time.Since(t0).Seconds()}
	logf("%d orders of %d users created in %.1f s", cfg.Orders, cfg.Users, res.CreateSeconds)

	// One signed SUCCESS notify per order, one a line.
	bodies := filepath.Join(cfg.Dir, "bodies.tsv")
	f, err := os.Create(bodies)
	if err != nil {
		return nil, err
	}
	w := bufio.NewWriter(f)
	now := time.Now()
	for _, o := range orders {
		res.ExpectedCoins += o.Coins
		body := fmt.Sprintf(`{"event_id":"wk-%s","order_id":"%s","amount":%d,"status":"SUCCESS","paid_at":%d}`, o.ID, o.ID, o.Amount, now.UnixMilli())
		fmt.Fprintf(w, "%s\t%s\n", SignNotify(cfg.Secret, now, []byte(body)), body)
	}
	if err := w.Flush(); err != nil {
		return nil, err
	}
	f.Close()
	script := filepath.Join(cfg.Dir, "webhook.lua")
	if err := os.WriteFile(script, webhookLua, 0o644); err != nil {
		return nil, err
	}

	// wrk, bounded by MaxTime; its threads stop once their notifies are answered.
	doneDir := filepath.Join(cfg.Dir, "done")
	if err := os.MkdirAll(doneDir, 0o755); err != nil {
		return nil, err
	}
	args := []string{"-t", strconv.Itoa(cfg.Threads), "-c", strconv.Itoa(cfg.Conns), "-d", strconv.Itoa(int(cfg.MaxTime.Seconds())) + "s",
		"--timeout", "10s", "-s", script, cfg.HTTP, "--", bodies, strconv.Itoa(cfg.Threads), doneDir}
	logf("%s %s", cfg.Wrk, strings.Join(args, " "))
	var outBuf bytes.Buffer
	var nodeCPU0 time.Duration
	if cfg.NodePID > 0 {
		nodeCPU0, _ = CPUTime(cfg.NodePID)
	}
	cmd := exec.CommandContext(ctx, cfg.Wrk, args...)
	cmd.Stdout, cmd.Stderr = &outBuf, &outBuf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("wrk: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	// wrk runs for -d whatever happens: interrupt it (it then reports) once
	// every thread has written its done file.
	var werr error
wait:
	for {
		select {
		case werr = <-exited:
			break wait
		case <-time.After(50 * time.Millisecond):
		}
		if ents, _ := os.ReadDir(doneDir); len(ents) >= cfg.Threads {
			_ = cmd.Process.Signal(os.Interrupt)
			werr = <-exited
			break
		}
	}
	out := outBuf.Bytes()
	if cfg.Log != nil {
		cfg.Log.Write(out)
	}
	if werr != nil {
		return nil, fmt.Errorf("wrk: %w", werr)
	}
	if err := parseWrk(out, res); err != nil {
		return nil, err
	}
	if res.Answered > 0 {
		if cfg.NodePID > 0 {
			if t, err := CPUTime(cfg.NodePID); err == nil {
				res.NodeCPUus = float64((t - nodeCPU0).Microseconds()) / float64(res.Answered)
			}
		}
		if ps := cmd.ProcessState; ps != nil {
			res.WrkCPUus = float64((ps.UserTime() + ps.SystemTime()).Microseconds()) / float64(res.Answered)
		}
	}

	// Every order PAYED, every buyer credited exactly its orders' coins.
	var paid atomic.Int64
	if err := parallel(ctx, cfg.Orders, 32, func(i int) error {
		o, err := call[order](ctx, hc, "GET", cfg.HTTP+"/api/v1/pay/orders/"+orders[i].ID, tokens[orders[i].user], "")
		if err == nil && o.Status == "PAYED" {
			paid.Add(1)
		}
		return err
	}); err != nil {
		return nil, fmt.Errorf("orders after: %w", err)
	}
	res.Paid = int(paid.Load())
	want := make([]int64, cfg.Users)
	for _, o := range orders {
		want[o.user] += o.Coins
	}
	var wrong atomic.Int64
	var credited atomic.Int64
	if err := parallel(ctx, cfg.Users, 32, func(u int) error {
		wl, err := getWallet(ctx, hc, cfg.HTTP, tokens[u])
		credited.Add(wl.Balance)
		if err == nil && wl.Balance != want[u] {
			wrong.Add(1)
		}
		return err
	}); err != nil {
		return nil, fmt.Errorf("wallets: %w", err)
	}
	res.CreditedCoins = credited.Load()
	res.ExactlyOnce = res.Paid == cfg.Orders && wrong.Load() == 0 && res.CreditedCoins == res.ExpectedCoins &&
		res.Answered == int64(cfg.Orders) && res.Bad == 0
	if !res.ExactlyOnce {
		res.Error = fmt.Sprintf("%d of %d orders paid, %d buyers with a wrong balance, %d notifies answered success, %d otherwise",
			res.Paid, cfg.Orders, wrong.Load(), res.Answered, res.Bad)
	}
	return res, nil
}

// parseWrk reads the "WEBHOOK {json}" line webhook.lua's done() prints.
func parseWrk(out []byte, res *WebhookResult) error {
	for _, line := range strings.Split(string(out), "\n") {
		js, ok := strings.CutPrefix(line, "WEBHOOK ")
		if !ok {
			continue
		}
		var v struct {
			Sent       int64 `json:"sent"`
			OK         int64 `json:"ok"`
			Bad        int64 `json:"bad"`
			Filler     int64 `json:"filler"`
			Requests   int64 `json:"requests"`
			DurationUS int64 `json:"duration_us"`
			NotifyUS   int64 `json:"notify_us"`
			P50US      int64 `json:"p50_us"`
			P99US      int64 `json:"p99_us"`
			MaxUS      int64 `json:"max_us"`
			Connect    int64 `json:"connect"`
			Read       int64 `json:"read"`
			Write      int64 `json:"write"`
			Status     int64 `json:"status"`
			Timeout    int64 `json:"timeout"`
		}
		if err := json.Unmarshal([]byte(js), &v); err != nil {
			return fmt.Errorf("wrk output: %w", err)
		}
		res.Requests, res.Answered, res.Bad, res.Filler = v.Requests, v.OK, v.Bad, v.Filler
		res.Seconds, res.WrkSeconds = float64(v.NotifyUS)/1e6, float64(v.DurationUS)/1e6
		if res.Seconds > 0 {
			res.NotifiesPerS = float64(v.OK) / res.Seconds
		}
		res.Non2xx = v.Status
		res.SocketErrors = v.Connect + v.Read + v.Write + v.Timeout
		res.LatencyP50Ms, res.LatencyP99Ms, res.LatencyMaxMs = float64(v.P50US)/1000, float64(v.P99US)/1000, float64(v.MaxUS)/1000
		return nil
	}
	return errors.New("wrk output has no WEBHOOK line (was webhook.lua's done() run?)")
}

// parallel runs f(0..n-1) with at most conc at once; the first error stops
// new calls and is returned.
func parallel(ctx context.Context, n, conc int, f func(i int) error) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for range min(conc, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { first = err })
					next.Store(int64(n))
					return
				}
			}
		}()
	}
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

// WriteJSON writes res to path.
func (res *WebhookResult) WriteJSON(path string) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// Package loadtest is the library of cmd/loadgen: it opens many LiveEdge
// WebSocket connections (over the Go SDK, clientsdk) against nodes on this
// machine, joins them to one room and runs a scenario — idle connections,
// room fan-out from one publisher, chat from several talkers, a reconnect
// storm after a node is killed, a gift storm, a red-packet grab storm —
// measuring push latency from a timestamp in the chat text, gaps and
// duplicates by room offset, request → reply latency, and memory per
// connection, and checking the money through the HTTP API after the gift
// and grab storms. RunWebhook measures the payment webhook with wrk.
// Loopback addresses only.
package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/liveedge/liveedge/clientsdk"
)

// Scenarios.
const (
	Idle           = "idle"
	Fanout         = "fanout"
	Chat           = "chat"
	ReconnectStorm = "reconnect-storm"
	Gift           = "gift"
	Grab           = "grab"
)

// MaxChatRate is the node's default chat limit per user per second
// (limits.chat_per_second); the chat scenario keeps each talker under it.
const MaxChatRate = 5

// Config describes one run. Zero fields take the defaults of Normalize.
type Config struct {
	Scenario string
	// Client is ClientSDK (default: clientsdk, reconnect, re-join, dedup) or
	// ClientRaw (idle only: the minimal idle viewer of raw.go).
	Client   string
	WS       []string // WebSocket URLs, one per node: ws://127.0.0.1:8081/ws
	HTTP     []string // HTTP bases in the same order: http://127.0.0.1:8080
	Conns    int      // connections in this process (viewers + publishers)
	Duration time.Duration
	Ramp     int   // connections opened per second
	Room     int64 // 0: open (or get back) Anchor's room
	Anchor   int64
	UserBase int64 // user ids are UserBase+i

	Rate     float64 // fanout / reconnect-storm: pushes per second through one publisher
	Talkers  int     // chat: talking connections
	ChatRate float64 // chat: chats per second per talker (≤ MaxChatRate)
	Payload  int     // chat text bytes (the timestamp is padded to this)

	GiftID      int64 // gift: the gift sent (0: DefaultGiftID); Rate is the offered gifts/s in all (0: closed loop)
	NoGiftLimit bool  // gift: the node runs without limits.gift_per_second (allow Rate/Conns above MaxGiftRate)
	NoChatLimit bool  // fanout / chat / reconnect-storm: the node runs without limits.chat_per_second (allow a rate above MaxChatRate)
	// Warmup: gift: gifts scheduled in this first part of the run are sent
	// and checked but not timed (the node warms up: wallets loaded, buffers
	// grown). 0: every gift is timed.
	Warmup    time.Duration
	RainTotal int64 // grab: coins in the rain (default 100 per packet)
	RainCount int   // grab: packets (default Conns: one per grabber)

	// SrcIPs > 1 dials connection i from 127.0.0.(1 + i mod SrcIPs), so that
	// 100k connections to one node do not exhaust one source address's
	// ephemeral ports (loopback targets only).
	SrcIPs int

	Heartbeat time.Duration // 0: the server's (hello); < 0: none
	NodePID   int           // sample this process's RSS (the node)
	KillPID   int           // reconnect-storm: SIGKILL this process after KillAfter
	KillAfter time.Duration

	// TokenSecret, when set, is the nodes' JWT secret: viewers' tokens are
	// signed here, as an app's backend would issue them, instead of asked
	// of the nodes' dev endpoint (whose HTTP work would then count in the
	// node's figures during the ramp).
	TokenSecret string

	// NoPublish: this process has no publishers (-procs: only the first has).
	NoPublish bool
	// MoneyShare: this process is one of several of a gift or grab run
	// (-procs). It checks only its own users (each sender's debit, each
	// grabber's balance) and reports their sums (Result.UsersCoins); what is
	// run-wide — the receiver's `received`, the rain's totals, the anchor's
	// refund — is checked by the parent over every process (MoneyTotals).
	MoneyShare bool
	// RainCode: grab with MoneyShare: the rain the parent made and starts.
	RainCode string
	// PublishedFile (-procs): the publishing process writes what it
	// published here (Published, JSON) once its chats are all placed; the
	// others wait for it to know what their viewers should receive.
	PublishedFile string
	// Trace: write one JSON line per connection (its join position, the
	// offsets it received, its nodes) and per chat sent, for diagnosis.
	Trace string
	// StartAt: when publishing (or the kill timer) starts; zero = right after the ramp.
	StartAt time.Time
	Drain   time.Duration // wait for late pushes after the last publish

	Log io.Writer // progress lines; nil = none
}

// Normalize applies the scenario's defaults and checks cfg.
func (cfg *Config) Normalize() error {
	if len(cfg.WS) == 0 {
		cfg.WS = []string{"ws://127.0.0.1:8081/ws"}
	}
	if len(cfg.HTTP) == 0 {
		cfg.HTTP = []string{"http://127.0.0.1:8080"}
	}
	for _, u := range append(append([]string{}, cfg.WS...), cfg.HTTP...) {
		if err := CheckLoopback(u); err != nil {
			return err
		}
	}
	if cfg.Conns <= 0 {
		cfg.Conns = 100
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 10 * time.Second
	}
	if cfg.Ramp <= 0 {
		cfg.Ramp = 500
	}
	if cfg.Anchor <= 0 {
		cfg.Anchor = 1
	}
	if cfg.UserBase <= 0 {
		// fresh users every run (per-user limits, max_conns_per_user)
		cfg.UserBase = 1_000_000_000 + time.Now().Unix()%1_000_000*1000_000
	}
	if cfg.Payload <= 0 {
		cfg.Payload = 100
	}
	if cfg.Drain <= 0 {
		cfg.Drain = 3 * time.Second
	}
	switch cfg.Scenario {
	case "", Idle:
		cfg.Scenario = Idle
		cfg.Talkers, cfg.ChatRate = 0, 0
	case Fanout:
		if cfg.Rate <= 0 {
			cfg.Rate = MaxChatRate
		}
		cfg.Talkers, cfg.ChatRate = 1, cfg.Rate
	case Chat:
		if cfg.Talkers <= 0 {
			cfg.Talkers = 5
		}
		if cfg.ChatRate <= 0 {
			cfg.ChatRate = 2
		}
	case ReconnectStorm:
		if cfg.KillPID <= 0 {
			return errors.New("loadtest: reconnect-storm needs the pid of a node to kill (-kill-pid)")
		}
		if cfg.KillAfter <= 0 {
			cfg.KillAfter = 2 * time.Second
		}
		if cfg.Drain < 30*time.Second {
			cfg.Drain = 30 * time.Second
		}
		cfg.Talkers, cfg.ChatRate = 0, 0
		if cfg.Rate > 0 {
			cfg.Talkers, cfg.ChatRate = 1, cfg.Rate
		}
	case Gift:
		cfg.Talkers, cfg.ChatRate = 0, 0
		if cfg.GiftID <= 0 {
			cfg.GiftID = DefaultGiftID
		}
		if per := cfg.Rate / float64(cfg.Conns); !cfg.NoGiftLimit && (per > MaxGiftRate || cfg.Rate <= 0) {
			return fmt.Errorf("loadtest: gift rate %.1f/s per sender (-rate %.0f, 0 = closed loop) is above the node's %d/s limit: more -conns, or a node with LIVEEDGE_LIMITS_GIFT_PER_SECOND=0 and -no-gift-limit", per, cfg.Rate, MaxGiftRate)
		}
	case Grab:
		cfg.Talkers, cfg.ChatRate = 0, 0
		if cfg.MoneyShare && cfg.RainCode == "" {
			return errors.New("loadtest: a grab share needs the parent's rain (-rain-code)")
		}
		if cfg.RainCount <= 0 {
			cfg.RainCount = cfg.Conns
		}
		if cfg.RainTotal <= 0 {
			cfg.RainTotal = 100 * int64(cfg.RainCount)
		}
		if cfg.RainTotal < int64(cfg.RainCount) {
			return fmt.Errorf("loadtest: a rain of %d coins cannot fill %d packets", cfg.RainTotal, cfg.RainCount)
		}
	default:
		return fmt.Errorf("loadtest: unknown scenario %q (idle, fanout, chat, reconnect-storm, gift, grab)", cfg.Scenario)
	}
	if cfg.ChatRate > MaxChatRate && !cfg.NoChatLimit {
		// Chats past the limit would be refused (10429), not measured.
		return fmt.Errorf("loadtest: chat rate %.1f/s per publisher is above the node's %d/s limit: a node with LIVEEDGE_LIMITS_CHAT_PER_SECOND=0 and -no-chat-limit", cfg.ChatRate, MaxChatRate)
	}
	switch cfg.Client {
	case "", ClientSDK:
		cfg.Client = ClientSDK
	case ClientRaw:
		if cfg.Scenario != Idle {
			return fmt.Errorf("loadtest: -client raw runs the idle scenario only, not %s", cfg.Scenario)
		}
	default:
		return fmt.Errorf("loadtest: unknown client %q (sdk, raw)", cfg.Client)
	}
	if cfg.MoneyShare && cfg.Scenario != Gift && cfg.Scenario != Grab {
		return fmt.Errorf("loadtest: a money share is a gift or grab run's, not %s", cfg.Scenario)
	}
	if cfg.NoPublish {
		cfg.Talkers = 0
	}
	if cfg.SrcIPs < 0 || cfg.SrcIPs > 254 {
		return fmt.Errorf("loadtest: -src-ips %d: 1..254 addresses 127.0.0.1..127.0.0.N", cfg.SrcIPs)
	}
	if cfg.Talkers >= cfg.Conns {
		return fmt.Errorf("loadtest: %d connections leave no viewers beside %d publishers", cfg.Conns, cfg.Talkers)
	}
	return nil
}

// Result holds a run's figures (the -json file).
type Result struct {
	Scenario string `json:"scenario"`
	Client   string `json:"client,omitempty"` // "raw": the minimal idle client (empty: the Go SDK)
	Procs    int    `json:"procs"`
	// FailedProcs: -procs children that ended without a result (left out
	// of the figures: a partial run, loadgen exits 1).
	FailedProcs int     `json:"failed_procs,omitempty"`
	Conns       int64   `json:"connections"` // connected and joined
	ConnErrors  int64   `json:"connect_errors"`
	Viewers     int64   `json:"viewers"`
	Talkers     int64   `json:"publishers"`
	RampSeconds float64 `json:"ramp_seconds"`
	RunSeconds  float64 `json:"run_seconds"` // the publish / hold phase

	PushesSent int64 `json:"pushes_sent"`
	SendErrors int64 `json:"send_errors"`
	// SkippedSends: publish slots skipped because a chat's reply came after
	// the next slot (the schedule goes on from then, afterNext): pushes
	// not sent, so not measured — a stall shows here, not in the latency.
	SkippedSends int64 `json:"skipped_sends,omitempty"`
	Deliveries   int64 `json:"deliveries"` // viewers' pushes, each once
	// Delivery accounting (deliveries.go): Published chats the room numbered
	// (seen by their publisher; also one whose reply was lost); each viewer is
	// expected to receive those numbered after it joined (Expected, summed
	// over viewers); Missing are expected ones not delivered by the end of the
	// drain — lost; NotExpected those a viewer was not to receive: numbered
	// before it joined, or skipped by a re-join answered recovered:false.
	Published             int64    `json:"published"`
	Expected              int64    `json:"expected_deliveries"`
	Missing               int64    `json:"missing"` // lost
	LostViewers           int64    `json:"lost_viewers"`
	LostSamples           []string `json:"lost_samples,omitempty"`
	NotExpected           int64    `json:"not_expected"`
	NotExpectedBeforeJoin int64    `json:"not_expected_before_join"`
	NotExpectedResync     int64    `json:"not_expected_resync"`
	DeliveriesPerSec      float64  `json:"deliveries_per_sec"`
	P50Ms                 float64  `json:"latency_p50_ms"`
	P99Ms                 float64  `json:"latency_p99_ms"`
	MaxMs                 float64  `json:"latency_max_ms"`
	Gaps                  int64    `json:"gaps"`       // offsets skipped
	Duplicates            int64    `json:"duplicates"` // offsets seen again by the app
	SDKDupDropped         int64    `json:"sdk_duplicates_dropped"`
	Resyncs               int64    `json:"resyncs"`
	EpochChanges          int64    `json:"epoch_changes"`
	Disconnects           int64    `json:"disconnects"`
	Reconnects            int64    `json:"reconnects"`
	Errors                int64    `json:"errors"`
	ErrorSamples          []string `json:"error_samples,omitempty"`

	NodeRSSBefore  int64   `json:"node_rss_before_bytes,omitempty"`
	NodeRSSAfter   int64   `json:"node_rss_after_bytes,omitempty"`
	NodeRSSPerConn float64 `json:"node_rss_per_conn_bytes,omitempty"`
	// NodeRSSEnd is the node's RSS at the end of an idle hold, every
	// connection still held (sampled by the -procs parent, or by -client
	// raw): what it settles at once the ramp's garbage is collected
	// (node.idle_release), where NodeRSSAfter is the highest sample (-procs)
	// or the one right after the ramp.
	NodeRSSEnd        int64   `json:"node_rss_end_bytes,omitempty"`
	NodeRSSEndPerConn float64 `json:"node_rss_end_per_conn_bytes,omitempty"`
	NodeCPUCores      float64 `json:"node_cpu_cores"` // the node's CPU over the hold / publish phase, in cores (with NodePID)
	LoadgenRSSBefore  int64   `json:"loadgen_rss_before_bytes"`
	LoadgenRSSAfter   int64   `json:"loadgen_rss_after_bytes"`
	LoadgenRSSPerConn float64 `json:"loadgen_rss_per_conn_bytes"`

	// -client raw: the hold in detail. Held counts joined connections (a
	// connection is held only while joined); with -procs HeldMin is the sum
	// of each process's lowest count (a lower bound of the lowest total).
	HeldMin           int64            `json:"held_min,omitempty"`
	HeldEnd           int64            `json:"held_end,omitempty"`
	HoldDisconnects   int64            `json:"hold_disconnects"`
	HoldReconnects    int64            `json:"hold_reconnects"`
	DisconnectReasons map[string]int64 `json:"disconnect_reasons,omitempty"` // close code, "1006" (no close frame), "ping-timeout"
	Pings             int64            `json:"pings,omitempty"`
	PingTimeouts      int64            `json:"ping_timeouts,omitempty"`
	Acks              int64            `json:"acks,omitempty"`
	LoadgenCPUCores   float64          `json:"loadgen_cpu_cores,omitempty"` // this process's CPU over the hold (-procs: summed)
	JoinP50Ms         float64          `json:"join_p50_ms,omitempty"`       // hello → join reply (every join, re-joins too)
	JoinP99Ms         float64          `json:"join_p99_ms,omitempty"`
	JoinMaxMs         float64          `json:"join_max_ms,omitempty"`
	JoinBuckets       map[int]int64    `json:"join_buckets,omitempty"`
	JoinMaxUS         int64            `json:"join_max_us,omitempty"`

	// gift / grab: requests answered, latency from send to reply (the
	// latency_* fields), and the money checked through the HTTP API after the run.
	OfferedRate      float64       `json:"offered_rate,omitempty"`   // gift: gifts/s offered in all (0: closed loop)
	WarmupSeconds    float64       `json:"warmup_seconds,omitempty"` // gift: not timed at the start
	Requests         int64         `json:"requests,omitempty"`       // gifts or grabs sent
	Replies          int64         `json:"replies,omitempty"`        // answered OK (gifts debited, packets granted)
	Refused          int64         `json:"refused,omitempty"`        // answered with an error code
	RefusedCodes     map[int]int64 `json:"refused_codes,omitempty"`
	RepliesPerSec    float64       `json:"replies_per_sec,omitempty"`
	Packets          int64         `json:"packets,omitempty"`        // grab: the rain's total_count
	TotalAmount      int64         `json:"total_amount,omitempty"`   // grab: the rain's total_amount
	GrantedAmount    int64         `json:"granted_amount,omitempty"` // grab: Σ amounts the grabbers were told
	Ambiguous        int64         `json:"ambiguous,omitempty"`      // sent, outcome unknown (timeout, disconnect)
	MissedSlots      int64         `json:"missed_slots,omitempty"`   // gift: due before the end, never sent (the sender's 32 in flight)
	UsersCoins       int64         `json:"users_coins,omitempty"`    // through the HTTP API after the run: gift Σ senders' debits, grab Σ grabbers' balances
	StormSeconds     float64       `json:"storm_seconds,omitempty"`  // what replies_per_sec is over
	Conserved        *bool         `json:"conserved,omitempty"`
	ConservationNote string        `json:"conservation,omitempty"`

	Killed               bool    `json:"killed,omitempty"`
	ReconnectedAfterKill int64   `json:"reconnected_after_kill,omitempty"`
	NotReconnected       int64   `json:"not_reconnected,omitempty"`
	ReconnectP50Ms       float64 `json:"reconnect_p50_ms,omitempty"`
	ReconnectP99Ms       float64 `json:"reconnect_p99_ms,omitempty"`
	ReconnectMaxMs       float64 `json:"reconnect_max_ms,omitempty"`

	// Histograms (bucket index → count, max in µs) for merging -procs results.
	LatencyBuckets   map[int]int64 `json:"latency_buckets,omitempty"`
	LatencyMaxUS     int64         `json:"latency_max_us,omitempty"`
	ReconnectBuckets map[int]int64 `json:"reconnect_buckets,omitempty"`
	ReconnectMaxUS   int64         `json:"reconnect_max_us,omitempty"`
}

// run is the state of one Run.
type run struct {
	cfg  Config
	room int64
	http *http.Client

	lat, recon Hist
	killAt     atomic.Int64 // unix ns; 0 before the kill
	closing    atomic.Bool  // the run is closing its connections
	lastPush   atomic.Int64 // unix ns of the last push delivered to a viewer

	conns, connErrs, deliveries, gaps, dups, resyncs, epochs atomic.Int64
	disconnects, reconnects, reconnAfterKill, errs           atomic.Int64
	sent, sendErrs, sdkDups, skipped                         atomic.Int64

	errMu   sync.Mutex
	samples []string

	m money // gift / grab

	// delivery accounting (deliveries.go)
	pubMu    sync.Mutex
	placed   map[chatKey]int64 // chats seen pushed back to a publisher → offset
	pubEp    string
	otherEps []string
	answered []chatKey  // chats answered OK
	pubLog   []chatLog  // with Trace
	pubRec   *Published // what was published, once known
}

type chatLog struct {
	Pub    int    `json:"pub"`
	Seq    int64  `json:"seq"`
	SentMS int64  `json:"sent_ms"`
	RepMS  int64  `json:"reply_ms"`
	Err    string `json:"err,omitempty"`
}

type lconn struct {
	r       *run
	c       *clientsdk.Client
	viewer  bool
	user    int64
	token   string
	granted int64 // grab: the amount this connection was told it got

	mu     sync.Mutex
	known  bool
	off    int64
	ep     string
	lostAt time.Time // disconnected after the kill, not yet back
	acct   viewerAcct
	nodes  []string // with Trace: "unix ms node" per connection made
}

func (r *run) logf(format string, args ...any) {
	if r.cfg.Log != nil {
		fmt.Fprintf(r.cfg.Log, "loadgen: "+format+"\n", args...)
	}
}

func (r *run) fail(err error) {
	r.errs.Add(1)
	r.errMu.Lock()
	if len(r.samples) < 10 {
		r.samples = append(r.samples, err.Error())
	}
	r.errMu.Unlock()
}

// Run runs cfg's scenario until done or ctx ends, and returns the figures.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Normalize(); err != nil {
		return nil, err
	}
	r := &run{cfg: cfg, http: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64}}}
	defer r.http.CloseIdleConnections()
	room := cfg.Room
	if room == 0 {
		var err error
		if room, err = OpenRoom(ctx, r.http, cfg.HTTP[0], cfg.Anchor); err != nil {
			return nil, err
		}
	}
	r.room = room
	switch cfg.Scenario {
	case Gift:
		if err := r.prepareGift(ctx); err != nil {
			return nil, err
		}
	case Grab:
		if err := r.prepareGrab(ctx); err != nil {
			return nil, err
		}
	}
	res := &Result{Scenario: cfg.Scenario, Procs: 1}
	if cfg.NodePID > 0 {
		res.NodeRSSBefore, _ = RSS(cfg.NodePID)
	}
	res.LoadgenRSSBefore, _ = RSS(0)
	r.logf("%s: %d %s connections to room %d at %d/s over %d node(s)", cfg.Scenario, cfg.Conns, cfg.Client, room, cfg.Ramp, len(cfg.WS))
	if cfg.Client == ClientRaw {
		r.runRaw(ctx, res)
		r.fill(res)
		return res, nil
	}

	// Ramp: connection i starts at i/Ramp s, at most 256 dials in flight.
	t0 := time.Now()
	conns := make([]*lconn, cfg.Conns)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 256)
	for i := range cfg.Conns {
		if d := time.Until(t0.Add(time.Duration(i) * time.Second / time.Duration(cfg.Ramp))); d > 0 {
			select {
			case <-time.After(d):
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			lc, err := r.open(ctx, i, i >= cfg.Talkers)
			if err != nil {
				r.connErrs.Add(1)
				r.fail(fmt.Errorf("conn %d: %w", i, err))
				return
			}
			conns[i] = lc
			r.conns.Add(1)
		}(i)
	}
	wg.Wait()
	res.RampSeconds = time.Since(t0).Seconds()
	r.logf("ramp done in %.1f s: %d connected, %d failed", res.RampSeconds, r.conns.Load(), r.connErrs.Load())

	// Memory per connection, after the ramp settles.
	time.Sleep(time.Second)
	r.measureMemory(res)

	if d := time.Until(cfg.StartAt); !cfg.StartAt.IsZero() && d > 0 {
		select {
		case <-time.After(d):
		case <-ctx.Done():
		}
	}
	var pubs []*lconn
	var viewers int64
	for i, lc := range conns {
		switch {
		case lc == nil:
		case i < cfg.Talkers:
			pubs = append(pubs, lc)
		default:
			viewers++
		}
	}
	res.Viewers, res.Talkers = viewers, int64(len(pubs))

	// The publish / hold phase.
	var cpu0 time.Duration
	if cfg.NodePID > 0 {
		cpu0, _ = CPUTime(cfg.NodePID)
	}
	t1 := time.Now()
	runCtx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	if cfg.Scenario == ReconnectStorm {
		go r.kill(runCtx)
	}
	var all []*lconn
	for _, lc := range conns {
		if lc != nil {
			all = append(all, lc)
		}
	}
	switch cfg.Scenario {
	case Gift:
		r.gift(runCtx, all)
	case Grab:
		r.grab(ctx, all)
	}
	var pwg sync.WaitGroup
	for k, p := range pubs {
		pwg.Add(1)
		go func() {
			defer pwg.Done()
			r.publish(runCtx, p, k)
		}()
	}
	pwg.Wait()
	<-runCtx.Done()
	if cfg.Scenario == Idle && cfg.NodePID > 0 {
		if v, err := RSS(cfg.NodePID); err == nil {
			res.setNodeEnd(v, r.conns.Load()) // the connections are still open
		}
	}
	res.RunSeconds = time.Since(t1).Seconds()
	if cfg.NodePID > 0 {
		if cpu1, err := CPUTime(cfg.NodePID); err == nil && cpu0 > 0 && res.RunSeconds > 0 {
			res.NodeCPUCores = (cpu1 - cpu0).Seconds() / res.RunSeconds
		}
	}

	// Drain: late pushes (and, in a storm, reconnects). With chats, until
	// every viewer has every chat it should receive (deliveries.go): what was
	// published is known once each chat answered OK has come back to its
	// publisher (another process: once that process has written it down).
	var vconns []*lconn
	for _, lc := range all {
		if lc.viewer {
			vconns = append(vconns, lc)
		}
	}
	chats := cfg.ChatRate > 0
	drainStart := time.Now()
	deadline := drainStart.Add(cfg.Drain)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		done := true
		if chats {
			if r.pubRec == nil {
				r.loadPublished(time.Since(drainStart) >= cfg.Drain/2)
			}
			done = r.pubRec != nil && complete(*r.pubRec, vconns)
			if cfg.NoPublish && cfg.PublishedFile == "" {
				// another process publishes and writes nothing down: wait
				// until pushes stop coming
				done = time.Since(time.Unix(0, r.lastPush.Load())) > time.Second
			}
		}
		if cfg.Scenario == ReconnectStorm {
			done = r.killAt.Load() != 0 && r.disconnects.Load() > 0 && r.reconnAfterKill.Load() >= r.disconnects.Load() && done
		}
		if done {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if chats && r.pubRec == nil {
		r.loadPublished(true)
	}
	switch cfg.Scenario {
	case Gift:
		r.checkGift(ctx, all)
	case Grab:
		r.checkGrab(ctx, all)
	}
	r.closeAll(conns)
	if cfg.Trace != "" {
		if err := r.writeTrace(conns); err != nil {
			r.fail(fmt.Errorf("trace: %w", err))
		}
	}
	if chats {
		r.account(res, vconns)
	}
	r.fill(res)
	r.fillMoney(res)
	return res, nil
}

// measureMemory records the node's and this process's RSS and their growth
// per connection held.
func (r *run) measureMemory(res *Result) {
	if r.cfg.NodePID > 0 {
		res.NodeRSSAfter, _ = RSS(r.cfg.NodePID)
		if n := r.conns.Load(); n > 0 {
			res.NodeRSSPerConn = float64(res.NodeRSSAfter-res.NodeRSSBefore) / float64(n)
		}
	}
	res.LoadgenRSSAfter, _ = RSS(0)
	if n := r.conns.Load(); n > 0 {
		res.LoadgenRSSPerConn = float64(res.LoadgenRSSAfter-res.LoadgenRSSBefore) / float64(n)
	}
}

// open mints a token for user UserBase+i, dials (node i mod n first) and joins the room.
func (r *run) open(ctx context.Context, i int, viewer bool) (*lconn, error) {
	cfg := &r.cfg
	node := i % len(cfg.WS)
	user := cfg.UserBase + int64(i)
	tok, err := r.viewerToken(ctx, cfg.HTTP[node%len(cfg.HTTP)], user)
	if err != nil {
		return nil, err
	}
	if cfg.Scenario == Gift {
		if err := DevCredit(ctx, r.http, cfg.HTTP[node%len(cfg.HTTP)], user, r.giftCredit(), "lg-credit-"+strconv.FormatInt(user, 10)); err != nil {
			return nil, err
		}
	}
	lc := &lconn{r: r, viewer: viewer, user: user, token: tok}
	// Node i mod n first (PreferURL), then the others, rotated by i: after
	// a node dies its clients move on to the next one in their lists,
	// spread over the others rather than all onto one.
	var others []string
	for _, u := range cfg.WS {
		if u != cfg.WS[node] && !slices.Contains(others, u) {
			others = append(others, u)
		}
	}
	if len(others) > 0 {
		k := (i / len(cfg.WS)) % len(others) // not i: that follows the node choice
		others = append(others[k:], others[:k]...)
	}
	var local net.Addr
	if cfg.SrcIPs > 1 {
		local = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%cfg.SrcIPs))}
	}
	c, err := clientsdk.Dial(ctx, clientsdk.Config{
		LocalAddr:         local,
		URL:               cfg.WS[node],
		URLs:              others,
		PreferURL:         true,
		Token:             tok,
		EventBuffer:       16,
		DedupWindow:       64,
		HeartbeatInterval: cfg.Heartbeat,
		ReconnectMin:      100 * time.Millisecond,
		ReconnectMax:      5 * time.Second,
		OnPush:            lc.onPush,
		OnState:           lc.onState,
	})
	if err != nil {
		return nil, err
	}
	lc.c = c
	jr, err := c.JoinInfo(ctx, r.room)
	if err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("join: %w", err)
	}
	lc.mu.Lock()
	if !lc.known {
		lc.known, lc.off, lc.ep = true, jr.Off, jr.Ep
	}
	lc.acct.join(jr.Off, jr.Ep)
	lc.mu.Unlock()
	return lc, nil
}

func (lc *lconn) onPush(p clientsdk.Push) {
	r := lc.r
	if p.Room != r.room || p.Off == 0 {
		return // another room, or a push to the user (a gift result: no off)
	}
	now := time.Now()
	ts, ck, chat := parseChat(p.Data)
	lc.mu.Lock()
	if lc.acct.firstOff == 0 {
		lc.acct.firstOff = p.Off
	}
	switch {
	case !lc.known:
		lc.known = true
	case p.Ep != lc.ep:
		r.epochs.Add(1)
	case p.Off <= lc.off:
		r.dups.Add(1)
		lc.mu.Unlock()
		return
	case p.Off > lc.off+1:
		r.gaps.Add(p.Off - lc.off - 1)
	}
	lc.off, lc.ep = p.Off, p.Ep
	if chat && lc.viewer && (!lc.acct.joined || p.Ep == lc.acct.joinEp) {
		lc.acct.got.add(p.Off) // offsets of the epoch it joined in (the one accounted)
	}
	lc.mu.Unlock()
	if !lc.viewer {
		if chat && ck.seq > 0 {
			r.notePlaced(ck, p.Ep, p.Off)
		}
		return
	}
	if chat {
		r.lastPush.Store(now.UnixNano())
		r.deliveries.Add(1)
		r.lat.Record(now.Sub(time.Unix(0, ts)))
	}
}

func (lc *lconn) onState(ev clientsdk.StateEvent) {
	r := lc.r
	switch ev.State {
	case clientsdk.StateDisconnected:
		if r.closing.Load() {
			return
		}
		r.disconnects.Add(1)
		if r.killAt.Load() != 0 {
			lc.mu.Lock()
			if lc.lostAt.IsZero() {
				lc.lostAt = time.Now()
			}
			lc.mu.Unlock()
		}
	case clientsdk.StateConnected:
		if r.cfg.Trace != "" {
			lc.mu.Lock()
			lc.nodes = append(lc.nodes, strconv.FormatInt(time.Now().UnixMilli(), 10)+" "+ev.Hello.Node)
			lc.mu.Unlock()
		}
		if ev.Attempt == 0 {
			return // Dial's connection
		}
		r.reconnects.Add(1)
		if k := r.killAt.Load(); k != 0 {
			lc.mu.Lock()
			lost := !lc.lostAt.IsZero()
			lc.lostAt = time.Time{}
			lc.mu.Unlock()
			if lost {
				r.reconnAfterKill.Add(1)
				r.recon.Record(time.Since(time.Unix(0, k)))
			}
		}
	case clientsdk.StateRoomResync:
		r.resyncs.Add(1)
		lc.mu.Lock()
		if ev.Room == r.room && ev.Ep == lc.ep && ev.Off > lc.off {
			lc.acct.skipped = append(lc.acct.skipped, [2]int64{lc.off, ev.Off})
		}
		lc.mu.Unlock()
	case clientsdk.StateRoomDropped:
		r.fail(fmt.Errorf("room dropped on re-join: %v", ev.Err))
	case clientsdk.StateClosed:
		if ev.Err != nil && !r.closing.Load() {
			r.fail(fmt.Errorf("client closed: %v", ev.Err))
		}
	}
}

// stamp reads the send time out of a chat push's d: {"from":U,"text":"lg <unix ns> ..."}.
func stamp(d []byte) (int64, bool) {
	const key = `"text":"lg `
	i := bytes.Index(d, []byte(key))
	if i < 0 {
		return 0, false
	}
	rest := d[i+len(key):]
	j := bytes.IndexByte(rest, ' ')
	if j < 0 {
		return 0, false
	}
	ts, err := strconv.ParseInt(string(rest[:j]), 10, 64)
	return ts, err == nil
}

// chatText is "lg <unix ns> <publisher>.<seq> " padded with x to size bytes.
func chatText(pub int, seq int64, size int) string {
	s := "lg " + strconv.FormatInt(time.Now().UnixNano(), 10) + " " + strconv.Itoa(pub) + "." + strconv.FormatInt(seq, 10) + " "
	if len(s) < size {
		s += strings.Repeat("x", size-len(s))
	}
	return s
}

// publish chats at ChatRate through p until ctx ends (sends are not
// overlapped: a slow reply delays the next chat, never bunches them —
// afterNext — so a publisher held up by a failover does not burst into the
// node's per-user chat rate when it comes back).
func (r *run) publish(ctx context.Context, p *lconn, k int) {
	every := time.Duration(float64(time.Second) / r.cfg.ChatRate)
	next := time.Now()
	for seq := int64(1); ; seq++ {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(next)):
		}
		next = next.Add(every)
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t0 := time.Now()
		_, err := p.c.Chat(sctx, r.room, chatText(k, seq, r.cfg.Payload))
		cancel()
		if now := time.Now(); now.After(next) && every > 0 {
			r.skipped.Add(int64(now.Sub(next) / every))
		}
		next = afterNext(next, time.Now())
		if r.cfg.Trace != "" {
			cl := chatLog{Pub: k, Seq: seq, SentMS: t0.UnixMilli(), RepMS: time.Now().UnixMilli()}
			if err != nil {
				cl.Err = err.Error()
			}
			r.pubMu.Lock()
			r.pubLog = append(r.pubLog, cl)
			r.pubMu.Unlock()
		}
		if err != nil {
			r.sendErrs.Add(1)
			r.fail(fmt.Errorf("chat: %w", err))
			continue
		}
		r.sent.Add(1)
		r.noteSent(chatKey{k, seq})
	}
}

// afterNext is when the chat after one answered should go: at next, its slot
// on the schedule, unless its reply came later than that — then at once,
// and the schedule goes on from now (the slots missed are skipped, not
// sent back to back).
func afterNext(next, now time.Time) time.Time {
	if next.Before(now) {
		return now
	}
	return next
}

// kill sends SIGKILL to KillPID KillAfter into the run.
func (r *run) kill(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(r.cfg.KillAfter):
	}
	r.killAt.Store(time.Now().UnixNano())
	// ESRCH: another loadgen process (-procs) killed it first
	if err := syscall.Kill(r.cfg.KillPID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		r.fail(fmt.Errorf("kill %d: %w", r.cfg.KillPID, err))
		return
	}
	r.logf("killed pid %d", r.cfg.KillPID)
}

func (r *run) fill(res *Result) {
	res.Conns, res.ConnErrors = r.conns.Load(), r.connErrs.Load()
	res.PushesSent, res.SendErrors, res.SkippedSends = r.sent.Load(), r.sendErrs.Load(), r.skipped.Load()
	res.Deliveries = r.deliveries.Load()
	res.Gaps, res.Duplicates, res.Resyncs, res.EpochChanges = r.gaps.Load(), r.dups.Load(), r.resyncs.Load(), r.epochs.Load()
	res.Disconnects, res.Reconnects, res.Errors = r.disconnects.Load(), r.reconnects.Load(), r.errs.Load()
	res.SDKDupDropped = r.sdkDups.Load()
	res.ErrorSamples = r.samples
	res.LatencyBuckets, res.LatencyMaxUS = r.lat.Buckets(), r.lat.MaxUS()
	res.Killed = r.killAt.Load() != 0
	if res.Killed {
		res.ReconnectedAfterKill = r.reconnAfterKill.Load()
		res.ReconnectBuckets, res.ReconnectMaxUS = r.recon.Buckets(), r.recon.MaxUS()
	}
	res.finish(&r.lat, &r.recon)
}

// finish computes the derived figures from the counters and histograms.
func (res *Result) finish(lat, recon *Hist) {
	if res.RunSeconds > 0 {
		res.DeliveriesPerSec = float64(res.Deliveries) / res.RunSeconds
	}
	res.P50Ms, res.P99Ms, res.MaxMs = lat.Quantile(0.5), lat.Quantile(0.99), lat.Quantile(1)
	if res.Killed {
		res.NotReconnected = max(res.Disconnects-res.ReconnectedAfterKill, 0)
		res.ReconnectP50Ms, res.ReconnectP99Ms, res.ReconnectMaxMs = recon.Quantile(0.5), recon.Quantile(0.99), recon.Quantile(1)
	}
}

func (r *run) closeAll(conns []*lconn) {
	r.closing.Store(true)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, lc := range conns {
		if lc == nil {
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st := lc.c.Stats()
			r.sdkDups.Add(st.Duplicates + st.OffsetDuplicates)
			lc.mu.Lock()
			lc.acct.closedAt = time.Now()
			lc.mu.Unlock()
			_ = lc.c.Close()
			<-sem
		}()
	}
	wg.Wait()
}

// viewerToken is a viewer's token for user: signed here with
// Config.TokenSecret, or else minted by the node at base (DevToken).
func (r *run) viewerToken(ctx context.Context, base string, user int64) (string, error) {
	if r.cfg.TokenSecret != "" {
		return MintToken(r.cfg.TokenSecret, user, "viewer", 24*time.Hour)
	}
	return DevToken(ctx, r.http, base, user, "viewer")
}

// MintToken signs an HS256 token for user with role, valid for ttl, with the
// claims a node verifies (PROTOCOL.md §1: sub, role, iat, exp).
func MintToken(secret string, user int64, role string, ttl time.Duration) (string, error) {
	now := time.Now()
	return jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"sub": strconv.FormatInt(user, 10), "role": role, "iat": now.Unix(), "exp": now.Add(ttl).Unix(),
	}).SignedString([]byte(secret))
}

// DevToken mints a token for user with role from a node's /api/v1/dev/token
// (auth.dev_tokens must be on).
func DevToken(ctx context.Context, hc *http.Client, base string, user int64, role string) (string, error) {
	var out struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
		Data struct {
			Token string `json:"token"`
		} `json:"data"`
	}
	body := fmt.Sprintf(`{"user_id":%d,"role":%q}`, user, role)
	if err := postJSON(ctx, hc, base+"/api/v1/dev/token", "", body, &out); err != nil {
		return "", err
	}
	if out.Code != 0 || out.Data.Token == "" {
		return "", fmt.Errorf("dev token: code %d %s", out.Code, out.Msg)
	}
	return out.Data.Token, nil
}

// OpenRoom opens anchor's room (or gets it back) through a node's HTTP API.
func OpenRoom(ctx context.Context, hc *http.Client, base string, anchor int64) (int64, error) {
	tok, err := DevToken(ctx, hc, base, anchor, "anchor")
	if err != nil {
		return 0, err
	}
	var out struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
		Data struct {
			RoomID int64 `json:"room_id"`
		} `json:"data"`
	}
	if err := postJSON(ctx, hc, base+"/api/v1/rooms", tok, `{"type":0}`, &out); err != nil {
		return 0, err
	}
	if out.Code != 0 || out.Data.RoomID <= 0 {
		return 0, fmt.Errorf("open room: code %d %s", out.Code, out.Msg)
	}
	return out.Data.RoomID, nil
}

func postJSON(ctx context.Context, hc *http.Client, url, token, body string, out any) error {
	return doJSON(ctx, hc, "POST", url, token, body, out)
}

func getJSON(ctx context.Context, hc *http.Client, url, token string, out any) error {
	return doJSON(ctx, hc, "GET", url, token, "", out)
}

func doJSON(ctx context.Context, hc *http.Client, method, url, token, body string, out any) error {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: status %d: %w", method, url, resp.StatusCode, err)
	}
	return nil
}

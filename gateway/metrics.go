package gateway

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/liveedge/liveedge/router"
)

// metrics are one node's Prometheus metrics, on its own registry (so several
// nodes can live in one test process).
type metrics struct {
	reg  *prometheus.Registry
	node string

	connections prometheus.Gauge
	framesIn    prometheus.Counter
	// framesOut counts the data frames connections' writers wrote; the
	// metric adds those a room's fan-out wrote directly (router stats).
	framesOut atomic.Int64
	// readers counts the connections whose reader goroutine runs (wsReader).
	readers atomic.Int64
	// lanes counts the connections whose requests a lane serves (lane.go).
	lanes          atomic.Int64
	badFrames      prometheus.Counter
	resends        prometheus.Counter
	resendGiveUps  prometheus.Counter
	givenDropped   prometheus.Counter
	queueDrops     prometheus.Counter
	slowCloses     prometheus.Counter
	framePanics    prometheus.Counter
	closes         *prometheus.CounterVec
	upgradesDenied *prometheus.CounterVec
	payNotifies    *prometheus.CounterVec
	giftSeconds    prometheus.Histogram
	httpRefused    *prometheus.CounterVec
	refreshes      *prometheus.CounterVec
}

// opts names a metric of this node: liveedge_<name>{node=...}.
func (m *metrics) opts(name, help string) prometheus.Opts {
	return prometheus.Opts{Namespace: "liveedge", Name: name, Help: help, ConstLabels: prometheus.Labels{"node": m.node}}
}

func newMetrics(node string, r router.Router) *metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := (&metrics{node: node}).opts
	m := &metrics{
		reg:           reg,
		node:          node,
		connections:   prometheus.NewGauge(prometheus.GaugeOpts(f("connections", "Open WebSocket connections."))),
		framesIn:      prometheus.NewCounter(prometheus.CounterOpts(f("frames_in_total", "WebSocket frames read."))),
		badFrames:     prometheus.NewCounter(prometheus.CounterOpts(f("bad_frames_total", "Client frames answered with 10001."))),
		resends:       prometheus.NewCounter(prometheus.CounterOpts(f("resends_total", "Reliable pushes resent for want of an ack."))),
		givenDropped:  prometheus.NewCounter(prometheus.CounterOpts(f("resend_given_dropped_total", "User pushes given up on and dropped: a connection keeps at most ws.offline_max of them for the hand-on at close, the oldest go."))),
		resendGiveUps: prometheus.NewCounter(prometheus.CounterOpts(f("resend_giveups_total", "Reliable pushes not resent after the last try (room pushes dropped: the room offsets recover them; user pushes kept and handed on when the connection goes)."))),
		queueDrops:    prometheus.NewCounter(prometheus.CounterOpts(f("queue_drops_total", "Frames refused because a send queue was full."))),
		slowCloses:    prometheus.NewCounter(prometheus.CounterOpts(f("slow_consumer_closes_total", "Connections closed with 4408."))),
		framePanics:   prometheus.NewCounter(prometheus.CounterOpts(f("frame_panics_total", "Frames whose handler panicked (a bug): their connection closed 1011."))),
		closes: prometheus.NewCounterVec(prometheus.CounterOpts(f("closes_total", "Connections closed by the server, by reason.")),
			[]string{"reason"}),
		upgradesDenied: prometheus.NewCounterVec(prometheus.CounterOpts(f("upgrades_denied_total", "WebSocket upgrades refused, by reason.")),
			[]string{"reason"}),
		payNotifies: prometheus.NewCounterVec(prometheus.CounterOpts(f("pay_notifies_total", "Payment webhook deliveries, by outcome.")),
			[]string{"outcome"}),
		httpRefused: prometheus.NewCounterVec(prometheus.CounterOpts(f("http_refused_total",
			"HTTP requests the API server could not read, answered with an error envelope and the connection closed, by reason.")),
			[]string{"reason"}),
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts(f("token_refreshes_total",
			"WebSocket refresh requests, by outcome: ok, refused (10002: a token that does not verify, or the connection's own already ended), forbidden (10003: another user's or role's).")),
			[]string{"outcome"}),
		giftSeconds: prometheus.NewHistogram(histOpts(f("gift_seconds",
			"Time from a gift frame read to its reply queued (debit durable or refused)."),
			prometheus.ExponentialBuckets(100e-6, 1.5, 26))), // 100 µs .. ~2.5 s
	}
	reg.MustRegister(m.connections, m.framesIn, m.badFrames, m.resends, m.resendGiveUps, m.givenDropped,
		m.queueDrops, m.slowCloses, m.framePanics, m.closes, m.upgradesDenied, m.payNotifies, m.giftSeconds, m.httpRefused,
		m.refreshes)
	stat := func(name, help string, gauge bool, get func(router.Stats) int64) {
		fn := func() float64 { return float64(get(r.Stats())) }
		if gauge {
			reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts(f(name, help)), fn))
		} else {
			reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts(f(name, help)), fn))
		}
	}
	stat("rooms", "Open rooms on this node.", true, func(s router.Stats) int64 { return s.Rooms })
	stat("room_members", "Room memberships on this node.", true, func(s router.Stats) int64 { return s.MembersOnline })
	stat("room_pushes_total", "Pushes published to rooms.", false, func(s router.Stats) int64 { return s.RoomPushes })
	stat("user_pushes_total", "Pushes sent to users.", false, func(s router.Stats) int64 { return s.UserPushes })
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts(f("frames_out_total", "WebSocket data frames written.")),
		func() float64 { return float64(m.framesOut.Load() + r.Stats().FramesDirect) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts(f("ws_readers_running",
		"Connections with a reader goroutine (reading or waiting up to ws.read_park_after); the others wait in epoll with none.")),
		func() float64 { return float64(m.readers.Load()) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts(f("ws_lanes_running",
		"Connections whose requests are served off their reader, behind one that may wait on Redis (a cluster's join or chat, a grab with Redis in use).")),
		func() float64 { return float64(m.lanes.Load()) }))
	stat("frames_direct_total", "WebSocket data frames a room's fan-out wrote itself to a connection with nothing queued (also in frames_out_total).",
		false, func(s router.Stats) int64 { return s.FramesDirect })
	stat("fanout_frames_total", "Frames handed to sessions by fan-out.", false, func(s router.Stats) int64 { return s.FramesFanned })
	stat("offline_dropped_total", "Reliable user pushes dropped for the bounds of what is kept for a user: its offline box full (ws.offline_max), or a closing connection's hand-on cut to its newest (ws.offline_max; 4,096 with the boxes off).", false, func(s router.Stats) int64 { return s.OfflineDropped })
	stat("room_queue_drops_total", "Pushes refused because a room queue was full (in a cluster also: queued pushes that are not reliable, dropped for reliable ones while Redis did not answer).", false, func(s router.Stats) int64 { return s.RoomDropped })
	stat("room_queue_overruns_total", "Cluster room pushes dropped from a room's queue on this node, oldest first, because its fan-out fell 8,192 pushes behind (members see a gap and re-sync).", false, func(s router.Stats) int64 { return s.RoomOverrun })
	if c, ok := r.(*router.Cluster); ok {
		cstat := func(name, help string, gauge bool, get func(router.ClusterStats) int64) {
			fn := func() float64 { return float64(get(c.ClusterStats())) }
			if gauge {
				reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts(f(name, help)), fn))
			} else {
				reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts(f(name, help)), fn))
			}
		}
		cstat("cluster_room_pushes_sequenced_total", "Room pushes numbered by this node's sequencer (Redis).", false,
			func(s router.ClusterStats) int64 { return s.PushesSequenced })
		cstat("cluster_nats_room_msgs_out_total", "Room batches this node published on NATS (one per sequenced batch).", false,
			func(s router.ClusterStats) int64 { return s.BatchesOut })
		cstat("cluster_nats_room_msgs_in_total", "Room batches this node received from NATS (one per batch per node with members).", false,
			func(s router.ClusterStats) int64 { return s.BatchesIn })
		cstat("cluster_gap_fills_total", "Missing room offsets read back from the shared history.", false,
			func(s router.ClusterStats) int64 { return s.GapFills })
		cstat("cluster_gaps_lost_total", "Missing room offsets no longer in the shared history (skipped).", false,
			func(s router.ClusterStats) int64 { return s.GapsLost })
		cstat("cluster_sequencer_errors_total", "Room push batches whose numbering in Redis failed (retried until Redis answers or the room closes).", false,
			func(s router.ClusterStats) int64 { return s.SequencerErrors })
		cstat("cluster_room_pushes_given_up_total", "Room pushes made on this node never numbered: Redis did not answer before the room closed here (or the node stopped).", false,
			func(s router.ClusterStats) int64 { return s.PushesGivenUp })
		cstat("cluster_user_handoffs_kept_total", "Reliable pushes for users on other nodes that no node answered for (kept in the offline list, the holders told to drain it).", false,
			func(s router.ClusterStats) int64 { return s.HandoffsKept })
		cstat("cluster_subscribed_rooms", "Rooms this node is subscribed to on NATS.", true,
			func(s router.ClusterStats) int64 { return int64(s.SubscribedRooms) })
	}
	return m
}

func histOpts(o prometheus.Opts, buckets []float64) prometheus.HistogramOpts {
	return prometheus.HistogramOpts{Namespace: o.Namespace, Name: o.Name, Help: o.Help, ConstLabels: o.ConstLabels, Buckets: buckets}
}

// GiftLatency is the histogram of liveedge_gift_seconds (for benchmarks).
func (s *Server) GiftLatency() prometheus.Histogram { return s.metrics.giftSeconds }

package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/account"
	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pk"
	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/edge/room"
	"github.com/liveedge/liveedge/edge/ticket"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// Node is one LiveEdge process: storage, event bus, router, business services
// and the HTTP and WebSocket listeners. New builds it, Start binds the
// listeners, Shutdown drains and flushes. cmd/liveedge is a thin wrapper.
type Node struct {
	Config configs.Config
	Log    *slog.Logger
	errIDs atomic.Uint64 // ids of logged internal errors of ops served here (wireErr)

	Store    *persist.Store
	Ledger   *persist.Ledger // local wallet mode only
	Wallet   persist.Wallet  // the wallet in use (Ledger or the shared one)
	Redis    rueidis.Client  // nil unless redis.addr is set
	shared   *persist.SharedWallet
	Router   router.Router   // Local, or Cluster when cluster.enabled
	Local    *router.Local   // this node's sessions (inside Cluster in a cluster)
	Cluster  *router.Cluster // nil unless cluster.enabled
	routerNC *nats.Conn      // the cluster router's own NATS connection (NoEcho)
	Rooms    *room.Service
	Gifts    *gift.Service
	PK       *pk.Service
	Pay      *pay.Service
	worker   *pay.WorkerLease // shared mode: the order-id worker id leased in Redis
	payOpen  *limit.Held      // shared mode: a user's unpaid orders counted on every node
	WS       *Server
	API      *API
	Auth     *Auth

	// RedPackets runs red-packet rains (edge/redpacket).
	RedPackets *redpacket.Service
	// rains is RedPackets once made, for the wallet's watcher
	// (contributeRainClaims runs on it, maybe before RedPackets is set).
	rains atomic.Pointer[redpacket.Service]
	// owners are the nodes last seen holding the worker leases (workerOwner).
	owners ownersSeen
	// grabs bounds a user's grabs over every code (redpacket.grabs_per_second): the
	// rain's own limit is per (user, code), and a grab of a code no rain has
	// still costs a lookup — in a cluster a NATS request to the node its
	// worker id names.
	grabs *limit.Keyed

	// Accounts holds account statuses (frozen users): Pebble in local
	// mode, Redis in shared mode.
	Accounts account.Statuses

	// Tickets sells seats; this node's own programs only (other nodes forward
	// to the owner); in a cluster its coupons are shared in Redis (see
	// docs/tickets.md).
	Tickets *ticket.Service

	natsSrv *natsserver.Server
	NC      *nats.Conn

	metrics   *metrics
	stopIdem  chan struct{}
	payFwd    *payForwards // le.pay.<node> requests: stopped first at close
	payFwdSub *nats.Subscription
	// rpSub serves the other nodes' red-packet shard requests (le.rp.<node>);
	// rpWork counts them: they end before RedPackets and the store close.
	rpSub  *nats.Subscription
	rpWork workGate
	// catWork: catalogue reloads started by Redis's invalidations.
	catWork workGate
	// redisProbe is the last Redis ping of /readyz (redisReachable).
	redisProbe struct {
		mu  sync.Mutex
		at  time.Time
		err error
	}
	idemDone chan struct{} // closed when housekeepingLoop has returned
	stopSync chan struct{} // cluster: stops the room replica's Sync loop
	syncDone chan struct{}
	// stopRelease ends the idle memory release (node.idle_release).
	stopRelease, releaseDone chan struct{}
	draining                 atomic.Bool
	closed                   atomic.Bool
	// fatal carries the store's fatal failure (persist.Store.OnFatal) to
	// Fatal's reader.
	fatal chan error
}

// Fatal delivers the node's fatal failure: its storage failed a write (a WAL
// write or fsync error), money and orders refuse to move from then on, and
// the process must end at once — without Shutdown, which would write — so
// that its restart replays the WAL (cmd/liveedge exits 1).
func (n *Node) Fatal() <-chan error { return n.fatal }

// RoomEventsStream is the JetStream stream of room lifecycle events
// (subjects liveedge.room.opened / liveedge.room.closed).
const RoomEventsStream = "LIVEEDGE_ROOMS"

// Bounds of RoomEventsStream besides its 7 days.
const (
	RoomEventsMaxMsgs  = 1_000_000
	RoomEventsMaxBytes = 256 << 20
	// embeddedNATSMaxStore bounds the embedded NATS server's JetStream disk.
	embeddedNATSMaxStore = 4 * RoomEventsMaxBytes
)

// New builds a node from cfg. Nothing listens until Start.
func New(cfg configs.Config, log *slog.Logger) (_ *Node, err error) {
	if cfg.Node.GOGC > 0 {
		debug.SetGCPercent(cfg.Node.GOGC) // process-wide: the node is the process
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	if bare := cfg.Unprotected(); len(bare) > 0 {
		log.Warn("shared backends reached without credentials: every node trusts what reaches it through them; protect them (credentials or an isolated network)", "unprotected", bare)
	}
	log = log.With("node", cfg.Node.ID)
	n := &Node{Config: cfg, Log: log, fatal: make(chan error, 1)}
	defer func() {
		if err != nil {
			n.closed.Store(true) // stops retry loops (catalogue reload) started so far
			n.closeBackends()
		}
	}()
	if n.Store, err = persist.OpenWith(cfg.Node.DataDir, persist.Options{BlockCacheBytes: int64(cfg.Node.BlockCacheMB) << 20, WALMinSync: cfg.Node.WALMinSync.D()}); err != nil {
		return nil, err
	}
	n.Store.OnFatal(func(err error) {
		log.Error("storage failed a write: this node must stop and replay its WAL", "err", err)
		n.fatal <- err // once: cap 1
	})
	if err = n.startNATS(); err != nil {
		return nil, err
	}
	var onCatalogueInvalidated atomic.Pointer[func()]
	if cfg.Redis.Addr != "" {
		var tlsCfg *tls.Config
		if cfg.Redis.TLS {
			host, _, _ := net.SplitHostPort(cfg.Redis.Addr)
			tlsCfg = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
		}
		n.Redis, err = rueidis.NewClient(rueidis.ClientOption{
			InitAddress:   []string{cfg.Redis.Addr},
			Username:      cfg.Redis.Username,
			Password:      cfg.Redis.Password,
			TLSConfig:     tlsCfg,
			ClientName:    "liveedge-" + cfg.Node.ID,
			MaxFlushDelay: cfg.Redis.MaxFlushDelay.D(),
			OnInvalidations: func(msgs []rueidis.RedisMessage) {
				hit := msgs == nil // nil: the whole cache was flushed
				for _, m := range msgs {
					if k, _ := m.ToString(); k == gift.RedisCatalogueKey {
						hit = true
					}
				}
				if f := onCatalogueInvalidated.Load(); hit && f != nil && n.catWork.enter() {
					// Waited for before the store closes (a reload writes
					// the catalogue to it): an invalidation during the
					// shutdown — Redis closing flushes the cache — ran one
					// on a closed store (a Pebble panic).
					go func() {
						defer n.catWork.leave()
						(*f)()
					}()
				}
			},
		})
		if err != nil {
			return nil, fmt.Errorf("redis %s: %w", cfg.Redis.Addr, err)
		}
	}
	if err = n.startRouter(); err != nil {
		return nil, err
	}
	roomCfg := room.Config{OpenCloseInterval: cfg.Rooms.OpenCloseInterval.D(), Events: n.publishRoomEvent}
	if n.Cluster != nil {
		roomCfg.Shared = &room.Shared{Client: n.Redis}
	}
	if n.Rooms, err = room.New(n.Store, n.Router, roomCfg); err != nil {
		return nil, err
	}
	if n.Cluster != nil {
		if err = n.followRooms(); err != nil {
			return nil, err
		}
	}
	var catStore gift.CatalogueStore = gift.PebbleCatalogue{Store: n.Store}
	var coupons *ticket.SharedCoupons // nil: this node's Pebble
	switch cfg.Wallet.Mode {
	case "shared":
		// Account statuses (freezes) changed through each node are rebuilt
		// with the wallet from every node's disk.
		statuses := &account.Shared{Client: n.Redis, Store: n.Store}
		n.Accounts = statuses
		backfill(log, "account statuses", "statuses", "", statuses.Backfill)
		wcfg := persist.SharedConfig{Node: cfg.Node.ID, Nodes: cfg.Wallet.Nodes, Log: log, Contribute: statuses.Contribute}
		if n.Cluster != nil {
			// Granted and used through any node, once cluster-wide (coupon
			// ids are unique across nodes: order ids of leased worker ids);
			// rebuilt with the wallet when Redis loses them.
			coupons = ticket.NewSharedCoupons(n.Redis, n.Store)
			// With them, the payment req_id bindings and the rains'
			// one-per-user places, from every node's disk.
			contrib := []func(time.Time, func(...string) error) error{coupons.Contribute, n.contributePayReqs, n.contributeTicketReqs, n.contributeWorkerOwner, statuses.Contribute}
			// (The bindings and the statuses are outside le:*: a reset
			// leaves them, and adding them again gives the same state.)
			wcfg.ContributedPrefixes = []string{ticket.SharedCouponPrefix}
			if n.shardedRains() && cfg.RedPacket.OnePerUser {
				contrib = append(contrib, n.contributeRainClaims)
				wcfg.ContributedPrefixes = append(wcfg.ContributedPrefixes, rainClaimPrefix)
			}
			wcfg.Contribute = func(since time.Time, add func(op ...string) error) error {
				for _, f := range contrib {
					if err := f(since, add); err != nil {
						return err
					}
				}
				return nil
			}
			backfill(log, "coupons", "coupons", " (once)", coupons.Backfill)
		}
		n.shared, err = persist.NewSharedWallet(n.Store, n.Redis, wcfg)
		if err != nil {
			return nil, err
		}
		n.Wallet = n.shared
		catStore = gift.RedisCatalogue{Client: n.Redis, Mirror: n.Store}
	default:
		if n.Ledger, err = persist.OpenLedger(n.Store, persist.LedgerConfig{IdemMemoryBytes: cfg.Wallet.IdemMemoryBytes}); err != nil {
			return nil, err
		}
		n.Wallet = n.Ledger
	}
	cat, err := gift.NewCatalogue(catStore)
	if err != nil {
		return nil, err
	}
	reload := func() {
		// A failed read leaves Redis's tracking of the key disarmed (no more
		// invalidations), so retry until one succeeds.
		for wait := 50 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
			err := cat.Reload()
			if err == nil || n.closed.Load() {
				return
			}
			n.Log.Error("catalogue reload", "err", err, "retry_in", wait)
			time.Sleep(wait)
		}
	}
	onCatalogueInvalidated.Store(&reload)
	// An invalidation that arrived while the catalogue was being built was
	// dropped (no hook yet) and disarmed Redis's tracking of the key: read it
	// once more now, which re-arms tracking and picks up any change.
	reload()
	var giftsShared *limit.Shared
	if n.shared != nil {
		// A user's gifts are counted on every node (the shared wallet runs
		// the gift's check on a goroutine of its own: it may wait for Redis).
		giftsShared = limit.NewShared(n.Redis, "gift", cfg.Limits.GiftPerSecond, time.Second, max(1, cfg.Limits.GiftPerSecond))
	}
	n.Gifts = gift.New(n.Wallet, n.Router, cat, gift.Config{
		Receivers: roomAudience{rooms: n.Rooms, router: n.Router},
		PerSecond: cfg.Limits.GiftPerSecond, SharedRate: giftsShared, EffectWindow: cfg.Gifts.EffectWindow.D(),
		RoomEffectsPerSecond: cfg.Gifts.RoomEffectsPerSecond,
	}, log)
	if n.Cluster != nil {
		tallies := n.Wallet.Tally
		if n.shared != nil {
			tallies = n.shared.TallyFresh // the end's scores: not from a cache another node's write may not have reached
		}
		n.PK = pk.NewShared(n.Router, n.Rooms.EnsureOpen, n.Redis, tallies, log) // a room opened through another node may not be replicated here yet
		if n.shared != nil {
			// Redis lost its data: the running contests this node holds go
			// back once the wallet (and so the contests' tallies) is rebuilt;
			// their ends wait for it.
			n.PK.SetWalletReady(n.shared.Ready)
			n.shared.OnReady(n.PK.RestoreLost)
		}
	} else {
		n.PK = pk.New(n.Router, n.Rooms.EnsureOpen, n.Store, n.Wallet.Tally, log)
	}
	if d, ok := n.Wallet.(persist.TallyDropper); ok {
		// An ended contest's two tallies go once its scores are final.
		n.PK.SetTallyDrop(func(name string, rooms [2]int64) {
			for _, room := range rooms {
				if err := d.DropTally(name, room); err != nil {
					log.Warn("pk: contest tally not dropped (kept: harmless)", "tally", name, "room", room, "err", err)
				}
			}
		})
	}
	if err = n.PK.Restore(time.Now()); err != nil {
		return nil, err
	}
	n.Gifts.SetScorer(n.PK)
	if n.Accounts == nil { // not the shared wallet's (above)
		if n.Accounts, err = account.NewLocal(n.Store); err != nil {
			return nil, err
		}
	}
	n.Gifts.SetAccounts(n.Accounts)
	n.Rooms.SetOpponent(n.PK.Opponent)
	// A room closed through another node ends its contest here too: this
	// node's copy stops taking PK gifts and writes its wait mark, as at the
	// contest's end time (else gifts it took until end.lua would be
	// debited as PK gifts and never scored).
	// (On its own goroutine: it may read Redis, and the room events'
	// subscription delivers one event at a time.)
	n.Rooms.SetOnClosed(func(room int64) { go n.PK.EndRoom(room) })
	if err = n.watchCatalogue(cat); err != nil {
		return nil, err
	}
	public := cfg.Pay.PublicURL
	if public == "" {
		public = "http://" + cfg.HTTP.Addr
	}
	workerID, workerHeld := cfg.Pay.WorkerID, func() bool { return true }
	var reqClaims pay.ReqClaims
	var sharedOrders *limit.Shared
	if n.Redis != nil && cfg.Wallet.Mode == "shared" {
		reqClaims = payReqClaims{rdb: n.Redis}
		// A user's order creations are counted on every node (as this one's).
		sharedOrders = limit.NewShared(n.Redis, "order", cfg.Pay.OrdersPerMinute, time.Minute, max(1, cfg.Pay.OrdersPerMinute))
		// And their unpaid orders.
		n.payOpen = limit.NewHeld(n.Redis, "payopen", cfg.Pay.MaxOpenOrdersPerUser, log)
		// Nodes sharing Redis never share an order-id worker id.
		lctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		n.worker, err = pay.LeaseWorker(lctx, n.Redis, cfg.Node.ID, cfg.Pay.WorkerID, lastWorker(n.Store), 0, log)
		cancel()
		if err != nil {
			return nil, err
		}
		workerID, workerHeld = n.worker.ID(), n.worker.Held
		if err = n.Store.Put(keyLastWorker, []byte(strconv.Itoa(workerID))); err != nil {
			return nil, err
		}
	}
	n.Pay, err = pay.New(n.Store, n.Wallet, n.Router, pay.Config{
		Node: cfg.Node.ID, WorkerID: workerID, WorkerHeld: workerHeld, Secrets: cfg.Pay.Secrets,
		OrderTimeout: cfg.Pay.OrderTimeout.D(), ProviderURL: cfg.Pay.ProviderURL,
		NotifyURL:      public + "/api/v1/pay/notify",
		ReconcileAfter: cfg.Pay.ReconcileAfter.D(), ReconcileEvery: cfg.Pay.ReconcileEvery.D(), Log: log,
		MaxOpenPerUser: cfg.Pay.MaxOpenOrdersPerUser, OrdersPerMinute: cfg.Pay.OrdersPerMinute, UnaskedRetention: cfg.Pay.UnaskedRetention.D(),
		Frozen: n.Accounts.Frozen, ReqClaims: reqClaims, SharedCreates: sharedOrders, SharedOpen: n.payOpen,
	})
	if err != nil {
		return nil, err
	}
	if n.worker != nil {
		// Ids made from now on are after every id this worker id's
		// earlier holders could have made, whatever this clock says —
		// also those of a holder that took it while this node's lease
		// had lapsed (program ids read Since each time).
		p := n.Pay
		n.worker.SetOnSince(func(t time.Time) { p.OrderIDsAbove(pay.FirstIDAt(t)) })
		p.OrderIDsAbove(pay.FirstIDAt(n.worker.Since()))
	}
	if n.shared != nil && n.payOpen != nil {
		// Redis lost its data and was rebuilt: the unpaid orders' places
		// are not in the rebuild (they live in Redis only).
		n.shared.OnReady(n.Pay.KeepOpenPlaces)
	}
	// After the worker lease (rain codes carry the worker id in a cluster),
	// before the forwarded requests are served.
	if err = n.newRedPackets(); err != nil {
		return nil, err
	}
	var cstore ticket.CouponStore
	var places *limit.Shared
	if coupons != nil {
		cstore = coupons
		// A user's ticket orders are counted on every node (as this one's).
		places = limit.NewShared(n.Redis, "tkorder", cfg.Tickets.OrdersPerMinute, time.Minute, max(1, cfg.Tickets.OrdersPerMinute))
	}
	var reqBinding ticket.ReqBinding
	if n.Cluster != nil {
		reqBinding = ticketReqs{n: n}
	}
	n.Tickets, err = ticket.New(n.Store, n.Wallet, n.Pay, n.Router, ticket.Config{
		PayTimeout: cfg.Tickets.PayTimeout.D(), OrdersPerMinute: cfg.Tickets.OrdersPerMinute, MaxPrograms: cfg.Tickets.MaxPrograms, MaxSeats: cfg.Tickets.MaxSeats, AskBudget: cfg.Tickets.AskBudget.D(), Log: log,
		NextProgramID: n.nextProgramID(), Coupons: cstore, SharedPlaces: places, Frozen: n.Accounts.Frozen, ReqBinding: reqBinding})
	if err != nil {
		return nil, err
	}
	n.Pay.RegisterBusiness(ticket.Biz, n.Tickets) // paid events of ticket orders go to the ticket service
	if n.Cluster != nil {
		// Only now: a forwarded ticket op, or a ticket order's paid event,
		// needs the ticket service (its start reads every order and settles
		// interrupted sagas: seconds, while the other nodes already forward
		// here again under this node's worker id).
		if err = n.servePayForwards(); err != nil {
			return nil, err
		}
		if n.shardedRains() {
			if err = n.serveRedPacketShards(); err != nil {
				return nil, err
			}
		}
	}
	if n.shared != nil {
		// Ops the crash before this start left on their way and that ran:
		// their gifts' effects and credits' pushes, before any retry.
		n.shared.TellSettledAtOpen()
	}
	n.metrics = newMetrics(cfg.Node.ID, n.Router)
	labelled := prometheus.WrapRegistererWith(prometheus.Labels{"node": cfg.Node.ID}, n.metrics.reg)
	if n.Ledger != nil {
		for _, c := range n.Ledger.Collectors() {
			labelled.MustRegister(c)
		}
	}
	if n.shared != nil {
		for _, c := range n.shared.Collectors() {
			labelled.MustRegister(c)
		}
	}
	for _, c := range n.Tickets.Collectors() {
		labelled.MustRegister(c)
	}
	for _, c := range n.Pay.Collectors() {
		labelled.MustRegister(c)
	}
	auth := NewAuth(cfg.Auth.JWTSecret)
	auth.SetMaxTTL(cfg.Auth.MaxTokenTTL.D())
	n.Auth = auth
	deps := ServerDeps{
		Config: cfg, Log: log, Auth: auth, Router: n.Router, Metrics: n.metrics, RedPackets: n.RedPackets,
		ChatLimit: limit.New(cfg.Limits.ChatPerSecond, time.Second, max(1, cfg.Limits.ChatPerSecond), nil),
		Gifts:     n.Gifts, RoomOpen: n.Rooms.EnsureOpen, RoomKnownClosed: n.Rooms.KnownClosed, Grab: n.grabAsync,
	}
	if n.Cluster != nil && n.Redis != nil {
		// A chat's retry may reach another node: its req_id is kept in Redis.
		deps.ChatOnce = &redisChatOnce{rdb: n.Redis, node: cfg.Node.ID, timeout: 2 * time.Second}
		// A user's chats are counted on every node (as this one's).
		deps.ChatShared = limit.NewShared(n.Redis, "chat", cfg.Limits.ChatPerSecond, time.Second, max(1, cfg.Limits.ChatPerSecond))
		// A user's connections are bounded on every node together.
		deps.SessionsElsewhere = n.Cluster.SessionsElsewhere
	}
	deps.RoomOpsWait, deps.GrabWaits = n.Cluster != nil, n.grabWaits
	n.WS = newServer(deps)
	n.API = newAPI(n, auth)
	n.stopIdem, n.idemDone = make(chan struct{}), make(chan struct{})
	go n.housekeepingLoop()
	if d := cfg.Node.IdleRelease.D(); d > 0 {
		r := newIdleRelease(d)
		n.metrics.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts(n.metrics.opts("idle_memory_releases_total",
			"Times the idle node returned its free heap to the OS (node.idle_release).")),
			func() float64 { return float64(r.releases.Load()) }))
		n.stopRelease, n.releaseDone = make(chan struct{}), make(chan struct{})
		go func() {
			defer close(n.releaseDone)
			r.run(n.stopRelease)
		}()
	}
	return n, nil
}

// natsAuth are the options of an external NATS's credentials (none: no
// option).
func natsAuth(c configs.NATS) []nats.Option {
	switch {
	case c.CredsFile != "":
		return []nats.Option{nats.UserCredentials(c.CredsFile)}
	case c.Token != "":
		return []nats.Option{nats.Token(c.Token)}
	case c.User != "":
		return []nats.Option{nats.UserInfo(c.User, c.Password)}
	}
	return nil
}

// startRouter makes the node's router: Local alone, or, with
// cluster.enabled, Cluster on a NATS connection of its own (NoEcho: a node
// never receives its own room batches) and the node's Redis client.
func (n *Node) startRouter() error {
	cfg := n.Config
	lc := router.LocalConfig{MaxRoomsPerSes: cfg.WS.MaxRoomsPerConn,
		HistorySize: cfg.Rooms.HistorySize, HistoryTTL: cfg.Rooms.HistoryTTL.D(),
		OfflineMax: cfg.WS.OfflineMax, OfflineTTL: cfg.WS.OfflineTTL.D()}
	if lc.OfflineMax == 0 {
		lc.OfflineMax = -1 // configured off
	}
	if !cfg.Cluster.Enabled {
		n.Local = router.NewLocal(cfg.Node.ID, lc)
		n.Router = n.Local
		return nil
	}
	var cl atomic.Pointer[router.Cluster]
	routerBack := func(*nats.Conn) {
		if c := cl.Load(); c != nil {
			c.Reconnected()
		}
	}
	nc, err := nats.Connect(cfg.NATS.URL, append(natsAuth(cfg.NATS), nats.Name(cfg.Node.ID+"-router"), nats.NoEcho(),
		nats.RetryOnFailedConnect(true), nats.MaxReconnects(-1), nats.ReconnectWait(500*time.Millisecond),
		nats.ReconnectBufSize(8<<20),
		// Messages may have been lost while away — or, when NATS was down
		// at the start, while this node served without it.
		nats.ReconnectHandler(routerBack), nats.ConnectHandler(routerBack))...)
	if err != nil {
		return natsErr("router nats", cfg.NATS.URL, err)
	}
	n.routerNC = nc
	// Two processes under one node.id share its worker lease, its
	// forwarded requests (le.pay.<id>) and its shared-wallet records: the
	// second is refused (a crash's restart waits a heartbeat period first).
	ictx, cancel := context.WithTimeout(context.Background(), cfg.Cluster.PresenceTTL.D()+5*time.Second)
	inUse := router.NodeIDInUse(ictx, n.Redis, cfg.Node.ID, cfg.Cluster.PresenceTTL.D())
	cancel()
	if inUse {
		return fmt.Errorf("node.id %q is in use by another running node (its presence is refreshed in Redis): give every node its own node.id", cfg.Node.ID)
	}
	c, err := router.NewCluster(router.ClusterConfig{
		Node: cfg.Node.ID, Local: lc, NATS: nc, Redis: n.Redis,
		GapWait: cfg.Cluster.GapWait.D(), PresenceTTL: cfg.Cluster.PresenceTTL.D(), Linger: cfg.Cluster.Linger.D(),
		Log: n.Log,
	})
	if err != nil {
		return err
	}
	cl.Store(c)
	n.Cluster, n.Local, n.Router = c, c.LocalRouter(), c
	return nil
}

// followRooms keeps this node's replica of the cluster's open rooms: the
// opened/closed events of other nodes as they come, and a full Sync every 5 s
// for events missed while NATS was away.
func (n *Node) followRooms() error {
	_, err := n.NC.Subscribe("liveedge.room.*", func(m *nats.Msg) {
		var rm room.Room
		if proto.Unmarshal(m.Data, &rm) != nil {
			return
		}
		switch m.Subject {
		case "liveedge.room.opened":
			n.Rooms.Apply("opened", rm)
		case "liveedge.room.closed":
			n.Rooms.Apply("closed", rm)
		}
	})
	if err != nil {
		return err
	}
	n.stopSync = make(chan struct{})
	n.syncDone = make(chan struct{})
	go func() {
		defer close(n.syncDone)
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-n.stopSync:
				return
			case <-t.C:
				if err := n.Rooms.Sync(); err != nil {
					n.Log.Warn("room replica not synced", "err", err)
				}
			}
		}
	}()
	return nil
}

func (n *Node) startNATS() error {
	cfg := n.Config
	if !cfg.NATS.Embedded {
		// An external NATS that is down (briefly, or at start) does not stop
		// the node: the client keeps retrying in the background (publishes
		// are buffered meanwhile, subscriptions are sent on connect) and the
		// stream is ensured once it is connected. No feature needs NATS to
		// serve (see ready).
		onConnect := func(nc *nats.Conn) {
			go func() {
				if err := ensureStreams(nc); err != nil {
					n.Log.Error("nats connected: jetstream stream not ensured", "err", err)
				}
			}()
		}
		nc, err := nats.Connect(cfg.NATS.URL, append(natsAuth(cfg.NATS), nats.Name(cfg.Node.ID),
			nats.RetryOnFailedConnect(true), nats.MaxReconnects(-1), nats.ReconnectWait(time.Second),
			nats.ConnectHandler(onConnect),   // the first connect, now or after retries
			nats.ReconnectHandler(onConnect), // a restarted server may have lost the stream
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
				if err != nil { // nil: closed by us
					n.Log.Warn("nats disconnected, reconnecting", "url", redactURL(cfg.NATS.URL), "err", err)
				}
			}))...)
		if err != nil {
			return natsErr("nats", cfg.NATS.URL, err)
		}
		n.NC = nc
		if !nc.IsConnected() {
			n.Log.Warn("nats not reachable yet, retrying in the background", "url", redactURL(cfg.NATS.URL))
			return nil
		}
		return ensureStreams(nc) // reachable now: a stream that cannot be made fails the start
	}
	opts := &natsserver.Options{
		ServerName: cfg.Node.ID,
		JetStream:  true,
		StoreDir:   filepath.Join(cfg.Node.DataDir, "nats"),
		// The streams' disk, shared with the ledger, is bounded whatever
		// a client with access creates (the room events stream takes a
		// quarter of it).
		JetStreamMaxStore: embeddedNATSMaxStore,
		NoLog:             true,
		NoSigs:            true,
		DontListen:        cfg.NATS.Listen == "",
		// nats.user/password or nats.token, when set, are required of
		// every client, this node's own in-process one included (a
		// listener beyond loopback needs them: configs).
		Username:      cfg.NATS.User,
		Password:      cfg.NATS.Password,
		Authorization: cfg.NATS.Token,
	}
	if cfg.NATS.Listen != "" {
		host, port, err := net.SplitHostPort(cfg.NATS.Listen)
		if err != nil {
			return fmt.Errorf("nats.listen: %w", err)
		}
		opts.Host = host
		if opts.Port, err = strconv.Atoi(port); err != nil {
			return fmt.Errorf("nats.listen: %w", err)
		}
	}
	ns, err := natsserver.NewServer(opts)
	if err != nil {
		return fmt.Errorf("embedded nats: %w", err)
	}
	ns.Start()
	n.natsSrv = ns
	if !ns.ReadyForConnections(10 * time.Second) {
		return errors.New("embedded nats: not ready after 10s")
	}
	copts := []nats.Option{nats.InProcessServer(ns), nats.Name(cfg.Node.ID)}
	if cfg.NATS.User != "" {
		copts = append(copts, nats.UserInfo(cfg.NATS.User, cfg.NATS.Password))
	} else if cfg.NATS.Token != "" {
		copts = append(copts, nats.Token(cfg.NATS.Token))
	}
	nc, err := nats.Connect("", copts...)
	if err != nil {
		return fmt.Errorf("embedded nats connect: %w", err)
	}
	n.NC = nc
	return ensureStreams(nc)
}

func ensureStreams(nc *nats.Conn) error {
	js, err := nc.JetStream()
	if err != nil {
		return err
	}
	sc := &nats.StreamConfig{
		Name:     RoomEventsStream,
		Subjects: []string{"liveedge.room.>"},
		// Bounded in age, count and bytes (the oldest go first): rooms are
		// opened at any rate, and the embedded server shares the disk with
		// the ledger.
		MaxAge:   7 * 24 * time.Hour,
		MaxMsgs:  RoomEventsMaxMsgs,
		MaxBytes: RoomEventsMaxBytes,
		Discard:  nats.DiscardOld,
		Storage:  nats.FileStorage,
	}
	_, err = js.AddStream(sc)
	if errors.Is(err, nats.ErrStreamNameAlreadyInUse) {
		// Made by an older version without the bounds: give it them.
		_, err = js.UpdateStream(sc)
	}
	if err != nil && !errors.Is(err, nats.ErrStreamNameAlreadyInUse) {
		// Nodes starting together race to make it: one wins, the others
		// may be told its subjects overlap. The stream being there is all
		// that matters.
		if _, ierr := js.StreamInfo(RoomEventsStream); ierr == nil {
			return nil
		}
		return fmt.Errorf("jetstream stream %s: %w", RoomEventsStream, err)
	}
	return nil
}

// publishRoomEvent records a room lifecycle event on JetStream. Best effort:
// the room record in Pebble is the source of truth; the stream feeds other
// nodes and observers.
func (n *Node) publishRoomEvent(kind string, r room.Room) {
	b, err := proto.Marshal(r)
	if err != nil {
		return
	}
	if err := n.NC.Publish("liveedge.room."+kind, b); err != nil {
		n.Log.Warn("room event not published", "kind", kind, "room", r.ID, "err", err)
	}
}

// CatalogueSubject carries "the gift catalogue changed" between nodes.
const CatalogueSubject = "liveedge.gift.catalogue"

// watchCatalogue reloads the catalogue when any node announces a change and
// announces local changes.
func (n *Node) watchCatalogue(cat *gift.Catalogue) error {
	cat.OnChange = func() {
		if err := n.NC.Publish(CatalogueSubject, []byte(n.Config.Node.ID)); err != nil {
			n.Log.Warn("catalogue change not announced", "err", err)
		}
	}
	_, err := n.NC.Subscribe(CatalogueSubject, func(m *nats.Msg) {
		if string(m.Data) == n.Config.Node.ID {
			return
		}
		if err := cat.Reload(); err != nil {
			n.Log.Error("catalogue reload", "err", err)
		}
	})
	return err
}

// housekeepingLoop drops idempotency records older than their TTL, and on a
// single node the records of rooms closed more than room.ClosedRecordTTL
// ago (a cluster's Redis expires those): once at start (a node restarted
// more often than hourly would otherwise never expire any), then hourly.
// With statuses in Redis it also puts back, every account.MendEvery, the
// changes on this node's disk that Redis lost without losing a wallet op
// (account.Shared.Mend).
func (n *Node) housekeepingLoop() {
	defer close(n.idemDone)
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	var mend <-chan time.Time
	statuses, shared := n.Accounts.(*account.Shared)
	if shared {
		m := time.NewTicker(account.MendEvery)
		defer m.Stop()
		mend = m.C
	}
	for now := time.Now(); ; {
		n.expireRecords(now)
		for waiting := true; waiting; {
			select {
			case <-n.stopIdem:
				return
			case now = <-t.C:
				waiting = false
			case <-mend:
				n.mendStatuses(statuses)
			}
		}
	}
}

// expireRecords is housekeepingLoop's hourly pass.
func (n *Node) expireRecords(now time.Time) {
	if n.Ledger != nil { // shared mode: the SharedWallet's watcher expires its own records
		if k, err := n.Ledger.ExpireIdem(now.Add(-persist.DefaultIdemTTL)); err != nil {
			n.Log.Error("idempotency expiry", "err", err)
		} else if k > 0 {
			n.Log.Info("idempotency records expired", "count", k)
		}
	}
	if k, err := n.Rooms.PruneClosed(now.Add(-room.ClosedRecordTTL)); err != nil {
		n.Log.Error("closed rooms' records expiry", "err", err)
	} else if k > 0 {
		n.Log.Info("closed rooms' records expired", "count", k)
	}
}

// mendStatuses is housekeepingLoop's account.Shared.Mend.
func (n *Node) mendStatuses(statuses *account.Shared) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if k, err := statuses.Mend(ctx); err != nil {
		n.Log.Warn("account statuses not checked against Redis", "err", err)
	} else if k > 0 {
		n.Log.Error("account status changes Redis had lost put back (it went back to an older state)", "count", k)
	}
}

// Start binds the WebSocket and HTTP listeners.
func (n *Node) Start() error {
	if err := n.WS.Listen(); err != nil {
		return fmt.Errorf("ws listen %s: %w", n.Config.WS.Addr, err)
	}
	if err := n.API.Listen(); err != nil {
		return fmt.Errorf("http listen %s: %w", n.Config.HTTP.Addr, err)
	}
	if n.Config.Pay.PublicURL == "" {
		n.Pay.SetNotifyURL("http://" + n.API.Addr() + "/api/v1/pay/notify")
	}
	n.Log.Info("liveedge node started", "http", n.API.Addr(), "ws", n.WS.Addr())
	return nil
}

// ready is /readyz: nil when the node can serve what its mode needs.
//
//   - Every mode: not draining, storage not failed (persist.Store: a failed
//     write is fatal). Pebble is in process (New fails without it).
//   - wallet.mode shared: Redis reachable (balances, idempotency and the gift
//     catalogue live there) and the shared wallet's generation known (after a
//     Redis data loss money moves again only once the ledgers are rebuilt).
//   - wallet.mode local: nothing outside the process.
//   - NATS (embedded or external) is needed by no feature today: room events
//     and catalogue announcements on it are best effort (the room record in
//     Pebble is the truth; shared mode's catalogue is invalidated through
//     Redis), so NATS being down does not make the node unready.
func (n *Node) ready() *notReady {
	switch {
	case n.draining.Load():
		return &notReady{Dep: "node", Reason: "draining"}
	case n.Store.Failed() != nil:
		return &notReady{Dep: "store", Reason: "storage failed: restarting", Err: n.Store.Failed()}
	case n.Cluster != nil && !n.routerNC.IsConnected():
		return &notReady{Dep: "nats", Reason: "NATS unreachable (cluster routing)", Err: n.routerNC.LastError()}
	case n.shared != nil:
		if err := n.redisReachable(); err != nil {
			return &notReady{Dep: "redis", Reason: "Redis unreachable", Err: err}
		}
		if !n.shared.Ready() {
			return &notReady{Dep: "wallet", Reason: "shared wallet not ready (rebuilding)"}
		}
	}
	return nil
}

// notReady is why a node is not ready. /readyz answers anyone Dep and
// Reason, fixed words naming what is missing; Err, the details (addresses,
// a driver's message), goes to the log only.
type notReady struct {
	Dep    string // node (draining), store, nats, redis, wallet
	Reason string
	Err    error
}

// redisProbeEvery bounds how often /readyz pings Redis: answers within it
// reuse the last result, so a /readyz flood is not a Redis flood.
const redisProbeEvery = 500 * time.Millisecond

// redisReachable pings Redis (at most once per redisProbeEvery; a second
// caller meanwhile waits for the first's answer).
func (n *Node) redisReachable() error {
	p := &n.redisProbe
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.at.IsZero() && time.Since(p.at) < redisProbeEvery {
		return p.err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	p.err = n.Redis.Do(ctx, n.Redis.B().Ping().Build()).Error()
	p.at = time.Now()
	return p.err
}

// Shutdown stops accepting, closes every connection with 1001 after draining
// its send queue (bounded by ctx), then flushes and closes storage and NATS.
func (n *Node) Shutdown(ctx context.Context) error {
	if !n.closed.CompareAndSwap(false, true) {
		return nil
	}
	n.draining.Store(true)
	start := time.Now()
	n.WS.Shutdown(ctx)
	hctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	n.API.Shutdown(hctx)
	cancel()
	// The HTTP requests still being handled finish first (bounded by the
	// drain's ctx, at least 5 s: the calls they wait on are bounded so): closing
	// the services and stores under them failed them half done.
	wctx, cancel := context.WithTimeout(context.Background(), max(5*time.Second, time.Until(deadlineOf(ctx))))
	if !n.API.WaitHandlers(wctx) {
		n.Log.Warn("HTTP requests still running at shutdown: their backends close under them")
	}
	cancel()
	err := n.closeBackends()
	n.Log.Info("liveedge node stopped", "took", time.Since(start).Round(time.Millisecond), "err", err)
	return err
}

// deadlineOf is ctx's deadline, or now when it has none.
func deadlineOf(ctx context.Context) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d
	}
	return time.Now()
}

func (n *Node) closeBackends() error {
	var errs []error
	if n.Gifts != nil {
		n.Gifts.FlushEffects() // the last gifts' room effects, before the router closes
	}
	if n.payFwdSub != nil {
		// Forwarded requests end first: those running finish, the rest are
		// answered "busy", none runs after the services below close.
		_ = n.payFwdSub.Unsubscribe()
		n.payFwd.stop()
	}
	if n.stopIdem != nil {
		close(n.stopIdem)
		<-n.idemDone // an expiry in progress finishes before the ledger and store close
	}
	if n.stopRelease != nil {
		close(n.stopRelease)
		<-n.releaseDone
	}
	if n.Tickets != nil {
		n.Tickets.Close()
	}
	if n.Pay != nil {
		n.Pay.Close()
	}
	n.payOpen.Close() // before Redis closes
	if n.worker != nil {
		n.worker.Close() // before Redis closes
	}
	if n.PK != nil {
		n.PK.Close()
	}
	if n.rpSub != nil {
		// Other nodes' leases, closes and recoveries end first (each
		// bounded): none runs on a closed service or store.
		_ = n.rpSub.Unsubscribe()
	}
	n.rpWork.stop()
	if n.RedPackets != nil {
		n.RedPackets.Close() // before the wallet closes: settlements in progress finish
	}
	if n.stopSync != nil {
		close(n.stopSync)
		<-n.syncDone
	}
	if n.Cluster != nil {
		n.Cluster.Close() // before Redis closes
	}
	if n.routerNC != nil {
		n.routerNC.Close()
	}
	if n.NC != nil {
		if err := n.NC.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrConnectionReconnecting) {
			errs = append(errs, err)
		}
		n.NC.Close()
	}
	if n.shared != nil {
		n.shared.Close()
	}
	if n.Ledger != nil {
		n.Ledger.Close() // commits what is queued
	}
	if n.Redis != nil {
		n.Redis.Close()
	}
	if n.natsSrv != nil {
		n.natsSrv.Shutdown()
		n.natsSrv.WaitForShutdown()
	}
	n.catWork.stop() // after Redis: its close may start one more (refused now)
	if n.Store != nil {
		if err := n.Store.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// roomAudience is gift.Receivers: a gift may go to the room's anchor or to
// a user with a session joined to the room — in a cluster on any live node
// (router.UserInRoom: the cluster's presence; an error when it could not be read).
type roomAudience struct {
	rooms  *room.Service
	router router.Router
}

var _ gift.Receivers = roomAudience{}

func (a roomAudience) CanReceive(roomID, user int64) (bool, error) {
	if anchor, ok, err := a.rooms.AnchorOf(roomID); err != nil {
		return false, err // the room could not be read: 50000 retry (gift.Receivers)
	} else if ok && anchor == user {
		return true, nil
	}
	return a.router.UserInRoom(roomID, user)
}

// backfill copies what Redis holds of what (account statuses, coupons) to
// this node's disk at a start, within a minute; a failure is logged and the
// next start tries again.
func backfill(log *slog.Logger, what, attr, note string, fill func(context.Context) (int, error)) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if k, err := fill(ctx); err != nil {
		log.Warn(what+" not copied to this node's disk yet (next start tries again)", "err", err)
	} else if k > 0 {
		log.Info(what+" copied to this node's disk"+note, attr, k)
	}
}

// redactURL is a server URL (or a comma-separated list) as it can be
// logged: credentials written into it (nats://user:pass@host, or
// user:pass@host, which the client takes as nats://) replaced.
func redactURL(raw string) string {
	parts := strings.Split(raw, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		full := p
		if !strings.Contains(p, "://") {
			full = "nats://" + p
		}
		if u, err := url.Parse(full); err == nil && u.User != nil {
			u.User = url.User("redacted")
			parts[i] = u.String()
		} else if err != nil && strings.Contains(p, "@") {
			parts[i] = "(unparsable URL with credentials)"
		}
	}
	return strings.Join(parts, ",")
}

// natsErr is err of a connection to raw: as it is when raw carries no
// credentials, else its text without them (the client's errors quote the
// URL it was given).
func natsErr(what, raw string, err error) error {
	red := redactURL(raw)
	if red == raw {
		return fmt.Errorf("%s %s: %w", what, raw, err)
	}
	if ue := (*url.Error)(nil); errors.As(err, &ue) {
		// The parser quotes pieces of the URL (a cut copy, an escape, a
		// "port" that is the password's start): none of it is shown.
		return fmt.Errorf("%s %s: the URL does not parse", what, red)
	}
	msg := err.Error()
	for _, p := range strings.Split(raw, ",") {
		if p = strings.TrimSpace(p); p != "" {
			msg = strings.ReplaceAll(msg, p, redactURL(p))
		}
		if at := strings.LastIndex(p, "@"); at >= 0 {
			if from := strings.Index(p, "://"); from >= 0 && from+3 <= at {
				msg = strings.ReplaceAll(msg, p[from+3:at], "redacted")
			} else {
				msg = strings.ReplaceAll(msg, p[:at], "redacted")
			}
		}
	}
	return fmt.Errorf("%s %s: %s", what, red, msg)
}

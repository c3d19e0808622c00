package bench

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/persist"
)

// BenchmarkRedPacketGrabWS measures red-packet grabs over WebSocket end to
// end (issue 13, item 5b), with the gift benchmark's load generator (a child
// process by default, the same client code for both servers; closed loop,
// LIVEEDGE_GIFTBENCH_CONNS connections × LIVEEDGE_GIFTBENCH_WINDOW grabs in
// flight each):
//
//   - echo: the bare gws server answering each grab frame with a reply frame
//     of the size LiveEdge's grab reply has (the baseline).
//   - echo_push: the same, each reply followed by a reliable push shaped
//     like LiveEdge's 5570 that the client acknowledges — the frames a
//     LiveEdge grab costs (3 per grab, the echo's 1), without its work.
//   - liveedge: a real node, one room, one running rain of 1,000,000
//     packets (one_per_user and the grab interval off, so every connection
//     grabs again and again); every grab pops a packet and answers once its
//     grant and credit are fsynced (group-committed ledger op), and the
//     grabber gets its reliable 5570 credit push, which the client
//     acknowledges as the SDKs do. x-echo = grabs/s ÷ the echo's replies/s
//     of the same run (target ≥ 0.8).
//   - liveedge_batch: the same with ?batch=1 (the SDKs' default): the node
//     may put a grab's reply and its 5570 in one frame.
//
// Run:
//
//	go test -run '^$' -bench RedPacketGrabWS -benchtime 1x ./edge/gift/bench/
func BenchmarkRedPacketGrabWS(b *testing.B) {
	raiseNofile(b)
	sameGC()
	k := loadKnobs()
	const code = "aaaaaaaaaaaaaaaaaaaaaaaaaa" // the echo's: a code's length
	var echoRate float64
	echo := func(b *testing.B, pushes bool) float64 {
		var rate float64
		for range b.N {
			srv := startEcho(b, 0)
			srv.pushes = pushes
			targets := make([]connTarget, k.conns)
			for i := range targets {
				targets[i] = connTarget{url: "ws://" + srv.addr + "/ws", user: senderBase + int64(i), room: 1, anchor: 1, code: code}
			}
			cl := startClients(b, k, targets)
			res := cl.run(0)
			res.reportAs(b, "grabs/s")
			rate = res.rate()
			cl.close()
		}
		return rate
	}
	b.Run("echo", func(b *testing.B) { echoRate = echo(b, false) })
	var pushRate float64
	b.Run("echo_push", func(b *testing.B) { pushRate = echo(b, true) })
	for _, batch := range []bool{false, true} {
		name := "liveedge"
		if batch {
			name = "liveedge_batch"
		}
		b.Run(name, func(b *testing.B) {
			grabWS(b, k, batch, echoRate, pushRate)
		})
	}
}

// grabWS is one LiveEdge sub-benchmark of BenchmarkRedPacketGrabWS.
func grabWS(b *testing.B, k knobs, batch bool, echoRate, pushRate float64) {
	{
		for range b.N {
			node, cl := startLiveEdgeGrab(b, k, batch)
			res := cl.run(0)
			res.reportAs(b, "grabs/s")
			if echoRate > 0 {
				b.ReportMetric(res.rate()/echoRate, "x-echo")
			}
			if pushRate > 0 {
				b.ReportMetric(res.rate()/pushRate, "x-echo-push")
			}
			cl.close()
			code, _ := node.RedPackets.Codes(grabRoom) // the running rain
			v, err := node.RedPackets.Get(code)
			if err != nil || int64(v.GrantedCount) < res.ok {
				b.Fatalf("rain %+v (%v): fewer durable grants than ok answers (%d)", v, err, res.ok)
			}
		}
	}
}

var grabRoom int64

// startLiveEdgeGrab starts a node with a running rain in one room and
// connects k.conns grabbers to it, joined to the room.
func startLiveEdgeGrab(b testing.TB, k knobs, batch bool) (*gateway.Node, clients) {
	b.Helper()
	cfg := nodetest.Config(b)
	cfg.Log.Level = "warn"
	cfg.RedPacket.OnePerUser = false
	cfg.RedPacket.GrabInterval = configs.Duration(0)
	cfg.RedPacket.GrabsPerSecond = 0 // every connection grabs again and again, as fast as it can
	cfg.RedPacket.PrepareInterval, cfg.RedPacket.StartInterval = 0, 0
	cfg.RedPacket.MaxCount = 1_000_000
	node := nodetest.Start(b, cfg)
	const anchor, count, total = 1, 1_000_000, 10_000_000
	grabRoom = nodetest.OpenRoom(b, node, anchor, 0)
	if _, err := node.Ledger.Apply(persist.Op{User: anchor, Postings: []persist.Posting{{User: anchor, Delta: total, Reason: persist.ReasonDev}}}); err != nil {
		b.Fatal(err)
	}
	v, err := node.RedPackets.Create(anchor, grabRoom, total, count, 10*time.Minute)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := node.RedPackets.Prepare(anchor, v.Code); err != nil {
		b.Fatal(err)
	}
	base := nodetest.WSURL(node)
	targets := make([]connTarget, k.conns)
	for i := range targets {
		u := senderBase + int64(i)
		url := base + "?token=" + nodetest.Token(b, node, u, gateway.RoleViewer)
		if batch {
			url += "&batch=1" // the SDKs' default: replies and pushes may share a frame
		}
		targets[i] = connTarget{url: url, user: u, room: grabRoom, anchor: anchor, code: v.Code}
	}
	cl := startClients(b, k, targets)
	if _, err := node.RedPackets.Start(anchor, v.Code); err != nil {
		b.Fatal(err)
	}
	return node, cl
}

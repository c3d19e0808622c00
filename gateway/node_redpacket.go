package gateway

import (
	"github.com/liveedge/liveedge/edge/redpacket"
)

// newRedPackets builds the red-packet service (after the rooms, the wallet
// and the router) and restores the rains a previous run left unfinished. A
// grabber must have a session joined to the rain's room on this node
// (router.UserInRoom); a cluster-wide presence replaces it behind
// redpacket.Config.InRoom.
func (n *Node) newRedPackets() (err error) {
	cfg := n.Config.RedPacket
	var pool redpacket.Pool = redpacket.NewMemoryPool()
	if cfg.Pool == "redis-list" {
		pool = &redpacket.RedisListPool{Client: n.Redis}
	}
	n.RedPackets, err = redpacket.New(n.Store, n.Wallet, n.Router, redpacket.Config{
		Node: n.Config.Node.ID, Pool: pool,
		AnchorOf: n.Rooms.AnchorOf, InRoom: n.Router.UserInRoom,
		MaxCount: cfg.MaxCount, MaxTotal: cfg.MaxTotal, MaxDuration: cfg.MaxDuration.D(),
		MaxPerAnchor: cfg.MaxPerAnchor, OnePerUser: cfg.OnePerUser,
		PrepareInterval: cfg.PrepareInterval.D(), StartInterval: cfg.StartInterval.D(),
		GrabInterval: cfg.GrabInterval.D(),
	}, n.Log)
	if err != nil {
		return err
	}
	n.Rooms.SetRedPacket(n.RedPackets.ActiveCode)
	return nil
}

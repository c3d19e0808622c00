package gateway

import (
	"context"

	"github.com/cloudwego/hertz/pkg/app"
)

type userStatusReq struct {
	Status int `json:"status"`
}

// userStatus answers a user's account status (role admin):
// {"user_id":U,"status":1|2}.
func (a *API) userStatus(_ context.Context, c *app.RequestContext) {
	id, okID := a.adminPathID(c)
	if !okID {
		return
	}
	st, err := a.node.Accounts.Status(id)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]int64{"user_id": id, "status": int64(st)})
}

// setUserStatus freezes ({"status":2}) or unfreezes ({"status":1}) a
// user's account (role admin), durably before the answer.
func (a *API) setUserStatus(_ context.Context, c *app.RequestContext) {
	id, okID := a.adminPathID(c)
	if !okID {
		return
	}
	var r userStatusReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	if err := a.node.Accounts.SetStatus(id, r.Status); err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]int64{"user_id": id, "status": int64(r.Status)})
}

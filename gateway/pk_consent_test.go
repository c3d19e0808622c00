package gateway_test

import (
	"context"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

type pkView struct {
	Code int `json:"code"`
	Data struct {
		PKID      string           `json:"pk_id"`
		Status    string           `json:"status"`
		Rooms     [2]int64         `json:"rooms"`
		Scores    map[string]int64 `json:"scores"`
		Seq       int64            `json:"seq"`
		Over      bool             `json:"over"`
		ExpiresAt int64            `json:"expires_at"`
	} `json:"data"`
}

func pkCall(t *testing.T, n *gateway.Node, method, path string, user int64, role, body string) (int, pkView) {
	t.Helper()
	var out pkView
	st := nodetest.DoJSON(t, method, nodetest.HTTPURL(n)+"/api/v1/pk"+path, nodetest.Token(t, n, user, role), body, &out)
	return st, out
}

// invitePKAccepted has anchorA (of room a) invite room b and anchorB (b's
// anchor) accept; it returns the running contest's id.
func invitePKAccepted(t *testing.T, n *gateway.Node, anchorA, anchorB, a, b int64, secs int) string {
	t.Helper()
	st, inv := pkCall(t, n, "POST", "", anchorA, gateway.RoleAnchor, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":%d}`, a, b, secs))
	if st != 200 || inv.Data.Status != "invited" || inv.Data.PKID == "" {
		t.Fatalf("invite: %d %+v", st, inv)
	}
	st, ct := pkCall(t, n, "POST", "/"+inv.Data.PKID+"/accept", anchorB, gateway.RoleAnchor, "")
	if st != 200 || ct.Data.Status != "running" || ct.Data.PKID != inv.Data.PKID {
		t.Fatalf("accept: %d %+v", st, ct)
	}
	return ct.Data.PKID
}

// An anchor cannot pull another anchor's room into a contest: POST /pk
// only invites (the invited anchor hears of it, biz 5562); nothing runs
// until room b's anchor accepts; a third party (a viewer, another anchor,
// the inviter) cannot accept; a declined or withdrawn invitation leaves no
// contest; pending invitations per anchor are bounded; an admin pairs at once.
func TestPKNeedsConsent(t *testing.T) {
	n := giftConfig(t)
	ra := nodetest.OpenRoom(t, n, 1, 0)
	rb := nodetest.OpenRoom(t, n, 2, 0)
	rc := nodetest.OpenRoom(t, n, 3, 0)
	rd := nodetest.OpenRoom(t, n, 4, 0)
	var logB pushLog
	sdkDial(t, n, 2, &logB, nil)

	st, inv := pkCall(t, n, "POST", "", 1, gateway.RoleAnchor, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":60}`, ra, rb))
	if st != 200 || inv.Data.Status != "invited" || inv.Data.ExpiresAt <= time.Now().UnixMilli() {
		t.Fatalf("invite: %d %+v", st, inv)
	}
	id := inv.Data.PKID
	notRunning := func(why string) {
		t.Helper()
		for _, r := range []int64{ra, rb} {
			if _, _, running := n.PK.Running(r); running || n.PK.Opponent(r) != 0 {
				t.Fatalf("%s: room %d is in a contest", why, r)
			}
		}
		if _, found := n.PK.Get(id); found {
			t.Fatalf("%s: contest %s exists", why, id)
		}
	}
	notRunning("after the invitation")
	if st, got := pkCall(t, n, "GET", "/"+id, 2, gateway.RoleAnchor, ""); st != 200 || got.Data.Status != "invited" {
		t.Fatalf("get invitation: %d %+v", st, got)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool {
		for _, p := range logB.snapshot() {
			var d struct {
				PKID string `json:"pk_id"`
			}
			if p.Biz == proto.BizPKInvite && p.Ack && proto.Unmarshal(p.Data, &d) == nil && d.PKID == id {
				return true
			}
		}
		return false
	}, "room b's anchor got no biz 5562 invitation")
	// Third parties cannot accept.
	for _, who := range []struct {
		user int64
		role string
	}{{99, gateway.RoleViewer}, {3, gateway.RoleAnchor}, {1, gateway.RoleAnchor}} {
		if st, got := pkCall(t, n, "POST", "/"+id+"/accept", who.user, who.role, ""); st != 403 || got.Code != proto.CodeForbidden {
			t.Fatalf("accept by %d: %d %+v", who.user, st, got)
		}
		if who.user != 1 {
			if st, _ := pkCall(t, n, "POST", "/"+id+"/decline", who.user, who.role, ""); st != 403 {
				t.Fatalf("decline by %d: %d", who.user, st)
			}
		}
	}
	notRunning("after third parties tried")
	// Room b's anchor accepts: the contest runs, under the invitation's id.
	st, ct := pkCall(t, n, "POST", "/"+id+"/accept", 2, gateway.RoleAnchor, "")
	if st != 200 || ct.Data.Status != "running" || ct.Data.PKID != id || ct.Data.Rooms != [2]int64{ra, rb} {
		t.Fatalf("accept: %d %+v", st, ct)
	}
	if got, _, running := n.PK.Running(rb); !running || got != id || n.PK.Opponent(rb) != ra {
		t.Fatalf("not running after accept")
	}
	if st, _ := pkCall(t, n, "POST", "/"+id+"/accept", 2, gateway.RoleAnchor, ""); st != 404 {
		t.Fatalf("second accept: %d", st)
	}

	// Declined by room d's anchor, withdrawn by the inviter: no contest.
	for _, decliner := range []int64{4, 3} {
		st, inv := pkCall(t, n, "POST", "", 3, gateway.RoleAnchor, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":60}`, rc, rd))
		if st != 200 || inv.Data.Status != "invited" {
			t.Fatalf("invite c→d: %d %+v", st, inv)
		}
		if st, got := pkCall(t, n, "POST", "/"+inv.Data.PKID+"/decline", decliner, gateway.RoleAnchor, ""); st != 200 || got.Data.Status != "declined" {
			t.Fatalf("decline by %d: %d %+v", decliner, st, got)
		}
		if st, _ := pkCall(t, n, "POST", "/"+inv.Data.PKID+"/accept", 4, gateway.RoleAnchor, ""); st != 404 {
			t.Fatalf("accept after decline: %d", st)
		}
		if st, _ := pkCall(t, n, "GET", "/"+inv.Data.PKID, 4, gateway.RoleAnchor, ""); st != 404 {
			t.Fatalf("declined invitation still readable: %d", st)
		}
		if n.PK.Opponent(rc) != 0 || n.PK.Opponent(rd) != 0 {
			t.Fatal("contest after a decline")
		}
	}
	// At most 3 pending invitations per anchor.
	for i := 0; i < 3; i++ {
		if st, _ := pkCall(t, n, "POST", "", 3, gateway.RoleAnchor, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":60}`, rc, rd)); st != 200 {
			t.Fatalf("invite %d: %d", i, st)
		}
	}
	if st, got := pkCall(t, n, "POST", "", 3, gateway.RoleAnchor, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":60}`, rc, rd)); st != 429 || got.Code != proto.CodeRateLimited {
		t.Fatalf("4th pending invitation: %d %+v", st, got)
	}
	// An admin pairs two rooms directly.
	if st, got := pkCall(t, n, "POST", "", 1000, gateway.RoleAdmin, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":60}`, rc, rd)); st != 200 || got.Data.Status != "running" {
		t.Fatalf("admin pairing: %d %+v", st, got)
	}
	if n.PK.Opponent(rd) != rc {
		t.Fatal("admin pairing not running")
	}
}

// PK scores have one shape: GET /api/v1/pk/{id} answers the same object
// keyed by room id as biz 5558's d.
func TestPKScoresOneShape(t *testing.T) {
	n, ra, rb, va, logA := pkRooms(t)
	ctx := context.Background()
	st, ct := pkCall(t, n, "POST", "", 1000, gateway.RoleAdmin, fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":60}`, ra, rb))
	if st != 200 || ct.Data.PKID == "" {
		t.Fatalf("admin pairing: %d %+v", st, ct)
	}
	id := ct.Data.PKID
	d := giftReq(ra, 1, 23, 1, "shape1")
	d["pk"] = true
	if _, err := sendGift(ctx, va, d); err != nil {
		t.Fatal(err)
	}
	var last pkProgress
	nodetest.Eventually(t, 5*time.Second, func() bool {
		p := pkPushes(logA, id)
		if len(p) == 0 {
			return false
		}
		last = p[len(p)-1]
		return last.Scores[fmt.Sprint(ra)] == 20
	}, "no PK push with score 20")
	st, got := pkCall(t, n, "GET", "/"+id, 50, gateway.RoleViewer, "")
	if st != 200 {
		t.Fatalf("get pk: %d", st)
	}
	want := map[string]int64{fmt.Sprint(ra): 20, fmt.Sprint(rb): 0}
	if !reflect.DeepEqual(last.Scores, want) || !reflect.DeepEqual(got.Data.Scores, last.Scores) || got.Data.Seq != last.Seq {
		t.Fatalf("push scores %v (seq %d), GET scores %v (seq %d), want both %v", last.Scores, last.Seq, got.Data.Scores, got.Data.Seq, want)
	}
	persisttest.CheckConservation(t, n.Ledger)
}

// A room closed during its PK ends the contest: the other room's viewers
// get the final result at once (not after the contest's hour), and the
// other room can be paired again. Before, the contest ran on against a
// closed room and the other room was refused 10409 "already in a PK".
func TestPKEndsWhenItsRoomCloses(t *testing.T) {
	n := giftConfig(t)
	ra := nodetest.OpenRoom(t, n, 1, 0)
	rb := nodetest.OpenRoom(t, n, 2, 0)
	rc := nodetest.OpenRoom(t, n, 3, 0)
	var logB pushLog
	vb := sdkDial(t, n, 60, &logB, nil)
	if _, err := vb.Join(context.Background(), rb); err != nil {
		t.Fatal(err)
	}
	id := invitePKAccepted(t, n, 1, 2, ra, rb, 3600)
	var out struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "DELETE", nodetest.HTTPURL(n)+fmt.Sprintf("/api/v1/rooms/%d", ra), nodetest.Token(t, n, 1, gateway.RoleAnchor), "", &out); st != 200 {
		t.Fatalf("close room a: %d %d", st, out.Code)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool {
		p := pkPushes(&logB, id)
		return len(p) > 0 && p[len(p)-1].Over
	}, "no final PK push in room b after room a closed")
	checkPKEndsOnce(t, pkPushes(&logB, id))
	invitePKAccepted(t, n, 2, 3, rb, rc, 60) // room b is free again
}

// POST /pk without a room (or with 0, a negative id) is 10001 for an anchor
// as for an admin; it was room_a's lookup's 10004 for an anchor.
func TestPKInviteWithoutRoomsIsABadRequest(t *testing.T) {
	n := giftConfig(t)
	ra := nodetest.OpenRoom(t, n, 1, 0)
	for _, body := range []string{`{"room_b":5,"duration_s":60}`, `{"room_a":0,"room_b":5,"duration_s":60}`, `{"room_a":-3,"room_b":5,"duration_s":60}`, fmt.Sprintf(`{"room_a":%d,"duration_s":60}`, ra)} {
		for _, role := range []string{gateway.RoleAnchor, gateway.RoleAdmin} {
			if st, out := pkCall(t, n, "POST", "", 1, role, body); st != 400 || out.Code != proto.CodeBadRequest {
				t.Errorf("%s %s: %d %d, want 400 10001", role, body, st, out.Code)
			}
		}
	}
}

// In a cluster, a room closed through one node ends its contest on every
// node at once: each node's copy stops taking PK gifts when it learns of
// the close (not only the closing node's, the others' a second or more later
// when end.lua ran — PK gifts they took meanwhile were debited as PK gifts
// and never scored).
func TestClusterRoomCloseEndsItsContestEverywhere(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	peers := []string{"gw-1", "gw-2"}
	n1 := nodetest.Start(t, clusterNodeConfig(t, "gw-1", peers, rds, nats))
	n2 := nodetest.Start(t, clusterNodeConfig(t, "gw-2", peers, rds, nats))
	ra := nodetest.OpenRoom(t, n1, 1, 0)
	rb := nodetest.OpenRoom(t, n1, 2, 0)
	invitePKAccepted(t, n1, 1, 2, ra, rb, 60)
	nodetest.Eventually(t, 5*time.Second, func() bool { _, _, ok := n2.PK.Running(rb); return ok },
		"gw-2 does not know the contest")
	var out struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "DELETE", fmt.Sprintf("%s/api/v1/rooms/%d", nodetest.HTTPURL(n1), ra), nodetest.Token(t, n1, 1, gateway.RoleAnchor), "", &out); st != 200 || out.Code != 0 {
		t.Fatalf("close room: %d %+v", st, out)
	}
	// Well inside the contest's end grace (1 s), after which end.lua ends it
	// in Redis for every node anyway.
	nodetest.Eventually(t, 800*time.Millisecond, func() bool { _, _, ok := n2.PK.Running(rb); return !ok },
		"gw-2 still takes PK gifts for the contest of a closed room")
}

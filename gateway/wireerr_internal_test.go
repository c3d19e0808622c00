package gateway

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// An op served here (a ticket or red-packet op, local or forwarded) that
// fails with an error not of ours is logged with its cause and an id the
// answer names: before, the cause was dropped (the answer was the shared
// "internal error" and the HTTP log line said only that). Errors of ours
// keep their code and message and are not logged.
func TestWireErrLogsTheCauseOfAnInternalError(t *testing.T) {
	var buf bytes.Buffer
	n := &Node{Log: slog.New(slog.NewTextHandler(&buf, nil)), Config: configs.Config{}}
	n.Config.Node.ID = "gw-7"
	e := n.wireErr(errors.New("pebble: disk full"))
	if e.Code != proto.CodeInternal || !strings.Contains(e.Msg, "node gw-7, error 1") {
		t.Fatalf("answer %+v, want 50000 naming the node and error 1", e)
	}
	if log := buf.String(); !strings.Contains(log, "pebble: disk full") || !strings.Contains(log, "error_id=1") {
		t.Fatalf("log %q, want the cause and its id", log)
	}
	buf.Reset()
	if e := n.wireErr(persist.ErrInsufficient); e.Code != proto.CodeInsufficientBalance || buf.Len() != 0 {
		t.Fatalf("an error of ours: %+v, log %q", e, buf.String())
	}
	if e := n.wireErr(proto.Errorf(proto.CodeNotFound, "no such rain")); e.Code != proto.CodeNotFound || e.Msg != "no such rain" || buf.Len() != 0 {
		t.Fatalf("a proto error: %+v, log %q", e, buf.String())
	}
}

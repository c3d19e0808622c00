package clientsdk

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Why a TokenFunc is called: TokenReason of its context.
const (
	// TokenConnect: one of Dial's attempts.
	TokenConnect = "connect"
	// TokenReconnect: a reconnect after the connection dropped.
	TokenReconnect = "reconnect"
	// TokenExpired: a reconnect after the last token was refused (HTTP
	// 401) or ended (close 4501): a cached token will not do.
	TokenExpired = "expired"
	// TokenRefresh: the open connection's token nears its end; the new one
	// is handed to it in a refresh request, the connection kept.
	TokenRefresh = "refresh"
)

type tokenReasonKey struct{}

// TokenReason reports why a Config.TokenFunc is called with ctx:
// TokenConnect, TokenReconnect, TokenExpired or TokenRefresh ("" for a
// context that did not come from the client).
func TokenReason(ctx context.Context) string {
	r, _ := ctx.Value(tokenReasonKey{}).(string)
	return r
}

// token is the token for a connection attempt or a refresh: TokenFunc's,
// told why, or the static Token.
func (c *Client) token(ctx context.Context, reason string) (string, error) {
	if c.cfg.TokenFunc == nil {
		return c.cfg.Token, nil
	}
	t, err := c.cfg.TokenFunc(context.WithValue(ctx, tokenReasonKey{}, reason))
	if err != nil {
		return "", fmt.Errorf("%w: %w", errTokenFunc, err)
	}
	return t, nil
}

// errTokenFunc wraps TokenFunc's errors.
var errTokenFunc = errors.New("clientsdk: token")

// errNotExtended: a refresh's token ends no later than the one it replaces.
var errNotExtended = errors.New("clientsdk: the refreshed token ends no later than the one it replaces (TokenFunc must issue a new token for TokenRefresh)")

// refreshLead is how long before the connection's token ends the client asks
// TokenFunc for the next one (a quarter of the time left for a token that
// has less than four of them), less a random part of half as much: clients
// given tokens at the same time do not all ask at once.
const refreshLead = time.Minute

// maxRefreshLeft: a token with longer left is not refreshed (the node caps
// exp at the year 2200; a Duration holds 292 years).
const maxRefreshLeft = 100 * 365 * 24 * time.Hour

// refreshes keeps s open past its token's end (a TokenFunc, and a node that
// says how long the token has left: left, from the hello read at from).
// Shortly before the end it asks TokenFunc for a token (TokenRefresh) and
// sends it in a refresh request; the reply says how long the new one has
// left, and so on. A refresh that fails (TokenFunc's error, a refused token,
// no reply, a token that ends no later than the last) is tried again when
// half the time left has passed, while at least refreshRetryFloor is left;
// after that the node closes the connection 4501 and the client reconnects
// with a new token (TokenExpired), as it does with a node that does not
// know refresh.
func (c *Client) refreshes(s *session, left time.Duration, from time.Time) {
	defer c.wg.Done()
	end := from.Add(left)
	next := refreshAt(from, left)
	for {
		t := time.NewTimer(time.Until(next))
		select {
		case <-t.C:
		case <-s.done:
			t.Stop()
			return
		case <-c.ctx.Done():
			t.Stop()
			return
		}
		at := time.Now()
		got, err := c.refresh(s)
		switch {
		case err == nil && got > maxRefreshLeft:
			return
		case err == nil && at.Add(got).After(end.Add(time.Second)):
			end, next = at.Add(got), refreshAt(at, got)
			c.log.Debug("clientsdk: token refreshed", "left", got)
			continue
		case err == nil:
			// The same token again (a TokenFunc that caches it): tried
			// again as a failure is, not at a quarter of what is left —
			// a burst of refreshes towards the end.
			end, err = at.Add(got), errNotExtended
		case errors.Is(err, errNotSent) || errors.Is(err, ErrDisconnected):
			return // the session ended: the next one has its own
		}
		rest := time.Until(end)
		c.log.Warn("clientsdk: token refresh failed", "err", err, "left", rest)
		if rest < refreshRetryFloor {
			return
		}
		next = time.Now().Add(rest / 2)
	}
}

// refreshRetryFloor: with less left than this, a failed refresh is not tried
// again (the connection is about to be closed 4501).
const refreshRetryFloor = 2 * time.Second

// refreshAt is when to refresh a token that has left from from.
func refreshAt(from time.Time, left time.Duration) time.Time {
	lead := min(refreshLead, left/4)
	return from.Add(left - lead - time.Duration(rand.Int64N(int64(lead/2)+1)))
}

// refresh asks TokenFunc for a token and hands it to s's node: how long the
// new token has left.
func (c *Client) refresh(s *session) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.RequestTimeout)
	defer cancel()
	tok, err := c.token(ctx, TokenRefresh)
	if err != nil {
		return 0, err
	}
	id, cl, err := s.send(ctx, proto.TypeRefresh, proto.RefreshReq{Token: tok}, nil)
	if err != nil {
		return 0, err
	}
	d, err := s.await(ctx, proto.TypeRefresh, id, cl)
	if err != nil {
		return 0, err
	}
	var r proto.RefreshReply
	if err := proto.Unmarshal(d, &r); err != nil || r.ExpiresInMS <= 0 {
		return 0, fmt.Errorf("clientsdk: refresh reply without expires_in_ms")
	}
	return leftOf(r.ExpiresInMS), nil
}

// leftOf is a node's expires_in_ms as a Duration (past maxRefreshLeft: more
// than it, never an overflow).
func leftOf(ms int64) time.Duration {
	if ms > maxRefreshLeft.Milliseconds() {
		return maxRefreshLeft + time.Millisecond
	}
	return time.Duration(ms) * time.Millisecond
}

package gateway

import (
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Roles carried in tokens.
const (
	RoleViewer = "viewer"
	RoleAnchor = "anchor"
	RoleAdmin  = "admin"
)

// maxExpires caps a token's expiry (a later one is valid until then).
var maxExpires = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC)

// Identity is an authenticated caller.
type Identity struct {
	UserID  int64
	Role    string
	Expires time.Time
}

// Auth issues and verifies HS256 JWTs (PROTOCOL.md §1).
type Auth struct {
	secret []byte
	maxTTL time.Duration // auth.max_token_ttl (0 = any exp); set before the first Verify
	parser *jwt.Parser   // its options are read-only after construction: shared by every Verify
	key    jwt.Keyfunc
}

// NewAuth returns an Auth with secret.
func NewAuth(secret string) *Auth {
	a := &Auth{secret: []byte(secret),
		parser: jwt.NewParser(jwt.WithValidMethods([]string{"HS256"}), jwt.WithExpirationRequired())}
	a.key = func(*jwt.Token) (any, error) { return a.secret, nil }
	return a
}

type claims struct {
	Role string `json:"role"`
	jwt.RegisteredClaims
}

// ValidRole reports whether r is a known role.
func ValidRole(r string) bool { return r == RoleViewer || r == RoleAnchor || r == RoleAdmin }

// Issue returns a token for user with role valid for ttl.
func (a *Auth) Issue(user int64, role string, ttl time.Duration) (string, error) {
	c := claims{Role: role, RegisteredClaims: jwt.RegisteredClaims{
		Subject:   strconv.FormatInt(user, 10),
		IssuedAt:  jwt.NewNumericDate(time.Now()),
		ExpiresAt: jwt.NewNumericDate(time.Now().Add(ttl)),
	}}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(a.secret)
}

var errBadToken = errors.New("bad token")

// SetMaxTTL refuses, from now on, tokens whose exp is further than d from
// the time of the check (0 = any exp). Not safe beside Verify: set it
// before the node serves.
func (a *Auth) SetMaxTTL(d time.Duration) { a.maxTTL = d }

// issuerSkew is how far an issuer's clock may run ahead of the node's: a
// token issued (iat) further in the future, or whose exp is further than
// maxTTL + issuerSkew away, is refused.
const issuerSkew = time.Minute

// Verify parses and checks a token.
func (a *Auth) Verify(tok string) (Identity, error) {
	var c claims
	_, err := a.parser.ParseWithClaims(tok, &c, a.key)
	if err != nil {
		return Identity{}, errBadToken
	}
	uid, err := strconv.ParseInt(c.Subject, 10, 64)
	if err != nil || uid <= 0 || !ValidRole(c.Role) {
		return Identity{}, errBadToken
	}
	exp := c.ExpiresAt.Time
	now := time.Now()
	if a.maxTTL > 0 && exp.Sub(now) > a.maxTTL+issuerSkew {
		return Identity{}, errBadToken
	}
	if c.IssuedAt != nil && c.IssuedAt.Sub(now) > issuerSkew {
		return Identity{}, errBadToken
	}
	if exp.After(maxExpires) {
		exp = maxExpires // past 2262 its UnixNano (the heartbeat sweep's clock) wraps negative: "expired"
	}
	return Identity{UserID: uid, Role: c.Role, Expires: exp}, nil
}

// WSSubprotocol is the WebSocket subprotocol a client offers beside its
// token (WSBearerPrefix + token) in Sec-WebSocket-Protocol: a browser cannot
// set an Authorization header on a WebSocket, and a token in the URL's query
// ends up in access logs, proxies' logs and browser history. The node
// answers with this one (a browser fails a connection whose answer names
// none of the offered ones), never the token.
const WSSubprotocol = "liveedge.v1"

// WSBearerPrefix starts the subprotocol that carries a token.
const WSBearerPrefix = "liveedge.bearer."

// subprotocols reads a Sec-WebSocket-Protocol header's values: whether they
// offer WSSubprotocol, and the token one carries (WSBearerPrefix + token, or
// "").
func subprotocols(values []string) (offered bool, token string) {
	for _, v := range values {
		for p := range strings.SplitSeq(v, ",") {
			switch p = strings.TrimSpace(p); {
			case p == WSSubprotocol:
				offered = true
			case token == "" && len(p) > len(WSBearerPrefix) && strings.HasPrefix(p, WSBearerPrefix):
				token = p[len(WSBearerPrefix):]
			}
		}
	}
	return offered, token
}

// BearerToken extracts the token of an "Authorization: Bearer <t>" header value.
func BearerToken(h string) string {
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

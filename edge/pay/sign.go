package pay

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"strconv"
	"strings"
	"sync"
	"time"
)

// SignatureHeader carries "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>".
const SignatureHeader = "X-Pay-Signature"

// DefaultTolerance is how far t may be from now.
const DefaultTolerance = 300 * time.Second

// Errors of Verify (all answered 401; the reason is for logs and metrics).
var (
	ErrNoSignature  = errors.New("pay: missing or malformed signature header")
	ErrStale        = errors.New("pay: signature timestamp outside tolerance")
	ErrBadSignature = errors.New("pay: signature mismatch")
)

// Sign returns the header value for body at t with secret.
func Sign(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac(secret, ts, body))
}

// requestContext prefixes what a merchant's request signature covers
// (SignRequest): the same secrets sign the provider's answers and notifies,
// over "<t>.<body>", and anyone may have one of those (a query answer
// about any order) — replayed as a request, it must not verify. An
// answer's MAC input starts with a digit, a request's with this.
const requestContext = "request."

// SignRequest returns the header value for a merchant's request body (a
// close at the provider) at t: one signature per secret, up to 4 (during
// a rotation the provider holds either), over requestContext, so that it
// never verifies as an answer nor an answer as a request.
func SignRequest(secrets []string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	var b strings.Builder
	b.WriteString("t=" + ts)
	for _, secret := range secrets[:min(len(secrets), 4)] {
		b.WriteString(",v1=" + hex.EncodeToString(macIn(secret, requestContext, ts, body)))
	}
	return b.String()
}

// VerifyRequest is Verify for a merchant's request signed by SignRequest.
func VerifyRequest(header string, body []byte, secrets []string, now time.Time, tolerance time.Duration) error {
	return verify(requestContext, header, body, secrets, now, tolerance)
}

func mac(secret, ts string, body []byte) []byte { return macIn(secret, "", ts, body) }

// macIn is the HMAC of "<context><ts>.<body>" with secret.
func macIn(secret, context, ts string, body []byte) []byte {
	pool := macPool(secret)
	m := pool.Get().(hash.Hash)
	m.Reset()
	m.Write([]byte(context))
	m.Write([]byte(ts))
	m.Write([]byte{'.'})
	m.Write(body)
	sum := m.Sum(nil)
	pool.Put(m)
	return sum
}

// macPools holds, per secret, HMAC states keyed with it (keying one hashes
// the secret twice and allocates both SHA-256 states: every notify checks
// every configured secret). Secrets come from the configuration only, so
// the map stays as small as it is.
var macPools sync.Map // secret → *sync.Pool of hash.Hash

func macPool(secret string) *sync.Pool {
	if p, ok := macPools.Load(secret); ok {
		return p.(*sync.Pool)
	}
	p, _ := macPools.LoadOrStore(secret, &sync.Pool{New: func() any { return hmac.New(sha256.New, []byte(secret)) }})
	return p.(*sync.Pool)
}

// Verify checks header against the raw body before anything in the body is
// trusted. Any of secrets may have signed (rotation); comparisons are
// constant-time; t must be within tolerance of now.
func Verify(header string, body []byte, secrets []string, now time.Time, tolerance time.Duration) error {
	return verify("", header, body, secrets, now, tolerance)
}

func verify(context, header string, body []byte, secrets []string, now time.Time, tolerance time.Duration) error {
	var ts string
	var sigs [][]byte
	for _, part := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			if b, err := hex.DecodeString(v); err == nil && len(b) == sha256.Size {
				sigs = append(sigs, b)
			}
		}
	}
	if ts == "" || len(sigs) == 0 || len(sigs) > 4 {
		return ErrNoSignature
	}
	t, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return ErrNoSignature
	}
	if d := now.Sub(time.Unix(t, 0)); d > tolerance || d < -tolerance {
		return ErrStale
	}
	for _, secret := range secrets {
		want := macIn(secret, context, ts, body)
		for _, s := range sigs {
			if hmac.Equal(want, s) {
				return nil
			}
		}
	}
	return ErrBadSignature
}

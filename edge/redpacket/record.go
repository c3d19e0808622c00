package redpacket

import (
	"cmp"
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// States of a rain (SPEC §3: the seed's WAIT → PREPARED → SENT, with the end
// made explicit).
const (
	StateWait     = "WAIT"     // created, nothing debited
	StatePrepared = "PREPARED" // anchor debited T, split durable
	StateRunning  = "RUNNING"  // started: grabs are served until EndsAt or the pool is empty
	StateFinished = "FINISHED" // settled: unclaimed amount refunded, totals final
)

// Durable layout (Pebble, through persist.Store and the wallet's op records):
//
//	rec/rp/<code>             JSON record, rewritten at each state change until
//	                          FINISHED; then moved to rec/rpdone/ (start-up reads
//	                          rec/rp/ only: the rains not finished)
//	rec/rpdone/<code>         JSON record of a FINISHED rain
//	rec/rpsplit/<code>        the split: N uvarint amounts (written with the
//	                          prepare debit, in the same ledger op)
//	rec/rpgrant/<code>/<idx>  JSON grant {user, amount, at}: written with the
//	                          grabber's credit, in the same ledger op
var (
	prefixRain  = []byte("rec/rp/")
	prefixDone  = []byte("rec/rpdone/")
	prefixSplit = []byte("rec/rpsplit/")
	prefixGrant = []byte("rec/rpgrant/")
)

func rainKey(code string) []byte  { return append(append([]byte{}, prefixRain...), code...) }
func doneKey(code string) []byte  { return append(append([]byte{}, prefixDone...), code...) }
func splitKey(code string) []byte { return append(append([]byte{}, prefixSplit...), code...) }

func grantPrefix(code string) []byte {
	return append(append(append([]byte{}, prefixGrant...), code...), '/')
}

func grantKey(code string, idx int32) []byte {
	return binary.BigEndian.AppendUint32(grantPrefix(code), uint32(idx))
}

// Ledger request ids. Each is scoped to the user of its op.
func prepareReqID(code string, try int) string {
	return "rp-prep:" + code + ":" + strconv.Itoa(try)
}
func grantReqID(code string, idx int32) string {
	return "rp:" + code + ":" + strconv.FormatInt(int64(idx), 10)
}
func settleReqID(code string) string { return "rp-end:" + code }

// Ledger tallies.
const (
	// TallyGrabbed is the total a user got from red packets.
	TallyGrabbed = "rpgot"
	// TallyGiven is the total an anchor's rains granted (refunds excluded).
	TallyGiven = "rpgiven"
)

// record is a rain as stored (rec/rp/<code>).
type record struct {
	Code       string `json:"code"`
	Node       string `json:"node"` // the node that owns it
	Room       int64  `json:"room_id"`
	Anchor     int64  `json:"anchor_id"`
	Total      int64  `json:"total_amount"`
	Count      int    `json:"total_count"`
	DurationMS int64  `json:"duration_ms"`
	State      string `json:"state"`
	CreatedAt  int64  `json:"created_at"`
	PreparedAt int64  `json:"prepared_at,omitempty"`
	StartedAt  int64  `json:"started_at,omitempty"`
	EndsAt     int64  `json:"ends_at,omitempty"`
	FinishedAt int64  `json:"finished_at,omitempty"`
	// Final totals (FINISHED), from the durable grants.
	GrantedCount  int   `json:"granted_count,omitempty"`
	GrantedAmount int64 `json:"granted_amount,omitempty"`
	MaxGrant      int64 `json:"max_grant,omitempty"`
	Refunded      int64 `json:"refunded,omitempty"`
	Cancelled     bool  `json:"cancelled,omitempty"` // ended by its anchor before it started
	// Pending names the wallet op (prepare | cancel) sent for this rain
	// whose outcome is not recorded yet: written before the op, cleared by
	// its outcome. Until that op is retried (same request id: it lands
	// once) the rain neither starts nor is cancelled/prepared another way,
	// across restarts too: the shared wallet may still land it.
	Pending string `json:"pending,omitempty"`
	// PrepTry numbers the prepare's ledger request id: raised by each
	// refusal for the balance (the ledger remembers that answer).
	PrepTry int `json:"prep_try,omitempty"`
	// Nodes is the per-node split of a sharded rain (FINISHED).
	Nodes []NodeSplit `json:"nodes,omitempty"`
}

// grant is one durable grant (rec/rpgrant/<code>/<idx>).
type grant struct {
	User   int64 `json:"user"`
	Amount int64 `json:"amount"`
	At     int64 `json:"at"`
}

// codeBytes is the entropy of a code: 128 bits, so codes cannot be guessed
// (a room's code is only learned from its 5560 push or its room info).
const codeBytes = 16

var codeEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// codeLen is the length of a code (26 characters of [a-z2-7]).
var codeLen = codeEncoding.EncodedLen(codeBytes)

func newCode() string {
	var b [codeBytes]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go ≥ 1.24)
	return codeEncoding.EncodeToString(b[:])
}

// codeAlphabet is codeEncoding's: a code's first character can carry 5 bits.
const codeAlphabet = "abcdefghijklmnopqrstuvwxyz234567"

// newTaggedCode is newCode whose first character is tag (0..31: in a
// cluster, the creating node's worker id, so any node can tell which node
// serves the rain); the other 25 characters stay random (125 bits).
func newTaggedCode(tag int) string {
	c := []byte(newCode())
	c[0] = codeAlphabet[tag&31]
	return string(c)
}

// CodeTag is the tag newTaggedCode put in code (ok false: not a code).
func CodeTag(code string) (int, bool) {
	if !wellFormed(code) {
		return 0, false
	}
	return strings.IndexByte(codeAlphabet, code[0]), true
}

// wellFormed reports whether code can be a code (what goes into keys).
func wellFormed(code string) bool {
	if len(code) != codeLen {
		return false
	}
	for i := 0; i < len(code); i++ {
		c := code[i]
		if !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return false
		}
	}
	return true
}

func encodeSplit(amounts []int64) []byte {
	b := make([]byte, 0, len(amounts)*3)
	for _, a := range amounts {
		b = binary.AppendUvarint(b, uint64(a))
	}
	return b
}

var errBadSplit = errors.New("redpacket: corrupt split record")

func decodeSplit(b []byte, count int) ([]int64, error) {
	out := make([]int64, 0, count)
	for len(b) > 0 {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, errBadSplit
		}
		out = append(out, int64(v))
		b = b[n:]
	}
	if len(out) != count {
		return nil, errBadSplit
	}
	return out, nil
}

// storeRecord is a durable record write for a ledger op.
func storeRecord(key, v []byte) persist.Record { return persist.Record{Key: key, Value: v} }

// cryptoRead fills b from crypto/rand.
func cryptoRead(b []byte) { _, _ = rand.Read(b) }

// ClaimsOnDisk calls fn with every grant in store whose rain may still be
// running at since (give or take an hour): its rain, its user, and until when the user's
// one-per-user place is needed (unix ms: the grant's time plus maxDuration,
// at or after its rain's end). The places of a shared set (Config.Claim)
// are rebuilt from it when Redis loses them.
func ClaimsOnDisk(store *persist.Store, maxDuration time.Duration, since time.Time, fn func(code string, user int64, until int64) error) error {
	if maxDuration <= 0 {
		maxDuration = DefaultMaxDuration
	}
	from := since.UnixMilli()
	return store.Scan(prefixGrant, func(k, v []byte) error {
		rest := k[len(prefixGrant):]
		if len(rest) < 5 || rest[len(rest)-5] != '/' {
			return nil
		}
		var g grant
		if err := proto.Unmarshal(v, &g); err != nil {
			return fmt.Errorf("redpacket: grant %q: %w", k, err)
		}
		until := g.At + maxDuration.Milliseconds()
		if until+time.Hour.Milliseconds() < from { // an hour's slack for the nodes' clocks
			return nil
		}
		return fn(string(rest[:len(rest)-5]), g.User, until)
	})
}

// InDoubtClaims calls fn, in a stable order, with every grant this node has
// in doubt (the wallet could not tell its outcome; applied again at the
// rain's end, so it may still land): its rain, its user and the rain's end.
// Rebuilt places (ClaimsOnDisk) must keep these users too — their grant
// may be in no ledger yet, and their retry must not take a second packet.
func (s *Service) InDoubtClaims(fn func(code string, user int64, until int64) error) error {
	type claim struct {
		code        string
		user, until int64
	}
	s.mu.Lock()
	rains := make([]*rain, 0, len(s.rains))
	for _, r := range s.rains {
		rains = append(rains, r)
	}
	shards := make([]*shard, 0, len(s.shards))
	for _, sh := range s.shards {
		shards = append(shards, sh)
	}
	s.mu.Unlock()
	var out []claim
	for _, r := range rains {
		r.mu.Lock()
		for _, op := range r.doubt {
			out = append(out, claim{r.rec.Code, op.User, r.rec.EndsAt})
		}
		r.mu.Unlock()
	}
	for _, sh := range shards {
		sh.mu.Lock()
		for _, op := range sh.doubt {
			out = append(out, claim{sh.code, op.User, sh.endsAt})
		}
		sh.mu.Unlock()
	}
	slices.SortFunc(out, func(a, b claim) int {
		if c := strings.Compare(a.code, b.code); c != 0 {
			return c
		}
		return cmp.Compare(a.user, b.user)
	})
	for _, c := range out {
		if err := fn(c.code, c.user, c.until); err != nil {
			return err
		}
	}
	return nil
}

package persist

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/bytedance/sonic"
	"github.com/redis/rueidis"
)

// The shared wallet's generations: a Redis that lost its data (or a new one)
// is rebuilt from every node's ledger before money moves again — each node
// contributes its share once per generation (and its Contribute state), the
// last one flips it ready (see the SharedWallet doc).

// initScript reads the generation (KEYS[1], le:meta: gen and state), first
// making one — ARGV gen, rebuilding, for ARGV[2] nodes — if Redis has none
// (a new or emptied Redis).
var initScript = rueidis.NewLuaScript(luaScript("init"))

// contribScript adds one batch of a node's ledger to a rebuilding generation,
// once: KEYS meta, contrib set; ARGV gen, marker, then triples (op, key, val)
// with op "incr" (INCRBY), "idem" (SET val until the next arg, a unix ms
// deadline, if still ahead by Redis's clock), "seq"
// (raise to at least val), "hincr" (HINCRBY key field val: field is the
// next arg), "hset" (HSET key field val, likewise), "sadd" (SADD key
// member, and the set kept until the next arg, a unix ms deadline — nothing
// if already past by Redis's clock; an op that may be applied again) or
// "zadd" (a recent trade: ZADD key score member, the score the next arg,
// the list cut to its newest recentMax).
var contribScript = rueidis.NewLuaScript(luaScript("contrib",
	"RECENT_MAX", strconv.Itoa(recentMax), "RECENT_DROP_FROM", strconv.Itoa(recentMax+1)))

// finishScript marks node done and flips the generation to ready when every
// node is done. KEYS meta, done set; ARGV gen, node.
var finishScript = rueidis.NewLuaScript(luaScript("finish"))

// newGen names a new generation: this node's clock and a random part
// (unique even when two clocks agree).
func (w *SharedWallet) newGen() string {
	return strconv.FormatInt(w.now().UnixNano(), 36) + "-" + strconv.FormatUint(rand.Uint64(), 36)
}

// genStart is when generation gen began (newGen), zero if gen is not one.
func genStart(gen string) time.Time {
	head, _, ok := strings.Cut(gen, "-")
	ns, err := strconv.ParseInt(head, 36, 64)
	if !ok || err != nil || ns <= 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// ensureGeneration reads (or creates) the current generation. If it is
// ready, Apply may use it; if it is rebuilding, this node contributes its
// ledger (once per generation) and Apply stays unavailable until the watcher
// sees the generation ready. It never waits for other nodes.
func (w *SharedWallet) ensureGeneration(ctx context.Context) error {
	w.rebuild.Lock()
	defer w.rebuild.Unlock()
	gen, state, err := w.initGen(ctx)
	if err != nil {
		return err
	}
	if c := w.condemned.Load(); c != nil && *c == gen {
		// This node found gen rolled back and its reset has not happened
		// (it failed): never ready again; reset it now, then rebuild.
		w.gen.Store(nil)
		if err := w.resetGen(ctx, gen); err != nil {
			return fmt.Errorf("persist: reset of a rolled-back generation: %w", err)
		}
		if gen, state, err = w.initGen(ctx); err != nil {
			return err
		}
		if gen == *c {
			return errors.New("persist: a rolled-back generation is still current")
		}
	}
	if state == "ready" {
		w.readyGen(gen)
		return nil
	}
	w.gen.Store(nil)
	if gen == w.lastReady {
		// This node saw gen ready, and a generation never goes back to
		// rebuilding: Redis came back from a snapshot taken before gen was
		// ready, without what moved since. Reset it and rebuild.
		w.dataLost(gen, "the generation went back from ready to rebuilding")
		return nil
	}
	if w.contributed == gen {
		// Contributed — unless Redis came back from a snapshot taken before
		// this node's contribution was finished: then the rebuild waits for
		// it forever. Its batches are the same (the ledger does not change
		// while gen rebuilds) and each is added once (its marker).
		done, err := w.rdb.Do(ctx, w.rdb.B().Sismember().Key(keyContrib+gen+":done").Member(w.node).Build()).AsBool()
		if err != nil {
			return fmt.Errorf("persist: shared wallet contribution check: %w", err)
		}
		if done {
			return nil
		}
		w.log.Warn("shared wallet: this node's contribution is missing from Redis (it went back): contributing again", "generation", gen)
	}
	// Applies that read the old generation finish writing their ledger
	// shares first; later ones see none and fail.
	w.applying.Lock()
	w.applying.Unlock()
	state, err = w.contribute(ctx, gen)
	if err != nil {
		return err
	}
	w.contributed = gen
	w.log.Info("shared wallet: ledger contributed to rebuild", "generation", gen, "state", state)
	if state == "ready" {
		w.readyGen(gen)
	}
	return nil
}

// initGen reads the current generation and its state, creating one (state
// rebuilding) when Redis has none.
func (w *SharedWallet) initGen(ctx context.Context) (gen, state string, err error) {
	vals, err := initScript.Exec(ctx, w.rdb, []string{keyMeta}, []string{w.newGen(), strconv.Itoa(len(w.nodes))}).AsStrSlice()
	if err != nil {
		return "", "", fmt.Errorf("persist: shared wallet init: %w", err)
	}
	return vals[0], vals[1], nil
}

// readyGen makes gen, ready in Redis, this node's generation (under
// w.rebuild); the OnReady listeners run if it is not the one they last ran
// for.
func (w *SharedWallet) readyGen(gen string) {
	w.gen.Store(&gen)
	if gen == w.lastReady {
		return
	}
	w.lastReady = gen
	w.unsettledMu.Lock()
	fns := slices.Clone(w.readyFns)
	w.unsettledMu.Unlock()
	for _, fn := range fns {
		go fn()
	}
}

// OnReady adds fn, run on a goroutine of its own each time a generation
// other than the last one becomes ready on this node: after a Redis data
// loss, the rebuilt one. Listeners put back shared state that lives in
// Redis only (bounds, leases) — nothing a rebuild restores.
func (w *SharedWallet) OnReady(fn func()) {
	w.unsettledMu.Lock()
	w.readyFns = append(w.readyFns, fn)
	w.unsettledMu.Unlock()
}

// Ready reports whether the wallet can move money now.
func (w *SharedWallet) Ready() bool {
	g := w.gen.Load()
	return g != nil && *g != ""
}

// WaitReady waits until Ready or ctx ends.
func (w *SharedWallet) WaitReady(ctx context.Context) error {
	for !w.Ready() {
		select {
		case <-ctx.Done():
			return ErrWalletUnavailable
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

func (w *SharedWallet) onGenerationLost(ctx context.Context) {
	if err := w.ensureGeneration(ctx); err != nil {
		w.log.Error("shared wallet: rebuild", "err", err)
	}
}

// contribute adds this node's ledger to generation gen, batch by batch, each
// batch exactly once (a marker per batch). A retry (an error, a restart of
// this node) must cut the same batches: the ledger does not change while the
// generation is rebuilding (Apply fails, and the ones under way finished
// first: applying), and idempotency rows are not expired meanwhile
// (maybeExpireIdem), all of them contributed, each with what is left of its
// window. What SharedConfig.Contribute adds
// is numbered apart (its markers in a set of their own), so it never shifts
// the ledger's batches.
func (w *SharedWallet) contribute(ctx context.Context, gen string) (string, error) {
	const batchOps = 300
	var args []string
	batch, section := 0, ""
	flush := func() error {
		if len(args) == 0 {
			return nil
		}
		marker := w.node + ":" + strconv.Itoa(batch)
		full := append([]string{gen, marker}, args...)
		res, err := contribScript.Exec(ctx, w.rdb, []string{keyMeta, keyContrib + gen + section}, full).ToString()
		if err != nil {
			return fmt.Errorf("persist: contribute: %w", err)
		}
		if res == "stale" {
			return errStaleGen
		}
		batch++
		args = args[:0]
		return nil
	}
	add := func(a ...string) error {
		args = append(args, a...)
		if len(args) >= batchOps*3 {
			return flush()
		}
		return nil
	}
	err := w.store.Scan(PrefixBal, func(k, v []byte) error {
		return add("incr", balKey(int64(KeyID(k))), strconv.FormatInt(DecodeInt64(v), 10))
	})
	if err == nil {
		err = w.store.Scan(PrefixTally, func(k, v []byte) error {
			rest := k[len(PrefixTally):]
			if len(rest) < 10 {
				return nil
			}
			name := string(rest[:len(rest)-9])
			user := int64(binary.BigEndian.Uint64(rest[len(rest)-8:]))
			return add("incr", tallyRKey(name, user), strconv.FormatInt(DecodeInt64(v), 10))
		})
	}
	if err == nil {
		// Every row on disk (the watcher's expiry waits while the generation
		// rebuilds, so the ops are the same on every attempt), each with the
		// end of its window: the script writes only those still live.
		err = w.store.Scan(PrefixIdem, func(k, v []byte) error {
			r, err := decodeResult(v)
			if err != nil {
				return err
			}
			at := time.UnixMilli(r.At)
			_, user, req, ok := parseIdemKey(k)
			if !ok {
				return nil
			}
			return add("idem", idemRKey(user, req), formatResult(r), strconv.FormatInt(at.Add(w.ttl).UnixMilli(), 10))
		})
	}
	if err == nil {
		err = w.contributeTrades(add)
	}
	if err == nil {
		if v, gerr := w.store.Get(SeqKey("trade")); gerr == nil {
			err = add("seq", keySeqTrade, strconv.FormatInt(DecodeInt64(v), 10))
		}
	}
	if err == nil {
		// This node's applied-op counters (shared_audit.go), from the disk.
		var n, sum int64
		if v, gerr := w.store.Get(wmApplied); gerr == nil {
			n = DecodeInt64(v)
		}
		if v, gerr := w.store.Get(wmSum); gerr == nil {
			sum = DecodeInt64(v)
		}
		err = add("hincr", nodeRKey(w.node), "n", strconv.FormatInt(n, 10))
		if err == nil {
			err = add("hincr", nodeRKey(w.node), "sum", strconv.FormatInt(sum, 10))
		}
	}
	if err == nil {
		err = add("seq", keySeqTrade, "0") // every node flushes at least one batch
	}
	if err == nil {
		err = flush()
	}
	if err == nil && w.extra != nil {
		batch, section = 0, ":x" // markers in a set of their own
		if err = w.extra(genStart(gen), add); err == nil {
			err = flush()
		}
	}
	if errors.Is(err, errStaleGen) {
		return "stale", nil // the generation moved on; the watcher comes back
	}
	if err != nil {
		return "", err
	}
	return finishScript.Exec(ctx, w.rdb, []string{keyMeta, keyContrib + gen + ":done"}, []string{gen, w.node}).ToString()
}

var errStaleGen = errors.New("persist: stale generation")

// contributeTrades adds the newest recentMax trades of each user on this
// node's disk to the users' recent-trade lists (what GET /wallet/trades
// lists: without them, every list starts empty after a Redis loss). The
// rows are scanned in key order — by user, then trade id — keeping each
// user's newest recentMax at a time.
func (w *SharedWallet) contributeTrades(add func(a ...string) error) error {
	var user int64 = -1
	var keep []Trade
	emit := func() error {
		for _, t := range keep[max(0, len(keep)-recentMax):] {
			b, err := sonic.Marshal(t)
			if err != nil {
				return err
			}
			if err := add("zadd", recentKey(t.User), string(b), strconv.FormatInt(t.ID, 10)); err != nil {
				return err
			}
		}
		keep = keep[:0]
		return nil
	}
	err := w.store.Scan(PrefixTrade, func(_, v []byte) error {
		t, err := decodeTrade(v)
		if err != nil {
			return err
		}
		if t.User != user {
			if err := emit(); err != nil {
				return err
			}
			user = t.User
		}
		if len(keep) == 2*recentMax {
			keep = append(keep[:0], keep[recentMax:]...)
		}
		keep = append(keep, t)
		return nil
	})
	if err != nil {
		return err
	}
	return emit()
}

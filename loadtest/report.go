package loadtest

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
)

// setNodeEnd records the node's RSS at the end of the hold with held
// connections (see NodeRSSEnd).
func (res *Result) setNodeEnd(rss, held int64) {
	res.NodeRSSEnd = rss
	if held > 0 && res.NodeRSSBefore > 0 {
		res.NodeRSSEndPerConn = float64(rss-res.NodeRSSBefore) / float64(held)
	}
}

// WriteSummary prints the figures for a person.
func (res *Result) WriteSummary(w io.Writer) {
	fmt.Fprintf(w, "scenario %s, %d process(es)\n", res.Scenario, res.Procs)
	fmt.Fprintf(w, "  connections   %d joined, %d failed (ramp %.1f s); %d viewers, %d publishers\n",
		res.Conns, res.ConnErrors, res.RampSeconds, res.Viewers, res.Talkers)
	if res.NodeRSSAfter > 0 {
		fmt.Fprintf(w, "  node RSS      %.1f → %.1f MiB: %.1f KiB per connection\n",
			mib(res.NodeRSSBefore), mib(res.NodeRSSAfter), res.NodeRSSPerConn/1024)
	}
	if res.NodeRSSEnd > 0 {
		fmt.Fprintf(w, "  node RSS end  %.1f MiB at the hold's end, connections held: %.1f KiB per connection\n",
			mib(res.NodeRSSEnd), res.NodeRSSEndPerConn/1024)
	}
	if res.NodeRSSAfter > 0 {
		fmt.Fprintf(w, "  node CPU      %.3f cores over the run phase (%.1f s)\n", res.NodeCPUCores, res.RunSeconds)
	}
	fmt.Fprintf(w, "  loadgen RSS   %.1f → %.1f MiB: %.1f KiB per connection\n",
		mib(res.LoadgenRSSBefore), mib(res.LoadgenRSSAfter), res.LoadgenRSSPerConn/1024)
	if res.Requests > 0 {
		what := "gifts"
		if res.Scenario == Grab {
			what = "grabs"
			fmt.Fprintf(w, "  rain          %d coins in %d packets; grabbers told %d coins\n", res.TotalAmount, res.Packets, res.GrantedAmount)
		}
		offered := "closed loop"
		if res.Scenario == Grab {
			offered = "all at once, one packet each at most"
		} else if res.OfferedRate > 0 {
			offered = fmt.Sprintf("offered %.0f/s", res.OfferedRate)
		}
		fmt.Fprintf(w, "  %-13s %d sent (%s), %d answered OK (%.0f/s), %d refused %v\n", what, res.Requests, offered, res.Replies, res.RepliesPerSec, res.Refused, res.RefusedCodes)
		fmt.Fprintf(w, "  reply latency p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", res.P50Ms, res.P99Ms, res.MaxMs)
		if res.MissedSlots > 0 {
			fmt.Fprintf(w, "  missed        %d slots due before the end never sent (32 in flight per sender): not in the latency\n", res.MissedSlots)
		}
		if res.Conserved != nil {
			fmt.Fprintf(w, "  conservation  %v: %s\n", *res.Conserved, res.ConservationNote)
		}
	} else if res.PushesSent > 0 || res.SendErrors > 0 || res.Published > 0 {
		fmt.Fprintf(w, "  pushes        %d sent (%d failed, %d slots skipped behind a late reply), %d numbered by the room, over %.1f s; %d delivered (%.0f/s)\n",
			res.PushesSent, res.SendErrors, res.SkippedSends, res.Published, res.RunSeconds, res.Deliveries, res.DeliveriesPerSec)
		fmt.Fprintf(w, "  deliveries    %d expected, %d lost (%d viewers); %d not expected (%d numbered before the viewer joined, %d skipped by a resync)\n",
			res.Expected, res.Missing, res.LostViewers, res.NotExpected, res.NotExpectedBeforeJoin, res.NotExpectedResync)
		fmt.Fprintf(w, "  latency       p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", res.P50Ms, res.P99Ms, res.MaxMs)
	} else {
		fmt.Fprintf(w, "  held          %.1f s\n", res.RunSeconds)
	}
	fmt.Fprintf(w, "  order         %d gaps, %d duplicates (%d dropped by the SDK), %d resyncs, %d epoch changes\n",
		res.Gaps, res.Duplicates, res.SDKDupDropped, res.Resyncs, res.EpochChanges)
	fmt.Fprintf(w, "  connections   %d disconnects, %d reconnects, %d errors\n", res.Disconnects, res.Reconnects, res.Errors)
	if res.Client == ClientRaw {
		fmt.Fprintf(w, "  raw client    held (joined) %d at the end of the hold, at least %d during it; %d disconnects / %d reconnects during the hold %v\n",
			res.HeldEnd, res.HeldMin, res.HoldDisconnects, res.HoldReconnects, res.DisconnectReasons)
		fmt.Fprintf(w, "                %d pings (%d unanswered), %d acks; loadgen CPU %.3f cores over the hold; join reply p50 %.1f ms, p99 %.1f ms, max %.1f ms\n",
			res.Pings, res.PingTimeouts, res.Acks, res.LoadgenCPUCores, res.JoinP50Ms, res.JoinP99Ms, res.JoinMaxMs)
	}
	if res.Killed {
		fmt.Fprintf(w, "  after kill    %d reconnected and recovered, %d not; p50 %.0f ms, p99 %.0f ms, max %.0f ms\n",
			res.ReconnectedAfterKill, res.NotReconnected, res.ReconnectP50Ms, res.ReconnectP99Ms, res.ReconnectMaxMs)
	}
	for _, e := range res.LostSamples {
		fmt.Fprintf(w, "  lost: %s\n", e)
	}
	for _, e := range res.ErrorSamples {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// WriteJSON writes res to path.
func (res *Result) WriteJSON(path string) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// ReadJSON reads a result written by WriteJSON.
func ReadJSON(path string) (*Result, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var res Result
	if err := json.Unmarshal(b, &res); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &res, nil
}

// Merge adds up the results of several processes of one run (-procs): counters
// summed (each process accounts its own viewers' deliveries against the
// publishing process's record), histograms merged, times the longest, memory per connection from
// the sums. The node's RSS is the one measured by the process that saw the
// most connections (nodeAfter, when > 0, overrides it: sampled by the parent
// once every process had ramped).
func Merge(parts []*Result, nodeBefore, nodeAfter, nodeEnd int64) *Result {
	out := &Result{Procs: len(parts)}
	var lat, recon, join Hist
	for _, p := range parts {
		out.Scenario = p.Scenario
		out.Client = p.Client
		out.Conns += p.Conns
		out.ConnErrors += p.ConnErrors
		out.Viewers += p.Viewers
		out.Talkers += p.Talkers
		out.RampSeconds = max(out.RampSeconds, p.RampSeconds)
		out.RunSeconds = max(out.RunSeconds, p.RunSeconds)
		out.PushesSent += p.PushesSent
		out.SendErrors += p.SendErrors
		out.SkippedSends += p.SkippedSends
		out.Deliveries += p.Deliveries
		out.Published = max(out.Published, p.Published) // every process accounts the same record
		out.Expected += p.Expected
		out.Missing += p.Missing
		out.LostViewers += p.LostViewers
		if len(out.LostSamples) < 10 {
			out.LostSamples = append(out.LostSamples, p.LostSamples...)
		}
		out.NotExpected += p.NotExpected
		out.NotExpectedBeforeJoin += p.NotExpectedBeforeJoin
		out.NotExpectedResync += p.NotExpectedResync
		out.Gaps += p.Gaps
		out.Duplicates += p.Duplicates
		out.SDKDupDropped += p.SDKDupDropped
		out.Resyncs += p.Resyncs
		out.EpochChanges += p.EpochChanges
		out.Disconnects += p.Disconnects
		out.Reconnects += p.Reconnects
		out.Errors += p.Errors
		if len(out.ErrorSamples) < 10 {
			out.ErrorSamples = append(out.ErrorSamples, p.ErrorSamples...)
		}
		out.LoadgenRSSBefore += p.LoadgenRSSBefore
		out.LoadgenRSSAfter += p.LoadgenRSSAfter
		out.NodeCPUCores = max(out.NodeCPUCores, p.NodeCPUCores) // every process times the same node over the same phase
		out.Killed = out.Killed || p.Killed
		out.ReconnectedAfterKill += p.ReconnectedAfterKill
		out.Requests += p.Requests
		out.Replies += p.Replies
		out.Refused += p.Refused
		for c, n := range p.RefusedCodes {
			if out.RefusedCodes == nil {
				out.RefusedCodes = map[int]int64{}
			}
			out.RefusedCodes[c] += n
		}
		out.Ambiguous += p.Ambiguous
		out.MissedSlots += p.MissedSlots
		out.UsersCoins += p.UsersCoins
		out.GrantedAmount += p.GrantedAmount
		out.OfferedRate += p.OfferedRate
		out.WarmupSeconds = max(out.WarmupSeconds, p.WarmupSeconds)
		out.StormSeconds = max(out.StormSeconds, p.StormSeconds) // the shares run at once, from one start time
		out.Packets = max(out.Packets, p.Packets)
		out.TotalAmount = max(out.TotalAmount, p.TotalAmount)
		out.HeldMin += p.HeldMin
		out.HeldEnd += p.HeldEnd
		out.HoldDisconnects += p.HoldDisconnects
		out.HoldReconnects += p.HoldReconnects
		out.Pings += p.Pings
		out.PingTimeouts += p.PingTimeouts
		out.Acks += p.Acks
		out.LoadgenCPUCores += p.LoadgenCPUCores
		for k, v := range p.DisconnectReasons {
			if out.DisconnectReasons == nil {
				out.DisconnectReasons = map[string]int64{}
			}
			out.DisconnectReasons[k] += v
		}
		lat.Merge(p.LatencyBuckets, p.LatencyMaxUS)
		recon.Merge(p.ReconnectBuckets, p.ReconnectMaxUS)
		join.Merge(p.JoinBuckets, p.JoinMaxUS)
	}
	if join.Count() > 0 {
		out.JoinBuckets, out.JoinMaxUS = join.Buckets(), join.MaxUS()
		out.JoinP50Ms, out.JoinP99Ms, out.JoinMaxMs = join.Quantile(0.5), join.Quantile(0.99), join.Quantile(1)
	}
	if out.StormSeconds > 0 {
		out.RepliesPerSec = float64(out.Replies) / out.StormSeconds
	}
	if out.Conns > 0 {
		out.LoadgenRSSPerConn = float64(out.LoadgenRSSAfter-out.LoadgenRSSBefore) / float64(out.Conns)
		if nodeAfter > 0 {
			out.NodeRSSBefore, out.NodeRSSAfter = nodeBefore, nodeAfter
			out.NodeRSSPerConn = float64(nodeAfter-nodeBefore) / float64(out.Conns)
		}
		if nodeEnd > 0 {
			out.setNodeEnd(nodeEnd, out.Conns)
		}
	}
	out.LatencyBuckets, out.LatencyMaxUS = lat.Buckets(), lat.MaxUS()
	if out.Killed {
		out.ReconnectBuckets, out.ReconnectMaxUS = recon.Buckets(), recon.MaxUS()
	}
	out.finish(&lat, &recon)
	return out
}

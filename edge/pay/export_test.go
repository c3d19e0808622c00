package pay

// LeaseWorkerAt is LeaseWorker reading the high marks' time from now.
var LeaseWorkerAt = leaseWorker

// NotBelow is notBelow (tests).
func (g *IDGen) NotBelow(id int64) { g.notBelow(id) }

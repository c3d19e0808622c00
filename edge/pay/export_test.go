package pay

// LeaseWorkerAt is LeaseWorker reading the high marks' time from now.
var LeaseWorkerAt = leaseWorker

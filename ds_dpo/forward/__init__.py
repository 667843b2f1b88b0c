"""One forward over a micro-batch: batch layouts, attention kernels, sequence parallelism, log-probs."""

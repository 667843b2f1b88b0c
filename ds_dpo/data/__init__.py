"""Reading, normalising and tokenizing preference pairs; the sampler that batches them."""

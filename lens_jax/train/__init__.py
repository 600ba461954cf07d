"""Training machinery: mesh and sharding, train state, optimiser, step, checkpoints, metrics."""

"""Training: mesh and sharding, optimiser, checkpointing, the shared loop and the trainers."""

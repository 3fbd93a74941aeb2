"""Task registry, losses and the challenge's official metrics."""

"""Data layer: one record schema, adapters for datasets as released, TFDS builders, Grain pipelines
and the embedded ultrasound simulator (sonosynth)."""

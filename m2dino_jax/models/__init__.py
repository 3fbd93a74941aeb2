"""Models: ViT encoders (DINOv3 / DINOv2), RoPE, MoE, task heads, weight import.

Parameters carry logical axis names (`out_sharding` metadata); `m2dino_jax/mesh.py` maps them
to the mesh. We create variables unsharded and place them explicitly, so Flax's eager
variable sharding is switched off here.
"""

import flax

flax.config.update("flax_always_shard_variable", False)

"""m2dino_jax: JAX/Flax medical-imaging foundation models.

M2DINO (task-conditioned MoE on a DINOv3 encoder), UltraDINO self-distillation and
transfer-aware scaling laws, in one codebase with one encoder, data layer and trainer.
"""

__version__ = "0.1.0"

"""Analytic matmul FLOPs of our steps (2 per multiply-add; a train step = forward + backward = 3 x forward).

Counted: every dense layer and the attention products (q k^T and p v). Not counted: norms, softmax,
activations, resizes, the optimiser and the EMA (a few percent at these sizes). The benchmarks report this
count next to XLA's cost analysis of the compiled program (which counts every op), as a cross-check, and
compute MFU from the analytic count (the MaxText convention: ViT FLOPs/image ~ 3 (2 N P + 4 L N^2 d)).
The 3 x rule counts an input gradient for the first layer too, which no step computes (the input is data),
so a model with a large patch embedding (the 3D MAE's 16^3 patches) sits ~2% above XLA's count.
"""

from __future__ import annotations


def block_flops(tokens: int, dim: int, mlp_dim: int, *, experts: int = 0, top_k: int = 0) -> int:
  """Forward FLOPs of one pre-norm transformer block on one sequence of `tokens` tokens.

  q/k/v/o projections 4 d^2 per token, attention 2 x 2 N^2 d, the FFN 2 d h per token (a MoE block: the
  router d E plus top_k experts per token)."""
  f = 2 * tokens * 4 * dim * dim + 4 * tokens * tokens * dim
  ffn = 2 * dim * mlp_dim
  return f + (2 * tokens * (dim * experts + top_k * ffn) if experts else 2 * tokens * ffn)


def vit_forward_flops(*, dim: int, depth: int, mlp_dim: int, patch: int, image_size: int, channels: int,
                      prefix: int, moe_layers=(), experts: int = 0, top_k: int = 0) -> int:
  """Forward FLOPs of a 2D ViT encoder on one image: patch embedding + blocks (`prefix` = CLS + registers)."""
  patches = (image_size // patch) ** 2
  tokens = prefix + patches
  f = 2 * patches * patch * patch * channels * dim
  for i in range(depth):
    moe = i in set(moe_layers)
    f += block_flops(tokens, dim, mlp_dim, experts=experts if moe else 0, top_k=top_k if moe else 0)
  return f


def dino_head_flops(in_dim: int, hidden: int, bottleneck: int, prototypes: int, nlayers: int) -> int:
  """Forward FLOPs of the DINO head on one vector: MLP in -> hidden^(nlayers-1) -> bottleneck, then the
  weight-normalised prototype layer bottleneck -> prototypes."""
  dims = [in_dim] + [hidden] * (max(nlayers, 1) - 1) + [bottleneck]
  return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:])) + 2 * bottleneck * prototypes


def dino_step_flops(*, dim: int, depth: int, mlp_dim: int, patch: int, channels: int, registers: int,
                    global_size: int, local_size: int, num_local: int, max_masked: int, hidden: int,
                    bottleneck: int, prototypes: int, nlayers: int) -> dict:
  """FLOPs per image (2 global + num_local local crops) of a DINOv2 step: teacher forward on the global crops
  (backbone, head on CLS and on `max_masked` patch tokens per crop), student forward + backward on all crops."""
  enc = lambda size: vit_forward_flops(dim=dim, depth=depth, mlp_dim=mlp_dim, patch=patch, image_size=size,
                                       channels=channels, prefix=1 + registers)
  head = dino_head_flops(dim, hidden, bottleneck, prototypes, nlayers)
  teacher = 2 * enc(global_size) + 2 * (1 + max_masked) * head
  student = 2 * enc(global_size) + num_local * enc(local_size) + (2 + num_local + 2 * max_masked) * head
  return {"teacher_fwd": teacher, "student_fwd": student, "train": teacher + 3 * student}


def mae3d_step_flops(*, dim: int, depth: int, mlp_dim: int, patch: int, crop: int, in_chans: int,
                     mask_ratio: float, dec_dim: int, dec_depth: int, dec_mlp_dim: int) -> dict:
  """FLOPs per volume of a 3D MAE step. The patch embedding runs on all N patches, the encoder on CLS + the
  K = int(N (1 - ratio)) kept ones, the decoder (embed, blocks, prediction) on CLS + all N."""
  n = (crop // patch) ** 3
  keep = int(n * (1 - mask_ratio))
  pdim = patch ** 3 * in_chans
  fwd = 2 * n * pdim * dim
  fwd += depth * block_flops(1 + keep, dim, mlp_dim)
  fwd += 2 * (1 + keep) * dim * dec_dim
  fwd += dec_depth * block_flops(1 + n, dec_dim, dec_mlp_dim)
  fwd += 2 * (1 + n) * dec_dim * pdim
  return {"patches": n, "kept": keep, "fwd": fwd, "train": 3 * fwd}

"""`m2dino bench ssl`: the analytic FLOP count of the DINOv2 step, counted by hand on a tiny configuration."""

import ml_collections

from m2dino_jax.bench import ssl


def test_step_flops_by_hand():
  c = ml_collections.ConfigDict(dict(
      model=dict(dim=8, depth=2, heads=2, mlp_dim=16, patch=4, in_chans=1, num_registers=1, kind="dinov2",
                 pos_grid=2),
      data=dict(global_size=8, local_size=4, num_local=2),
      head=dict(prototypes=32, hidden_dim=16, bottleneck_dim=4, nlayers=3)))
  # global crop 8 px / patch 4: 4 patches, 6 tokens (CLS, 1 register); local 4 px: 1 patch, 3 tokens
  glob = 2 * 4 * 16 * 8 + 2 * (2 * 6 * 4 * 8 * 8 + 4 * 6 * 6 * 8 + 2 * 6 * 2 * 8 * 16)   # embed + 2 blocks
  loc = 2 * 1 * 16 * 8 + 2 * (2 * 3 * 4 * 8 * 8 + 4 * 3 * 3 * 8 + 2 * 3 * 2 * 8 * 16)
  head = 2 * (8 * 16 + 16 * 16 + 16 * 4 + 4 * 32)  # per token: MLP 8-16-16-4, prototypes 4 -> 32
  assert (glob, loc, head) == (15616, 6976, 1152)
  # student fwd + bwd: 2 global + 2 local crops, head on 4 CLS + 2 x 2 masked patches; teacher fwd: 2 global,
  # head on 2 CLS + 2 x 2 masked patches
  student = 3 * (2 * glob + 2 * loc + head * (2 + 2 + 2 * 2))
  teacher = 2 * glob + head * (2 + 2 * 2)
  got = ssl.step_flops_per_image(c, max_masked=2)
  assert (got["encoder_global_fwd"], got["encoder_local_fwd"], got["head_per_token"]) == (glob, loc, head)
  assert (got["student"], got["teacher"], got["total"]) == (student, teacher, student + teacher) == \
      (163200, 38144, 201344)

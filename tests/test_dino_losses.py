"""UltraDINO losses, centring, schedules and block masks against plain NumPy / PyTorch references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from m2dino_jax.train.dino import data, losses, schedules

RNG = np.random.default_rng(0)


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_dino_loss_with_centering_matches_numpy():
  b, k, t_s, t_t = 5, 7, 0.1, 0.04
  s_g, s_l = RNG.normal(size=(2, b, k)), RNG.normal(size=(3, b, k))
  t_logits, center = RNG.normal(size=(2, b, k)), RNG.normal(size=(1, k)) * 0.1
  targets = np_softmax((t_logits - center) / t_t)
  # DINOv2: global crops against the other global crop, locals against both; sum of batch means / pairs
  terms = []
  for i, s in enumerate(list(s_g) + list(s_l)):
    for j in range(2):
      if i < 2 and i == j:
        continue
      terms.append(np.mean(-np.sum(targets[j] * np_log_softmax(s / t_s), -1)))
  want = sum(terms) / len(terms)
  got_targets = losses.teacher_targets(jnp.asarray(t_logits), jnp.asarray(center), t_t, "ema")
  got = losses.dino_loss(jnp.asarray(s_g), jnp.asarray(s_l), got_targets, t_s)
  assert len(terms) == 2 + 3 * 2
  np.testing.assert_allclose(np.asarray(got_targets), targets, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_ibot_loss_counts_masked_tokens_only():
  n, p, k, t_s = 4, 6, 5, 0.1
  s, t = RNG.normal(size=(n, p, k)), np_softmax(RNG.normal(size=(n, p, k)))
  masks = np.zeros((n, p), bool)
  masks[0, [1, 4]] = True
  masks[2, :5] = True  # images 1 and 3 unmasked: contribute 0 but count in the denominator (DINOv2)
  ce = -np.sum(t * np_log_softmax(s / t_s), -1)
  want = (ce[0, [1, 4]].mean() + ce[2, :5].mean()) / n
  got = losses.ibot_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(masks), t_s)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # unmasked tokens do not matter
  s2 = s.copy()
  s2[~masks] += 100 * RNG.normal(size=s2[~masks].shape)
  np.testing.assert_allclose(float(losses.ibot_loss(jnp.asarray(s2), jnp.asarray(t), jnp.asarray(masks), t_s)),
                             want, rtol=1e-5)


def test_koleo_matches_torch_reference():
  torch = pytest.importorskip("torch")
  x = RNG.normal(size=(12, 9)).astype(np.float32)

  def torch_koleo(x):  # DINOv2 KoLeoLoss
    x = torch.nn.functional.normalize(x, eps=1e-8, p=2, dim=-1)
    dots = x @ x.t()
    n = x.shape[0]
    dots.view(-1)[::(n + 1)].fill_(-1)
    idx = torch.max(dots, dim=1).indices
    dist = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[idx])
    return -torch.log(dist + 1e-8).mean()

  want = float(torch_koleo(torch.from_numpy(x)))
  np.testing.assert_allclose(float(losses.koleo_loss(jnp.asarray(x))), want, rtol=1e-5)
  groups = np.mean([float(torch_koleo(torch.from_numpy(x[i:i + 4]))) for i in (0, 4, 8)])
  np.testing.assert_allclose(float(losses.koleo_loss(jnp.asarray(x), group=4)), groups, rtol=1e-5)


def test_sinkhorn_knopp_marginals():
  logits = jnp.asarray(RNG.normal(size=(16, 8)))
  q = np.asarray(losses.sinkhorn_knopp(logits, 0.5, n_iter=200))
  np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-4)  # every sample: a distribution
  np.testing.assert_allclose(q.sum(0), 16 / 8, atol=1e-4)  # every prototype: an equal share
  # DINOv2's 3 rounds: the last normalisation is over samples, so rows are exact
  q3 = np.asarray(losses.sinkhorn_knopp(logits, 0.5, n_iter=3))
  np.testing.assert_allclose(q3.sum(1), 1.0, atol=1e-5)
  # NumPy transcription of DINOv2's SinkhornKnopp (3 iterations)
  qq = np.exp(np.asarray(logits, np.float64) / 0.5).T
  qq /= qq.sum()
  for _ in range(3):
    qq /= qq.sum(1, keepdims=True) * 8
    qq /= qq.sum(0, keepdims=True) * 16
  np.testing.assert_allclose(q3, (qq * 16).T, rtol=1e-4, atol=1e-7)
  # masked rows (iBOT padding) are ignored: same as Sinkhorn on the valid rows alone
  w = np.r_[np.ones(10), np.zeros(6)]
  qw = np.asarray(losses.sinkhorn_knopp(logits, 0.5, n_iter=3, weights=jnp.asarray(w)))
  np.testing.assert_allclose(qw[:10], np.asarray(losses.sinkhorn_knopp(logits[:10], 0.5, 3)), rtol=1e-5)
  assert np.all(qw[10:] == 0)


def test_ema_center_and_monitors():
  c, t = RNG.normal(size=(1, 4)), RNG.normal(size=(6, 4))
  np.testing.assert_allclose(np.asarray(losses.ema_center(jnp.asarray(c), jnp.asarray(t), 0.9)),
                             0.9 * c + 0.1 * t.mean(0, keepdims=True), rtol=1e-6)
  w = np.array([1, 0, 1, 0, 0, 1.0])
  np.testing.assert_allclose(np.asarray(losses.ema_center(jnp.asarray(c), jnp.asarray(t), 0.9, jnp.asarray(w))),
                             0.9 * c + 0.1 * t[w > 0].mean(0, keepdims=True), rtol=1e-6)
  p = np.full((3, 8), 1 / 8)
  np.testing.assert_allclose(float(losses.mean_entropy(jnp.asarray(p))), math.log(8), rtol=1e-6)
  x = RNG.normal(size=(32, 6))
  s = np.linalg.svd(x, compute_uv=False)
  q = s / s.sum() + 1e-7
  np.testing.assert_allclose(float(losses.rankme(jnp.asarray(x))), np.exp(-(q * np.log(q)).sum()), rtol=1e-5)
  assert float(losses.rankme(jnp.ones((32, 6)))) < 1.01  # collapsed: rank one


def test_schedules_match_formulas():
  total, warm = 100, 10
  lr = schedules.cosine(0.004, 1e-6, total, warm)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 0.002, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 0.004, rtol=1e-6)
  i = 55 - warm
  np.testing.assert_allclose(float(lr(55)), 1e-6 + 0.5 * (0.004 - 1e-6) * (1 + math.cos(math.pi * i / 90)), rtol=1e-5)
  mom = schedules.cosine(0.992, 1.0, total)
  for step in (0, 37, 100):
    np.testing.assert_allclose(float(mom(step)), 1 - 0.008 * (1 + math.cos(math.pi * step / total)) / 2, rtol=1e-6)
  wd = schedules.cosine(0.04, 0.4, total)
  np.testing.assert_allclose([float(wd(0)), float(wd(50)), float(wd(100))], [0.04, 0.22, 0.4], rtol=1e-5)
  temp = schedules.linear_warmup_then_constant(0.04, 0.07, 30)
  np.testing.assert_allclose([float(temp(0)), float(temp(15)), float(temp(30)), float(temp(99))],
                             [0.04, 0.055, 0.07, 0.07], rtol=1e-5)
  np.testing.assert_allclose(schedules.scaled_lr(0.004, 512), 0.004 * math.sqrt(0.5))


def test_block_masks_ratios_in_range():
  rng = np.random.default_rng(0)
  grid, n_crops = (14, 14), 64
  masks = data.collate_masks(n_crops, grid, 0.5, (0.1, 0.5), rng)
  counts = masks.sum(1)
  assert masks.shape == (64, 196) and (counts > 0).sum() == 32
  ratios = counts[counts > 0] / 196
  # the generator stops within min_num_patches (4) of its target; targets span [0.1, 0.5]
  assert ratios.min() >= 0.1 - 4 / 196 and ratios.max() <= 0.5, (ratios.min(), ratios.max())
  assert ratios.max() > 0.4 and ratios.min() < 0.15  # the linspace slices cover the range
  # blocks, not salt-and-pepper: almost every masked patch has a masked 4-neighbour (only the last small
  # top-up block of a mask may be 1 x 1)
  m = masks[counts > 0].reshape(-1, 14, 14)
  pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  neigh = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
  assert neigh[m].mean() > 0.97, neigh[m].mean()


def test_multicrop_shapes_and_determinism():
  import ml_collections

  from configs import ultradino
  c = ultradino.get_config("smoke").data
  img = (RNG.random((80, 120)) * 255).astype(np.uint8)
  crop = data.MultiCrop(c)
  a, b = crop(img, np.random.default_rng(3)), crop(img, np.random.default_rng(3))
  assert a["global"].shape == (2, 64, 64, 1) and a["local"].shape == (2, 32, 32, 1)
  np.testing.assert_array_equal(a["global"], b["global"])
  assert isinstance(c, ml_collections.ConfigDict)

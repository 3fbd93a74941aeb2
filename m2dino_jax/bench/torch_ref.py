"""Plain PyTorch reference of the multi-task train step, for `m2dino bench train`.

The model is a transformers DINOv3ViTModel (eager attention, fp32) whose `mlp` in the MoE blocks is
replaced by `TorchMoE`, a per-expert-loop MoE with our routing (models/moe.py: router x @ W + bias[task],
softmax -> top-k -> renormalise, per-image capacity filled first choices first, Switch balance loss and
z-loss), plus the task head written plainly in torch (the same layers as models/heads.py), the same
losses (tasks/losses.py) and torch.optim.AdamW with our parameter groups (no decay on 1-D weights and
tokens, head lr x head_lr_mult) and global-norm clipping.

`jax_params()` exports every weight under our parameter names, so the JAX model can be built with the
very same weights and both sides compute one function (the benchmark checks the first loss).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy().astype(np.float32)


class TorchMoE(nn.Module):
  """Token-routed, task-biased MoE FFN with a per-expert loop; `task_ids` [B] is set before each call.

  capacity_factor <= 0 is dropless. After a call, `aux` holds the auxiliary loss and telemetry.
  """

  def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, num_tasks: int, *,
               capacity_factor: float = 1.25, balance_weight: float = 0.01, z_weight: float = 1e-3):
    super().__init__()
    self.num_experts, self.top_k = num_experts, top_k
    self.capacity_factor, self.balance_weight, self.z_weight = capacity_factor, balance_weight, z_weight
    init = lambda *shape: nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))
    self.w_in = init(num_experts, dim, hidden)
    self.b_in = nn.Parameter(torch.zeros(num_experts, hidden))
    self.w_out = init(num_experts, hidden, dim)
    self.b_out = nn.Parameter(torch.zeros(num_experts, dim))
    self.router = init(dim, num_experts)
    self.task_bias = nn.Parameter(torch.zeros(num_tasks, num_experts))
    self.task_ids: torch.Tensor | None = None
    self.aux: dict = {}

  def capacity(self, num_tokens: int) -> int:
    if self.capacity_factor <= 0:
      return num_tokens
    slots = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
    return min(num_tokens, max(1, slots))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    e, k = self.num_experts, self.top_k
    task_ids = self.task_ids if self.task_ids is not None else torch.zeros(b, dtype=torch.long)
    logits = x @ self.router + self.task_bias[task_ids][:, None, :]
    probs = logits.softmax(dim=-1)
    top_p, experts = probs.topk(k, dim=-1)
    gates = top_p / top_p.sum(dim=-1, keepdim=True)
    # slot of each assignment in its expert's queue of the image: all first choices, then second ones
    hot = F.one_hot(experts, e)                                       # [B, N, k, E]
    queue = hot.transpose(1, 2).reshape(b, k * n, e)
    position = ((queue.cumsum(dim=1) - queue) * queue).sum(-1).reshape(b, k, n).transpose(1, 2)
    capacity = self.capacity(n)
    kept = position < capacity
    gates = gates * kept
    load = hot.sum(dim=(0, 1, 2)).float() / (b * n * k)
    balance = e * (load * probs.mean(dim=(0, 1))).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    self.aux = {"aux_loss": self.balance_weight * balance + self.z_weight * z, "balance_loss": balance,
                "z_loss": z, "drop_fraction": 1.0 - kept.float().mean()}
    flat_x = x.reshape(b * n, d)
    flat_experts, flat_gates, flat_kept = experts.reshape(b * n, k), gates.reshape(b * n, k), kept.reshape(b * n, k)
    y = torch.zeros_like(flat_x)
    for expert in range(e):
      token, choice = torch.nonzero((flat_experts == expert) & flat_kept, as_tuple=True)
      if token.numel() == 0:
        continue
      h = F.gelu(flat_x[token] @ self.w_in[expert] + self.b_in[expert])
      out = h @ self.w_out[expert] + self.b_out[expert]
      y = y.index_add(0, token, out * flat_gates[token, choice, None])
    return y.reshape(b, n, d)

  def jax_params(self) -> dict[str, np.ndarray]:
    return {name: _np(getattr(self, name)) for name in ("w_in", "b_in", "w_out", "b_out", "router", "task_bias")}


class ClsHead(nn.Module):
  """Linear classifier on [CLS || mean patch token] (heads.ClsHead, kind 'linear')."""

  def __init__(self, dim: int, num_classes: int):
    super().__init__()
    self.out = nn.Linear(2 * dim, num_classes)

  def forward(self, cls, patches, features, image_hw):
    return self.out(torch.cat([cls, patches.mean(dim=1)], dim=-1))

  def jax_params(self) -> dict[str, np.ndarray]:
    return {"out.kernel": _np(self.out.weight.T), "out.bias": _np(self.out.bias)}


def _resize(x: torch.Tensor, size) -> torch.Tensor:
  """Bilinear, half-pixel centres, antialiased when shrinking (as jax.image.resize 'bilinear')."""
  if tuple(x.shape[-2:]) == tuple(size):
    return x
  # fp32 (torch has no bf16 antialiased bilinear kernel): under autocast the next conv casts back to bf16
  return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


class SegHead(nn.Module):
  """UperNet-lite (heads.SegHead): lateral 1x1, FPN top-down sum, 3x3 smoothing, concat, 3x3 fuse,
  GroupNorm, GELU (tanh), 1x1 classifier, upsampling to the image. Feature maps are [B, D, h, w]."""

  def __init__(self, dim: int, num_classes: int, num_inputs: int, channels: int):
    super().__init__()
    self.scales = tuple(4.0 / 2 ** i for i in range(num_inputs))
    self.lateral = nn.ModuleList(nn.Conv2d(dim, channels, 1) for _ in range(num_inputs))
    self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_inputs))
    self.fuse = nn.Conv2d(channels * num_inputs, channels, 3, padding=1)
    self.norm = nn.GroupNorm(min(32, channels), channels, eps=1e-6)
    self.classify = nn.Conv2d(channels, num_classes, 1)

  def forward(self, cls, patches, features, image_hw):
    h, w = features[0].shape[-2:]
    levels = [_resize(lat(f), (max(1, round(h * s)), max(1, round(w * s))))
              for f, lat, s in zip(features, self.lateral, self.scales)]
    for i in range(len(levels) - 2, -1, -1):
      levels[i] = levels[i] + _resize(levels[i + 1], levels[i].shape[-2:])
    finest = levels[0].shape[-2:]
    outs = [_resize(conv(x), finest) for conv, x in zip(self.smooth, levels)]
    x = F.gelu(self.norm(self.fuse(torch.cat(outs, dim=1))), approximate="tanh")
    return _resize(self.classify(x), image_hw)

  def jax_params(self) -> dict[str, np.ndarray]:
    conv = lambda c: _np(c.weight.permute(2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
    dense = lambda c: _np(c.weight[:, :, 0, 0].T)
    out = {"fuse.kernel": conv(self.fuse), "fuse.bias": _np(self.fuse.bias), "norm.scale": _np(self.norm.weight),
           "norm.bias": _np(self.norm.bias), "classify.kernel": dense(self.classify),
           "classify.bias": _np(self.classify.bias)}
    for i, (lat, smooth) in enumerate(zip(self.lateral, self.smooth)):
      out.update({f"lateral.{i}.kernel": dense(lat), f"lateral.{i}.bias": _np(lat.bias),
                  f"smooth.{i}.kernel": conv(smooth), f"smooth.{i}.bias": _np(smooth.bias)})
    return out


class Reference(nn.Module):
  """DINOv3 backbone (transformers) with MoE blocks, one task head; returns (prediction, MoE aux loss)."""

  def __init__(self, hf_model, head: nn.Module, *, moe_layers=(), moe_kwargs=None, out_blocks=(), num_tasks=1):
    super().__init__()
    self.backbone = hf_model
    self.head = head
    self.out_blocks = tuple(out_blocks)
    self.moe_layers = tuple(moe_layers)
    cfg = hf_model.config
    self.num_prefix = 1 + cfg.num_register_tokens
    for i in self.moe_layers:  # the monkey-patch: the HF layer calls self.mlp(hidden_states)
      hf_model.model.layer[i].mlp = TorchMoE(cfg.hidden_size, cfg.intermediate_size, num_tasks=num_tasks,
                                             **(moe_kwargs or {}))

  def moe_modules(self) -> list[TorchMoE]:
    return [self.backbone.model.layer[i].mlp for i in self.moe_layers]

  def forward(self, pixels: torch.Tensor, task_ids: torch.Tensor):
    bb = self.backbone
    for m in self.moe_modules():
      m.task_ids = task_ids
    x = bb.embeddings(pixels)
    rope = bb.rope_embeddings(pixels)
    grid = (pixels.shape[-2] // bb.config.patch_size, pixels.shape[-1] // bb.config.patch_size)
    features = []
    for i, layer in enumerate(bb.model.layer):
      x = layer(x, position_embeddings=rope)
      if i in self.out_blocks:
        f = bb.norm(x)[:, self.num_prefix:]
        features.append(f.transpose(1, 2).reshape(f.shape[0], f.shape[2], *grid))
    x = bb.norm(x)
    pred = self.head(x[:, 0], x[:, self.num_prefix:], features, pixels.shape[-2:])
    aux = sum((m.aux["aux_loss"] for m in self.moe_modules()), torch.zeros(()))
    return pred, aux

  def jax_encoder_params(self, vit_cfg) -> dict[str, np.ndarray]:
    """Encoder weights under our names (convert.hf_to_params for the dense part, MoE weights as they are)."""
    from m2dino_jax.models import convert
    sd = dict(self.backbone.state_dict())
    for i in self.moe_layers:  # hf_to_params expects a dense MLP in every block: give empty stand-ins
      for name in [k for k in sd if k.startswith(f"model.layer.{i}.mlp.")]:
        del sd[name]
      for proj in ("up_proj", "down_proj"):
        sd[f"model.layer.{i}.mlp.{proj}.weight"] = np.zeros((0, 0), np.float32)
    params = convert.hf_to_params(sd, vit_cfg)
    for i, moe in zip(self.moe_layers, self.moe_modules()):
      params = {k: v for k, v in params.items() if not k.startswith(f"blocks.{i}.mlp.")}
      params.update({f"blocks.{i}.mlp.{k}": v for k, v in moe.jax_params().items()})
    return params


def task_loss(head_kind: str, pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
  """Classification CE, or segmentation CE + soft Dice over the foreground classes (tasks/losses.py)."""
  if head_kind == "cls":
    return F.cross_entropy(pred, target)
  ce = F.cross_entropy(pred, target)
  probs = pred.softmax(dim=1)
  onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()
  inter = (probs * onehot).sum(dim=(2, 3))
  dice = (2 * inter + 1.0) / (probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3)) + 1.0)
  return ce + (1.0 - dice[:, 1:].mean(dim=-1)).mean()


def make_optimizer(model: Reference, *, lr: float, head_lr_mult: float, weight_decay: float, betas, **kw):
  """AdamW with our groups: decay only on >= 2-D weights that are not tokens; the head at lr x mult."""
  groups = []
  for part, mult in ((model.backbone, 1.0), (model.head, head_lr_mult)):
    decay, no_decay = [], []
    for name, p in part.named_parameters():
      (no_decay if p.ndim < 2 or "token" in name else decay).append(p)
    groups += [{"params": decay, "lr": lr * mult, "weight_decay": weight_decay},
               {"params": no_decay, "lr": lr * mult, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kw)


def train_step(model: Reference, opt, pixels, task_ids, target, *, head_kind: str, num_classes: int,
               clip_norm: float, task_weight: float = 1.0, autocast: bool = False) -> float:
  """One update; returns the loss before it (task_weight * task loss + MoE aux losses). `autocast`: the
  forward (and so the backward) under torch.autocast bf16, parameters and AdamW state fp32."""
  opt.zero_grad(set_to_none=True)
  with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
    pred, aux = model(pixels, task_ids)
    loss = task_weight * task_loss(head_kind, pred.float(), target, num_classes) + aux.float()
  loss.backward()
  if clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  opt.step()
  return float(loss.detach())

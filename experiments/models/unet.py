"""A small class-conditional UNet for 8x8x1 digit images (DDPM noise model).

Layout for ``channels=(32, 64)``::

    conv_in                      8x8x32
    res_0 -> attn_0              8x8x32    (skip 0)
    down_1 -> res_1 -> attn_1    4x4x64    (skip 1)
    mid_res_0 -> mid_attn -> mid_res_1
    up_res_1 -> up_attn_1        4x4 (concat skip 1) -> 64
    up_1                         nearest x2 + conv -> 8x8x32
    up_res_0 -> up_attn_0        8x8 (concat skip 0) -> 32
    norm_out -> swish -> conv_out   8x8x1  (predicted noise)

The label enters only through cross-attention: image features (queries)
attend to a two-token "prompt" ``[start_token, label_embed(label)]`` via
Dense layers named ``to_q``/``to_k``/``to_v``/``to_out``, the names
Stable Diffusion uses, so LoRA recipes written for those carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class UNetConfig:
  """Sizes of the UNet. ``channels[i]`` is the width at resolution ``8 / 2**i``."""

  channels: tuple[int, ...] = (32, 64)
  ctx_dim: int = 32
  groups: int = 8
  attn_heads: int = 4
  n_classes: int = 10
  time_dim: int = 128
  out_channels: int = 1


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of timesteps ``t (B,)`` -> ``(B, dim)`` float32.

  Frequencies are geometric from 1 down to ``1 / max_period`` so both the
  coarse and the fine position of ``t`` in a 200-step chain are visible.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """``x (B, H, W, C_in)``, ``temb (B, time_dim)`` -> ``(B, H, W, out_ch)``."""

  out_ch: int
  groups: int

  @nn.compact
  def __call__(self, x, temb):
    h = nn.swish(nn.GroupNorm(num_groups=self.groups, name="norm_1")(x))
    h = nn.Conv(self.out_ch, (3, 3), name="conv_1")(h)
    # Time enters as a per-channel shift, broadcast over the image.
    h = h + nn.Dense(self.out_ch, name="time_proj")(nn.swish(temb))[:, None, None, :]
    h = nn.swish(nn.GroupNorm(num_groups=self.groups, name="norm_2")(h))
    h = nn.Conv(self.out_ch, (3, 3), name="conv_2")(h)
    skip = x if x.shape[-1] == self.out_ch else nn.Conv(self.out_ch, (1, 1), name="skip")(x)
    return skip + h


class CrossAttention(nn.Module):
  """Residual cross-attention from image features to a context sequence.

  ``x (B, H, W, C)`` supplies queries; ``ctx (B, L, ctx_dim)`` supplies keys
  and values. Returns ``(B, H, W, C)``. Projections follow diffusers:
  bias-free ``to_q``/``to_k``/``to_v`` (kernels ``(C, C)``, ``(ctx_dim, C)``,
  ``(ctx_dim, C)``) and ``to_out`` with bias (``(C, C)``).
  """

  heads: int
  groups: int

  @nn.compact
  def __call__(self, x, ctx):
    b, hgt, wid, c = x.shape
    head_dim = c // self.heads
    h = nn.GroupNorm(num_groups=self.groups, name="norm")(x).reshape(b, hgt * wid, c)
    q = nn.Dense(c, use_bias=False, name="to_q")(h)
    k = nn.Dense(c, use_bias=False, name="to_k")(ctx)
    v = nn.Dense(c, use_bias=False, name="to_v")(ctx)
    q, k, v = (a.reshape(b, -1, self.heads, head_dim) for a in (q, k, v))
    weights = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(head_dim), axis=-1)
    o = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(b, hgt * wid, c)
    o = nn.Dense(c, name="to_out")(o)
    return x + o.reshape(b, hgt, wid, c)


class UNet(nn.Module):
  """Noise predictor ``(x, t, label) -> eps``.

  ``x`` float ``(B, 8, 8, 1)``; ``t`` timesteps ``(B,)`` or a scalar (int or
  float); ``label`` int32 ``(B,)`` in ``[0, n_classes)``. Returns ``eps``
  ``(B, 8, 8, 1)``.
  """

  config: UNetConfig = UNetConfig()

  @nn.compact
  def __call__(self, x, t, label):
    cfg = self.config
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))

    temb = timestep_embedding(t, cfg.channels[0])
    temb = nn.Dense(cfg.time_dim, name="time_fc1")(temb)
    temb = nn.Dense(cfg.time_dim, name="time_fc2")(nn.swish(temb))

    # The learned start token gives attention a label-free place to put
    # weight, like a text encoder's BOS token.
    start = self.param("start_token", nn.initializers.normal(1.0), (1, 1, cfg.ctx_dim))
    cls = nn.Embed(cfg.n_classes, cfg.ctx_dim, name="label_embed")(label)[:, None, :]
    ctx = jnp.concatenate([jnp.broadcast_to(start, (b, 1, cfg.ctx_dim)), cls], axis=1)

    def attn(name):
      return CrossAttention(cfg.attn_heads, cfg.groups, name=name)

    h = nn.Conv(cfg.channels[0], (3, 3), name="conv_in")(x)
    skips = []
    for i, ch in enumerate(cfg.channels):
      if i > 0:
        h = nn.Conv(ch, (3, 3), strides=(2, 2), name=f"down_{i}")(h)
      h = ResBlock(ch, cfg.groups, name=f"res_{i}")(h, temb)
      h = attn(f"attn_{i}")(h, ctx)
      skips.append(h)

    mid = cfg.channels[-1]
    h = ResBlock(mid, cfg.groups, name="mid_res_0")(h, temb)
    h = attn("mid_attn")(h, ctx)
    h = ResBlock(mid, cfg.groups, name="mid_res_1")(h, temb)

    for i in reversed(range(len(cfg.channels))):
      h = jnp.concatenate([h, skips[i]], axis=-1)
      h = ResBlock(cfg.channels[i], cfg.groups, name=f"up_res_{i}")(h, temb)
      h = attn(f"up_attn_{i}")(h, ctx)
      if i > 0:
        # Nearest-neighbour x2 via repeat: same values as
        # jax.image.resize(..., "nearest") but its gradient compiles
        # noticeably faster on CPU.
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = nn.Conv(cfg.channels[i - 1], (3, 3), name=f"up_{i}")(h)

    h = nn.swish(nn.GroupNorm(num_groups=cfg.groups, name="norm_out")(h))
    return nn.Conv(cfg.out_channels, (3, 3), name="conv_out")(h)

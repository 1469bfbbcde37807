"""A tiny UNet twice: in torch (a diffusers model) and in Flax linen, same names and numerics.

diffusers' own Flax UNet is deprecated (gone in 0.40) and does not match its torch
UNet out of the box (GroupNorm groups and eps, gelu approximation), so the tests
use this pair. torch names: ``conv_in``, ``down_blocks.0.resnets.0.{conv1,
time_emb_proj, conv2}``, ``down_blocks.0.attentions.0.{proj_in, transformer_blocks.0.
{attn1, attn2}.{to_q, to_k, to_v, to_out.0}, ff.net.0.proj, ff.net.2, proj_out}``,
``conv_out``. Flax paths: the same with ``.<i>`` folded into ``_<i>``
(``down_blocks_0/attentions_0/...``). The torch side is a diffusers ``ModelMixin``
with ``PeftAdapterMixin``, so diffusers' own LoRA loaders (kohya conversion, alphas,
``load_lora_adapter``) run on it.
"""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin

tnn = torch.nn
C, CTX, TEMB, G = 32, 16, 32, 8  # channels, context dim, time emb, groups


# ---------------------------------------------------------------- torch


class _Attn(tnn.Module):
  def __init__(self, ctx):
    super().__init__()
    self.to_q = tnn.Linear(C, C, bias=False)
    self.to_k = tnn.Linear(ctx, C, bias=False)
    self.to_v = tnn.Linear(ctx, C, bias=False)
    self.to_out = tnn.ModuleList([tnn.Linear(C, C)])

  def forward(self, x, ctx=None):
    ctx = x if ctx is None else ctx
    q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
    a = torch.softmax(q @ k.transpose(-1, -2) / C ** 0.5, -1)
    return self.to_out[0](a @ v)


class _Block(tnn.Module):
  def __init__(self):
    super().__init__()
    self.norm1, self.norm2, self.norm3 = (tnn.LayerNorm(C) for _ in range(3))
    self.attn1, self.attn2 = _Attn(C), _Attn(CTX)
    self.ff = tnn.Module()
    self.ff.net = tnn.ModuleList([tnn.Module(), tnn.Identity(),
                                  tnn.Linear(2 * C, C)])
    self.ff.net[0].proj = tnn.Linear(C, 4 * C)

  def forward(self, x, ctx):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), ctx)
    h, gate = self.ff.net[0].proj(self.norm3(x)).chunk(2, -1)
    return x + self.ff.net[2](h * F.gelu(gate))


class _Transformer(tnn.Module):
  def __init__(self):
    super().__init__()
    self.norm = tnn.GroupNorm(G, C, eps=1e-6)
    self.proj_in = tnn.Conv2d(C, C, 1)
    self.transformer_blocks = tnn.ModuleList([_Block()])
    self.proj_out = tnn.Conv2d(C, C, 1)

  def forward(self, x, ctx):
    n, c, h, w = x.shape
    y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(n, h * w, c)
    y = self.transformer_blocks[0](y, ctx)
    return x + self.proj_out(y.reshape(n, h, w, c).permute(0, 3, 1, 2))


class _Resnet(tnn.Module):
  def __init__(self):
    super().__init__()
    self.norm1, self.norm2 = tnn.GroupNorm(G, C), tnn.GroupNorm(G, C)
    self.conv1, self.conv2 = tnn.Conv2d(C, C, 3, padding=1), tnn.Conv2d(C, C, 3, padding=1)
    self.time_emb_proj = tnn.Linear(TEMB, C)

  def forward(self, x, temb):
    h = self.conv1(F.silu(self.norm1(x)))
    h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
    return x + self.conv2(F.silu(self.norm2(h)))


class TorchTinySD(ModelMixin, ConfigMixin, PeftAdapterMixin):
  @register_to_config
  def __init__(self):
    super().__init__()
    self.conv_in = tnn.Conv2d(4, C, 3, padding=1)
    self.down_blocks = tnn.ModuleList([tnn.Module()])
    self.down_blocks[0].resnets = tnn.ModuleList([_Resnet()])
    self.down_blocks[0].attentions = tnn.ModuleList([_Transformer()])
    self.conv_out = tnn.Conv2d(C, 4, 3, padding=1)

  def forward(self, x, temb, ctx):
    h = self.conv_in(x)
    h = self.down_blocks[0].resnets[0](h, temb)
    h = self.down_blocks[0].attentions[0](h, ctx)
    return self.conv_out(h)


# ---------------------------------------------------------------- flax


def _conv(features, k, name):
  return fnn.Conv(features, (k, k), padding=k // 2, name=name)


def _gn(name, eps=1e-5):
  return fnn.GroupNorm(G, epsilon=eps, name=name)


class FAttn(fnn.Module):
  @fnn.compact
  def __call__(self, x, ctx=None):
    ctx = x if ctx is None else ctx
    q = fnn.Dense(C, use_bias=False, name="to_q")(x)
    k = fnn.Dense(C, use_bias=False, name="to_k")(ctx)
    v = fnn.Dense(C, use_bias=False, name="to_v")(ctx)
    a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / C ** 0.5, -1)
    return fnn.Dense(C, name="to_out_0")(a @ v)


class FResnet(fnn.Module):
  @fnn.compact
  def __call__(self, x, temb):
    h = _conv(C, 3, "conv1")(jax.nn.silu(_gn("norm1")(x)))
    h = h + fnn.Dense(C, name="time_emb_proj")(jax.nn.silu(temb))[:, None, None]
    return x + _conv(C, 3, "conv2")(jax.nn.silu(_gn("norm2")(h)))


class FNet0(fnn.Module):  # diffusers' GEGLU: ff.net.0.proj
  @fnn.compact
  def __call__(self, x):
    return fnn.Dense(4 * C, name="proj")(x)


class FFeedForward(fnn.Module):
  @fnn.compact
  def __call__(self, x):
    h, gate = jnp.split(FNet0(name="net_0")(x), 2, -1)
    return fnn.Dense(C, name="net_2")(h * jax.nn.gelu(gate, approximate=False))


class FBlock(fnn.Module):
  @fnn.compact
  def __call__(self, x, ctx):
    ln = lambda n: fnn.LayerNorm(epsilon=1e-5, name=n)
    x = x + FAttn(name="attn1")(ln("norm1")(x))
    x = x + FAttn(name="attn2")(ln("norm2")(x), ctx)
    return x + FFeedForward(name="ff")(ln("norm3")(x))


class FTransformer(fnn.Module):
  @fnn.compact
  def __call__(self, x, ctx):
    n, hh, ww, c = x.shape
    y = _conv(C, 1, "proj_in")(_gn("norm", 1e-6)(x)).reshape(n, hh * ww, c)
    y = FBlock(name="transformer_blocks_0")(y, ctx)
    return x + _conv(C, 1, "proj_out")(y.reshape(n, hh, ww, c))


class FDown(fnn.Module):
  @fnn.compact
  def __call__(self, h, temb, ctx):
    return FTransformer(name="attentions_0")(FResnet(name="resnets_0")(h, temb), ctx)


class FTinySD(fnn.Module):
  """NHWC inside; takes and returns NCHW like the torch twin."""

  @fnn.compact
  def __call__(self, x, temb, ctx):
    h = _conv(C, 3, "conv_in")(jnp.transpose(x, (0, 2, 3, 1)))
    h = FDown(name="down_blocks_0")(h, temb, ctx)
    return jnp.transpose(_conv(4, 3, "conv_out")(h), (0, 3, 1, 2))


def torch_to_flax(state_dict):
  """torch state dict -> nested Flax params (names: `.<i>` -> `_<i>`)."""
  out = {}
  for key, v in state_dict.items():
    v = v.detach().numpy()
    parts = key.split(".")
    path = []
    for p in parts[:-1]:
      if p.isdigit():
        path[-1] = f"{path[-1]}_{p}"
      else:
        path.append(p)
    leaf = parts[-1]
    if leaf == "weight":
      if v.ndim == 4:
        leaf, v = "kernel", np.transpose(v, (2, 3, 1, 0))
      elif v.ndim == 2:
        leaf, v = "kernel", v.T
      else:
        leaf = "scale"
    node = out
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(v)
  return out

"""A small character-level GPT in flax.linen.

Parameter paths are part of the experiments' contract (LoRA targets are
picked by path), e.g. for block 0::

    params/embed/embedding               (vocab, d)
    params/pos/embedding                 (max_len, d)
    params/block_0/attn/query/kernel     (d, heads, head_dim)   also key, value
    params/block_0/attn/out/kernel       (heads, head_dim, d)
    params/block_0/mlp/fc1/kernel        (d, mlp)
    params/block_0/mlp/fc2/kernel        (mlp, d)
    params/head/kernel                   (d, vocab)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# GPT-2's embedding scale; flax's default Embed init (unit variance) makes
# the residual stream start far larger than the attention/MLP updates.
_EMBED_INIT = nn.initializers.normal(stddev=0.02)


@dataclass(frozen=True)
class GPTConfig:
  """Sizes of the GPT. ``mlp=None`` means the usual ``4 * d_model``."""

  vocab: int
  d_model: int = 128
  n_heads: int = 4
  n_layers: int = 2
  mlp: Optional[int] = None
  max_len: int = 128
  dropout: float = 0.0

  @property
  def mlp_dim(self) -> int:
    return 4 * self.d_model if self.mlp is None else self.mlp

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError("d_model must be divisible by n_heads")


class MLP(nn.Module):
  """``(B, T, d) -> (B, T, d)`` through ``fc1`` (d -> mlp), gelu, ``fc2``."""

  config: GPTConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    h = nn.gelu(nn.Dense(self.config.mlp_dim, name="fc1")(x))
    h = nn.Dense(self.config.d_model, name="fc2")(h)
    return nn.Dropout(self.config.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; ``x (B, T, d)``, ``mask (B, 1, T, T)``."""

  config: GPTConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    cfg = self.config
    h = nn.LayerNorm(name="ln_1")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=cfg.n_heads,
        qkv_features=cfg.d_model,
        out_features=cfg.d_model,
        dropout_rate=cfg.dropout,
        name="attn",
    )(h, mask=mask, deterministic=deterministic)
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + MLP(cfg, name="mlp")(h, deterministic=deterministic)


class GPT(nn.Module):
  """Decoder-only transformer: int32 tokens ``(B, T)`` -> logits ``(B, T, vocab)``.

  ``T`` must not exceed ``config.max_len``. Dropout (if ``config.dropout``)
  needs ``deterministic=False`` and a ``'dropout'`` rng.
  """

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):
    cfg = self.config
    _, t = tokens.shape
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len {cfg.max_len}")
    x = nn.Embed(cfg.vocab, cfg.d_model, embedding_init=_EMBED_INIT, name="embed")(tokens)
    pos = nn.Embed(cfg.max_len, cfg.d_model, embedding_init=_EMBED_INIT, name="pos")
    x = x + pos(jnp.arange(t))
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    mask = nn.make_causal_mask(tokens)
    for i in range(cfg.n_layers):
      x = Block(cfg, name=f"block_{i}")(x, mask, deterministic=deterministic)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(cfg.vocab, name="head")(x)


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats.

  ``logits`` ``(..., vocab)``, int ``targets`` ``(...)``; returns a scalar.
  The log-softmax runs in float32 so a bf16 model still gets an exact loss.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)
  return -jnp.mean(picked)


def bits_per_char(nats):
  """Convert a per-character loss from nats to bits."""
  return nats / math.log(2.0)

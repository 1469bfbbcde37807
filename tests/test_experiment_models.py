"""Tests for the reference GPT / UNet models and the DDPM helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import diffusion_utils as dfu
from experiments.models import (GPT, GPTConfig, UNet, UNetConfig, bits_per_char, lm_loss,
                                timestep_embedding)


def _paths(tree):
  """``{'params/a/b': shape}`` for every leaf (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def _numpy_params(model, *args, seed=0):
  # Random params without model.init: XLA on CPU takes ~10 s to compile
  # the UNet's init (one partitionable-threefry draw per parameter), while
  # the structure from eval_shape is free and any non-degenerate values
  # serve these tests. Shapes and paths are exactly those init produces.
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(s):
    fan_in = max(1, int(np.prod(s.shape[:-1])))
    return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree.map(fill, shapes)


# --- GPT -------------------------------------------------------------------

GPT_CFG = GPTConfig(vocab=98, d_model=32, n_heads=4, n_layers=2, max_len=16)


@pytest.fixture(scope="module")
def gpt():
  model = GPT(GPT_CFG)
  variables = _numpy_params(model, jnp.zeros((2, 16), jnp.int32))
  return model, variables, jax.jit(model.apply)


def test_gpt_param_paths_and_shapes(gpt):
  _, variables, _ = gpt
  p = _paths(variables)
  d, h, hd, v = 32, 4, 8, 98
  for i in range(2):
    b = f"params/block_{i}"
    for name in ("query", "key", "value"):
      assert p[f"{b}/attn/{name}/kernel"] == (d, h, hd)
    assert p[f"{b}/attn/out/kernel"] == (h, hd, d)
    assert p[f"{b}/mlp/fc1/kernel"] == (d, 4 * d)
    assert p[f"{b}/mlp/fc2/kernel"] == (4 * d, d)
  assert p["params/embed/embedding"] == (v, d)
  assert p["params/pos/embedding"] == (16, d)
  assert p["params/head/kernel"] == (d, v)
  assert "params/block_2/attn/query/kernel" not in p


def test_gpt_default_config_shapes():
  cfg = GPTConfig(vocab=98)
  p = _paths(jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert cfg.mlp_dim == 512 and cfg.head_dim == 32
  assert p["params/block_1/attn/query/kernel"] == (128, 4, 32)
  assert p["params/block_1/attn/out/kernel"] == (4, 32, 128)
  assert p["params/block_1/mlp/fc1/kernel"] == (128, 512)
  assert p["params/pos/embedding"] == (128, 128)
  with pytest.raises(ValueError):
    GPTConfig(vocab=10, d_model=30, n_heads=4)


def test_gpt_logits_shape(gpt):
  _, variables, apply = gpt
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 98)
  logits = apply(variables, tokens)
  assert logits.shape == (2, 16, 98) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())


def test_gpt_is_causal(gpt):
  _, variables, apply = gpt
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 98)
  t = 6
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 17) % 98)
  a, b = apply(variables, tokens), apply(variables, changed)
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
  # The check has teeth: later positions do see the change ...
  assert float(jnp.abs(a[:, t + 1:] - b[:, t + 1:]).max()) > 1e-3
  # ... and position t sees a change at t itself.
  c = apply(variables, tokens.at[:, t].set((tokens[:, t] + 1) % 98))
  assert float(jnp.abs(a[:, t] - c[:, t]).max()) > 1e-3


def test_gpt_rejects_too_long_input(gpt):
  model, variables, _ = gpt
  with pytest.raises(ValueError):
    model.apply(variables, jnp.zeros((1, 17), jnp.int32))


def test_gpt_dropout_uses_rng():
  cfg = GPTConfig(vocab=11, d_model=16, n_heads=2, n_layers=1, max_len=8, dropout=0.5)
  model = GPT(cfg)
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  variables = _numpy_params(model, tokens)

  @jax.jit
  def run(key):
    return model.apply(variables, tokens, deterministic=False, rngs={"dropout": key})

  a, b = run(jax.random.key(0)), run(jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_allclose(a, run(jax.random.key(0)))


def test_lm_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(3, 5))
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  expected = -np.take_along_axis(logp, targets[..., None], -1).mean()
  got = lm_loss(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  uniform = lm_loss(jnp.zeros((2, 4, 98)), jnp.zeros((2, 4), jnp.int32))
  np.testing.assert_allclose(uniform, math.log(98), rtol=1e-6)
  np.testing.assert_allclose(bits_per_char(uniform), math.log2(98), rtol=1e-6)
  assert bits_per_char(math.log(2)) == pytest.approx(1.0)


# --- UNet ------------------------------------------------------------------

UNET_CFG = UNetConfig(channels=(8, 16), ctx_dim=8, groups=4, attn_heads=2, time_dim=16)
X = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
T = jnp.array([5, 50, 150], jnp.int32)
Y = jnp.array([0, 3, 9], jnp.int32)


@pytest.fixture(scope="module")
def unet():
  model = UNet(UNET_CFG)
  params = _numpy_params(model, X, T, Y)
  return model, params, jax.jit(model.apply)


def test_unet_cross_attention_param_names():
  model = UNet()  # default config
  shapes = jax.eval_shape(model.init, jax.random.key(0), X, T, Y)
  p = _paths(shapes)
  c0, c1, ctx = 32, 64, 32
  for block, c in (("attn_0", c0), ("attn_1", c1), ("mid_attn", c1), ("up_attn_0", c0)):
    assert p[f"params/{block}/to_q/kernel"] == (c, c)
    assert p[f"params/{block}/to_k/kernel"] == (ctx, c)
    assert p[f"params/{block}/to_v/kernel"] == (ctx, c)
    assert p[f"params/{block}/to_out/kernel"] == (c, c)
    # diffusers' q/k/v projections are bias-free; to_out has a bias.
    assert f"params/{block}/to_q/bias" not in p
    assert p[f"params/{block}/to_out/bias"] == (c,)
  assert p["params/label_embed/embedding"] == (10, ctx)
  assert p["params/start_token"] == (1, 1, ctx)
  assert p["params/res_0/conv_1/kernel"] == (3, 3, c0, c0)
  assert p["params/down_1/kernel"] == (3, 3, c0, c1)
  assert p["params/up_res_0/skip/kernel"] == (1, 1, 2 * c0, c0)
  assert p["params/conv_out/kernel"] == (3, 3, c0, 1)
  out = jax.eval_shape(model.apply, shapes, X, T, Y)
  assert out.shape == (3, 8, 8, 1)


def test_unet_output_shape(unet):
  _, params, apply = unet
  eps = apply(params, X, T, Y)
  assert eps.shape == (3, 8, 8, 1) and eps.dtype == jnp.float32
  assert bool(jnp.isfinite(eps).all())


def test_unet_output_depends_on_label_per_example(unet):
  _, params, apply = unet
  a = apply(params, X, T, Y)
  b = apply(params, X, T, Y.at[0].set(7))
  assert float(jnp.abs(a[0] - b[0]).max()) > 1e-4
  # No leakage across the batch (GroupNorm is per example).
  np.testing.assert_allclose(a[1:], b[1:], atol=1e-6)


def test_unet_output_depends_on_time(unet):
  _, params, apply = unet
  a = apply(params, X, T, Y)
  b = apply(params, X, T + 20, Y)
  assert float(jnp.abs(a - b).max()) > 1e-4
  # A scalar t is broadcast over the batch (shape check only: a second
  # compile for the value would cost more than it tells).
  assert jax.eval_shape(apply, params, X, 50, Y).shape == (3, 8, 8, 1)


def test_timestep_embedding_matches_formula():
  t = jnp.array([0.0, 1.0, 37.0])
  emb = timestep_embedding(t, 6, max_period=100.0)
  freqs = 100.0 ** (-np.arange(3) / 3)
  args = np.array([0.0, 1.0, 37.0])[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-5)
  assert timestep_embedding(t, 7).shape == (3, 7)


# --- diffusion -------------------------------------------------------------


@pytest.mark.parametrize("make", [dfu.cosine_schedule, dfu.linear_schedule])
def test_schedules(make):
  s = make(200)
  assert s.betas.shape == s.alpha_bars.shape == (200,)
  # float32 betas vs a float64 product: the tiny tail values differ ~1e-5.
  np.testing.assert_allclose(s.alpha_bars, np.cumprod(1 - s.betas.astype(np.float64)), rtol=1e-4)
  assert (np.diff(s.alpha_bars) < 0).all()
  assert s.alpha_bars[0] > 0.99 and s.alpha_bars[-1] < 1e-3
  assert ((s.betas > 0) & (s.betas < 1)).all()


def test_q_sample_formula():
  s = dfu.default_schedule()
  x0 = jnp.ones((2, 8, 8, 1))
  noise = -jnp.ones((2, 8, 8, 1))
  xt = dfu.q_sample(x0, jnp.array([0, 199]), noise)
  for i, t in enumerate((0, 199)):
    ab = float(s.alpha_bars[t])
    np.testing.assert_allclose(xt[i], math.sqrt(ab) - math.sqrt(1 - ab), rtol=1e-5, atol=1e-6)


def _oracle(x0):
  """A perfect noise model for data that is always ``x0``."""
  ab = jnp.asarray(dfu.default_schedule().alpha_bars)

  def apply_fn(params, x, t, labels):
    a = ab[t].reshape(-1, 1, 1, 1)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  return apply_fn


def test_ddpm_loss_bounds():
  x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(256, 8, 8, 1)), jnp.float32)
  labels = jnp.zeros((256,), jnp.int32)
  key = jax.random.key(3)
  assert float(dfu.ddpm_loss(_oracle(x0), None, x0, labels, key)) < 1e-6
  # Predicting zero noise costs E[noise^2] = 1.
  zero = dfu.ddpm_loss(lambda p, x, t, y: jnp.zeros_like(x), None, x0, labels, key)
  assert abs(float(zero) - 1.0) < 0.05
  grad = jax.grad(lambda w: dfu.ddpm_loss(lambda p, x, t, y: p * x, w, x0, labels, key))(0.0)
  assert np.isfinite(grad) and grad != 0


# Not steps=1: a single jump from t = T-1 divides by sqrt(alpha_bar) ~ 2e-4,
# which turns float32 rounding into ~1e-3 error; any later step at a small t
# re-estimates x0 from a well-conditioned point and removes it.
@pytest.mark.parametrize("steps", [2, 20])
def test_ddim_recovers_data_under_oracle(steps):
  x0 = jnp.asarray(np.random.default_rng(2).uniform(-0.9, 0.9, size=(4, 8, 8, 1)), jnp.float32)
  labels = jnp.zeros((4,), jnp.int32)
  out = dfu.ddim_sample(_oracle(x0), None, labels, jax.random.key(0), steps=steps)
  np.testing.assert_allclose(out, x0, atol=1e-4)


def test_ddim_with_unet_is_deterministic_and_bounded(unet):
  model, params, _ = unet
  sample = jax.jit(lambda p, k: dfu.ddim_sample(model.apply, p, Y, k, steps=5))
  a, b = sample(params, jax.random.key(0)), sample(params, jax.random.key(0))
  c = sample(params, jax.random.key(1))
  assert a.shape == (3, 8, 8, 1)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert float(jnp.abs(a).max()) <= 1.0
  with pytest.raises(ValueError):
    dfu.ddim_sample(model.apply, params, Y, jax.random.key(0), steps=0)

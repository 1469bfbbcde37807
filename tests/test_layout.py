"""Kernels stored output-first: an adapter's input side is the side the model contracts.

The reference model is transformers' GPT-2 ``Conv1D`` layout: a ``(out, in)``
kernel used as ``x @ kernel.T``. The expected numbers come from NumPy and PEFT's
own formula for such layers (``delta = s · B @ A`` with ``A (r, in)``, ``B (out, r)``),
not from jlora's math.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import randomize


class Conv1D(nn.Module):
  """transformers' FlaxConv1D: kernel (features, in), y = x @ kernel.T + bias."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.5), (self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ()))) + bias


class GPT2Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    qkv = Conv1D(3 * x.shape[-1], name="c_attn")(x)
    return x + Conv1D(x.shape[-1], name="c_proj")(jnp.tanh(qkv[..., : x.shape[-1]]))


X = jax.random.normal(jax.random.key(5), (2, 7, 32))


def _block():
  model = GPT2Block()
  return model, model.init(jax.random.key(0), X)


def test_split_read_from_the_model_is_input_side(key):
  model, params = _block()
  cfg = jlora.LoraConfig(rank=4, targets=["c_attn"], dora=True)
  (ad,) = jlora.adapters(jlora.init(key, params, cfg, fn=model.apply, args=(X,)))
  assert ad.kernel.shape == (96, 32)
  assert ad.out_first and ad.a.shape == (4, 32) and ad.b.shape == (96, 4)
  assert ad.m.shape == (96,)  # one magnitude per output feature
  # kaiming: U(±1/sqrt(fan_in)) with fan_in = 32, the contracted side
  bound = float(jnp.abs(ad.a).max())
  assert 0.9 / math.sqrt(32) < bound <= 1 / math.sqrt(32)
  # DoRA's m starts at the norm of each output row over the inputs
  np.testing.assert_allclose(ad.m, np.linalg.norm(np.asarray(ad.kernel), axis=1), rtol=1e-6)
  assert "(out, in)" in jlora.summary(jlora.init(key, params, cfg, fn=model.apply, args=(X,)),
                                      print_fn=None)


def test_in_axes_override_gives_the_same_layout(key):
  model, params = _block()
  traced = jlora.init(key, params, jlora.LoraConfig(rank=4, targets=["c_attn", "c_proj"]),
                      fn=model.apply, args=(X,))
  by_hand = jlora.init(key, params, jlora.LoraConfig(rank=4, targets=["c_attn", "c_proj"],
                                                     in_axes={"c_": -1}))
  for a, b in zip(jlora.adapters(traced), jlora.adapters(by_hand)):
    assert a.a.shape == b.a.shape and a.b.shape == b.b.shape
    np.testing.assert_array_equal(a.a, b.a)
  # in_axes=1 on a traced (out, in) kernel is an explicit choice, and it is honoured
  forced = jlora.init(key, params, jlora.LoraConfig(rank=4, targets=["c_attn"], in_axes={"c_attn": 1}),
                      fn=model.apply, args=(X,))
  assert jlora.adapters(forced)[0].a.shape == (96, 4)


def test_merge_is_pefts_formula(key):
  model, params = _block()
  cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=["c_attn"])
  adapted = randomize(jlora.init(key, params, cfg, fn=model.apply, args=(X,)), key)
  (ad,) = jlora.adapters(adapted)
  w, a, b = (np.asarray(v, np.float64) for v in (ad.kernel, ad.a, ad.b))
  want = w + 2.0 * b @ a  # PEFT, fan_in_fan_out=False layout: W (out, in) + s · B @ A
  np.testing.assert_allclose(jlora.merge(adapted)["params"]["c_attn"]["kernel"], want, rtol=1e-5,
                             atol=1e-6)


def test_dora_merge_against_numpy(key):
  model, params = _block()
  cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=["c_attn"], dora=True)
  adapted = randomize(jlora.init(key, params, cfg, fn=model.apply, args=(X,)), key)
  (ad,) = jlora.adapters(adapted)
  w, a, b, m = (np.asarray(v, np.float64) for v in (ad.kernel, ad.a, ad.b, ad.m))
  v = w + 2.0 * b @ a
  want = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(jlora.merge(adapted)["params"]["c_attn"]["kernel"], want, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_factored_without_fallback_and_trains(key, dora):
  model, params = _block()
  cfg = jlora.LoraConfig(rank=4, targets=["c_attn", "c_proj"], dora=dora)
  adapted = randomize(jlora.init(key, params, cfg, fn=model.apply, args=(X,)), key, 0.1)
  fact = jlora.lora(model.apply, on_fallback="error")
  np.testing.assert_allclose(fact(adapted, X), model.apply(jlora.merge(adapted), X),
                             rtol=1e-4, atol=1e-4)
  y = jnp.sin(X)
  loss = lambda p, x: jnp.mean((fact(p, x) - y) ** 2)
  tx = jlora.optimizer(optax.adam(1e-2), adapted)
  step = jlora.train_step(loss, tx, donate=False)
  p, state = adapted, tx.init(adapted)
  losses = []
  for _ in range(4):
    p, state, l = step(p, state, X)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  # factored gradients equal the merged ones
  _, g_fact = jlora.value_and_grad(loss)(adapted, X)
  merged_loss = lambda p, x: jnp.mean((jlora.lora(model.apply, mode="merged")(p, x) - y) ** 2)
  _, g_ref = jlora.value_and_grad(merged_loss)(adapted, X)
  for a, b in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rank_error_names_the_real_sides(key):
  model, params = _block()
  with pytest.raises(ValueError, match=r"min\(in, out\) = min\(32, 96\) \(in shape \(32,\), out shape \(96,\)\)"):
    jlora.init(key, params, jlora.LoraConfig(rank=40, targets=["c_attn"]), fn=model.apply, args=(X,))


def test_full_rank_square_output_first_is_refused(key):
  params = {"lin": {"kernel": jnp.ones((6, 6))}}
  with pytest.raises(ValueError, match="output-first.*rank-6"):
    jlora.init(key, params, jlora.LoraConfig(rank=6, in_axes={"lin": -1}))
  (ad,) = jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=5, in_axes={"lin": -1})))
  assert ad.out_first and ad.a.shape == (5, 6)


def test_use_that_fits_no_layout_is_reported(key):
  """A kernel (a, b, c) contracted over axes 0 and 2: no adapter layout expresses it."""
  params = {"w": {"kernel": jax.random.normal(key, (3, 4, 5))}}
  fn = lambda p, x: jnp.einsum("nac,abc->nb", x, p["w"]["kernel"])
  x = jnp.ones((2, 3, 5))
  with pytest.raises(ValueError, match=r"contracts its axes \[0, 2\].*in_axes"):
    jlora.init(key, params, jlora.LoraConfig(rank=2), fn=fn, args=(x,))
  # with an explicit split it is built, and runs exactly through the merged fallback
  adapted = randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, in_axes={"w": 2}),
                                 fn=fn, args=(x,)), key)
  with pytest.warns(jlora.LoraFallbackWarning):
    out = jlora.lora(fn)(adapted, x)
  np.testing.assert_allclose(out, fn(jlora.merge(adapted), x), rtol=1e-5, atol=1e-5)


def test_out_first_multi_axis_einsum(key):
  """An out-projection stored (d, heads, head_dim) but contracted over (heads, head_dim)."""
  params = {"o": {"kernel": jax.random.normal(key, (8, 2, 3))}}
  fn = lambda p, h: jnp.einsum("thk,dhk->td", h, p["o"]["kernel"])
  h = jax.random.normal(key, (5, 2, 3))
  adapted = randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, dora=True), fn=fn,
                                 args=(h,)), key)
  (ad,) = jlora.adapters(adapted)
  assert ad.a.shape == (2, 2, 3) and ad.b.shape == (8, 2) and ad.m.shape == (8,)
  out = jlora.lora(fn, on_fallback="error")(adapted, h)
  np.testing.assert_allclose(out, fn(jlora.merge(adapted), h), rtol=1e-5, atol=1e-5)
  w, a, b = (np.asarray(v, np.float64) for v in (ad.kernel, ad.a, ad.b))
  v = w + np.einsum("dr,rhk->dhk", b, a)  # scale 1
  want = np.asarray(ad.m)[:, None, None] * v / np.sqrt((v ** 2).sum(axis=(1, 2), keepdims=True))
  np.testing.assert_allclose(jlora.merge(adapted)["o"]["kernel"], want, rtol=1e-5, atol=1e-6)

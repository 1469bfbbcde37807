"""``jlora.lora(fn)``: factored application equals the merged reference.

For every kernel kind and every transformation the contract lists, the factored
outputs and the A/B gradients must match ``fn(jlora.merge(params))`` (rtol 1e-4).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from helpers import (LinenNet, NNXNet, TOKENS, adapter_grads, kernel_shaped_products, plain_fn,
                     plain_params, randomize)

ALL = r"(kernel|embedding)$"


def _adapted(key, params, fn=None, args=(), **cfg):
  cfg = jlora.LoraConfig(**{"rank": 2, "alpha": 3.0, "targets": ALL, **cfg})
  return randomize(jlora.init(key, params, cfg, fn=fn, args=args), jax.random.fold_in(key, 7), scale=0.2)


def _loss(out):
  return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))


def assert_factored_matches_merged(fn, params, *args, rtol=1e-4, atol=1e-5, unroll=0):
  """Outputs and adapter gradients, factored vs merged, with fallbacks as errors."""
  fact = jlora.lora(fn, on_fallback="error", unroll_max_rank=unroll)
  ref = jlora.lora(fn, mode="merged")
  for a, b in zip(jax.tree.leaves(fact(params, *args)), jax.tree.leaves(ref(params, *args))):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
  ga = adapter_grads(jax.grad(lambda p: _loss(fact(p, *args)))(params))
  gb = adapter_grads(jax.grad(lambda p: _loss(ref(p, *args)))(params))
  assert ga.keys() == gb.keys() and ga
  for p in ga:
    scale = float(np.abs(gb[p]).max()) + 1e-6
    np.testing.assert_allclose(ga[p] / scale, gb[p] / scale, rtol=rtol, atol=rtol, err_msg=p)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("unroll", [0, 16])
def test_linen_every_kind(key, dora, unroll):
  model = LinenNet()
  params = _adapted(key, model.init(key, TOKENS), model.apply, (TOKENS,), dora=dora)
  assert len(jlora.adapters(params)) == 9
  assert_factored_matches_merged(model.apply, params, TOKENS, unroll=unroll)


@pytest.mark.parametrize("conv", [
    dict(features=5, kernel_size=(3,), strides=(2,)),
    dict(features=5, kernel_size=(3,), kernel_dilation=(2,), padding="SAME"),
    dict(features=4, kernel_size=(3, 3), padding="VALID"),
    dict(features=4, kernel_size=(2, 2, 2), strides=(1, 2, 1)),
    dict(features=3, kernel_size=(1, 1)),
])
@pytest.mark.parametrize("dora", [False, True])
def test_conv_variants(key, conv, dora):
  model = nn.Conv(**conv)
  x = jax.random.normal(key, (2,) + (6,) * len(conv["kernel_size"]) + (3,))
  params = _adapted(key, model.init(key, x), model.apply, (x,), rank=1, dora=dora)
  assert_factored_matches_merged(model.apply, params, x)


def test_embed_lookup_and_attend(key):
  """A tied embedding: a gather for the lookup, a transposed matmul for the logits."""
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, t):
      emb = nn.Embed(11, 6, name="embed")
      return emb.attend(jnp.tanh(emb(t)))
  model = Tied()
  params = _adapted(key, model.init(key, TOKENS), model.apply, (TOKENS,))
  assert jlora.adapters(params)[0].a.shape == (11, 2)
  assert_factored_matches_merged(model.apply, params, TOKENS)


def test_nnx_functional(key):
  graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
  fn = lambda s, t: nnx.merge(graphdef, s)(t)
  params = _adapted(key, state, fn, (TOKENS,))
  assert len(jlora.adapters(params)) == 4
  assert_factored_matches_merged(fn, params, TOKENS)


def test_plain_function(key):
  params = _adapted(key, plain_params(key), plain_fn, (jnp.ones((3, 6)), jnp.ones((2, 5, 5, 2))),
                    targets=r"/w$")
  x = jax.random.normal(key, (3, 6))
  img = jax.random.normal(key, (2, 5, 5, 2))
  assert_factored_matches_merged(plain_fn, params, x, img)


def test_under_jit_and_vmap(key):
  model = LinenNet()
  params = _adapted(key, model.init(key, TOKENS), model.apply, (TOKENS,))
  fact = jax.jit(jlora.lora(model.apply, on_fallback="error"))
  ref = model.apply(jlora.merge(params), TOKENS)
  np.testing.assert_allclose(fact(params, TOKENS), ref, rtol=1e-4, atol=1e-5)
  # vmap over examples, each a (1, T) sequence
  per_ex = jax.vmap(lambda t: jlora.lora(model.apply, on_fallback="error")(params, t[None])[0])(TOKENS)
  np.testing.assert_allclose(per_ex, ref, rtol=1e-4, atol=1e-5)


def test_vmap_over_adapters(key):
  """Per-example adapters: vmap over a stack of adapter trees, shared base."""
  model = nn.Dense(4)
  x = jax.random.normal(key, (3, 5))
  base = model.init(key, x)
  trees = [_adapted(jax.random.key(i), base) for i in range(3)]
  adapters = jax.tree.map(lambda *xs: jnp.stack(xs), *[jlora.partition(t)[0] for t in trees])
  f = lambda ad, xi: jlora.lora(model.apply, on_fallback="error")(jlora.combine(ad, base), xi)
  got = jax.vmap(f)(adapters, x)
  want = jnp.stack([model.apply(jlora.merge(t), x[i]) for i, t in enumerate(trees)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
    return x + nn.Dense(x.shape[-1], name="fc")(nn.gelu(h)), None


class _ScanNet(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block) if self.remat else _Block
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize("remat", [False, True])
def test_nn_scan_over_layers(key, remat):
  model = _ScanNet(remat=remat)
  x = jax.random.normal(key, (2, 4, 8))
  params = _adapted(key, model.init(key, x), model.apply, (x,))
  ads = jlora.adapters(params)
  assert ads and all(a.n_stack == 1 and a.a.shape[0] == 3 for a in ads)
  assert_factored_matches_merged(model.apply, params, x)


def test_remat_and_user_scan_in_plain_code(key):
  ws = {"layers": {"w": jax.random.normal(key, (4, 6, 6)) / 3}, "head": {"w": jnp.ones((6, 2))}}

  def fn(p, x):
    step = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
    h, _ = jax.lax.scan(step, x, p["layers"]["w"])
    return h @ p["head"]["w"]
  x = jax.random.normal(key, (3, 6))
  params = _adapted(key, ws, fn, (x,), targets=r"/w$")
  assert jlora.adapters(params)[1].n_stack == 1  # read from the scan
  assert_factored_matches_merged(fn, params, x)


def test_fallback_is_exact_and_reported_once(key):
  def fn(p, x):  # the kernel also enters an elementwise op: no factored rule
    w = p["d"]["kernel"]
    return x @ w + jnp.sum(w * w)
  params = _adapted(key, {"d": {"kernel": jax.random.normal(key, (5, 3))}})
  x = jnp.ones((2, 5))
  wrapped = jlora.lora(fn)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = wrapped(params, x)
    wrapped(params, x)
  msgs = [str(w.message) for w in caught if issubclass(w.category, jlora.LoraFallbackWarning)]
  assert len(msgs) == 1 and "'d/kernel'" in msgs[0] and "`mul`" in msgs[0]
  np.testing.assert_allclose(out, fn(jlora.merge(params), x), rtol=1e-5)
  with pytest.raises(NotImplementedError, match="d/kernel"):
    jlora.lora(fn, on_fallback="error")(params, x)


def test_dropout_needs_rng_and_is_inverted(key):
  model = nn.Dense(64, use_bias=False)
  x = jnp.ones((512, 32))
  params = jlora.init(key, model.init(key, x), jlora.LoraConfig(rank=4, dropout=0.5))
  params = randomize(params, key)
  fact = jlora.lora(model.apply, on_fallback="error")
  ref = model.apply(jlora.merge(params), x)
  np.testing.assert_allclose(fact(params, x), ref, rtol=1e-4, atol=1e-5)  # no rng: off
  a = fact(params, x, lora_rng=jax.random.key(1))
  b = fact(params, x, lora_rng=jax.random.key(2))
  assert not np.allclose(a, ref) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, fact(params, x, lora_rng=jax.random.key(1)))
  # inverted dropout keeps the mean of the adapter branch
  base = model.apply(jlora.partition(params)[1], x)
  np.testing.assert_allclose(jnp.mean(a - base), jnp.mean(ref - base), rtol=0.1, atol=1e-2)


def test_without_adapters_is_the_plain_function(key):
  model = nn.Dense(3)
  x = jnp.ones((2, 4))
  params = model.init(key, x)
  np.testing.assert_array_equal(jlora.lora(model.apply)(params, x), model.apply(params, x))


def test_bad_mode():
  with pytest.raises(ValueError, match="mode"):
    jlora.lora(lambda p: p, mode="fast")


def test_linen_rngs_mutable_and_bf16_kernel(key):
  """model.apply's own kwargs pass through: rngs, mutable collections, bf16 compute."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      h = nn.Dropout(0.5, deterministic=not train)(nn.Dense(16)(x))
      h = nn.BatchNorm(use_running_average=not train)(h)
      return nn.Dense(4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(h)
  model, x = Net(), jax.random.normal(key, (3, 8))
  variables = model.init({"params": key, "dropout": key}, x, train=False)
  params = randomize(jlora.init(key, variables, jlora.LoraConfig(rank=2, dtype="float32")), key, 0.2)
  kw = dict(train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
  out, upd = jlora.lora(model.apply, on_fallback="error")(params, x, **kw)
  ref, ref_upd = model.apply(jlora.merge(params), x, **kw)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(upd["batch_stats"]["BatchNorm_0"]["mean"],
                             ref_upd["batch_stats"]["BatchNorm_0"]["mean"], rtol=1e-5, atol=1e-6)


def test_partial_contraction_falls_back_exactly(key):
  """A kernel with two input axes used by an einsum that contracts only one of them."""
  params = _adapted(key, {"w": {"kernel": jax.random.normal(key, (2, 3, 4))}}, in_axes={"w": 2})
  fn = lambda p, x: jnp.einsum("bk,hkd->bhd", x, p["w"]["kernel"])
  x = jax.random.normal(key, (5, 3))
  with pytest.warns(jlora.LoraFallbackWarning, match=r"dot_general` \(it contracts only some of the kernel.s input axes\)"):
    out = jlora.lora(fn)(params, x)
  np.testing.assert_allclose(out, fn(jlora.merge(params), x), rtol=1e-5, atol=1e-6)


class _WideNarrow(nn.Module):
  """Dense layers in both aspect ratios, 3-D tokens with bias, and attention (square)."""

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(64, name="up")(x))                      # 20 -> 64
    x = x + nn.Dense(20, name="down")(h)                          # 64 -> 20
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=40, out_features=40,
                                           name="attn")(x)


@pytest.mark.parametrize("dora", [False, True])
def test_high_rank_whole_matmul(key, dora):
  # Above unroll_max_rank (0 by default) a Dense-layout product runs as one lora_matmul (with
  # concatenated operands where that is cheaper); it must still equal the merged reference.
  model = _WideNarrow()
  x = jax.random.normal(key, (2, 5, 20))
  base = model.init(key, x)["params"]
  params = _adapted(key, {"params": base}, model.apply, (x,), rank=18, dora=dora,
                    targets=r"kernel$")
  assert_factored_matches_merged(model.apply, params, x)
  jaxpr = str(jax.make_jaxpr(lambda p: jlora.lora(model.apply)(p, x))(params))
  assert jaxpr.count("lora_matmul") >= 6, "the high-rank path was not taken"
  # ... and under jit of a vmap over examples
  batched = lambda p, xs: jax.vmap(lambda xi: model.apply(p, xi))(xs)
  assert_factored_matches_merged(jax.jit(batched), params, jnp.stack([x, 2 * x, -x]))


# -- the walker: every control-flow and call primitive ------------------------------


def test_traced_once_per_signature(key):
  calls = []

  def fn(p, x):
    calls.append(1)
    return x @ p["d"]["kernel"]
  params = _adapted(key, {"d": {"kernel": jax.random.normal(key, (4, 3))}})
  wrapped = jlora.lora(fn, on_fallback="error")
  for _ in range(3):
    wrapped(params, jnp.ones((2, 4)))
  assert len(calls) == 1
  wrapped(params, jnp.ones((5, 4)))  # a new shape traces again
  assert len(calls) == 2
  # the arrays of each call are used, not the traced ones
  other = jax.tree.map(lambda v: v * 2, params)
  np.testing.assert_allclose(wrapped(other, jnp.ones((2, 4))),
                             fn(jlora.merge(other), jnp.ones((2, 4))), rtol=1e-5)


def test_custom_vjp_keeps_the_users_rule_and_says_so(key):
  @jax.custom_vjp
  def clipped_matmul(x, w):  # a user's matmul whose backward clips the cotangent
    return x @ w
  clipped_matmul.defvjp(lambda x, w: (x @ w, (x, w)),
                        lambda res, g: (jnp.clip(g, -0.1, 0.1) @ res[1].T,
                                        res[0].T @ jnp.clip(g, -0.1, 0.1)))
  fn = lambda p, x: clipped_matmul(x, p["d"]["kernel"])
  params = _adapted(key, {"d": {"kernel": jax.random.normal(key, (4, 3))}})
  x = jax.random.normal(key, (2, 4))
  with pytest.warns(jlora.LoraFallbackWarning, match="custom_vjp_call.*custom derivative rule"):
    out = jlora.lora(fn)(params, x)
  np.testing.assert_allclose(out, fn(jlora.merge(params), x), rtol=1e-5)
  loss = lambda f: lambda p: jnp.sum(3 * f(p, x))
  g = adapter_grads(jax.grad(loss(jlora.lora(fn, on_fallback="ignore")))(params))
  g_ref = adapter_grads(jax.grad(loss(jlora.lora(fn, mode="merged")))(params))
  for p in g:  # the clipping rule applied: same as merged, not autodiff of x @ w
    np.testing.assert_allclose(g[p], g_ref[p], rtol=1e-5, atol=1e-6)


def test_loop_over_stacked_kernels_closed_over(key):
  """``lax.fori_loop`` over layers picks ``W[i]``: dynamic_slice + squeeze of a stack axis."""
  ws = {"layers": {"w": jax.random.normal(key, (4, 6, 6)) / 3}}

  def fn(p, x):
    return jax.lax.fori_loop(0, 4, lambda i, h: jnp.tanh(h @ p["layers"]["w"][i]), x)
  x = jax.random.normal(key, (3, 6))
  params = _adapted(key, ws, fn, (x,), targets=r"/w$")
  (ad,) = jlora.adapters(params)
  assert ad.n_stack == 1 and ad.a.shape == (4, 6, 2)  # the loop index picks a stack axis
  assert_factored_matches_merged(fn, params, x)
  # and with static indices, W[0] and W[3]
  static = lambda p, x: jnp.tanh(x @ p["layers"]["w"][0]) @ p["layers"]["w"][3]
  assert_factored_matches_merged(static, params, x)


def test_while_and_cond(key):
  ws = {"a": {"kernel": jax.random.normal(key, (5, 5)) / 2},
        "b": {"kernel": jax.random.normal(key, (5, 5)) / 2}}

  def fn(p, x, n):
    h = jax.lax.cond(jnp.sum(x) > 0, lambda h: h @ p["a"]["kernel"], lambda h: -h @ p["b"]["kernel"], x)
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["a"]["kernel"])),
                              (0, h))[1]
  x = jax.random.normal(key, (2, 5))
  params = _adapted(key, ws, fn, (x, 3))
  for sign in (1.0, -1.0):
    got = jlora.lora(fn, on_fallback="error")(params, sign * jnp.abs(x), 3)
    np.testing.assert_allclose(got, fn(jlora.merge(params), sign * jnp.abs(x), 3), rtol=1e-5,
                               atol=1e-6)
  # cond is differentiable: factored gradients equal merged ones
  assert_factored_matches_merged(lambda p, x: jax.lax.cond(
      jnp.sum(x) > 0, lambda h: h @ p["a"]["kernel"], lambda h: -h @ p["b"]["kernel"], x),
      params, x)


def test_optimization_barrier_keeps_factoring(key):
  fn = lambda p, x: jax.lax.optimization_barrier((p["d"]["kernel"], x))[1] @ \
      jax.lax.optimization_barrier((p["d"]["kernel"], x))[0]
  params = _adapted(key, {"d": {"kernel": jax.random.normal(key, (4, 3))}})
  assert_factored_matches_merged(fn, params, jax.random.normal(key, (2, 4)))


def test_no_weight_gradient_is_traced_for_frozen_kernels(key):
  """At the jaxpr level, before XLA can drop anything: with respect to the *whole*
  params tree, the factored path makes no kernel-shaped product (``W`` is behind
  ``stop_gradient``), while the merged path does."""
  model = LinenNet()
  tokens = jnp.arange(15).reshape(3, 5) % 11  # 15 rows: no activation has a kernel's shape
  params = _adapted(key, model.init(key, tokens), model.apply, (tokens,),
                    targets=r"(fc1|fc2|conv)/kernel$")
  shapes = {tuple(sorted(a.kernel.shape)) for a in jlora.adapters(params)}
  loss = lambda mode: lambda p: jnp.sum(jlora.lora(model.apply, mode=mode)(p, tokens) ** 2)
  assert kernel_shaped_products(jax.make_jaxpr(jax.grad(loss("factored")))(params), shapes) == []
  assert kernel_shaped_products(jax.make_jaxpr(jax.grad(loss("merged")))(params), shapes)


def test_dora_gradients_against_a_hand_written_model(key):
  """DoRA's norm is a constant to autodiff (paper Sec. 4.3). The reference is written
  out by hand: W' = m · V / sg(‖V‖), V = W + s·A@B, for a Dense kernel (in, out)."""
  w = jax.random.normal(key, (6, 5))
  params = _adapted(key, {"d": {"kernel": w}}, dora=True)
  (ad,) = jlora.adapters(params)
  x = jax.random.normal(jax.random.key(3), (4, 6))

  def by_hand(a, b, m):
    v = w + 1.5 * a @ b  # scale alpha/rank = 3/2
    return jnp.sum(jnp.sin(x @ (m * v / jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0)))))
  want = jax.grad(by_hand, argnums=(0, 1, 2))(ad.a, ad.b, ad.m)
  for mode in ("factored", "merged"):
    fn = jlora.lora(lambda p, x: x @ p["d"]["kernel"], mode=mode)
    _, g = jlora.value_and_grad(lambda p: jnp.sum(jnp.sin(fn(p, x))))(params)
    for got, ref in zip((g["d"]["lora_a"], g["d"]["lora_b"], g["d"]["lora_m"]), want):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6, err_msg=mode)

"""The params transform: init, merge, partition/combine, counts, and bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st

import jlora
from jlora import tree as tree_lib
from helpers import LinenNet, NNXNet, TOKENS, kernels, plain_params, randomize


# -- property tests over random kernels ------------------------------------------

def _cfg(n_stack, n_in, rank, **kw):
  return jlora.LoraConfig(rank=rank, targets=r"(kernel|embedding)$",
                          in_axes={"layer": n_in}, stack_axes={"layer": n_stack}, **kw)


@given(kernels(), st.sampled_from(["kaiming", "gaussian"]), st.booleans())
def test_merge_of_init_is_identity_bitwise(case, init, dora):
  params, n_stack, n_in, rank = case
  adapted = jlora.init(jax.random.key(1), params, _cfg(n_stack, n_in, rank, init=init, dora=dora))
  merged = jlora.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    if dora:  # m * W / ||W|| rounds; it is W up to a few ulps
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(a, b)


@given(kernels(), st.booleans())
def test_combine_inverts_partition(case, dora):
  params, n_stack, n_in, rank = case
  adapted = jlora.init(jax.random.key(2), params, _cfg(n_stack, n_in, rank, dora=dora, dropout=0.1))
  adapter, base = jlora.partition(adapted)
  assert jax.tree.structure(base) == jax.tree.structure(params)
  assert all(p[-1] in ("lora_a", "lora_b", "lora_scale", "lora_m", "lora_dropout")
             for p in tree_lib.flatten(adapter))
  back = jlora.combine(adapter, base)
  assert jax.tree.structure(back) == jax.tree.structure(adapted)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapted)):
    np.testing.assert_array_equal(a, b)


def _numpy_delta(w, a, b, s, n_stack):
  """The merged delta by NumPy tensordot, one stacked layer at a time."""
  w, a, b, s = (np.asarray(v, np.float64) for v in (w, a, b, s))
  if n_stack == 0:
    return s * np.tensordot(a, b, axes=1)
  return np.stack([_numpy_delta(w[i], a[i], b[i], s[i], n_stack - 1) for i in range(w.shape[0])])


@given(kernels(), st.booleans(), st.floats(0.5, 32))
def test_merge_matches_numpy_tensordot(case, rslora, alpha):
  params, n_stack, n_in, rank = case
  adapted = randomize(jlora.init(jax.random.key(3), params,
                                 _cfg(n_stack, n_in, rank, rslora=rslora, alpha=alpha)),
                      jax.random.key(4))
  (ad,) = jlora.adapters(adapted)
  expected_scale = alpha / (math.sqrt(rank) if rslora else rank)
  np.testing.assert_allclose(ad.scale, np.full(ad.scale.shape, expected_scale), rtol=1e-6)
  want = np.asarray(ad.kernel, np.float64) + _numpy_delta(ad.kernel, ad.a, ad.b, ad.scale, n_stack)
  got = tree_lib.flatten(jlora.merge(adapted))[ad.path]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@given(kernels())
def test_dora_merge_is_magnitude_times_direction(case):
  params, n_stack, n_in, rank = case
  adapted = randomize(jlora.init(jax.random.key(5), params, _cfg(n_stack, n_in, rank, dora=True)),
                      jax.random.key(6))
  (ad,) = jlora.adapters(adapted)
  v = np.asarray(ad.kernel, np.float64) + _numpy_delta(ad.kernel, ad.a, ad.b, ad.scale, n_stack)
  in_axes = tuple(range(n_stack, n_stack + n_in))
  norm = np.sqrt((v ** 2).sum(axis=in_axes, keepdims=True))
  m = np.expand_dims(np.asarray(ad.m, np.float64), in_axes)
  got = tree_lib.flatten(jlora.merge(adapted))[ad.path]
  np.testing.assert_allclose(got, m * v / norm, rtol=1e-4, atol=1e-5)


@given(kernels(), st.booleans())
def test_count_params_is_sum_of_r_in_plus_out(case, dora):
  params, n_stack, n_in, rank = case
  adapted = jlora.init(jax.random.key(7), params, _cfg(n_stack, n_in, rank, dora=dora))
  (ad,) = jlora.adapters(adapted)
  shape = ad.kernel.shape
  layers = math.prod(shape[:n_stack])
  fan_in, fan_out = math.prod(shape[n_stack:n_stack + n_in]), math.prod(shape[n_stack + n_in:])
  want = layers * (rank * (fan_in + fan_out) + (fan_out if dora else 0))
  count = jlora.count_params(adapted)
  assert count.trainable == want
  assert count.total == want + sum(np.size(x) for x in jax.tree.leaves(params))


# -- inits -----------------------------------------------------------------------

def test_kaiming_bound_and_zero_b(key):
  params = {"d": {"kernel": jnp.ones((256, 64))}}
  (ad,) = jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=8)))
  assert float(jnp.abs(ad.a).max()) <= 1 / 16 and float(jnp.abs(ad.a).max()) > 0.9 / 16
  assert not np.any(np.asarray(ad.b))


def test_gaussian_std_is_one_over_rank(key):
  params = {"d": {"kernel": jnp.ones((512, 64))}}
  (ad,) = jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=8, init="gaussian")))
  assert abs(float(jnp.std(ad.a)) - 1 / 8) < 0.01


def test_embedding_gets_zero_a_and_normal_b(key):
  params = {"e": {"embedding": jnp.ones((50, 16))}}
  (ad,) = jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=4, targets=["e"])))
  assert not np.any(np.asarray(ad.a))
  assert 0.7 < float(jnp.std(ad.b)) < 1.3


@pytest.mark.parametrize("how", ["pissa", "olora"])
@pytest.mark.parametrize("shape,n_in", [((12, 7), 1), ((3, 4, 6), 2)])
def test_residual_inits_keep_the_model_and_return_the_residual(key, how, shape, n_in):
  w = jax.random.normal(key, shape)
  params = {"lin": {"kernel": w}}
  cfg = jlora.LoraConfig(rank=3, alpha=6.0, init=how, in_axes={"lin": n_in})
  adapted = jlora.init(jax.random.key(1), params, cfg)
  (ad,) = jlora.adapters(adapted)
  assert not np.allclose(ad.kernel, w)  # the base in the tree is the residual
  np.testing.assert_allclose(jlora.merge(adapted)["lin"]["kernel"], w, atol=2e-5)
  w2 = np.asarray(w, np.float64).reshape(math.prod(shape[:n_in]), -1)
  d2 = np.asarray(ad.kernel - w, np.float64).reshape(w2.shape)
  if how == "pissa":  # s*A@B is the best rank-3 approximation of W
    u, s, vh = np.linalg.svd(w2)
    np.testing.assert_allclose(-d2, (u[:, :3] * s[:3]) @ vh[:3], atol=2e-5)
  else:  # A@B is W's projection onto its first 3 QR directions; PEFT subtracts s times it
    q, _ = np.linalg.qr(w2.T)
    np.testing.assert_allclose(-d2, 2.0 * (q[:, :3] @ q[:, :3].T @ w2.T).T, atol=2e-5)


def test_float32_adapters_on_bf16_kernel(key):
  params = {"d": {"kernel": jnp.ones((16, 8), jnp.bfloat16)}}
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=2, dtype="float32"))
  (ad,) = jlora.adapters(adapted)
  assert ad.a.dtype == jnp.float32 and ad.b.dtype == jnp.float32
  assert jlora.merge(adapted)["d"]["kernel"].dtype == jnp.bfloat16
  default = jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=2)))[0]
  assert default.a.dtype == jnp.bfloat16


def test_keys_are_per_path(key):
  """Adding a target does not reshuffle another adapter's init (lorax drew keys in order)."""
  params = {"a": {"kernel": jnp.ones((8, 8))}, "b": {"kernel": jnp.ones((8, 8))}}
  one = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=["b"]))
  two = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=["a", "b"]))
  np.testing.assert_array_equal(one["b"]["lora_a"], two["b"]["lora_a"])


def test_init_leaves_input_untouched(key):
  params = {"d": {"kernel": jnp.ones((4, 4))}}
  jlora.init(key, params, jlora.LoraConfig(rank=2, init="pissa"))
  assert set(params["d"]) == {"kernel"}
  np.testing.assert_array_equal(params["d"]["kernel"], 1.0)


# -- targets and splits ----------------------------------------------------------

def test_targets_three_forms_select_the_same(key):
  params = LinenNet().init(key, TOKENS)
  forms = [r"attn/(query|value)/kernel$", ["query", "value"],
           lambda p, leaf: p.endswith(("query/kernel", "value/kernel"))]
  chosen = [sorted(a.name for a in jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=2, targets=t))))
            for t in forms]
  assert chosen[0] == chosen[1] == chosen[2] == [
      "params/attn/query/kernel", "params/attn/value/kernel"]


def test_exclude_is_checked_first(key):
  params = LinenNet().init(key, TOKENS)
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=r"kernel$", exclude=["attn"]))
  paths = {a.name for a in jlora.adapters(adapted)}
  assert paths and not any("attn" in p for p in paths)


def test_default_split_of_flax_attention(key):
  params = LinenNet().init(key, TOKENS)
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=["query", "out"]))
  ads = {a.path[-2]: a for a in jlora.adapters(adapted)}
  assert ads["query"].a.shape == (8, 2) and ads["query"].b.shape == (2, 2, 4)
  assert ads["out"].a.shape == (2, 4, 2) and ads["out"].b.shape == (2, 8)


def test_split_read_from_the_model(key):
  """The einsum kernel (d, heads, k) contracts only d; the default rule would say (d, heads)."""
  model = LinenNet()
  params = model.init(key, TOKENS)
  cfg = jlora.LoraConfig(rank=2, targets=r"(kernel|embedding)$")
  ads = {a.name: a for a in jlora.adapters(jlora.init(key, params, cfg, fn=model.apply, args=(TOKENS,)))}
  assert ads["params/head/kernel"].a.shape == (8, 2)
  assert ads["params/head/kernel"].b.shape == (2, 3, 2)
  assert ads["params/conv/kernel"].a.shape == (3, 8, 2)
  assert ads["params/embed/embedding"].a.shape == (11, 2)
  default = {a.name: a for a in jlora.adapters(jlora.init(key, params, cfg))}
  assert default["params/head/kernel"].a.shape == (8, 3, 2)


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    block = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = block(name="stack")(x, None)
    return x


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(x.shape[-1], name="fc")(x)), None


def test_stacked_split_read_from_nn_scan(key):
  x = jnp.ones((2, 6))
  model = _Scanned()
  params = model.init(key, x)
  assert params["params"]["stack"]["fc"]["kernel"].shape == (3, 6, 6)
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=2), fn=model.apply, args=(x,))
  (ad,) = jlora.adapters(adapted)
  assert (ad.n_stack, ad.a.shape, ad.b.shape, ad.scale.shape) == (1, (3, 6, 2), (3, 2, 6), (3,))


def test_nnx_state_and_plain_dict(key):
  graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
  adapted = jlora.init(key, state, jlora.LoraConfig(rank=2, targets=r"(kernel|embedding)$"))
  assert isinstance(adapted, nnx.State)
  assert isinstance(adapted["fc1"]["lora_a"], nnx.LoRAParam)
  merged = jlora.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(state)
  nnx.merge(graphdef, merged)  # the merged state fits the module again

  params = plain_params(key)
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=r"/w$"))
  assert set(adapted["layer1"]) == {"w", "b", "w_lora_a", "w_lora_b", "w_lora_scale"}
  assert jax.tree.structure(jlora.merge(adapted)) == jax.tree.structure(params)


def test_rank_and_alpha_patterns(key):
  params = LinenNet().init(key, TOKENS)
  cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=["fc1", "fc2"],
                         rank_pattern={"fc1": 4}, alpha_pattern={"fc2": 1.0})
  ads = {a.path[-2]: a for a in jlora.adapters(jlora.init(key, params, cfg))}
  assert ads["fc1"].rank == 4 and float(ads["fc1"].scale) == 1.0
  assert ads["fc2"].rank == 2 and float(ads["fc2"].scale) == 0.5


def test_unmerge_inverts_merge(key):
  params = LinenNet().init(key, TOKENS)
  adapted = randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, targets=r"kernel$")), key)
  back = jlora.unmerge(jlora.merge(adapted), jlora.partition(adapted)[0])
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapted)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  dora = jlora.init(key, params, jlora.LoraConfig(rank=2, dora=True, targets=["fc1"]))
  with pytest.raises(ValueError, match="DoRA"):
    jlora.unmerge(jlora.merge(dora), dora)


def test_summary_lists_layers(key):
  params = LinenNet().init(key, TOKENS)
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=["query", "fc1"]))
  text = jlora.summary(adapted, print_fn=None)
  assert "params/attn/query/kernel" in text and "params/fc1/kernel" in text
  c = jlora.count_params(adapted)
  assert f"{c.trainable:,}" in text and "%" in text


# -- bad input -------------------------------------------------------------------

def test_no_match_lists_candidates(key):
  params = LinenNet().init(key, TOKENS)
  with pytest.raises(ValueError, match=r"matched no kernel.*params/attn/query/kernel"):
    jlora.init(key, params, jlora.LoraConfig(targets=r"attn/qeury/kernel$"))


@pytest.mark.parametrize("kw", [{"rank": 0}, {"rank": -1}, {"rank": 2.5}, {"alpha": 0},
                                {"init": "xavier"}, {"dropout": 1.0}, {"targets": 3},
                                {"rank_pattern": {"(": 2}}, {"dtype": "int32"}])
def test_config_rejects(kw):
  with pytest.raises((ValueError, TypeError)):
    jlora.LoraConfig(**kw)


def test_rank_above_min_in_out(key):
  with pytest.raises(ValueError, match=r"rank 5 .*'d/kernel'.*min\(in, out\) = min\(8, 4\)"):
    jlora.init(key, {"d": {"kernel": jnp.ones((8, 4))}}, jlora.LoraConfig(rank=5))


def test_non_float_kernel(key):
  with pytest.raises(TypeError, match="'d/kernel' has dtype int32"):
    jlora.init(key, {"d": {"kernel": jnp.ones((8, 4), jnp.int32)}}, jlora.LoraConfig(rank=2))


def test_pattern_key_matching_nothing(key):
  cfg = jlora.LoraConfig(rank=2, rank_pattern={"nope": 4})
  with pytest.raises(ValueError, match="rank_pattern key 'nope'"):
    jlora.init(key, {"d": {"kernel": jnp.ones((8, 4))}}, cfg)


def test_init_twice(key):
  adapted = jlora.init(key, {"d": {"kernel": jnp.ones((8, 4))}}, jlora.LoraConfig(rank=2))
  with pytest.raises(ValueError, match="already has adapters"):
    jlora.init(key, adapted, jlora.LoraConfig(rank=2))


def test_combine_shape_mismatch_names_path(key):
  adapted = jlora.init(key, {"d": {"kernel": jnp.ones((8, 4))}}, jlora.LoraConfig(rank=2))
  adapter, _ = jlora.partition(adapted)
  with pytest.raises(ValueError, match="'d/kernel' does not fit"):
    jlora.combine(adapter, {"d": {"kernel": jnp.ones((6, 4))}})
  with pytest.raises(ValueError, match="'d/lora_a'.* no complete adapter"):
    jlora.combine(adapter, {"e": {"kernel": jnp.ones((8, 4))}})


def test_grouped_conv_is_refused(key):
  model = nn.Conv(4, (3,), feature_group_count=2)
  x = jnp.ones((1, 5, 4))
  params = model.init(key, x)
  with pytest.raises(ValueError, match="grouped convolution"):
    jlora.init(key, params, jlora.LoraConfig(rank=1), fn=model.apply, args=(x,))


def test_non_container_params():
  with pytest.raises(TypeError, match="params tree of dicts"):
    jlora.init(jax.random.key(0), jnp.ones((2, 2)), jlora.LoraConfig(rank=1))


def test_selector_regex_is_searched_not_matched(key):
  params = {"enc": {"q": {"kernel": jnp.ones((4, 4))}}}
  assert jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=1, targets="q/kernel")))


def test_nnx_partition_base_fits_the_module(key):
  graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
  adapted = jlora.init(key, state, jlora.LoraConfig(rank=2, targets=["fc1", "fc2"]))
  adapter, base = jlora.partition(adapted)
  nnx.merge(graphdef, base)
  assert {p[-1] for p in tree_lib.flatten(adapter)} == {"lora_a", "lora_b", "lora_scale"}
  back = jlora.combine(adapter, base)
  assert jax.tree.structure(back) == jax.tree.structure(adapted)


def test_deltas_are_merged_minus_base(key):
  params = {"d": {"kernel": jax.random.normal(key, (6, 4))}}
  adapted = randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, alpha=5.0)), key)
  (path, d), = jlora.deltas(adapted).items()
  np.testing.assert_allclose(d, jlora.merge(adapted)["d"]["kernel"] - params["d"]["kernel"], atol=1e-6)


def test_embedding_b_is_standard_normal(key):
  """PEFT's embedding init: A = 0, B ~ N(0, 1): checked on 32768 draws (std to ~0.4%)."""
  params = {"e": {"embedding": jnp.ones((8, 4096))}}
  (ad,) = jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=8, targets=["e"])))
  b = np.asarray(ad.b, np.float64)
  assert abs(b.std() - 1.0) < 0.03 and abs(b.mean()) < 0.03


def test_bf16_merge_is_computed_in_float32(key):
  """``W + s·A@B`` is formed in float32 and rounded once to bf16 (NumPy reference);
  forming it in bf16 rounds the product first and misses ~20% of the elements."""
  import ml_dtypes
  w = jax.random.normal(key, (64, 48)).astype(jnp.bfloat16)
  adapted = randomize(jlora.init(key, {"d": {"kernel": w}}, jlora.LoraConfig(rank=16, alpha=5.0)),
                      jax.random.key(1))
  (ad,) = jlora.adapters(adapted)
  f32 = lambda v: np.asarray(v, np.float32)
  want = (f32(ad.kernel) + np.float32(5 / 16) * (f32(ad.a) @ f32(ad.b))).astype(ml_dtypes.bfloat16)
  got = np.asarray(jlora.merge(adapted)["d"]["kernel"])
  assert got.dtype == want.dtype
  assert np.mean(got != want) < 0.01

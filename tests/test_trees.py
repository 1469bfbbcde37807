"""Every params tree survives every transform: keys, lists, NNX containers, and which
leaves count as adapters."""

import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from helpers import randomize


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _odd_tree(key):
  k = jax.random.split(key, 4)
  return {
      "layers": [{"kernel": jax.random.normal(k[0], (4, 5))},
                 {"kernel": jax.random.normal(k[1], (5, 3)), "bias": jnp.zeros(3)}],
      "pair": ({"w": jax.random.normal(k[2], (3, 3))}, jnp.ones(2)),
      "a/b": {"kernel": jax.random.normal(k[3], (3, 2))},
      "ints": {7: {"kernel": jnp.ones((2, 2))}, 3: {"kernel": jnp.ones((2, 2))}},
  }


def test_lists_tuples_int_keys_and_slashes_survive(key):
  params = _odd_tree(key)
  cfg = jlora.LoraConfig(rank=1, targets=r"(kernel|/w)$", dora=True)
  adapted = randomize(jlora.init(key, params, cfg), key)
  paths = {a.path for a in jlora.adapters(adapted)}
  assert paths == {("layers", 0, "kernel"), ("layers", 1, "kernel"), ("pair", 0, "w"),
                   ("a/b", "kernel"), ("ints", 7, "kernel"), ("ints", 3, "kernel")}
  assert isinstance(adapted["layers"], list) and isinstance(adapted["pair"], tuple)
  assert set(adapted["ints"][7]) == {"kernel", "lora_a", "lora_b", "lora_scale", "lora_m"}
  merged = jlora.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  adapter, base = jlora.partition(adapted)
  _assert_same_tree(base, params)
  _assert_same_tree(jlora.combine(adapter, base), adapted)
  count = jlora.count_params(adapted)
  assert count.trainable == sum(a.a.size + a.b.size + a.m.size for a in jlora.adapters(adapted))


def test_unadapted_list_element_keeps_its_place(key):
  params = {"layers": [{"kernel": jnp.ones((3, 3))}, {"kernel": jnp.ones((3, 3))}]}
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=1, targets=r"layers/1/"))
  adapter, base = jlora.partition(adapted)
  assert adapter["layers"][0] is None and set(adapter["layers"][1]) == {"lora_a", "lora_b",
                                                                         "lora_scale"}
  _assert_same_tree(jlora.combine(adapter, base), adapted)


def test_name_collision_is_refused(key):
  params = {"a/b": {"kernel": jnp.ones((2, 2))}, "a": {"b": {"kernel": jnp.ones((2, 2))}}}
  with pytest.raises(ValueError, match="same name 'a/b/kernel'"):
    jlora.init(key, params, jlora.LoraConfig(rank=1))
  with pytest.raises(ValueError, match="same name"):
    jlora.merge(params)


def test_kernel_in_a_list_position_is_refused_by_name(key):
  with pytest.raises(ValueError, match="'ws/0' sits under the key 0"):
    jlora.init(key, {"ws": [jnp.ones((3, 3))]}, jlora.LoraConfig(rank=1, targets=r"ws/0$"))


def test_nnx_list_state_keeps_int_keys(key):
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
      for layer in self.layers:
        x = jnp.tanh(layer(x))
      return x
  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jnp.ones((3, 4))
  adapted = randomize(jlora.init(key, state, jlora.LoraConfig(rank=2), fn=fn, args=(x,)), key)
  assert {a.path for a in jlora.adapters(adapted)} == {("layers", 0, "kernel"), ("layers", 1, "kernel")}
  merged = jlora.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(state)
  np.testing.assert_allclose(jlora.lora(fn, on_fallback="error")(adapted, x), fn(merged, x),
                             rtol=1e-5, atol=1e-6)


def test_only_complete_adapters_count(key):
  """A user leaf named like an adapter leaf is a base leaf: not trained, not split off."""
  params = {"router": {"gate": jnp.ones((4, 4)), "gate_lora_m": jnp.ones(4)},
            "fc": {"kernel": jnp.ones((4, 3))}}
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=1, targets=["fc"]))
  adapter, base = jlora.partition(adapted)
  assert "router" not in adapter
  assert set(base["router"]) == {"gate", "gate_lora_m"}
  mask = jlora.trainable_mask(adapted)
  assert mask["router"]["gate_lora_m"] is False and mask["fc"]["lora_a"] is True
  count = jlora.count_params(adapted)
  assert count.trainable == 4 + 3
  tx = jlora.optimizer(optax.sgd(1.0), adapted)
  grads = jax.tree.map(jnp.ones_like, adapted)
  updates, _ = tx.update(grads, tx.init(adapted), adapted)
  assert not np.any(updates["router"]["gate_lora_m"])


def test_flax_nnx_lora_params_are_not_refused(key):
  """``nnx.LoRALinear`` holds its own lora_a/lora_b (no lora_scale): a base, not an adapter."""
  model = nnx.LoRALinear(6, 4, lora_rank=2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  adapted = jlora.init(key, state, jlora.LoraConfig(rank=1, targets=r"/?kernel$"))
  assert [a.path for a in jlora.adapters(adapted)] == [("kernel",)]
  assert set(jlora.partition(adapted)[1]["lora"]) == {"lora_a", "lora_b"}


def test_adapter_leaf_name_taken_is_refused(key):
  params = {"d": {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 1))}}
  with pytest.raises(ValueError, match=r"already has leaves at \['d/lora_a'\]"):
    jlora.init(key, params, jlora.LoraConfig(rank=1, targets=["d"]))


def test_combine_refuses_an_adapted_base(key):
  adapted = jlora.init(key, {"d": {"kernel": jnp.ones((4, 4))}}, jlora.LoraConfig(rank=1))
  adapter, _ = jlora.partition(adapted)
  with pytest.raises(ValueError, match="already has adapters"):
    jlora.combine(adapter, adapted)
  other = jlora.init(key, {"e": {"kernel": jnp.ones((4, 4))}}, jlora.LoraConfig(rank=1))
  with pytest.raises(ValueError, match="already has adapters.*'e/kernel'"):
    jlora.combine(adapter, {**other, "d": {"kernel": jnp.ones((4, 4))}})


def test_frozen_dict_and_empty_collections(key):
  variables = nn.Dense(3).init(key, jnp.ones((1, 4)))
  variables = {**variables, "batch_stats": {}}
  adapted = jlora.init(key, variables, jlora.LoraConfig(rank=1))
  assert adapted["batch_stats"] == {}
  merged = jlora.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(variables) and merged["batch_stats"] == {}


def test_leaf_path_given_as_a_module_name(key):
  params = {"attn": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((2, 2))}}}
  adapted = jlora.init(key, params, jlora.LoraConfig(rank=1, targets=["attn/query/kernel"]))
  assert [a.name for a in jlora.adapters(adapted)] == ["attn/query/kernel"]


def test_config_pickles_with_patterns():
  cfg = jlora.LoraConfig(rank=4, rank_pattern={"a": 2}, alpha_pattern={"b": 3.0},
                         in_axes={"c": -1}, stack_axes={"d": 1})
  back = pickle.loads(pickle.dumps(cfg))
  assert back == cfg and hash(back) == hash(cfg)
  with pytest.raises(TypeError, match="read-only"):
    back.rank_pattern["x"] = 1


@pytest.mark.parametrize("rslora", [False, True])
def test_alpha_none_is_scale_one(key, rslora):
  params = {"d": {"kernel": jnp.ones((16, 16))}}
  (ad,) = jlora.adapters(jlora.init(key, params, jlora.LoraConfig(rank=4, rslora=rslora)))
  assert float(ad.scale) == 1.0
  cfg = jlora.LoraConfig(rank=4, alpha=8.0, rslora=rslora)
  (ad,) = jlora.adapters(jlora.init(key, params, cfg))
  assert float(ad.scale) == (4.0 if rslora else 2.0)


def test_map_adapters_and_scale(key):
  params = {"d": {"kernel": jax.random.normal(key, (5, 4))}, "e": {"kernel": jnp.ones((4, 4))}}
  adapted = randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, alpha=4.0, dropout=0.1)), key)
  half = jlora.scale(adapted, 0.5)
  for a, b in zip(jlora.adapters(half), jlora.adapters(adapted)):
    np.testing.assert_allclose(a.scale, 0.5 * b.scale)
  _assert_same_tree(jlora.merge(jlora.scale(adapted, 0.0)), params)
  only_d = jlora.map_adapters(
      lambda ad: ad._replace(scale=ad.scale * 0) if ad.name == "e/kernel" else ad, adapted)
  np.testing.assert_array_equal(jlora.merge(only_d)["e"]["kernel"], params["e"]["kernel"])
  no_dropout = jlora.map_adapters(lambda ad: ad._replace(dropout=None), adapted)
  assert "lora_dropout" not in no_dropout["d"] and "lora_dropout" in adapted["d"]
  with pytest.raises(ValueError, match="does not fit"):
    jlora.map_adapters(lambda ad: ad._replace(b=ad.b[:1]), adapted)
  # a traced strength compiles once
  f = jax.jit(lambda p, s: jlora.merge(jlora.scale(p, s)))
  f(adapted, 0.3), f(adapted, 0.7)
  assert f._cache_size() == 1

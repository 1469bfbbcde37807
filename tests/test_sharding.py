"""The placement rule and ``jlora.shardings`` on one device; the mesh runs are in test_mesh.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, strategies as st
from jax.sharding import PartitionSpec as P

import jlora
from jlora import explicit, sharding
from jlora import tree as tree_lib
from jlora.adapter import Split

U = P.UNCONSTRAINED


@pytest.mark.parametrize("shape,split,spec,a,b,m", [
    # Dense (in, out)
    ((8, 6), Split(0, 1), P("x", "y"), P("x", None), P(None, "y"), P("y")),
    # a short spec pads with None; UNCONSTRAINED says nothing
    ((8, 6), Split(0, 1), P("x"), P("x", None), P(None, None), P(None)),
    ((8, 6), Split(0, 1), P(U, "y"), P(None, None), P(None, "y"), P("y")),
    # q/k/v (d, heads, head_dim): one input axis
    ((8, 4, 2), Split(0, 1), P(None, "model", None), P(None, None), P(None, "model", None),
     P("model", None)),
    # out-projection (heads, head_dim, d): two input axes
    ((4, 2, 8), Split(0, 2), P("model", None, None), P("model", None, None), P(None, None),
     P(None)),
    # conv (kh, kw, c_in, c_out)
    ((3, 3, 4, 6), Split(0, 3), P(None, None, "x", "y"), P(None, None, "x", None),
     P(None, "y"), P("y")),
    # output-first (out, in), as GPT-2's Conv1D: A = (r, in), B = (out, r)
    ((6, 8), Split(0, 1, True), P("y", "x"), P(None, "x"), P("y", None), P("y")),
    # nn.scan stack (L, in, out): the stack axis keeps its entry everywhere
    ((2, 8, 6), Split(1, 1), P("s", "x", "y"), P("s", "x", None), P("s", None, "y"),
     P("s", "y")),
    # several mesh axes on one kernel axis
    ((8, 6), Split(0, 1), P(("x", "y"), None), P(("x", "y"), None), P(None, None), P(None)),
])
def test_adapter_specs(shape, split, spec, a, b, m):
  got = sharding.adapter_specs(spec, split, len(shape))
  assert (got["lora_a"], got["lora_b"], got["lora_m"]) == (a, b, m)
  assert got["lora_scale"] == got["lora_dropout"] == P(*got["lora_m"][:split.n_stack])


@st.composite
def _layouts(draw):
  n_stack, n_in, n_out = draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
  out_first = draw(st.booleans())
  names = ["a", "b", "c", "d", "e", "f", "g", "h"]
  entries = [draw(st.sampled_from([None, names[i], (names[i], "z")]))
             for i in range(n_stack + n_in + n_out)]
  return Split(n_stack, n_in, out_first), entries


_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23)


@given(_layouts())
def test_every_adapter_axis_is_sharded_like_its_kernel_axis(layout):
  """Law: an adapter axis that is a kernel axis carries that axis' entry; the rank
  axis carries none. Axes are matched by size (all distinct primes, rank 2), so
  this reads the layout off ``Split``'s shapes, not off the rule's code."""
  split, entries = layout
  shape = _PRIMES[:len(entries)]
  by_size = dict(zip(shape, entries)) | {2: None}
  got = sharding.adapter_specs(P(*entries), split, len(shape))
  stack, _, outs = split.shapes(shape)
  for role, s in (("lora_a", split.a_shape(shape, 2)), ("lora_b", split.b_shape(shape, 2)),
                  ("lora_m", stack + outs), ("lora_scale", stack)):
    assert tuple(got[role]) == tuple(by_size[n] for n in s), role


def test_replicate_override():
  spec, split = P(("data", "model"), "model"), Split(0, 1)
  assert sharding.adapter_specs(spec, split, 2, replicate=True)["lora_a"] == P(None, None)
  dropped = sharding.adapter_specs(P(("data", "model"), None), split, 2, replicate=("data",))
  assert dropped["lora_a"] == P("model", None)
  assert sharding.adapter_specs(P("data", None), split, 2, replicate="data")["lora_a"] == \
      P(None, None)


def test_a_spec_longer_than_the_kernel_is_refused():
  with pytest.raises(ValueError, match="fc/kernel.*3 entries.*2 axes"):
    sharding.adapter_specs(P("x", None, None), Split(0, 1), 2, where="fc/kernel")


@pytest.mark.parametrize("group,sizes,ok,entry", [
    (("m", None), (4, 3), True, "m"),          # (heads@m, head_dim) -> m
    ((None, "m"), (4, 3), False, None),        # (heads, head_dim@m): not blocks
    (("d", "m"), (2, 8), True, ("d", "m")),    # one element per 'd' device, then 'm'
    (("d", "m"), (4, 8), False, None),         # 'd' holds 2 of 4: not blocks
    ((None, None), (4, 3), True, None),
    ((), (), True, None),
])
def test_merged_entry(group, sizes, ok, entry):
  assert explicit.merged(group, sizes, {"d": 2, "m": 4}) == (ok, entry)


def _params(key=jax.random.key(0)):
  base = {"enc": {"kernel": jax.random.normal(key, (8, 6)), "bias": jnp.zeros(6)}}
  return jlora.init(key, base, jlora.LoraConfig(rank=2))


def test_one_device_tree():
  params = _params()
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  assert all(s == dev for s in jax.tree.leaves(jlora.shardings(params)))
  tx = jlora.optimizer(optax.adam(1e-3), params)
  s = jlora.shardings(jax.eval_shape(tx.init, params), params=params)
  assert jax.tree.structure(s) == jax.tree.structure(tx.init(params))
  assert all(x == dev for x in jax.tree.leaves(s))


def test_an_abstract_leaf_without_sharding_is_refused():
  abstract = jax.eval_shape(_params)
  with pytest.raises(ValueError, match="'enc/(bias|kernel)' carries no sharding.*base="):
    jlora.shardings(abstract)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  base = {"enc": {"kernel": dev, "bias": dev}}
  s = jlora.shardings(abstract, base=base)
  assert set(tree_lib.flatten(s)) == set(tree_lib.flatten(abstract))
  assert all(x == dev for x in jax.tree.leaves(s))


def test_nnx_state_shardings_feed_jit():
  _, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  params = jlora.init(jax.random.key(1), state, jlora.LoraConfig(rank=2))
  s = jlora.shardings(params)
  assert isinstance(tree_lib.flatten(s)[("lora_a",)], nnx.Variable)
  out = jax.jit(lambda p: jax.tree.map(lambda v: v * 2, p), in_shardings=(s,), out_shardings=s)(
      params)
  np.testing.assert_array_equal(tree_lib.value(out["lora_a"]), 2 * tree_lib.value(params["lora_a"]))


def test_uncommitted_base_gives_uncommitted_adapters():
  params = _params()
  assert not any(getattr(v, "committed", False) for v in jax.tree.leaves(params))


def test_explicit_helpers_say_nothing_off_explicit_axes():
  x = jnp.ones((4, 3))
  assert explicit.typed(x) is None and explicit.entries(x) == (None, None)
  assert explicit.like(x, ("a", None)) is None
  assert explicit.reshard(x, None) is x
  assert explicit.merge_axes(jnp.ones((2, 3, 4)), [2, 1]).shape == (6, 4)
  assert explicit.split_axes(jnp.ones((6, 4)), [2, 1], (2, 3, 4), (None,) * 3).shape == (2, 3, 4)
  assert math.prod(explicit.merge_axes(jnp.ones((2, 3)), [0, 2]).shape) == 6


def test_stacked_adapters_and_quantized_kernels_follow_the_rule():
  """``jlora.stack_adapters`` trees get the rule's specs behind an unsharded adapter axis
  (``lora_ranks`` replicated), and a quantized kernel is read as the float kernel it stands
  for (4-bit codes pack its last axis). A 1x1 mesh: the specs are what is checked."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  at = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))
  base = {"q": {"kernel": jax.device_put(jax.random.normal(jax.random.key(0), (8, 2, 4)),
                                         at(None, "model", None))},
          "o": {"kernel": jax.device_put(jax.random.normal(jax.random.key(1), (2, 4, 8)),
                                         at("model", None, None))}}
  cfg = lambda r: jlora.LoraConfig(rank=r, targets=["q", "o"], in_axes={"q": 1, "o": 2})
  adapters = [jlora.partition(jlora.init(jax.random.key(i), base, cfg(r)))[0]
              for i, r in enumerate((2, 3))]
  s = jlora.shardings(jlora.combine(jlora.stack_adapters(adapters), base))
  spec = lambda leaf: tuple(leaf.spec) + (None,) * (4 - len(leaf.spec))
  assert spec(s["q"]["lora_a"])[:3] == (None, None, None)          # (n, d, r)
  assert spec(s["q"]["lora_b"])[:4] == (None, None, "model", None)  # (n, r, heads, head_dim)
  assert spec(s["o"]["lora_a"])[:4] == (None, "model", None, None)  # (n, heads, head_dim, r)
  assert spec(s["o"]["lora_ranks"])[:1] == (None,)
  q = jlora.quantize(base, ["q", "o"], bits=4, group_size=4)
  # quantize keeps the placement: codes and scales carry the kernel's entries
  assert spec(q["o"]["kernel"].sharding)[:3] == ("model", None, None)
  assert spec(q["q"]["quant_scale"].sharding)[:3] == (None, "model", None)
  got = jlora.shardings(jlora.init(jax.random.key(2), q, cfg(2)))
  assert spec(got["o"]["lora_a"])[:3] == ("model", None, None)
  assert spec(got["q"]["lora_b"])[:3] == (None, "model", None)

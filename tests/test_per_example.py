"""Per-example adapters: ``jlora.stack_adapters`` and ``wrapped(params, *args, adapter_ids=ids)``.

The reference for every output is the model run on one example at a time, with that example's
adapter merged into its kernels by ``jlora.merge`` (or the bare base for id -1).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import tree as tree_lib
from helpers import ScanDense, kinds_fn, kinds_model, random_adapted

B = 6


def _adapters(base, fn, args, specs, key=0, dora=False):
  """Adapter trees of different ranks and targets over one base (random A and B)."""
  out = []
  for i, (rank, targets) in enumerate(specs):
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, dora=dora)
    out.append(jlora.partition(random_adapted(base, cfg, fn=fn, args=args, seed=key + i))[0])
  return out


def _one_by_one(fn, base, adapters, ids, *args):
  """Each example alone (a batch of one) with its adapter merged; the outputs stacked."""
  run = jax.jit(lambda params, args: fn(params, *args))
  outs = []
  for b, i in enumerate(np.asarray(ids)):
    params = base if i < 0 else jlora.merge(jlora.combine(adapters[i], base))
    outs.append(run(params, [a[b:b + 1] for a in args]))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def kinds():
  base, args = kinds_model(batch=B)
  ads = _adapters(base, kinds_fn, args, [
      (2, r"(kernel|embedding)$"), (3, r"(fc|qkv|out)/kernel$"), (1, r"(conv|fc)/kernel$")])
  return base, args, ads


@functools.lru_cache
def _serve(mode="factored"):
  """A jitted ``wrapped(params, *args, adapter_ids=ids)``, one per mode for the module."""
  return jax.jit(lambda p, args, ids: jlora.lora(kinds_fn, mode=mode)(p, *args, adapter_ids=ids))


def test_each_example_runs_with_its_adapter(kinds):
  """Embedding, DenseGeneral in and out, Dense and conv kernels; ranks 2, 3, 1 padded to 3;
  targets differ; -1 is the base; factored and merged modes."""
  base, args, ads = kinds
  params = jlora.combine(jlora.stack_adapters(ads), base)
  ids = jnp.array([0, 1, 2, -1, 1, 0])
  want = _one_by_one(kinds_fn, base, ads, ids, *args)
  for mode in ("factored", "merged"):
    _close(_serve(mode)(params, args, ids), want)
  base_alone = kinds_fn(base, *[a[3:4] for a in args])
  got = _serve("factored")(params, args, ids)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(base_alone)):
    np.testing.assert_allclose(g[3], w[0], rtol=1e-6, atol=1e-7)  # -1: the base model


def test_gradient_is_the_sum_of_per_example_gradients():
  """Adapters 0-2 serve the batch; adapter 3 (another rank and targets, so every other
  adapter is zero-padded) serves no example and gets a zero gradient."""
  base, args = kinds_model(batch=B)
  ads = _adapters(base, kinds_fn, args, [(2, r"(kernel|embedding)$")] * 3 + [(3, "fc")])
  stacked = jlora.stack_adapters(ads)
  ids = jnp.array([1, 1, 0, -1, 2, 1])
  total = lambda out: sum(jnp.sum(jnp.sin(o)) for o in out)

  def loss(params, ids, *args):
    return total(jlora.lora(kinds_fn)(params, *args, adapter_ids=ids))

  _, g = jax.jit(jlora.value_and_grad(loss))(jlora.combine(stacked, base), ids, *args)
  g = tree_lib.flatten(g)
  grads_as_stack = {p: g.get(p, v) for p, v in tree_lib.flatten(stacked).items()}
  back = jlora.unstack_adapters(tree_lib.unflatten(grads_as_stack, stacked))
  # the reference: each example alone, its adapter merged (autodiff through jlora.merge)
  one = jax.jit(jlora.value_and_grad(
      lambda p, *args: total(jlora.lora(kinds_fn, mode="merged")(p, *args))))
  for i, adapter in enumerate(ads[:3]):
    want = None
    for b in np.flatnonzero(np.asarray(ids) == i):
      _, gb = one(jlora.combine(adapter, base), *[a[b:b + 1] for a in args])
      want = gb if want is None else jax.tree.map(jnp.add, want, gb)
    got = tree_lib.flatten(back[i])
    for p, v in tree_lib.flatten(want).items():
      np.testing.assert_allclose(got[p], v, rtol=1e-4, atol=1e-5, err_msg=f"{i} {p}")
  assert all(np.all(v == 0) for p, v in tree_lib.flatten(back[3]).items()
             if p[-1] in ("lora_a", "lora_b"))
  # the zero padding gets no gradient, so it stays zero under training (jlora.optimizer takes
  # the stacked tree like any other)
  assert np.all(np.asarray(g[("fc", "lora_a")])[:3, :, 2] == 0)
  params = jlora.combine(stacked, base)
  tx = jlora.optimizer(optax.adam(0.1), params)
  updates, _ = tx.update(tree_lib.unflatten(g, params), tx.init(params), params)
  new_a = params["fc"]["lora_a"] + tree_lib.flatten(updates)[("fc", "lora_a")]
  assert np.all(np.asarray(new_a)[:3, :, 2] == 0)
  assert not np.allclose(new_a, params["fc"]["lora_a"])


def test_scan_stacks_out_first_kernels_and_dora():
  """Adapters of nn.scan layers (a stack axis after the adapter axis), (out, in) kernels used
  as x @ W.T, and DoRA (id -1 must give the base exactly: magnitude ‖W‖)."""
  scan = ScanDense(features=5)
  x = jax.random.normal(jax.random.key(0), (B, 5))
  ids = jnp.array([1, 0, -1, 1, 0, 0])
  base = scan.init(jax.random.key(1), x)
  ads = _adapters(base, scan.apply, (x,), [(2, r"d/kernel$"), (1, r"d/kernel$")])
  stacked = jlora.stack_adapters(ads)
  assert stacked["params"]["layers"]["d"]["lora_a"].shape == (2, 3, 5, 2)
  serve = lambda fn: jax.jit(lambda p, x, ids: jlora.lora(fn)(p, x, adapter_ids=ids))
  got = serve(scan.apply)(jlora.combine(stacked, base), x, ids)
  _close(got, _one_by_one(scan.apply, base, ads, ids, x))

  torch_base = {"fc": {"w": jax.random.normal(jax.random.key(2), (7, 5))}}
  fn = lambda p, x: x @ p["fc"]["w"].T
  for dora in (False, True):
    ads = _adapters(torch_base, fn, (x,), [(2, r"w$"), (3, r"w$")], dora=dora)
    params = jlora.combine(jlora.stack_adapters(ads), torch_base)
    assert params["fc"]["w_lora_b"].shape == (2, 7, 3)  # (adapters, out, r)
    got = serve(fn)(params, x, ids)
    _close(got, _one_by_one(fn, torch_base, ads, ids, x))
    np.testing.assert_allclose(got[2], (x[2:3] @ torch_base["fc"]["w"].T)[0], rtol=1e-6,
                               atol=1e-7)


def test_partition_count_summary_and_unstack(kinds):
  base, args, ads = kinds
  stacked = jlora.stack_adapters({"a": ads[0], "b": ads[1], "c": ads[2]})
  params = jlora.combine(stacked, base)
  adapter, base_back = jlora.partition(params)
  assert jax.tree.structure(adapter) == jax.tree.structure(stacked)
  assert jax.tree.structure(base_back) == jax.tree.structure(base)
  # exact counts: each adapter at its own rank, not the padding
  want = sum(jlora.count_params(jlora.combine(a, base)).trainable for a in ads)
  assert jlora.count_params(params).trainable == want
  text = jlora.summary(params, print_fn=None)
  assert re.search(r"fc/kernel\s+dense \[3 adapters\].*\s2,3,1\s", text), text
  assert re.search(r"emb/embedding\s+embed \[3 adapters\].*\s2,0,0\s", text), text
  for a, b in zip(ads, jlora.unstack_adapters(stacked)):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_a_stacked_tree_is_never_read_as_one_adapter(kinds):
  base, args, ads = kinds
  params = jlora.combine(jlora.stack_adapters(ads), base)
  msg = "stacked.*adapter_ids"
  with pytest.raises(ValueError, match=msg):
    jlora.lora(kinds_fn)(params, *args)
  with pytest.raises(ValueError, match=msg):
    jlora.lora(kinds_fn, mode="merged")(params, *args)
  with pytest.raises(ValueError, match=msg):
    jlora.merge(params)
  with pytest.raises(ValueError, match=msg):
    jlora.scale(params, 0.5)
  # one adapter stacked: lora_scale is (1,), which without the marker would read as a stack
  with pytest.raises(ValueError, match=msg):
    jlora.merge(jlora.combine(jlora.stack_adapters(ads[:1]), base))


def test_adapter_ids_errors(kinds):
  base, args, ads = kinds
  params = jlora.combine(jlora.stack_adapters(ads), base)
  f = jlora.lora(kinds_fn)
  zeros = jnp.zeros(B, jnp.int32)
  with pytest.raises(ValueError, match=r"\[-1, 3\).*\[3\]"):
    f(params, *args, adapter_ids=jnp.array([0, 1, 3, 0, 0, 0]))
  with pytest.raises(ValueError, match="6 entries.*shapes \\[\\(4, 3\\)\\]"):
    f(params, args[0][:4], args[1], adapter_ids=zeros)
  with pytest.raises(ValueError, match="vector of ints"):
    f(params, *args, adapter_ids=jnp.zeros(B))
  with pytest.raises(ValueError, match="every adapter stacked.*plain"):
    f(jlora.combine(ads[0], base), *args, adapter_ids=zeros)
  with pytest.raises(ValueError, match="lead with the batch axis"):
    jlora.lora(lambda p, *a: jnp.sum(kinds_fn(p, *a)[0]))(params, *args, adapter_ids=zeros)
  dora = _adapters(base, kinds_fn, args, [(2, r"fc/kernel$")], dora=True)[0]
  with pytest.raises(ValueError, match="'fc'.*DoRA adapters"):
    jlora.stack_adapters([dora, ads[1]])
  # under jit the ids are unknown: one out of range gives NaN, never another adapter's output
  y, _ = _serve("factored")(params, args, jnp.array([0, 9, 0, 0, 0, 0]))
  assert np.all(np.isnan(y[1])) and np.all(np.isfinite(y[0]))


def test_hot_swap_compiles_once(kinds):
  """One jitted inference function serves another stack of the same shapes and other ids."""
  base, args, ads = kinds
  traces = []

  @jax.jit
  def serve(adapter, args, ids):
    traces.append(1)
    return jlora.lora(kinds_fn)(jlora.combine(adapter, base), *args, adapter_ids=ids)

  # the same ranks and targets (so the same shapes), other values
  others = _adapters(base, kinds_fn, args, [(2, r"(kernel|embedding)$"), (3, r"(fc|qkv|out)/kernel$"),
                                            (1, r"(conv|fc)/kernel$")], key=100)
  for stack, ids in ((ads, [0, 1, 2, -1, 1, 0]), (others, [2, 2, -1, 0, 1, 0])):
    ids = jnp.array(ids)
    _close(serve(jlora.stack_adapters(stack), args, ids),
           _one_by_one(kinds_fn, base, stack, ids, *args))
  assert len(traces) == 1


def test_base_product_stays_one_matmul_over_the_batch():
  """In the compiled program the frozen kernel meets the whole batch in one dot, and no
  kernel-sized array is made per example."""
  d_in, d_out, seq, n = 24, 40, 5, 4
  base = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (d_in, d_out))}}
  fn = lambda p, x: x @ p["fc"]["kernel"]
  x = jax.random.normal(jax.random.key(1), (B, seq, d_in))
  ads = _adapters(base, fn, (x,), [(8, "fc")] * n)
  params = jlora.combine(jlora.stack_adapters(ads), base)
  ids = jnp.arange(B) % n
  hlo = jax.jit(lambda p, x, i: jlora.lora(fn)(p, x, adapter_ids=i)).lower(
      params, x, ids).compile().as_text()
  dots = re.findall(r"= f32\[([0-9,]*)\]\{[^}]*\} dot\(", hlo)
  sizes = [int(np.prod([int(d) for d in s.split(",") if d])) for s in dots]
  assert B * seq * d_out in sizes                           # x·W over every token at once
  assert not re.search(rf"f32\[{B},{d_in},{d_out}\]", hlo)  # no per-example kernel


def test_per_example_adapters_on_a_quantized_base():
  """A QLoRA base serves several adapters in one batch: each example as if run alone on the
  dequantized base with its adapter merged; -1 is the quantized base alone."""
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name="fc2")(nn.gelu(nn.Dense(12, name="fc1")(x)))

  model, x = MLP(), jax.random.normal(jax.random.key(3), (4, 8))
  base = jlora.quantize(model.init(jax.random.key(0), x), ["fc1", "fc2"], bits=8)
  ads = _adapters(base, model.apply, (x,), [(2, "fc1"), (3, "fc")], key=5)
  params = jlora.combine(jlora.stack_adapters(ads), base)
  ids = jnp.array([1, -1, 0, 1])
  float_base = jlora.merge(base)
  want = [model.apply(float_base if i < 0 else jlora.merge(jlora.combine(ads[i], base)),
                      x[b:b + 1])[0] for b, i in enumerate(np.asarray(ids))]
  for mode in ("factored", "merged"):
    got = jax.jit(lambda p, x, ids: jlora.lora(model.apply, mode=mode)(p, x, adapter_ids=ids))(
        params, x, ids)
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)

"""Optimizer masking and the train step: only adapters move, and frozen weight
gradients are gone from the compiled step (checked on its HLO and FLOP count)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import jlora
from jlora import tree as tree_lib
from helpers import kernel_shaped_products, kernels, randomize


def _adapted_case(case, key):
  params, n_stack, n_in, rank = case
  cfg = jlora.LoraConfig(rank=rank, targets=r"(kernel|embedding)$", in_axes={"layer": n_in},
                         stack_axes={"layer": n_stack}, dora=True)
  return randomize(jlora.init(key, params, cfg), key)


@given(kernels(), st.sampled_from(["adam", "clip_adamw", "sgd"]))
def test_a_step_moves_adapter_leaves_only(case, which):
  params = _adapted_case(case, jax.random.key(0))
  tx = {"adam": optax.adam(0.1),
        "clip_adamw": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1)),
        "sgd": optax.sgd(0.1)}[which]
  tx = jlora.optimizer(tx, params)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)  # dense gradients everywhere, frozen too
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  for p, leaf in tree_lib.flatten(new).items():
    old = tree_lib.value(tree_lib.flatten(params)[p])
    moved = not np.array_equal(tree_lib.value(leaf), old)
    assert moved == (p[-1] in ("lora_a", "lora_b", "lora_m")), p


def test_optax_masked_trap_is_avoided():
  """optax.masked passes raw gradients to unmasked leaves; jlora.optimizer zeroes them."""
  params = jlora.init(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(rank=1))
  grads = jax.tree.map(jnp.ones_like, params)
  raw = optax.masked(optax.sgd(1.0), jlora.trainable_mask(params))
  leaked, _ = raw.update(grads, raw.init(params), params)
  assert np.all(leaked["d"]["kernel"] == 1.0)  # the trap: the kernel would move
  ours = jlora.optimizer(optax.sgd(1.0), params)
  upd, _ = ours.update(grads, ours.init(params), params)
  assert np.all(upd["d"]["kernel"] == 0.0) and np.all(upd["d"]["lora_scale"] == 0.0)


def test_lora_plus_scales_b_updates():
  params = randomize(jlora.init(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}},
                                jlora.LoraConfig(rank=2)), jax.random.key(1))
  grads = jax.tree.map(jnp.ones_like, params)
  plain = jlora.optimizer(optax.sgd(0.1), params)
  plus = jlora.optimizer(optax.sgd(0.1), params, lora_plus_ratio=16.0)
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = plus.update(grads, plus.init(params), params)
  np.testing.assert_allclose(u1["d"]["lora_b"], 16.0 * u0["d"]["lora_b"])
  np.testing.assert_array_equal(u1["d"]["lora_a"], u0["d"]["lora_a"])
  with pytest.raises(ValueError):
    jlora.optimizer(optax.sgd(0.1), params, lora_plus_ratio=0.0)


def test_optimizer_needs_adapters():
  with pytest.raises(ValueError, match="jlora.init"):
    jlora.optimizer(optax.adam(1e-3), {"d": {"kernel": jnp.ones((2, 2))}})


# -- the compiled train step --------------------------------------------------------

D, H, N_BLOCKS = 64, 128, 2
TARGETS = r"(query|key|value|out|fc1|fc2)/kernel$"


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(nn.LayerNorm()(x))
    return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(H, name="fc1")(nn.LayerNorm()(x))))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(N_BLOCKS):
      x = _Block(name=f"b{i}")(x)
    return x


@pytest.fixture(scope="module", params=[(4, 16), (4, 0), (24, 0)],
                ids=["r4-unrolled", "r4", "r24"])
def setup(request):
  # r4-unrolled runs branch.lora_branch with unrolled K=r products; r4 and r24 (jlora's
  # default, unroll_max_rank=0) run branch.lora_matmul, fc1's forward and fc2's backward
  # as concatenated products at r24.
  rank, unroll = request.param
  model = _Net()
  x = jax.random.normal(jax.random.key(0), (4, 24, D))
  y = jax.random.normal(jax.random.key(1), (4, 24, D))
  base = model.init(jax.random.key(2), x)
  params = jlora.init(jax.random.key(3), base,
                      jlora.LoraConfig(rank=rank, targets=TARGETS),
                      fn=model.apply, args=(x,))
  return model, x, y, base, params, unroll


def _compiled(step, *args):
  return jax.jit(step).lower(*args).compile()


def _flops(compiled):
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def _lora_step(model, y, params, mode="factored", unroll=0):
  tx = jlora.optimizer(optax.adam(1e-2), params)
  apply = jlora.lora(model.apply, mode=mode, unroll_max_rank=unroll)
  loss = lambda p, x: jnp.mean((apply(p, x) - y) ** 2)
  return jlora.train_step(loss, tx, jit=False), tx


def _kernel_shaped_dots(hlo: str, shapes) -> list[str]:
  """HLO dot/convolution/custom-call lines whose result has a kernel's shape, in any
  axis order (XLA lays weight gradients out as it likes: a conv's may be OHWI)."""
  wanted = {tuple(sorted(s)) for s in shapes}
  found = []
  for ln in hlo.splitlines():
    m = re.search(r"= f32\[([0-9,]*)\]\{[^}]*\} (dot|convolution|custom-call)\(", ln)
    if m and tuple(sorted(int(d) for d in m.group(1).split(",") if d)) in wanted:
      found.append(ln)
  return found


def test_train_step_trains_adapters_and_keeps_base_bitwise(setup):
  model, x, y, base, params, unroll = setup
  step, tx = _lora_step(model, y, params, unroll=unroll)
  step = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  kept = {p: np.asarray(tree_lib.value(v)) for p, v in tree_lib.flatten(params).items()}
  losses = []
  p = jax.tree.map(jnp.copy, params)
  for _ in range(5):
    p, state, loss = step(p, state, x)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  for path, v in tree_lib.flatten(p).items():
    same = np.array_equal(np.asarray(tree_lib.value(v)), kept[path])
    assert same == (path[-1] not in ("lora_a", "lora_b", "lora_m")), path
  # optimizer state: Adam moments for adapters only (2 x trainable floats, plus a count)
  state_floats = sum(np.size(s) for s in jax.tree.leaves(state))
  assert state_floats <= 2 * jlora.count_params(params).trainable + 4


def test_no_frozen_weight_gradients_in_compiled_step(setup):
  model, x, y, base, params, unroll = setup
  step, tx = _lora_step(model, y, params, unroll=unroll)
  hlo = _compiled(step, params, tx.init(params), x).as_text()
  shapes = {tuple(a.kernel.shape) for a in jlora.adapters(params)}
  # collapse multi-axis kernels too: XLA may reshape (d, heads, hd) to (d, heads*hd)
  shapes |= {(int(np.prod(s[:1])), int(np.prod(s[1:]))) for s in shapes} | \
            {(int(np.prod(s[:-1])), s[-1]) for s in shapes}
  assert _kernel_shaped_dots(hlo, shapes) == []
  merged_step, _ = _lora_step(model, y, params, mode="merged")
  merged_hlo = _compiled(merged_step, params, tx.init(params), x).as_text()
  assert len(_kernel_shaped_dots(merged_hlo, shapes)) >= len(jlora.adapters(params))


def test_flops_at_the_floor(setup):
  """XLA's count: floor <= factored step <= floor + the adapters' rank-r matmuls."""
  model, x, y, base, params, unroll = setup
  adam = optax.adam(1e-2)

  def full(p, s, x):
    g = jax.grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(p)
    u, s = adam.update(g, s, p)
    return optax.apply_updates(p, u), s
  f_full = _flops(_compiled(full, base, adam.init(base), x))
  f_floor = _flops(_compiled(
      lambda p, x: jax.grad(lambda x: jnp.mean((model.apply(p, x) - y) ** 2))(x), base, x))
  step, tx = _lora_step(model, y, params, unroll=unroll)
  f_lora = _flops(_compiled(step, params, tx.init(params), x))
  merged, _ = _lora_step(model, y, params, mode="merged")
  f_merged = _flops(_compiled(merged, params, tx.init(params), x))
  tokens = x.shape[0] * x.shape[1]
  # forward x·A, t·B; backward dB, dt, dA, dx: six rank-r products per matrix
  adapter = sum(6 * tokens * a.rank * (a.a.size + a.b.size) // a.rank for a in jlora.adapters(params))
  assert f_lora <= f_floor + adapter, (f_lora, f_floor, adapter)
  assert f_floor < f_full
  if max(a.rank for a in jlora.adapters(params)) <= 8:
    # At low rank the bound is tight enough to mean something: below the merged step.
    # (At r=24 on d=64 the adapters' own products cost more than a weight gradient.)
    assert f_lora < f_merged and f_merged > f_floor + adapter


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Conv(24, (3, 3), padding="SAME", name="c1")(x))
    return nn.Conv(x.shape[-1], (3, 3), padding="SAME", name="c2")(h)


def test_conv_flops_at_the_floor():
  model = _ConvNet()
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 16))
  base = model.init(jax.random.key(1), x)
  params = jlora.init(jax.random.key(2), base, jlora.LoraConfig(rank=2), fn=model.apply, args=(x,))
  f_floor = _flops(_compiled(
      lambda p, x: jax.grad(lambda x: jnp.mean((model.apply(p, x) - x) ** 2))(x), base, x))
  step, tx = _lora_step(model, x, params)
  compiled = _compiled(step, params, tx.init(params), x)
  merged, _ = _lora_step(model, x, params, mode="merged")
  f_merged = _flops(_compiled(merged, params, tx.init(params), x))
  pixels = 2 * 12 * 12
  adapter = sum(6 * pixels * a.rank * (a.a.size + a.b.size) // a.rank for a in jlora.adapters(params))
  assert _flops(compiled) <= f_floor + adapter < f_merged
  shapes = {tuple(a.kernel.shape) for a in jlora.adapters(params)}
  assert _kernel_shaped_dots(compiled.as_text(), shapes) == []
  merged_hlo = _compiled(merged, params, tx.init(params), x).as_text()
  assert len(_kernel_shaped_dots(merged_hlo, shapes)) >= len(shapes)


def test_step_compiles_once_with_a_committed_base():
  base = jax.device_put({"d": {"kernel": jnp.ones((16, 16))}}, jax.devices()[0])
  params = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2))
  tx = jlora.optimizer(optax.adam(1e-3), params)
  state = tx.init(params)
  step = jlora.train_step(
      lambda p, x: jnp.mean(jlora.lora(lambda q, x: x @ q["d"]["kernel"])(p, x) ** 2), tx)
  for _ in range(3):
    params, state, _ = step(params, state, jnp.ones((4, 16)))
  assert step._cache_size() == 1


def test_train_step_traces_no_frozen_gradient(setup):
  """At the jaxpr level, before XLA's dead-code elimination: the step differentiates the
  adapter leaves only, so no kernel-shaped product appears for any frozen kernel, adapted
  or not (here ``key``, ``out`` and ``fc2`` are not targets)."""
  model, x, y, base, _, unroll = setup
  params = jlora.init(jax.random.key(3), base, jlora.LoraConfig(rank=4, targets=["query", "value", "fc1"]),
                      fn=model.apply, args=(x,))
  step, tx = _lora_step(model, y, params, unroll=unroll)
  shapes = {tuple(sorted(np.shape(v))) for v in jax.tree.leaves(base) if np.ndim(v) >= 2}
  assert kernel_shaped_products(jax.make_jaxpr(step)(params, tx.init(params), x), shapes) == []
  # the same loss differentiated with respect to the whole tree does compute them
  full = jax.make_jaxpr(jax.grad(lambda p: jnp.mean((jlora.lora(model.apply)(p, x) - y) ** 2)))
  assert kernel_shaped_products(full(params), shapes)


def test_nnx_with_dropout_and_bf16_through_train_step():
  """NNX state holds rng keys and uint32 counters (nnx.Dropout); bf16 kernels with float32
  adapters: both train through train_step, frozen leaves bitwise unchanged."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(8, 16, rngs=rngs, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
      self.drop = nnx.Dropout(0.2, rngs=rngs)
      self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(self.drop(nnx.relu(self.fc1(x))).astype(jnp.float32))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  kinds = {str(tree_lib.value(v).dtype) for v in tree_lib.flatten(state).values()}
  assert "uint32" in kinds and "bfloat16" in kinds
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jax.random.normal(jax.random.key(2), (32, 4))
  params = jlora.init(jax.random.key(3), state, jlora.LoraConfig(rank=2, dtype="float32"),
                      fn=fn, args=(x,))
  loss = lambda p, x, y: jnp.mean((jlora.lora(fn, on_fallback="error")(p, x) - y) ** 2)
  tx = jlora.optimizer(optax.adam(1e-2), params)
  step = jlora.train_step(loss, tx, donate=False)
  p, s = params, tx.init(params)
  losses = []
  for _ in range(5):
    p, s, l = step(p, s, x, y)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  before, after = tree_lib.flatten(params), tree_lib.flatten(p)
  for path, leaf in before.items():
    a, b = tree_lib.value(leaf), tree_lib.value(after[path])
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    moved = not np.array_equal(np.asarray(a), np.asarray(b))
    assert moved == (path[-1] in ("lora_a", "lora_b")), path

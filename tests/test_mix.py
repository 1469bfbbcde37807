"""``jlora.mix`` against NumPy references, and exact gradients of scales and mixing weights.

References are independent of jlora's merge: each adapter's delta is written here with
``np.tensordot`` on the stored layout (input-first ``A: in + (r,)``, ``B: (r,) + out``; a
torch-style ``(out, in)`` kernel gets ``ΔW = s·B@A``), and the SVD is NumPy's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import jlora
from jlora import branch
from jlora import tree as tree_lib
from helpers import ScanDense, kernels, kinds_fn, kinds_model, random_adapted, randomize


def np_delta(a, b, s, n_stack):
  """``s · tensordot(A, B)`` per stacked layer (input-first layout)."""
  a, b, s = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(s, np.float64)
  if n_stack == 0:
    return s * np.tensordot(a, b, axes=1)
  return np.stack([np_delta(a[i], b[i], s[i], n_stack - 1) for i in range(a.shape[0])])


def only(tree):
  """The one adapter of a tree: (A, B, scale) as NumPy arrays."""
  (ad,) = jlora.adapters(tree)
  return np.asarray(ad.a), np.asarray(ad.b), np.asarray(ad.scale)


def kernel_of(params):
  (ad,) = jlora.adapters(params)
  return np.asarray(ad.kernel, np.float64)


@settings(max_examples=6)
@given(kernels(), st.lists(st.tuples(st.integers(1, 6), st.floats(0.1, 4),
                                     st.floats(-2, 2, allow_nan=False)), min_size=1, max_size=3),
       st.integers(0, 2**16))
def test_cat_is_the_exact_weighted_sum(case, specs, seed):
  """W + Σ wᵢ·sᵢ·AᵢBᵢ for any kernel kind (stacked too), mixed ranks and scales."""
  params, n_stack, n_in, max_rank = case
  (name, w0), = [(k, v) for k, v in params["params"]["layer"].items() if k != "bias"]
  shape = w0.shape
  rng = np.random.default_rng(seed)
  adapters, weights, want = {}, {}, 0.0
  for i, (r, scale, w) in enumerate(specs):
    r = min(r, max_rank)
    a = rng.normal(size=shape[:n_stack + n_in] + (r,)).astype(np.float32)
    b = rng.normal(size=shape[:n_stack] + (r,) + shape[n_stack + n_in:]).astype(np.float32)
    sc = np.full(shape[:n_stack], scale, np.float32)
    adapters[f"a{i}"] = {"params": {"layer": {"lora_a": a, "lora_b": b, "lora_scale": sc}}}
    weights[f"a{i}"] = w
    want = want + w * np_delta(a, b, sc, n_stack)
  params_mixed = jlora.combine(jlora.mix(adapters, weights), params)
  a, b, s = only(params_mixed)
  assert np.all(s == 1.0)  # scales folded in: the mix is not rescaled
  assert a.shape[-1] == sum(min(r, max_rank) for r, _, _ in specs)
  np.testing.assert_allclose(np_delta(a, b, s, n_stack), want, rtol=1e-5, atol=1e-4)
  merged = jlora.merge(params_mixed)["params"]["layer"][name]
  np.testing.assert_allclose(merged, np.asarray(w0, np.float64) + want, rtol=1e-5, atol=1e-4)


def _dense_adapters(key, shapes_ranks, rslora=False, alpha=4.0):
  """Adapters over a two-layer plain model; each targets its own subset of layers."""
  base = {"l1": {"kernel": jax.random.normal(key, (6, 5))},
          "l2": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (5, 4))}}
  out = {}
  for i, (targets, r) in enumerate(shapes_ranks):
    cfg = jlora.LoraConfig(rank=r, alpha=alpha, rslora=rslora, targets=targets)
    p = random_adapted(base, cfg, seed=20 + i, scale=0.5)
    out[f"a{i}"] = jlora.partition(p)[0]
  return base, out


def test_rslora_mix_is_not_rescaled_and_missing_kernels_count_as_zero():
  """PEFT's combined rsLoRA adapters come out scaled by sqrt(new rank); here the scale is
  folded into B and the result's scale is 1. An adapter without a kernel adds nothing there."""
  base, ads = _dense_adapters(jax.random.key(0), [("l1", 4), (["l1", "l2"], 4)], rslora=True)
  w = {"a0": 0.5, "a1": 2.0}
  merged = jlora.merge(jlora.combine(jlora.mix(ads, w), base))
  a0, a1 = (jlora.adapters(jlora.combine(ads[k], base)) for k in ("a0", "a1"))
  s = 4.0 / np.sqrt(4)  # alpha / sqrt(r)
  assert float(a0[0].scale) == s
  want_l1 = base["l1"]["kernel"] + 0.5 * s * a0[0].a @ a0[0].b + 2.0 * s * a1[0].a @ a1[0].b
  want_l2 = base["l2"]["kernel"] + 2.0 * s * a1[1].a @ a1[1].b
  np.testing.assert_allclose(merged["l1"]["kernel"], want_l1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged["l2"]["kernel"], want_l2, rtol=1e-5, atol=1e-5)


def _out_first(key, out_dim, in_dim, ranks):
  """``x @ W.T`` with W stored (out, in): jlora.init reads the layout from the model."""
  base = {"fc": {"w": jax.random.normal(key, (out_dim, in_dim))}}
  fn = lambda p, x: x @ p["fc"]["w"].T
  x = jnp.ones((3, in_dim))
  ads = {}
  for i, r in enumerate(ranks):
    p = random_adapted(base, jlora.LoraConfig(rank=r, alpha=2.0, targets=r"w$"), fn=fn,
                       args=(x,), seed=30 + i, scale=0.5)
    ads[f"a{i}"] = jlora.partition(p)[0]
  return base, fn, x, ads


@pytest.mark.parametrize("out_dim,in_dim", [(7, 5), (4, 4)])
def test_cat_of_out_first_adapters(out_dim, in_dim):
  """Torch-layout kernels: A (r, in), B (out, r), ΔW = s·B@A. (4, 4) with r=2 is read from an
  adapter tree alone, where both layouts fit the factors: the smaller rank is the right one."""
  base, fn, x, ads = _out_first(jax.random.key(0), out_dim, in_dim, [2, 1])
  w = [0.7, -1.5]
  mixed = jlora.mix(ads, w)
  assert mixed["fc"]["w_lora_a"].shape == (3, in_dim)
  assert mixed["fc"]["w_lora_b"].shape == (out_dim, 3)
  want = np.asarray(base["fc"]["w"], np.float64)
  for wi, t in zip(w, ads.values()):
    a, b, s = (np.asarray(t["fc"][f"w_lora_{k}"], np.float64) for k in ("a", "b", "scale"))
    want = want + wi * s * b @ a
  params = jlora.combine(mixed, base)
  np.testing.assert_allclose(jlora.merge(params)["fc"]["w"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jlora.lora(fn)(params, x), x @ want.T, rtol=1e-5, atol=1e-5)


def test_svd_is_the_best_rank_k_approximation():
  base, ads = _dense_adapters(jax.random.key(1), [(["l1", "l2"], 3), (["l1", "l2"], 2)])
  w = {"a0": 1.2, "a1": -0.6}
  exact = {}
  for name, t in ads.items():
    for ad in jlora.adapters(jlora.combine(t, base)):
      exact[ad.path] = exact.get(ad.path, 0) + w[name] * np.float64(ad.scale) * (
          np.asarray(ad.a, np.float64) @ np.asarray(ad.b, np.float64))
  for k in (1, 2, 5):
    mixed = jlora.combine(jlora.mix(ads, w, method="svd", rank=k), base)
    for ad in jlora.adapters(mixed):
      d = exact[ad.path]
      u, s, vt = np.linalg.svd(d, full_matrices=False)
      kk = min(k, *d.shape)
      best = (u[:, :kk] * s[:kk]) @ vt[:kk]
      got = np.float64(ad.scale) * np.asarray(ad.a, np.float64) @ np.asarray(ad.b, np.float64)
      assert ad.rank == kk and float(ad.scale) == 1.0
      np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-5)
      # Eckart-Young: the error is the dropped singular values.
      np.testing.assert_allclose(np.linalg.norm(got - d), np.sqrt(np.sum(s[kk:] ** 2)),
                                 rtol=1e-4, atol=1e-5)
  # rank=None: the largest source rank, as PEFT does
  assert {ad.rank for ad in jlora.adapters(jlora.combine(jlora.mix(ads, w, method="svd"),
                                                          base))} == {3}


def test_linear_follows_peft_and_is_approximate():
  base, ads = _dense_adapters(jax.random.key(2), [(["l1", "l2"], 2), (["l1", "l2"], 2)])
  w = {"a0": 0.8, "a1": -0.3}
  mixed = jlora.combine(jlora.mix(ads, w, method="linear"), base)
  for ad in jlora.adapters(mixed):
    srcs = [next(a for a in jlora.adapters(jlora.combine(t, base)) if a.path == ad.path)
            for t in ads.values()]
    c = [w[n] * float(a.scale) for n, a in zip(ads, srcs)]
    a_ref = sum(np.sign(ci) * np.sqrt(abs(ci)) * np.asarray(a.a) for ci, a in zip(c, srcs))
    b_ref = sum(np.sqrt(abs(ci)) * np.asarray(a.b) for ci, a in zip(c, srcs))
    np.testing.assert_allclose(ad.a, a_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ad.b, b_ref, rtol=1e-5, atol=1e-6)
    exact = sum(ci * np.asarray(a.a) @ np.asarray(a.b) for ci, a in zip(c, srcs))
    assert np.abs(np.asarray(ad.a) @ np.asarray(ad.b) - exact).max() > 1e-3  # cross terms
  # one adapter: linear is exact
  one = jlora.combine(jlora.mix({"a0": ads["a0"]}, [0.8], method="linear"), base)
  np.testing.assert_allclose(jlora.merge(one)["l1"]["kernel"],
                             jlora.merge(jlora.combine(jlora.mix({"a0": ads["a0"]}, [0.8]),
                                                       base))["l1"]["kernel"], rtol=1e-5)
  _, unequal = _dense_adapters(jax.random.key(2), [("l1", 2), ("l1", 3)])
  with pytest.raises(ValueError, match="equal ranks.*l1.*\\[2, 3\\]"):
    jlora.mix(unequal, [1.0, 1.0], method="linear")


def test_mix_refuses_what_it_cannot_do():
  base, ads = _dense_adapters(jax.random.key(3), [("l1", 2), ("l1", 3)])
  dora = jlora.partition(random_adapted(base, jlora.LoraConfig(rank=2, targets="l1", dora=True)))[0]
  with pytest.raises(ValueError, match="DoRA.*l1.*magnitude.*jlora.merge"):
    jlora.mix({"a0": ads["a0"], "d": dora}, [1.0, 1.0])
  with pytest.raises(ValueError, match="DoRA"):
    jlora.mix({"d": dora}, [1.0], method="svd")
  other = {"l1": {"kernel": jnp.ones((6, 7))}}
  wrong = jlora.partition(jlora.init(jax.random.key(0), other, jlora.LoraConfig(rank=2)))[0]
  with pytest.raises(ValueError, match="'a0' and 'x' do not fit one kernel at 'l1'"):
    jlora.mix({"a0": ads["a0"], "x": wrong}, [1.0, 1.0])
  with pytest.raises(ValueError, match="missing \\['a1'\\]"):
    jlora.mix(ads, {"a0": 1.0})
  with pytest.raises(ValueError, match="2 weights for 1"):
    jlora.mix({"a0": ads["a0"]}, [1.0, 2.0])
  with pytest.raises(ValueError, match="scalar"):
    jlora.mix(ads, [jnp.ones(2), 1.0])
  with pytest.raises(ValueError, match="rank is for method='svd'"):
    jlora.mix(ads, [1.0, 1.0], rank=2)
  with pytest.raises(ValueError, match="method must be"):
    jlora.mix(ads, [1.0, 1.0], method="ties")
  with pytest.raises(ValueError, match="no adapter leaves"):
    jlora.mix({"b": base}, [1.0])
  stacked = jlora.stack_adapters(ads)
  with pytest.raises(ValueError, match="stacked.*unstack_adapters"):
    jlora.mix({"s": stacked}, [1.0])


def test_mix_accepts_adapted_params_and_nnx_variables():
  from flax import nnx
  model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ads = {f"a{i}": randomize(jlora.init(jax.random.key(i), state, jlora.LoraConfig(rank=2)),
                            jax.random.key(5 + i)) for i in range(2)}
  mixed = jlora.mix(ads, [1.0, 0.5])  # adapted params in, an adapter tree out
  assert isinstance(mixed["lora_a"], nnx.Variable)
  params = jlora.combine(mixed, jlora.partition(ads["a0"])[1])
  want = sum(w * jlora.deltas(t)[("kernel",)] for w, t in zip([1.0, 0.5], ads.values()))
  np.testing.assert_allclose(jlora.deltas(params)[("kernel",)], want, rtol=1e-5, atol=1e-6)


# -- gradients: factored = merged, for scales and for mixing weights ------------------------


def _case(name):
  """(fn, adapted params, args): nn.scan stacks, rank 20 (the branch.lora_matmul path) or an
  output-first kernel. (Every other kernel kind: the test after this one.)"""
  if name == "scan":
    scan = ScanDense(features=6)
    x = jax.random.normal(jax.random.key(3), (4, 6))
    return scan.apply, random_adapted(scan.init(jax.random.key(5), x), jlora.LoraConfig(rank=2),
                                      fn=scan.apply, args=(x,), seed=6, scale=0.2), (x,)
  if name == "rank20":
    wide = {"d": {"kernel": jax.random.normal(jax.random.key(7), (24, 40)) / 5}}
    x = jax.random.normal(jax.random.key(8), (8, 24))
    fn = lambda p, x: jnp.sin(x @ p["d"]["kernel"])
    return fn, random_adapted(wide, jlora.LoraConfig(rank=20), seed=10, scale=0.1), (x,)
  base, fn, x, ads = _out_first(jax.random.key(11), 7, 5, [3])
  return fn, jlora.combine(ads["a0"], base), (x,)


@pytest.mark.parametrize("name", ["scan", "rank20", "out_first"])
def test_scale_gradient_is_exact_in_factored_mode(name):
  """d loss / d lora_scale (per kernel) and / d strength: factored = merged."""
  fn, params, args = _case(name)

  def loss(params, strength, mode):
    out = jlora.lora(fn, mode=mode)(jlora.scale(params, strength), *args)
    return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))
  grads = {}
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  for mode in ("factored", "merged"):
    g, gs = grad(params, 1.3, mode)
    grads[mode] = ({p: tree_lib.value(v) for p, v in tree_lib.flatten(g).items()
                    if p[-1] in ("lora_scale", "w_lora_scale")}, gs)
  want, got = grads["merged"][0], grads["factored"][0]
  assert want.keys() == got.keys() and want, name
  # float32 sums of terms of either sign: compare at the size of the largest gradient
  atol = 1e-5 * max(float(np.max(np.abs(v))) for v in want.values())
  for p, v in want.items():
    np.testing.assert_allclose(got[p], v, rtol=1e-4, atol=atol, err_msg=f"{name} {p}")
    assert np.any(np.asarray(v) != 0), (name, p)
  np.testing.assert_allclose(grads["factored"][1], grads["merged"][1], rtol=1e-4)


def test_mixing_weights_and_scales_trace_once_with_exact_gradients():
  """Embedding, DenseGeneral in and out, Dense and conv kernels: the gradient with respect to
  the mixing weights, to every lora_scale of the mix and to a strength equals mode="merged",
  and a jitted step traces once while the weights change."""
  base, args = kinds_model()
  ads = {}
  for i, (r, targets) in enumerate([(2, r"(kernel|embedding)$"), (3, r"(fc|qkv|out)/kernel$"),
                                    (1, r"(conv|fc)/kernel$")]):
    p = random_adapted(base, jlora.LoraConfig(rank=r, targets=targets), fn=kinds_fn, args=args,
                       seed=10 + i)
    ads[f"a{i}"] = jlora.partition(p)[0]
  traces = []

  def loss(w, scales, strength, mode="factored"):
    traces.append(mode)
    params = jlora.combine(jlora.mix(ads, w), base)
    params = tree_lib.unflatten({**tree_lib.flatten(params), **scales}, params)
    out = jlora.lora(kinds_fn, mode=mode)(jlora.scale(params, strength), *args)
    return sum(jnp.mean(jnp.sin(o)) for o in out)

  scales = {p: jnp.float32(1.0 + 0.1 * i) for i, (p, v) in enumerate(tree_lib.flatten(
      jlora.mix(ads, [1.0, 1.0, 1.0])).items()) if p[-1] == "lora_scale"}
  assert len(scales) == 5
  tx = optax.adam(0.1)

  @jax.jit
  def step(w, state):
    g = jax.grad(loss, argnums=(0, 1, 2))(w, scales, 1.3)
    u, state = tx.update(g[0], state, w)
    return optax.apply_updates(w, u), state, g

  merged_grad = jax.jit(jax.grad(lambda w, s, t: loss(w, s, t, "merged"), argnums=(0, 1, 2)))
  w = jnp.array([0.5, -1.0, 2.0])
  state = tx.init(w)
  for _ in range(3):
    w_before = w
    w, state, got = step(w, state)
    want = merged_grad(w_before, scales, 1.3)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      # float32 sums of terms of either sign: compare at the size of the largest gradient
      np.testing.assert_allclose(g, v, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(v))) + 1e-7)
    assert all(np.all(np.abs(v) > 0) for v in jax.tree.leaves(want))
  assert traces.count("factored") == 1  # new weights every step, one trace


def test_scale_cotangent_costs_nothing_in_a_train_step(monkeypatch):
  """The branch computes the scale's cotangent; in a train step the scale is a constant and
  XLA drops it: the compiled step's FLOPs equal those with the cotangent stubbed to zero."""
  base = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (32, 48))},
          "l2": {"kernel": jax.random.normal(jax.random.key(1), (48, 32))}}
  fn = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
  x = jax.random.normal(jax.random.key(2), (64, 32))

  def flops():
    # l1 at rank 4 runs branch.lora_branch, l2 at rank 24 branch.lora_matmul
    cfg = jlora.LoraConfig(rank=4, rank_pattern={"l2": 24})
    params = jlora.init(jax.random.key(3), base, cfg)
    tx = jlora.optimizer(optax.adam(1e-3), params)
    step = jlora.train_step(lambda p, x: jnp.mean(jlora.lora(fn)(p, x) ** 2), tx, jit=False)
    compiled = jax.jit(step).lower(params, tx.init(params), x).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  real = flops()
  factor_grads = branch._factor_grads

  def zero_ds(*args):
    da, db, ds = factor_grads(*args)
    return da, db, jnp.zeros_like(ds)

  monkeypatch.setattr(branch, "_factor_grads", zero_ds)
  params = jlora.init(jax.random.key(3), base, jlora.LoraConfig(rank=4, rank_pattern={"l2": 24}))
  strength = jax.jit(jax.grad(lambda s: jnp.sum(jlora.lora(fn)(jlora.scale(params, s), x))))
  assert float(strength(1.0)) == 0.0  # the stub is in effect
  assert flops() == real

"""jlora on a device mesh: 8 simulated CPU devices, in a subprocess of their own.

Meshes (``mesh_setups.SETUPS``): (8,) data parallel; (2, 4) data x model with
Megatron column/row sharding; (8,) FSDP (kernels sharded on their first input axis
over 'data'); ``nn.scan``-stacked layers on (2, 4) Megatron and on (8,) FSDP. Each
runs 5 Adam steps of ``jlora.train_step`` from adapters that ``jlora.init`` placed,
and must give one device's losses (rtol 1e-5), keep every adapter leaf and Adam
moment where it started, compile once, and donate without a warning.

Auto and Explicit mesh axes both run where the layout allows it without LoRA.
linen's ``Dense`` passes no ``out_sharding``, so a row-parallel linen layer cannot
run on Explicit axes even without LoRA (``test_linen_row_parallel_fails_explicit_without_lora_too``);
the linen Megatron layouts (``tp_linen``, ``scan_tp``) run on Auto axes, and the NNX
one (``tp``, whose row-parallel layers pass ``out_sharding``) on both.
"""

import functools
import os
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import devices
import jlora
import mesh_setups as ms
from experiments import collectives
from jlora import tree as tree_lib

test_on_8_devices = devices.launcher(__file__)

# (setup, Explicit axes?, unroll_max_rank): 0 (jlora.lora's default) runs the
# branch's rank-r products as dots, 16 unrolls them into elementwise work; each mesh
# runs both, one per axis type.
CASES = [("dp", False, 0), ("dp", True, 16), ("tp", False, 16), ("tp", True, 0),
         ("fsdp", False, 0), ("fsdp", True, 16), ("scan_tp", False, 0), ("scan_fsdp", True, 16)]


@functools.cache
def _run(name, explicit, unroll_max_rank=0):
  return ms.run(name, explicit, unroll_max_rank=unroll_max_rank)


@functools.cache
def _reference(model):
  return ms.reference(next(n for n, s in ms.SETUPS.items() if s.model == model))


def _adapter_floats(params, local_to=None) -> int:
  """Adapter floats (trainable leaves), or those one device holds when ``local_to``."""
  flat = tree_lib.flatten(params)
  total = 0
  for p in jlora.optim.trainable_roles(flat):
    v = tree_lib.value(flat[p])
    total += int(np.prod(v.sharding.shard_shape(v.shape) if local_to else v.shape))
  return total


# Collectives per device per step, from the compiled step (experiments/collectives.py):
# {(kind, mesh axes): (instructions, runs per step)}. T: tokens per device, r = 4.
EXPECTED = {
    # DP: the adapter gradients (and the loss) summed over 'data', all in one op
    # (XLA combines them). The frozen kernels have no gradient to sync.
    "dp": {("all-reduce", ("data",)): (1, 1)},
    # Megatron over 'model': forward, out-proj and fc2 (row-parallel) each sum their
    # partial outputs, T x D, and carry the branch's partial x·A, T x r, in the same
    # op; backward, fc1 (column-parallel) sums its input gradient, T x D, with its
    # T x r g·Bᵀ in the same op, and q/k/v sum only their T x r g·Bᵀ (their input
    # gradient is not needed: the block's input is data). One more op over 'data':
    # the adapter gradient shards and the loss.
    "tp": {("all-reduce", ("model",)): (4, 4), ("all-reduce", ("data",)): (1, 1)},
    # FSDP: each of the 6 kernels and its A (sharded like its input axis) gathered
    # once, and the adapter gradients summed over 'data' (XLA:CPU: all-reduce, then a
    # slice, for A).
    "fsdp": {("all-gather", ("data",)): (12, 12), ("all-reduce", ("data",)): (1, 1)},
    # The Megatron step per layer of a 2-layer scan: the 4 model-axis sums of "tp" run
    # once per layer (in the scan's while body), the last one now with q/k/v's T x D
    # input gradients too (the layer below trains); the adapter gradients are summed
    # per layer inside the loop, the loss once.
    "scan_tp": {("all-reduce", ("model",)): (4, 8), ("all-reduce", ("data",)): (2, 3)},
    # FSDP per layer of the scan: forward gathers the 6 kernels and 6 A's, backward
    # gathers the 6 kernels again (FSDP keeps no gathered kernel across the loop);
    # gradient sums as in "scan_tp".
    "scan_fsdp": {("all-gather", ("data",)): (18, 36), ("all-reduce", ("data",)): (2, 3)},
}


@devices.mesh_only
@pytest.mark.parametrize("name,explicit,unroll", CASES, ids=[
    f"{n}-{'explicit' if e else 'auto'}-{'dots' if u == 0 else 'unrolled'}" for n, e, u in CASES])
def test_step_on_mesh(name, explicit, unroll):
  r = _run(name, explicit, unroll)
  np.testing.assert_allclose(r.losses, _reference(ms.SETUPS[name].model), rtol=1e-5)
  for i, specs in enumerate(r.specs):
    moved = {tree_lib.path_str(p[1:]) for p in specs if specs[p] != r.expected[p]}
    assert not moved, f"step {i + 1} moved {sorted(moved)}"
  assert r.cache_size == 1, "the step compiled again"
  assert not [w for w in r.warnings if "donated" in w], r.warnings

  found = collectives.collectives(r.hlo, r.mesh)
  got = {k: (v["count"], v["runs"]) for k, v in collectives.summary(found).items()}
  assert got == EXPECTED[name], collectives.describe(found)
  assert not [c for c in found if c["kind"] == "reduce-scatter"]  # frozen kernels: no grads

  # Over 'data' go exactly the adapter gradients and the loss: no weight gradient.
  # Each device sums the gradient shards it holds; an FSDP-sharded A's gradient is
  # summed whole and then sliced (XLA:CPU makes no reduce-scatter of it).
  sync = sum(c["bytes"] * c["runs"] for c in found if c["axes"] == ("data",)
             and c["kind"] == "all-reduce")
  floats = _adapter_floats(r.params, local_to="fsdp" not in name)
  assert sync == 4 * (floats + 1), (sync, floats)
  layers = ms.LAYERS if name.startswith("scan") else 1
  if name in ("tp", "scan_tp"):
    # Over 'model': T x D sums the base needs anyway, plus one T x r partial per
    # adapted matrix per layer (what LoRA adds: r/D of a base sum).
    t = ms.BATCH * ms.SEQ // 2
    base_sums = (3 if name == "tp" else 6) * layers
    model = sum(c["bytes"] * c["runs"] for c in found if c["axes"] == ("model",))
    assert model == 4 * t * (base_sums * ms.D + 6 * layers * ms.RANK), collectives.describe(found)
    assert all(any(d[-1] == ms.RANK for _, d in c["operands"]) for c in found
               if c["axes"] == ("model",)), collectives.describe(found)


# Expected adapter specs, written out from the rule (lora_a: input entries + None;
# lora_b: None + output entries; the stack axis keeps its entry).
PLACED = {
    "tp": {("attn", "query", "lora_a"): (None, None),
           ("attn", "query", "lora_b"): (None, "model", None),
           ("attn", "out", "lora_a"): ("model", None, None),
           ("attn", "out", "lora_b"): (None, None),
           ("fc1", "lora_a"): (None, None), ("fc1", "lora_b"): (None, "model"),
           ("fc2", "lora_a"): ("model", None), ("fc2", "lora_b"): (None, None),
           ("fc2", "lora_scale"): ()},
    "fsdp": {("params", "attn", "value", "lora_a"): ("data", None),
             ("params", "attn", "value", "lora_b"): (None, None, None),
             ("params", "attn", "out", "lora_a"): ("data", None, None),
             ("params", "fc2", "lora_a"): ("data", None)},
    "scan_tp": {("params", "layers", "attn", "key", "lora_a"): (None, None, None),
                ("params", "layers", "attn", "key", "lora_b"): (None, None, "model", None),
                ("params", "layers", "fc2", "lora_a"): (None, "model", None),
                ("params", "layers", "fc2", "lora_scale"): (None,)},
}


@devices.mesh_only
@pytest.mark.parametrize("name,explicit,unroll", [c for c in CASES if c[0] in PLACED])
def test_init_places_adapters_like_their_kernels(name, explicit, unroll):
  r = _run(name, explicit, unroll)
  placed = {p[1:]: s for p, s in r.expected.items() if p[0] == 0}   # (params, opt)[0]
  for path, spec in PLACED[name].items():
    assert placed[path] == spec, path
  # Adam's moments follow their params.
  moments = {p: s for p, s in r.expected.items() if p[0] == 1 and p[-1] in ("lora_a", "lora_b")}
  assert moments
  for p, s in moments.items():
    assert s == placed[next(q for q in placed if p[-len(q):] == q)], p
  # jlora.shardings says the same, for the params and for the optimizer state.
  with jax.set_mesh(r.mesh):
    tx = jlora.optimizer(optax.adam(1e-2), r.params)
    want = jlora.shardings(r.params)
    opt_want = jlora.shardings(jax.eval_shape(tx.init, r.params), params=r.params)
  for p, s in tree_lib.flatten(want).items():
    assert s.is_equivalent_to(tree_lib.value(tree_lib.flatten(r.params)[p]).sharding,
                              len(placed[p])), p
  for (p, s), (_, v) in zip(tree_lib.flatten(opt_want).items(),
                            tree_lib.flatten(r.opt_state).items()):
    v = tree_lib.value(v)
    assert tree_lib.value(s).is_equivalent_to(v.sharding, v.ndim), p


def _init_values(name):
  x, _ = ms.data()
  apply, base = ms.model(name)
  return tree_lib.flatten(jlora.init(jax.random.key(2), base, jlora.LoraConfig(
      rank=ms.RANK, targets=ms.TARGETS)))


@devices.mesh_only
def test_init_under_jit_follows_explicit_kernels():
  """In jit, Explicit axes are part of the kernels' types: init places by them, and
  an abstract tree keeps them, so ``jlora.shardings`` needs no ``base=``."""
  name = "tp"
  mesh = ms.mesh(name, True)
  _, base = ms.model(name, True)
  cfg = jlora.LoraConfig(rank=ms.RANK, targets=ms.TARGETS)
  init = lambda b: jlora.init(jax.random.key(2), b, cfg)
  with jax.set_mesh(mesh):
    base = ms.place_base(name, base, mesh)
    params = jax.jit(init)(base)
    eager = init(base)
    where = jax.tree.map(lambda v: v.sharding, base)
    build = lambda: init(jax.tree.map(jax.sharding.reshard, ms.model(name, True)[1], where))
    s = jlora.shardings(jax.eval_shape(build))
  built = jax.jit(build, out_shardings=s)()  # outside set_mesh: s names the concrete mesh
  outside = jax.jit(init)(base)              # the kernels' types name their mesh
  ref = _init_values(name)
  for p, leaf in tree_lib.flatten(params).items():
    v, e = tree_lib.value(leaf), tree_lib.value(tree_lib.flatten(eager)[p])
    assert v.sharding.is_equivalent_to(e.sharding, v.ndim), p
    for other in (built, outside):
      assert tree_lib.value(tree_lib.flatten(other)[p]).sharding.is_equivalent_to(e.sharding,
                                                                                 v.ndim), p
    np.testing.assert_array_equal(np.asarray(v), np.asarray(tree_lib.value(ref[p])))


@devices.mesh_only
def test_abstract_init_on_auto_axes():
  """The never-materialised recipe: shapes from eval_shape, shardings from the base's
  placement (eval_shape drops Auto shardings), one jit with out_shardings."""
  name = "tp_linen"
  x, _ = ms.data()
  mesh = ms.mesh(name, False)
  apply, base = ms.model(name)
  cfg = jlora.LoraConfig(rank=ms.RANK, targets=ms.TARGETS)
  make = lambda: jlora.init(jax.random.key(2), ms.LinenBlock().init(jax.random.key(1), x), cfg)
  base_shardings = jax.tree_util.tree_map_with_path(
      lambda p, v: NamedSharding(mesh, ms.base_spec(name, tree_lib.keypath(p), v.ndim)), base)
  abstract = jax.eval_shape(make)
  assert all(getattr(v, "sharding", None) is None for v in jax.tree.leaves(abstract))
  with pytest.raises(ValueError, match="carries no sharding.*base="):
    jlora.shardings(abstract)
  s = jlora.shardings(abstract, base=base_shardings)
  params = jax.jit(make, out_shardings=s)()
  ref = _init_values(name)
  flat_s = tree_lib.flatten(s)
  for p, v in tree_lib.flatten(params).items():
    assert v.sharding == flat_s[p], p
    np.testing.assert_allclose(np.asarray(v), np.asarray(ref[p]), rtol=1e-6, err_msg=str(p))
  assert flat_s[("params", "fc1", "lora_b")].spec == P(None, "model")
  assert flat_s[("params", "attn", "out", "lora_a")].spec == P("model", None, None)


@devices.mesh_only
@pytest.mark.parametrize("replicate,a_spec", [(True, (None, None)), (("data",), (None, None)),
                                              (False, ("data", None))])
def test_replicate_override(replicate, a_spec):
  mesh, apply, base, x, _ = ms.placed("fsdp", True)
  with jax.set_mesh(mesh):
    params = jlora.init(jax.random.key(2), base, jlora.LoraConfig(rank=ms.RANK, targets="fc1"),
                        fn=apply, args=(x,), replicate=replicate)
    s = tree_lib.flatten(jlora.shardings(params, replicate=replicate))
  for p, v in tree_lib.flatten(params).items():
    assert v.sharding.is_equivalent_to(s[p], v.ndim), p
  a = tree_lib.flatten(params)[("params", "fc1", "lora_a")]
  assert tuple(a.sharding.spec) + (None,) * (2 - len(a.sharding.spec)) == a_spec
  assert tree_lib.flatten(params)[("params", "fc1", "kernel")].sharding.spec == P("data")


@devices.mesh_only
def test_linen_row_parallel_fails_explicit_without_lora_too():
  """jlora is never the reason a layout fails: this one fails in linen itself."""
  mesh, apply, base, xs, _ = ms.placed("tp_linen", True)
  with jax.set_mesh(mesh):
    with pytest.raises(Exception, match="out_sharding"):
      jax.jit(apply)(base, xs)
    with pytest.raises(Exception, match="out_sharding"):  # init reads the splits by running it
      jlora.init(jax.random.key(2), base, jlora.LoraConfig(rank=ms.RANK), fn=apply, args=(xs,))
    params = jlora.init(jax.random.key(2), base, jlora.LoraConfig(rank=ms.RANK, targets=ms.TARGETS))
    with pytest.raises(Exception, match="out_sharding"):
      jax.jit(jlora.lora(apply))(params, xs)


@devices.mesh_only
def test_axes_that_do_not_merge_as_blocks():
  """A kernel sharded on its *last* output axis, (d, heads, head_dim@model): the branch
  lays B out as (r, heads * head_dim), which is no block sharding; it is gathered for
  the branch, and the result resharded back. Checked against NumPy."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  f = lambda p, x: jnp.einsum("td,dhk->thk", x, p["w"])
  rng = np.random.default_rng(0)
  w, x = rng.standard_normal((16, 2, 8)), rng.standard_normal((8, 16))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x.astype(np.float32), NamedSharding(mesh, P("data")))
    params = jlora.init(jax.random.key(0), {"w": jax.device_put(
        w.astype(np.float32), NamedSharding(mesh, P(None, None, "model")))},
        jlora.LoraConfig(rank=2, targets="w"), fn=f, args=(xs,))
    params = ms.random_b(params)
    y, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(jlora.lora(f)(p, xs) ** 2)))(params)
  a, b = np.asarray(params["w_lora_a"], np.float64), np.asarray(params["w_lora_b"], np.float64)
  scale = float(params["w_lora_scale"])
  out = np.einsum("td,dhk->thk", x, w) + scale * np.einsum("tr,rhk->thk", x @ a, b)
  np.testing.assert_allclose(float(y), np.sum(out ** 2), rtol=1e-5)
  g = 2 * out
  np.testing.assert_allclose(grads["w_lora_b"], scale * np.einsum("tr,thk->rhk", x @ a, g),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads["w_lora_a"], scale * x.T @ np.einsum("thk,rhk->tr", g, b),
                             rtol=1e-4, atol=1e-4)
  assert params["w_lora_b"].sharding.spec == P(None, None, "model")


@devices.mesh_only
def test_uncommitted_leaves_join_the_mesh():
  """A leaf nobody placed (a counter, here) is replicated on the mesh before the
  first step, so the second step finds what the first returned."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  f = lambda p, x: x @ p["w"]
  base = {"w": jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data"))),
          "count": jnp.zeros((), jnp.int32)}
  with jax.set_mesh(mesh):
    params = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets="w"))
    assert not params["count"].committed
    tx = jlora.optimizer(optax.sgd(0.1), params)
    step = jlora.train_step(lambda p, x: jnp.mean(jlora.lora(f)(p, x) ** 2), tx)
    opt, x = tx.init(params), jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))
    for _ in range(3):
      params, opt, _ = step(params, opt, x)
  assert step._cache_size() == 1
  assert params["count"].sharding == NamedSharding(mesh, P())
  assert params["w_lora_a"].sharding.spec == P("data", None)


@devices.mesh_only
def test_readme_scaling_recipe():
  """README's "Scaling out" code runs as written, and places what it says."""
  text = (devices.ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text[text.index("## Scaling out"):], re.S)
  scope: dict = {}
  exec(compile(textwrap.dedent(blocks[0]), "README-scaling", "exec"), scope)
  params = scope["params"]["params"]
  assert params["fc1"]["lora_b"].sharding.spec == P(None, "model")
  assert params["fc2"]["lora_a"].sharding.spec == P("model", None)
  assert scope["step"]._cache_size() == 1
  exec(compile(textwrap.dedent(blocks[1]), "README-abstract", "exec"), scope)
  assert scope["params"]["params"]["fc2"]["lora_a"].sharding.spec == P("model", None)


@devices.mesh_only
def test_loaders_and_residual_inits_place_like_the_rule(tmp_path):
  """``load_peft``, ``load_sd_lora`` and ``jlora.load`` put loaded adapters where
  ``jlora.shardings`` says (beside their kernels); PiSSA's ``lora_a0``/``lora_b0`` sit
  like ``lora_a``/``lora_b`` and its residual kernel keeps the kernel's sharding."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  at = lambda *spec: NamedSharding(mesh, P(*spec))
  w = lambda k, shape, s: jax.device_put(jax.random.normal(jax.random.key(k), shape), s)
  base = {"fc1": {"kernel": w(0, (16, 32), at(None, "model"))},
          "fc2": {"kernel": w(1, (32, 16), at("model", None))}}
  params = jlora.init(jax.random.key(2), base, jlora.LoraConfig(rank=4, targets=["fc1", "fc2"]))
  want = tree_lib.flatten(jlora.shardings(params))
  spec = lambda s: tuple(s.spec) + (None,) * (2 - len(s.spec))
  jlora.save_peft(tmp_path / "peft", params)
  jlora.save_sd_lora(tmp_path / "kohya.safetensors", params)
  jlora.save(tmp_path / "ckpt", params, step=1)
  for loaded in (jlora.load_peft(tmp_path / "peft", base),
                 jlora.load_sd_lora(tmp_path / "kohya.safetensors", base),
                 jlora.load(tmp_path / "ckpt", base).params):
    for path, leaf in tree_lib.flatten(loaded).items():
      if str(path[-1]).startswith("lora_"):
        assert spec(leaf.sharding) == spec(want[path]), path
  assert spec(want[("fc1", "lora_b")]) == (None, "model")
  assert spec(want[("fc2", "lora_a")]) == ("model", None)
  pissa = jlora.init(jax.random.key(3), base,
                     jlora.LoraConfig(rank=4, targets=["fc1", "fc2"], init="pissa"))
  for name in ("fc1", "fc2"):
    got = pissa[name]
    assert spec(got["lora_a0"].sharding) == spec(got["lora_a"].sharding), name
    assert spec(got["lora_b0"].sharding) == spec(got["lora_b"].sharding), name
    assert spec(got["kernel"].sharding) == spec(base[name]["kernel"].sharding), name


@pytest.fixture(scope="module")
def _two_process_ckpt(tmp_path_factory):
  """The checkpoint directory both processes save to and load from."""
  return tmp_path_factory.mktemp("two_process_ckpt")


@pytest.fixture(scope="module", autouse=True)
def _two_processes(request, _two_process_ckpt):
  """The two-process run, started with the module so that it works beside the
  other tests; ``test_two_processes_match_one`` collects it."""
  wanted = jax.device_count() == devices.N_DEVICES and any(
      item.name == "test_two_processes_match_one" for item in request.session.items)
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
  args = ("--ckpt", str(_two_process_ckpt))
  procs = devices.Processes(worker, 2, 4, args=args) if wanted else None
  yield procs
  if procs is not None:
    procs.close()


@devices.mesh_only
@pytest.mark.slow
def test_two_processes_match_one(_two_processes, _two_process_ckpt):
  """(2, 4) Explicit Megatron from 2 processes x 4 devices == 1 process x 8 devices.
  Both processes then save the trained adapters and Adam state to one directory
  and load them back onto fresh adapters: the same bits, placed as saved. This
  process loads that checkpoint too (its devices have other ids than the two
  processes' had): onto its own mesh, and onto the unplaced base."""
  one = _run(*ms.TWO_PROCESS_CASE)
  w0, w1 = _two_processes.results(timeout=300)
  assert (w0["process_count"], w0["local_devices"], w0["devices"]) == (2, 4, 8)
  assert w0["losses"] == w1["losses"]              # one replicated value, read twice
  np.testing.assert_allclose(w0["losses"], one.losses, rtol=1e-5)  # gloo may sum in another order
  for w in (w0, w1):
    assert w["cache_size"] == 1 and not w["moved"], w
    assert not [m for m in w["warnings"] if "donated" in m], w["warnings"]

  saved = ms.checkpointed(one.params, one.opt_state)  # what the single process would save
  c0, c1 = w0["checkpoint"], w1["checkpoint"]
  for c in (c0, c1):
    assert c["step"] == ms.STEPS and c["leaves"] == len(saved), c
    assert not c["unequal"] and not c["moved"], c  # values gathered whole; shardings
  assert set(c0["sha256"]) == set(saved)
  assert c0["sha256"] == c1["sha256"]              # one global array per leaf, read twice

  # One process of 8 devices reads it onto its mesh: the same bits, placed as its own run.
  params, opt_state = ms.template(*ms.TWO_PROCESS_CASE[:2])
  ck = jlora.load(_two_process_ckpt, params, opt_state=opt_state)
  loaded = ms.checkpointed(ck.params, ck.opt_state)
  assert {k: ms.digest(np.asarray(v)) for k, v in loaded.items()} == c0["sha256"]
  for k, v in loaded.items():
    assert v.sharding.is_equivalent_to(saved[k].sharding, v.ndim), k
  # Onto the base as built, on no mesh: the adapters join their kernels' device.
  ck = jlora.load(_two_process_ckpt, ms.model(*ms.TWO_PROCESS_CASE[:2])[1])
  for k, v in ms.checkpointed(ck.params).items():
    assert ms.digest(np.asarray(v)) == c0["sha256"][k], k
    assert v.sharding.device_set == {jax.devices()[0]}, (k, v.sharding)

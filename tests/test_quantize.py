"""QLoRA: ``jlora.quantize`` and every function on a quantized base.

References are independent: the stored codes and scales against a NumPy quantizer written
from the formats' definitions, the factored outputs and gradients against NumPy on the
dequantized kernel, and the train step's memory against the float32-base step and against
plain autodiff through the dequantization (``compiled.memory_analysis()``, deterministic).
"""

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import quant
from jlora import tree as tree_lib
from helpers import LinenNet, TOKENS, randomize

# bitsandbytes' NF4 code book, as published.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]

FORMATS = {"int8": dict(bits=8), "int8_g32": dict(bits=8, group_size=32),
           "int4": dict(bits=4, group_size=32), "nf4": dict(bits=4, kind="nf4", group_size=32),
           "nf4_dq": dict(bits=4, kind="nf4", group_size=32, double_quant=True)}


# -- an independent NumPy quantizer ---------------------------------------------------------

def np_quantize(w, n_in, bits, kind="int", group_size=None, double_quant=False):
  """``(codes, scale, dequantized)`` of an input-first kernel, on its ``(C, N)`` matrix:
  groups are runs of ``g`` rows (all ``C`` rows per output channel by default).

  Returns the signed codes (int4 as -8..7, NF4 as indices) ``(C, N)``, the float32 scales
  ``(C // g, N)`` after double quantization, and the dequantized ``(C, N)`` float32 matrix.
  """
  c = math.prod(w.shape[:n_in])
  m = np.asarray(w, np.float32).reshape(c, -1)
  g = c if group_size is None else group_size
  blocks = m.reshape(c // g, g, -1)
  top = 1.0 if kind == "nf4" else float(2 ** (bits - 1) - 1)
  scale = np.abs(blocks).max(axis=1) * np.float32(1.0 / top)             # (C // g, N)
  y = blocks / np.where(scale == 0, 1, scale)[:, None, :]
  if kind == "nf4":
    codes = np.argmin(np.abs(y[..., None] - np.float32(PUBLISHED_NF4)), axis=-1)
    values = np.float32(PUBLISHED_NF4)[codes]
  else:
    codes = np.clip(np.round(y), -top, top)
    values = codes
  if double_quant:   # int8 codes of (scale - mean) in blocks of 256, one f32 scale each
    flat = scale.reshape(-1)
    offset = flat.mean(dtype=np.float32)
    centred = (flat - offset).reshape(-1, min(256, flat.size))
    s2 = np.abs(centred).max(axis=1, keepdims=True) * np.float32(1 / 127)
    scale = ((np.clip(np.round(centred / np.where(s2 == 0, 1, s2)), -127, 127) * s2)
             .reshape(scale.shape) + offset).astype(np.float32)
  deq = (values * scale[:, None, :]).reshape(c, -1).astype(np.float32)
  return codes.reshape(c, -1), scale, deq


def np_unpack4(packed):
  """uint8 ``(..., n)`` -> signed nibbles ``(..., 2n)``: element 2j low, 2j+1 high."""
  p = np.asarray(packed)
  out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.int32)
  out[..., 0::2], out[..., 1::2] = p & 15, p >> 4
  return out


KERNELS = {"dense": ((64, 24), 1), "qkv": ((64, 2, 6), 1), "out": ((2, 32, 16), 2)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_storage_matches_numpy(fmt):
  kw = FORMATS[fmt]
  rng = np.random.default_rng(0)
  tree = {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, (s, _) in KERNELS.items()}
  q = jlora.quantize(tree, bits=kw["bits"], kind=kw.get("kind", "int"),
                     group_size=kw.get("group_size"), double_quant=kw.get("double_quant", False),
                     in_axes={"qkv": 1, "out": 2})
  for name, (shape, n_in) in KERNELS.items():
    codes, scale, deq = np_quantize(np.asarray(tree[name]["kernel"]), n_in, **kw)
    leaf = q[name]
    c = math.prod(shape[:n_in])
    if kw["bits"] == 8:
      assert leaf["kernel"].dtype == jnp.int8 and leaf["kernel"].shape == shape
      np.testing.assert_array_equal(np.asarray(leaf["kernel"]).reshape(c, -1), codes)
      assert set(leaf) == {"kernel", "quant_scale"}
    else:
      assert leaf["kernel"].dtype == jnp.uint8 and leaf["kernel"].shape == shape[:-1] + (shape[-1] // 2,)
      nib = np_unpack4(leaf["kernel"]).reshape(c, -1)
      np.testing.assert_array_equal(nib if kw.get("kind") == "nf4" else nib - 16 * (nib >= 8), codes)
      np.testing.assert_allclose(leaf["quant_map"], PUBLISHED_NF4 if kw.get("kind") == "nf4"
                                 else list(range(8)) + list(range(-8, 0)), rtol=0, atol=2e-7)
    if not kw.get("double_quant"):
      assert leaf["quant_scale"].ndim == len(shape)   # keepdims: the rank of the kernel
      np.testing.assert_array_equal(np.asarray(leaf["quant_scale"]).reshape(scale.shape), scale)
    else:
      assert leaf["quant_scale"].dtype == jnp.int8 and "quant_dq_scale" in leaf
    # Self-describing: the leaves alone dequantize, through merge (no config).
    np.testing.assert_allclose(np.asarray(jlora.merge(q)[name]["kernel"]).reshape(c, -1), deq,
                               rtol=1e-6, atol=1e-7)
    if not kw.get("double_quant"):   # half a step at most (the widest NF4 gap is 0.3038)
      step = 0.5 * (0.3039 if kw.get("kind") == "nf4" else 1.0)
      err = np.abs(deq - np.asarray(tree[name]["kernel"]).reshape(c, -1))
      g = c if kw.get("group_size") is None else kw["group_size"]
      assert np.all(err <= step * np.repeat(scale, g, axis=0) + 1e-6)


def test_bytes_per_weight():
  """Codes plus every scale leaf, against float32 (issue 12: int8 <= 0.27x, 4-bit <= 0.16x)."""
  w = {"fc": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(256, 128)), jnp.float32)}}
  nbytes = lambda t: sum(np.asarray(x).nbytes for x in jax.tree.leaves(t))
  ratio = {k: nbytes(jlora.quantize(w, **kw)) / nbytes(w) for k, kw in
           (("int8", dict(bits=8)), ("int4", dict(bits=4)), ("nf4", dict(bits=4, kind="nf4")),
            ("nf4_dq", dict(bits=4, kind="nf4", double_quant=True)))}
  assert ratio["int8"] == pytest.approx(0.25 + 1 / 256, abs=1e-4)
  assert ratio["int4"] == ratio["nf4"] == pytest.approx(0.125 + 1 / 64 + 64 / w["fc"]["kernel"].nbytes)
  assert ratio["nf4_dq"] < 0.131   # QLoRA's 4.127 bits per weight
  assert quant.nf4_values().tolist() == pytest.approx(PUBLISHED_NF4, abs=2e-7)


def test_tree_stays_plain_and_partition_keeps_quantization_in_the_base():
  params = {"params": {"a": {"w": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
                       "b": {"kernel": jnp.ones((6, 4))}}}
  q = jlora.quantize(params, targets=r"(w|kernel)$")
  assert sorted(q["params"]["a"]) == ["bias", "w", "w_quant_scale"]
  assert sorted(q["params"]["b"]) == ["kernel", "quant_scale"]
  assert jax.tree.structure(jax.jit(lambda t: t)(q)) == jax.tree.structure(q)
  p = jlora.init(jax.random.key(0), q, jlora.LoraConfig(rank=2, targets=r"(w|kernel)$"))
  adapter, base = jlora.partition(p)
  assert all(k[-1].startswith(("lora_", "w_lora_")) for k in tree_lib.flatten(adapter))
  assert jax.tree.structure(base) == jax.tree.structure(q)
  assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), jlora.combine(adapter, base), p))
  assert jlora.count_params(p) == jlora.count_params(
      jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=r"(w|kernel)$")))
  merged = jlora.merge(p, dtype=jnp.bfloat16)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert merged["params"]["a"]["w"].dtype == jnp.bfloat16 and merged["params"]["a"]["bias"].dtype == jnp.float32
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(jlora.merge(q)))
  scaled = jlora.scale(p, 0.5)   # map_adapters leaves the quantized kernel's leaves alone
  assert jax.tree.structure(scaled) == jax.tree.structure(p)


def test_bfloat16_kernel_keeps_its_dtype():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.bfloat16)
  q = jlora.quantize({"d": {"kernel": w}}, bits=4, group_size=16)
  assert q["d"]["quant_scale"].dtype == jnp.bfloat16
  out = jlora.merge(q)["d"]["kernel"]
  assert out.dtype == jnp.bfloat16
  err = jnp.abs(out.astype(jnp.float32) - w.astype(jnp.float32))
  assert float(jnp.max(err)) <= 0.51 * float(jnp.max(q["d"]["quant_scale"].astype(jnp.float32)))


def test_nnx_state():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(8, 12, rngs=rngs)
      self.fc2 = nnx.Linear(12, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.fc1(x)))
  graphdef, state = nnx.split(M(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(1), (3, 8))
  q = jlora.quantize(state, bits=4, group_size=4)
  assert isinstance(q, nnx.State) and q["fc1"]["kernel"].get_value().dtype == jnp.uint8
  p = randomize(jlora.init(jax.random.key(2), q, jlora.LoraConfig(rank=2, targets="fc1"), fn=fn,
                           args=(x,)), jax.random.key(3))   # fc2 stays quantized, no adapter
  assert isinstance(p["fc1"]["lora_a"], nnx.LoRAParam)
  np.testing.assert_allclose(jax.jit(jlora.lora(fn))(p, x), fn(jlora.merge(p), x), rtol=1e-5,
                             atol=1e-6)


# -- init ---------------------------------------------------------------------------------

class _Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
    return nn.Dense(8, name="fc")(h)


def test_init_adapts_quantized_kernels_like_float_ones():
  model = _Attn()
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  params = model.init(jax.random.key(1), x)
  cfg = jlora.LoraConfig(rank=4, targets=["query", "out", "fc"])
  q = jlora.quantize(params, bits=4, group_size=16)   # the default split, as init's below
  want = jlora.partition(jlora.init(jax.random.key(2), params, cfg))[0]
  got = jlora.partition(jlora.init(jax.random.key(2), q, cfg))[0]
  # Same shapes, split and fan-in (kaiming bound), and the same draws: bitwise equal.
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and np.array_equal(a, b), got, want))
  assert got["params"]["attn"]["query"]["lora_b"].shape == (4, 2, 16)
  dora = jlora.init(jax.random.key(2), q, jlora.LoraConfig(rank=4, targets=["fc"], dora=True))
  w = np.asarray(jlora.merge(q)["params"]["fc"]["kernel"])
  np.testing.assert_allclose(dora["params"]["fc"]["lora_m"], np.linalg.norm(w, axis=0), rtol=1e-5)
  with pytest.raises(ValueError, match=r"'params/fc/kernel' is quantized"):
    jlora.init(jax.random.key(2), q, jlora.LoraConfig(rank=2, targets=["fc"], init="pissa"))


# -- the factored product against NumPy -----------------------------------------------------

def _fn(p, x):
  """A Dense, a q/k/v-like (d, heads, hd) projection and an out-projection (heads, hd, d)."""
  h = jnp.tanh(x @ p["fc"]["kernel"])                                  # (T, 64)
  v = jnp.einsum("td,dhk->thk", h, p["v"]["kernel"])                   # (T, 2, 32)
  return jnp.einsum("thk,hkd->td", v, p["o"]["kernel"])                # (T, 16)


def _np_forward(w, a, b, s, x):
  """The same model in NumPy on the dequantized kernels, returning every intermediate."""
  def dense(x2, name):
    return x2 @ w[name] + s * (x2 @ a[name]) @ b[name]
  hpre = dense(x, "fc")
  h = np.tanh(hpre)
  v = dense(h, "v")
  y = dense(v, "o")
  return hpre, h, v, y


def test_factored_outputs_and_gradients_match_numpy(fmt="nf4_dq"):
  """(The dequantization itself is checked against NumPy for every format above; this is
  the product machinery, on the format with the most leaves.)"""
  rng = np.random.default_rng(1)
  shapes = {"fc": (32, 64), "v": (64, 2, 32), "o": (2, 32, 16)}
  base = {k: {"kernel": jnp.asarray(rng.normal(size=s) / 8, jnp.float32)} for k, s in shapes.items()}
  x = jnp.asarray(rng.normal(size=(5, 32)), jnp.float32)
  q = jlora.quantize(base, **FORMATS[fmt], fn=_fn, args=(x,))
  p = randomize(jlora.init(jax.random.key(0), q, jlora.LoraConfig(rank=3, alpha=6.0), fn=_fn,
                           args=(x,)), jax.random.key(1), scale=0.3)
  c = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
  trainable, rest = jlora.split_trainable(p)
  loss = lambda t, x: jnp.sum(jlora.lora(_fn, on_fallback="error")(
      jlora.optim.join_trainable(t, rest, p), x) * c)
  value, (grads, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(trainable, x)
  # NumPy, on the dequantized kernels as 2-D matrices.
  flat = lambda arr, n_in: np.asarray(arr, np.float64).reshape(math.prod(arr.shape[:n_in]), -1)
  n_in = {"fc": 1, "v": 1, "o": 2}
  w = {k: flat(jlora.merge(q)[k]["kernel"], n_in[k]) for k in shapes}
  a = {k: flat(p[k]["lora_a"], n_in[k]) for k in shapes}
  b = {k: flat(p[k]["lora_b"], 1) for k in shapes}
  s = 2.0
  xs = np.asarray(x, np.float64)
  hpre, h, v, y = _np_forward(w, a, b, s, xs)
  np.testing.assert_allclose(value, np.sum(y * np.asarray(c)), rtol=1e-5)
  g_y = np.asarray(c, np.float64)
  grads_np = {}
  for name, inp, g in (("o", v, g_y),):
    grads_np[name] = (s * inp.T @ (g @ b[name].T), s * (inp @ a[name]).T @ g)
  g_v = g_y @ w["o"].T + s * (g_y @ b["o"].T) @ a["o"].T
  grads_np["v"] = (s * h.T @ (g_v @ b["v"].T), s * (h @ a["v"]).T @ g_v)
  g_h = g_v @ w["v"].T + s * (g_v @ b["v"].T) @ a["v"].T
  g_pre = g_h * (1 - h ** 2)
  grads_np["fc"] = (s * xs.T @ (g_pre @ b["fc"].T), s * (xs @ a["fc"]).T @ g_pre)
  g_x = g_pre @ w["fc"].T + s * (g_pre @ b["fc"].T) @ a["fc"].T
  for name in shapes:
    da, db = grads_np[name]
    np.testing.assert_allclose(flat(grads[name]["lora_a"], n_in[name]), da, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(flat(grads[name]["lora_b"], 1), db, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(dx, g_x, rtol=2e-4, atol=1e-5)


def test_every_kernel_kind_quantized_with_and_without_adapters():
  """Embedding lookup, attention, conv, dense and einsum kernels, all int8, half of them
  with adapters (embedding, query, out, conv, fc2) and half without: the factored run equals
  the float model on the dequantized kernels (no fallback), in outputs and gradients."""
  model = LinenNet()
  params = model.init(jax.random.key(0), TOKENS)
  q = jlora.quantize(params, r"(kernel|embedding)$", fn=model.apply, args=(TOKENS,))
  cfg = jlora.LoraConfig(rank=2, targets=r"(embed/embedding|query/kernel|out/kernel|conv|fc2)")
  p = randomize(jlora.init(jax.random.key(1), q, cfg, fn=model.apply, args=(TOKENS,)),
                jax.random.key(2), scale=0.2)
  assert len(jlora.adapters(p)) == 5 and len(quant.find(tree_lib.flatten(p))) == 9
  fact = lambda p: jnp.sum(jnp.sin(jlora.lora(model.apply, on_fallback="error")(p, TOKENS)))
  ref = lambda p: jnp.sum(jnp.sin(model.apply(jlora.merge(p), TOKENS)))
  (va, ga), (vb, gb) = (jax.jit(jlora.value_and_grad(f))(p) for f in (fact, ref))
  np.testing.assert_allclose(va, vb, rtol=1e-5)
  for (path, x), y in zip(tree_lib.flatten(ga).items(), tree_lib.flatten(gb).values()):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()), err_msg=str(path))


def test_a_quantized_kernel_reaching_an_op_without_a_rule_is_dequantized():
  q = jlora.quantize({"d": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)}})
  fn = lambda p, x: x @ p["d"]["kernel"] + jnp.sum(p["d"]["kernel"])
  with pytest.warns(jlora.LoraFallbackWarning, match="quantized kernel 'd/kernel'.*dequantized"):
    got = jlora.lora(fn)(q, jnp.ones((2, 8)))
  np.testing.assert_allclose(got, fn(jlora.merge(q), jnp.ones((2, 8))), rtol=1e-6)


# -- train steps: integers untouched, memory bounded ---------------------------------------

L, D, T = 8, 256, 16


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _=None):
    return jnp.tanh(nn.Dense(D, use_bias=False, name="fc")(h)), None


class _Unrolled(nn.Module):
  @nn.compact
  def __call__(self, h):
    for i in range(L):
      h = _Layer(name=f"l{i}")(h)[0]
    return h


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, h):
    return nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=L)(name="layers")(h, None)[0]


def _lora_step(model, fmt, rank=4):
  x = jax.random.normal(jax.random.key(0), (T, D))
  y = jax.random.normal(jax.random.key(1), (T, D))
  p = model.init(jax.random.key(2), x)
  if fmt:
    p = jlora.quantize(p, fn=model.apply, args=(x,), **FORMATS[fmt])
  p = jlora.init(jax.random.key(3), p, jlora.LoraConfig(rank=rank), fn=model.apply, args=(x,))
  tx = jlora.optimizer(optax.adam(1e-2), p)
  step = jlora.train_step(lambda p, x, y: jnp.mean((jlora.lora(model.apply)(p, x) - y) ** 2), tx)
  return step, p, tx.init(p), x, y


def _memory(step, *args):
  """``(arguments, temp)`` bytes of the compiled step, and the compiled step."""
  compiled = step.lower(*args).compile()
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes, m.temp_size_in_bytes, compiled


@pytest.mark.parametrize("model", [_Unrolled(), _Scanned()], ids=["unrolled", "scan"])
def test_train_step_memory_and_integer_leaves(model):
  """No layer's dequantized float32 kernel is kept for the backward pass, under nn.scan and
  unrolled (8 layers of 256 x 256, 16 tokens, r=4, Adam):

  * the quantized step's temp exceeds the float32 step's by at most two float kernels
    (the one being dequantized, and slack), however many layers there are; plain autodiff
    through the dequantization keeps one per layer;
  * arguments + temp: int8 at most half the float32 step's, 4-bit at most 0.45.

  Training leaves every integer and scale leaf bitwise as it was."""
  kernel = D * D * 4
  f32_args, f32_temp, _ = _memory(*_lora_step(model, None))
  int8_args, int8_temp, int8_step = _memory(*(int8 := _lora_step(model, "int8")))
  nf4_args, nf4_temp, nf4_step = _memory(*(nf4 := _lora_step(model, "nf4")))
  assert max(int8_temp, nf4_temp) <= f32_temp + 2 * kernel, (int8_temp, nf4_temp, f32_temp)
  assert _naive_temp(isinstance(model, _Scanned)) >= f32_temp + L // 2 * kernel  # the trap
  f32 = f32_args + f32_temp
  assert int8_args + int8_temp <= 0.5 * f32 and nf4_args + nf4_temp <= 0.45 * f32
  for step, (_, p, state, x, y) in ((int8_step, int8), (nf4_step, nf4)):
    frozen = {k: np.asarray(v) for k, v in tree_lib.flatten(p).items()
              if "lora_" not in str(k[-1])}
    losses = []
    p = jax.tree.map(jnp.copy, p)
    for _ in range(3):
      p, state, loss = step(p, state, x, y)
      losses.append(float(loss))
    assert losses[-1] < losses[0]
    for k, v in tree_lib.flatten(p).items():
      if k in frozen:
        assert v.dtype == frozen[k].dtype and np.array_equal(np.asarray(v), frozen[k]), k


def _naive_temp(scan: bool) -> int:
  """The memory trap: the temp bytes of the same int8 LoRA step with the base product
  differentiated by plain autodiff, ``x @ dequantize(q)``."""
  rng = np.random.default_rng(0)
  qs = [quant.quantize_array(jnp.asarray(rng.normal(size=(D, D)), jnp.float32), (0,), n_stack=0,
                             bits=8, kind="int", group_size=None, double_quant=False)
        for _ in range(L)]
  a, b = jnp.zeros((L, D, 4)), jnp.zeros((L, 4, D))
  x = jnp.ones((T, D))

  def loss(ab, qs):
    a, b = ab
    layer = lambda h, q, a, b: jnp.tanh(h @ q.dequantize() + (h @ a) @ b)
    if scan:
      return jnp.sum(jax.lax.scan(lambda h, z: (layer(h, *z), None), x, (qs, a, b))[0])
    h = x
    for i in range(L):
      h = layer(h, qs[i], a[i], b[i])
    return jnp.sum(h)
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *qs) if scan else qs
  return _memory(jax.jit(jax.grad(loss)), (a, b), stacked)[1]


# -- errors ---------------------------------------------------------------------------------

def _tree():
  return {"enc": {"kernel": jnp.ones((48, 6)), "bias": jnp.zeros(6)},
          "ids": {"kernel": jnp.ones((4, 4), jnp.int32)},
          "odd": {"kernel": jnp.ones((8, 5))}}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bits=3), ValueError, "bits must be 4 or 8"),
    (dict(bits=8, kind="nf4"), ValueError, "pass bits=4"),
    (dict(kind="fp4", bits=4), ValueError, "kind must be"),
    (dict(group_size=0), ValueError, "group_size must be"),
    (dict(double_quant=1), ValueError, "double_quant must be"),
    (dict(targets="enc/kernel", bits=4), ValueError, r"'enc/kernel' of shape \(48, 6\): group_size 64 does"
     r" not tile its input axes \(48,\)"),
    (dict(targets="enc/kernel", group_size=32), ValueError, "'enc/kernel'.*group_size 32"),
    (dict(targets="ids"), TypeError, r"'ids/kernel' has dtype int32"),
    (dict(targets="odd", bits=4, group_size=8), ValueError, r"'odd/kernel'.*odd size 5"),
    (dict(targets="nothing"), ValueError, "matched no kernel"),
])
def test_bad_input_names_the_path(kwargs, error, match):
  kwargs = {"targets": "enc/kernel|odd", **kwargs}
  with pytest.raises(error, match=match):
    jlora.quantize(_tree(), **kwargs)


def test_already_quantized_and_taken_names():
  q = jlora.quantize(_tree(), targets="enc/kernel")
  with pytest.raises(ValueError, match=r"'enc/kernel' is already quantized"):
    jlora.quantize(q, targets="enc")
  clash = {"d": {"kernel": jnp.ones((4, 4)), "quant_scale": jnp.ones((1, 4))}}
  with pytest.raises(ValueError, match=r"'d/kernel' cannot be quantized.*\['d/quant_scale'\]"):
    jlora.quantize(clash, targets="d/kernel")


def test_guards_on_quantized_trees():
  q = jlora.quantize({"d": {"kernel": jnp.ones((8, 4))}, "e": {"kernel": jnp.ones((8, 4))}})
  bad = {**q, "d": {**q["d"], "quant_scale": jnp.ones((3, 4))}}   # 3 does not divide 8
  with pytest.raises(ValueError, match=r"'d/kernel' has leaves that do not fit together"):
    jlora.merge(bad)
  both = {"m": {"kernel": jnp.ones((4, 4), jnp.int8), "embedding": jnp.ones((4, 4), jnp.int8),
                "quant_scale": jnp.ones((1, 4))}}
  with pytest.raises(ValueError, match="'m/quant_scale' would be the quantization leaf of both"):
    jlora.merge(both)
  with pytest.raises(ValueError, match=r"'layers/0' cannot be quantized.*not a string"):
    jlora.quantize({"layers": [jnp.ones((4, 4))]}, targets="layers")
  p = jlora.init(jax.random.key(0), q, jlora.LoraConfig(rank=1))
  with pytest.raises(ValueError, match=r"cannot unmerge into the quantized kernel 'd/kernel'"):
    jlora.unmerge(jlora.partition(p)[1], jlora.partition(p)[0])
  # map_adapters may swap a quantized kernel for a float one: its quantization leaves go.
  floated = jlora.map_adapters(lambda ad: ad._replace(kernel=ad.kernel.dequantize())
                               if ad.name == "d/kernel" else ad, p)
  assert "quant_scale" not in floated["d"] and floated["d"]["kernel"].dtype == jnp.float32
  assert floated["e"]["kernel"].dtype == jnp.int8 and "quant_scale" in floated["e"]


def test_stacked_kernel_needs_per_layer_scales():
  """A stack quantized as one matrix (no stack axes) has scales shared across layers: an
  adapter per layer cannot slice them, and init says so."""
  model = _Scanned()
  x = jnp.ones((2, D))
  p = model.init(jax.random.key(0), x)
  shared = jlora.quantize(p)   # no fn: the (L, D, D) kernel's first two axes are inputs
  with pytest.raises(ValueError, match=r"'params/layers/fc/kernel'.*not per layer.*stack_axes"):
    jlora.init(jax.random.key(1), shared, jlora.LoraConfig(rank=2), fn=model.apply, args=(x,))
  with pytest.warns(jlora.LoraFallbackWarning, match="scan over one of its input or output axes"):
    got = jlora.lora(model.apply)(shared, x)
  np.testing.assert_allclose(got, model.apply(jlora.merge(shared), x), rtol=1e-5, atol=1e-6)
  per_layer = jlora.quantize(p, stack_axes={"layers": 1})
  assert per_layer["params"]["layers"]["fc"]["quant_scale"].shape == (L, 1, D)


def test_output_first_kernel():
  """transformers' GPT-2 ``Conv1D``: a ``(out, in)`` kernel used as ``x @ kernel.T``. Read
  from the model, its scales are per output row and its groups run along the inputs."""
  class Conv1D(nn.Module):
    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", nn.initializers.normal(0.5), (24, x.shape[-1]))
      return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))
  model = Conv1D()
  x = jax.random.normal(jax.random.key(0), (3, 32))
  params = model.init(jax.random.key(1), x)
  q8 = jlora.quantize(params, fn=model.apply, args=(x,))
  assert q8["params"]["quant_scale"].shape == (24, 1)
  q4 = jlora.quantize(params, bits=4, group_size=16, fn=model.apply, args=(x,))
  assert q4["params"]["kernel"].shape == (24, 16) and q4["params"]["quant_scale"].shape == (24, 2)
  np.testing.assert_allclose(jlora.lora(model.apply, on_fallback="error")(q8, x),
                             model.apply(jlora.merge(q8), x), rtol=1e-5, atol=1e-6)
  p = randomize(jlora.init(jax.random.key(2), q4, jlora.LoraConfig(rank=2), fn=model.apply,
                           args=(x,)), jax.random.key(3))
  assert jlora.adapters(p)[0].out_first
  np.testing.assert_allclose(jlora.lora(model.apply, on_fallback="error")(p, x),
                             model.apply(jlora.merge(p), x), rtol=1e-5, atol=1e-5)


def test_checkpoint_and_peft_files_hold_the_adapter_only(tmp_path):
  """``jlora.save``, ``save_peft`` and ``save_sd_lora`` on a QLoRA tree store the adapter
  alone, and the loaders put it onto whatever quantized base they are given: loaded onto another
  base, the codes and scales are that base's (bitwise) and the adapter leaves are the saved
  ones."""
  def base(seed):
    params = {"params": {"fc1": {"kernel": jax.random.normal(jax.random.key(seed), (16, 32))},
                         "fc2": {"kernel": jax.random.normal(jax.random.key(seed + 1), (32, 8))}}}
    return jlora.quantize(params, ["fc1", "fc2"], bits=4, kind="nf4", group_size=8)
  cfg = jlora.LoraConfig(rank=2, targets=["fc1", "fc2"])
  p = jlora.map_adapters(lambda ad: ad._replace(b=ad.b + 0.25),   # a nonzero adapter
                         jlora.init(jax.random.key(2), base(0), cfg))
  jlora.save(tmp_path / "ckpt", p, step=1)
  jlora.save_peft(tmp_path / "peft", p)
  jlora.save_sd_lora(tmp_path / "kohya.safetensors", p)
  other = base(10)
  want = tree_lib.flatten(jlora.combine(jlora.partition(p)[0], other))
  for loaded in (jlora.load(tmp_path / "ckpt", other).params,
                 jlora.load_peft(tmp_path / "peft", other),
                 jlora.load_sd_lora(tmp_path / "kohya.safetensors", other)):
    got = tree_lib.flatten(loaded)
    assert list(got) == list(want)
    for path, w in want.items():
      assert got[path].dtype == w.dtype, path
      if jnp.issubdtype(w.dtype, jnp.integer):
        assert np.array_equal(got[path], w), path
      else:
        np.testing.assert_allclose(got[path], w, rtol=1e-6, err_msg=str(path))

"""Train-step cost of jlora against full fine-tuning, the FLOP floor and peer LoRA libraries.

Run::

    python -m experiments.bench --smoke     # tiny shapes, 2 rounds, no peers (the tests use it)
    python -m experiments.bench --quick     # the reference shapes, ~12 minutes on 2 CPU cores
    python -m experiments.bench --full      # more rounds, every rank on every model

Everything is measured in one process. For each model every variant's step is
AOT-compiled (``jax.jit(...).lower(...).compile()``), called for warm-up, then
timed round by round with the variants interleaved (the order rotates each round),
each call ended by ``jax.block_until_ready``. Times are medians; ratios are the
median over rounds of the per-round ratio, so a slow stretch of the shared machine
hits both sides of a ratio alike. Wall time and process CPU time (all threads) are
both recorded; absolute times are not results, only ratios.

Variants (float32, MSE to a fixed random target, ``optax.adam(1e-3)``):

* ``full``: gradient wrt every parameter, Adam on all of them, params and
  optimizer state donated.
* ``floor``: forward plus the gradient wrt the model input only; no parameter is
  differentiated. The least work any fine-tuning step can do.
* ``jlora_r{r}``: ``jlora.train_step(loss, jlora.optimizer(adam, params))`` with
  ``jlora.lora(model.apply)`` in the loss (factored).
* ``jlora_merged_r{r}``: the same step with ``jlora.lora(model.apply, mode="merged")``.
* ``nnx_lora_r{r}``: Flax NNX ``nnx.LoRALinear`` (MLP only), trained Tunix-style:
  ``nnx.value_and_grad(argnums=nnx.DiffState(0, nnx.LoRAParam))`` and
  ``nnx.Optimizer(wrt=nnx.LoRAParam)``, split/merge under ``jax.jit``.
* ``qwix_r{r}``: Qwix LoRA (``qwix.LoraProvider`` + ``qwix.apply_lora_to_model``),
  Tunix-style on the NNX MLP; on the linen models its ``lora_a``/``lora_b`` leaves
  are the only differentiated and optimized leaves. Optional: skipped with a note
  when ``qwix`` is not installed.

Several adapters at once (model ``multi``: the transformer with a 64-example batch, forward
passes unless named ``step_``):

* ``fwd_base``: the base model; ``fwd_one_r8``: one rank-8 adapter (factored);
  ``fwd_merged_r8``: that adapter merged (single-adapter serving).
* ``fwd_8x_r8``: 8 rank-8 adapters stacked (``jlora.stack_adapters``), example ``b`` with
  adapter ``b % 8`` (``adapter_ids``); ``step_one_r8`` / ``step_8x_r8``: the train steps of
  one adapter and of the 8 stacked ones on that batch.
* ``fwd_mix3_r8``: a ``jlora.mix`` (``cat``) of 3 rank-8 adapters done inside the jitted
  function, weights as arguments; ``fwd_one_r24``: one adapter of the same total rank.

Per variant the compiled step also gives XLA's FLOP count (``cost_analysis``), a
peak-memory estimate (``memory_analysis``: argument + output + temp - alias bytes),
the optimizer-state bytes, and counts from the optimized HLO (dots, convolutions,
custom calls, and ops whose result has a frozen kernel's shape).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import common
from experiments.models.unet import UNet, UNetConfig

NAME = "bench"
LR = 1e-3

# --------------------------------------------------------------------------------------
# Run sizes. ``ranks``: jlora ranks; ``peer_rank``: the rank of the merged step and the
# peers; ``peers``: whether nnx_lora / qwix run at all.

SIZES = {
    "smoke": dict(
        warmup=1, rounds=2, peers=False, peer_rank=4,
        models={
            "mlp": dict(d=32, hidden=64, blocks=2, batch=2, seq=8, ranks=(1, 4)),
            "transformer": dict(d=32, hidden=64, heads=4, blocks=1, batch=2, seq=8, ranks=(4,)),
            "unet": dict(channels=(32,), image=8, batch=1, ranks=(4,)),
            "multi": dict(d=32, hidden=64, heads=4, blocks=1, batch=8, seq=8, adapters=4, rank=4,
                          mix=3),
        }),
    "quick": dict(
        warmup=1, rounds=9, peers=True, peer_rank=8,
        models={
            "mlp": dict(d=512, hidden=2048, blocks=4, batch=32, seq=128, ranks=(1, 8, 64)),
            "transformer": dict(d=512, hidden=2048, heads=8, blocks=4, batch=32, seq=128,
                                ranks=(1, 8, 64)),
            "unet": dict(channels=(64, 128), image=32, batch=16, ranks=(8,)),
            "multi": dict(d=512, hidden=2048, heads=8, blocks=4, batch=64, seq=128, adapters=8,
                          rank=8, mix=3),
        }),
    "full": dict(
        warmup=2, rounds=12, peers=True, peer_rank=8,
        models={
            "mlp": dict(d=512, hidden=2048, blocks=4, batch=32, seq=128, ranks=(1, 8, 64)),
            "transformer": dict(d=512, hidden=2048, heads=8, blocks=4, batch=32, seq=128,
                                ranks=(1, 8, 64)),
            "unet": dict(channels=(64, 128), image=32, batch=16, ranks=(1, 8, 64)),
            "multi": dict(d=512, hidden=2048, heads=8, blocks=4, batch=64, seq=128, adapters=8,
                          rank=8, mix=3),
        }),
}

# Targets of the project's performance issue (rank = peer_rank; ratios from one run).
TARGET_FLOOR = 1.10      # jlora step time / floor step time
TARGET_FULL_MLP = 0.80   # jlora step time / full fine-tuning, on the MLP stack
TARGET_RANK = 1.15       # jlora rank-64 step time / rank-1 step time
TARGET_FORWARD = 1.05    # merged-mode forward time / base forward time (inference; 1.00 +- noise)
TARGET_PER_EXAMPLE = 1.3  # 64 examples over 8 stacked adapters / the same batch with one adapter
TARGET_MIX = 1.1          # a cat mix of 3 adapters / one adapter of the same total rank


# --------------------------------------------------------------------------------------
# Models (linen; the NNX twin of the MLP is built for the NNX and Qwix variants).


class MLPBlock(nn.Module):
  d: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(x)))


class MLPStack(nn.Module):
  """``blocks`` residual blocks ``x + fc2(gelu(fc1(x)))``: the peers' reference shape."""
  d: int
  hidden: int
  blocks: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      x = MLPBlock(self.d, self.hidden, name=f"block_{i}")(x)
    return x


class TransformerBlock(nn.Module):
  d: int
  hidden: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(h)))


class Transformer(nn.Module):
  """``blocks`` pre-LN blocks: self-attention (Flax's own) and an MLP."""
  d: int
  hidden: int
  heads: int
  blocks: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      x = TransformerBlock(self.d, self.hidden, self.heads, name=f"block_{i}")(x)
    return x


def _random_params(model, *args, seed: int):
  """Params with init's structure, filled from numpy (no compiled init: the UNet's
  takes ~10 s to compile on CPU). Kernels ~ N(0, 1/fan_in), norm scales 1, biases 0."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return jnp.ones(s.shape, s.dtype)
    if name == "bias":
      return jnp.zeros(s.shape, s.dtype)
    fan_in = max(1, int(np.prod(s.shape[:-1])))
    return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@dataclass
class Setup:
  """One benchmark model: base params, a batch, the apply function and LoRA targets."""
  name: str
  apply: Callable            # apply(params, *inputs) -> output
  params: Any
  inputs: tuple              # inputs[0] is the differentiable model input x
  target: jax.Array
  targets: list              # jlora / qwix module names
  ranks: tuple
  shape: str
  linen: nn.Module
  tokens: tuple = ()         # the row counts a weight gradient contracts over
  nnx_builder: Callable | None = None   # (rank, seed) -> NNX model, or None
  notes: list = field(default_factory=list)


def build_setup(name: str, spec: dict, seed: int) -> Setup:
  rng = np.random.default_rng(seed + 1)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  if name == "mlp":
    model = MLPStack(spec["d"], spec["hidden"], spec["blocks"])
    x = normal(spec["batch"], spec["seq"], spec["d"])
    params = _random_params(model, x, seed=seed)
    return Setup(name, model.apply, params, (x,), normal(*x.shape), ["fc1", "fc2"],
                 tuple(spec["ranks"]), f"{spec['blocks']} blocks, d={spec['d']}, "
                 f"hidden={spec['hidden']}, x {spec['batch']}x{spec['seq']}x{spec['d']}",
                 model, tokens=(spec["batch"] * spec["seq"],),
                 nnx_builder=lambda rank, s: _nnx_mlp(spec, rank, s))
  if name in ("transformer", "multi"):
    model = Transformer(spec["d"], spec["hidden"], spec["heads"], spec["blocks"])
    x = normal(spec["batch"], spec["seq"], spec["d"])
    params = _random_params(model, x, seed=seed)
    return Setup(name, model.apply, params, (x,), normal(*x.shape),
                 ["query", "key", "value", "out", "fc1", "fc2"], tuple(spec.get("ranks", ())),
                 f"{spec['blocks']} pre-LN blocks, d={spec['d']}, {spec['heads']} heads, "
                 f"mlp {spec['hidden']}, x {spec['batch']}x{spec['seq']}x{spec['d']}"
                 + (f", {spec['adapters']} adapters r{spec['rank']}" if name == "multi" else ""),
                 model, tokens=(spec["batch"] * spec["seq"],))
  if name == "unet":
    chans = tuple(spec["channels"])
    # ctx_dim 48 differs from every token count, so shapes tell kernels from activations.
    model = UNet(UNetConfig(channels=chans, ctx_dim=48, groups=8, attn_heads=4))
    b, s = spec["batch"], spec["image"]
    x = normal(b, s, s, 1)
    t = jnp.asarray(rng.integers(0, 200, size=b), jnp.int32)
    label = jnp.asarray(rng.integers(0, 10, size=b), jnp.int32)
    params = _random_params(model, x, t, label, seed=seed)
    # The ResBlock convs and the cross-attention projections. conv_in (1 input
    # channel) and conv_out (1 output channel) are too thin for rank > 1.
    tokens = tuple(b * (s >> i) ** 2 for i in range(len(chans))) + (2 * b,)
    return Setup(name, model.apply, params, (x, t, label), normal(*x.shape),
                 ["conv_1", "conv_2", "to_q", "to_k", "to_v", "to_out"], tuple(spec["ranks"]),
                 f"UNet channels={chans}, ctx_dim=48, x {b}x{s}x{s}x1", model, tokens=tokens)
  raise ValueError(name)


def _nnx_mlp(spec: dict, rank: int | None, seed: int):
  """The MLP stack in Flax NNX; ``rank`` swaps every Linear for ``nnx.LoRALinear``."""
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      def linear(i, o):
        if rank:
          return nnx.LoRALinear(i, o, lora_rank=rank, rngs=rngs)
        return nnx.Linear(i, o, rngs=rngs)
      self.fc1 = linear(spec["d"], spec["hidden"])
      self.fc2 = linear(spec["hidden"], spec["d"])

    def __call__(self, x):
      return x + self.fc2(nnx.gelu(self.fc1(x)))

  class Stack(nnx.Module):
    def __init__(self, rngs):
      for i in range(spec["blocks"]):
        setattr(self, f"block_{i}", Block(rngs))

    def __call__(self, x):
      for i in range(spec["blocks"]):
        x = getattr(self, f"block_{i}")(x)
      return x

  return Stack(nnx.Rngs(seed))


# --------------------------------------------------------------------------------------
# Variants. Each is a compiled step plus the mutable state it is called with.


@dataclass
class Variant:
  name: str
  kind: str            # full | floor | jlora | jlora_merged | nnx_lora | qwix
  rank: int | None
  compiled: Any
  state: tuple         # the donated/updated leading arguments
  batch: tuple         # the fixed trailing arguments
  n_state_out: int     # how many leading outputs replace ``state``
  opt_state_bytes: int
  trainable: int
  compile_s: float
  losses: list = field(default_factory=list)
  wall: list = field(default_factory=list)
  cpu: list = field(default_factory=list)

  def call(self):
    out = self.compiled(*self.state, *self.batch)
    out = jax.block_until_ready(out)
    if self.n_state_out:
      self.state = tuple(out[:self.n_state_out])
      self.losses.append(float(out[self.n_state_out]))
    return out


def _copy(tree):
  """A fresh copy of every array: donated buffers must not be shared between variants."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a, tree)


def _nbytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def _compile(fn, *args, donate=()):
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def _mse(out, target):
  return jnp.mean((out - target) ** 2)


def make_full(s: Setup) -> Variant:
  adam = optax.adam(LR)
  params = _copy(s.params)
  opt_state = adam.init(params)

  def step(p, st, *batch):
    *inputs, target = batch
    loss, g = jax.value_and_grad(lambda p: _mse(s.apply(p, *inputs), target))(p)
    u, st = adam.update(g, st, p)
    return optax.apply_updates(p, u), st, loss

  batch = (*s.inputs, s.target)
  compiled, secs = _compile(step, params, opt_state, *batch, donate=(0, 1))
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  return Variant("full", "full", None, compiled, (params, opt_state), batch, 2,
                 _nbytes(opt_state), int(n), secs)


def make_floor(s: Setup) -> Variant:
  def step(p, x, *rest):
    *others, target = rest
    return jax.grad(lambda x: _mse(s.apply(p, x, *others), target))(x)

  params = _copy(s.params)
  batch = (*s.inputs, s.target)
  compiled, secs = _compile(step, params, *batch)
  return Variant("floor", "floor", None, compiled, (params,), batch, 0, 0, 0, secs)


def lora_params(s: Setup, rank: int, seed: int):
  cfg = jlora.LoraConfig(rank=rank, targets=s.targets)
  params = jlora.init(jax.random.key(seed), s.params, cfg, fn=s.apply, args=s.inputs)
  # B = 0 at init; a small random B keeps the adapter branch live in every variant.
  return _randomize_b(params, np.random.default_rng(seed))


def _randomize_b(params, rng):
  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "lora_b":
      return jnp.asarray(0.01 * rng.normal(size=leaf.shape), leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(fill, params)


def make_jlora(s: Setup, rank: int, seed: int, mode: str = "factored") -> Variant:
  params = _copy(lora_params(s, rank, seed))
  tx = jlora.optimizer(optax.adam(LR), params)
  opt_state = tx.init(params)
  apply = jlora.lora(s.apply, mode=mode)

  def loss(p, *batch):
    *inputs, target = batch
    return _mse(apply(p, *inputs), target)

  step = jlora.train_step(loss, tx)          # jitted, params and opt_state donated
  batch = (*s.inputs, s.target)
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, *batch).compile()
  secs = time.perf_counter() - t0
  name = f"jlora_r{rank}" if mode == "factored" else f"jlora_merged_r{rank}"
  return Variant(name, "jlora" if mode == "factored" else "jlora_merged", rank, compiled,
                 (params, opt_state), batch, 2, _nbytes(opt_state),
                 jlora.count_params(params).trainable, secs)


def _nnx_step(model, s: Setup, name: str, kind: str, rank: int) -> Variant:
  """Tunix-style: grads wrt ``nnx.LoRAParam`` only, ``Optimizer(wrt=LoRAParam)``;
  split/merge under ``jax.jit`` with the state donated."""
  from flax import nnx
  opt = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.LoRAParam)
  graphdef, state = nnx.split((model, opt))

  def step(state, x, target):
    model, opt = nnx.merge(graphdef, state)
    loss_fn = lambda m: _mse(m(x), target)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  state = _copy(state)
  batch = (s.inputs[0], s.target)
  compiled, secs = _compile(step, state, *batch, donate=(0,))
  opt_bytes = _nbytes(nnx.state(opt, nnx.OptState))
  trainable = sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  return Variant(name, kind, rank, compiled, (state,), batch, 1, opt_bytes, int(trainable), secs)


def make_nnx_lora(s: Setup, rank: int, seed: int) -> Variant:
  model = s.nnx_builder(rank, seed)
  _randomize_nnx_b(model, seed)
  return _nnx_step(model, s, f"nnx_lora_r{rank}", "nnx_lora", rank)


def _randomize_nnx_b(model, seed: int):
  from flax import nnx
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam) and str(path[-1]).endswith("b"):
      old = var.get_value()
      var.set_value(jnp.asarray(0.01 * rng.normal(size=old.shape), old.dtype))


def make_qwix(s: Setup, rank: int, seed: int) -> Variant:
  import qwix
  pattern = r".*(" + "|".join(s.targets) + r")"
  provider = qwix.LoraProvider(module_path=pattern, rank=rank, alpha=float(rank))
  if s.nnx_builder is not None:
    from flax import nnx
    base = s.nnx_builder(None, seed)
    model = qwix.apply_lora_to_model(base, provider, s.inputs[0], rngs=nnx.Rngs(seed + 123))
    _randomize_nnx_b(model, seed)
    return _nnx_step(model, s, f"qwix_r{rank}", "qwix", rank)
  # A linen model: Qwix adds ``*_lora_a``/``*_lora_b`` params beside the kernels; those
  # are the only leaves differentiated and optimized.
  qmodel = qwix.apply_lora_to_model(s.linen, provider)
  shapes = jax.eval_shape(qmodel.init, jax.random.key(0), *s.inputs)
  rng = np.random.default_rng(seed)
  is_lora = lambda path: "lora_" in str(getattr(path[-1], "key", path[-1]))
  base_flat = dict(jax.tree_util.tree_flatten_with_path(s.params)[0])

  def fill(path, sd):
    if is_lora(path):
      scale = 0.01 if str(path[-1].key).endswith("lora_b") else 1 / math.sqrt(sd.shape[0])
      return jnp.asarray(scale * rng.normal(size=sd.shape), sd.dtype)
    return base_flat[path]

  full_params = jax.tree_util.tree_map_with_path(fill, shapes)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: is_lora(p), full_params)
  lora_p = jax.tree.map(lambda m, x: x if m else None, mask, full_params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, full_params)
  adam = optax.adam(LR)
  merge = lambda a, b: jax.tree.map(lambda m, x, y: x if m else y, mask, a, b,
                                    is_leaf=lambda x: x is None)

  def step(lp, st, fp, *batch):
    *inputs, target = batch
    loss, g = jax.value_and_grad(lambda lp: _mse(qmodel.apply(merge(lp, fp), *inputs),
                                                 target))(lp)
    u, st = adam.update(g, st, lp)
    return optax.apply_updates(lp, u), st, loss

  lora_p, frozen = _copy(lora_p), _copy(frozen)
  opt_state = adam.init(lora_p)
  batch = (frozen, *s.inputs, s.target)
  compiled, secs = _compile(step, lora_p, opt_state, *batch, donate=(0, 1))
  return Variant(f"qwix_r{rank}", "qwix", rank, compiled, (lora_p, opt_state), batch, 2,
                 _nbytes(opt_state), int(sum(np.size(x) for x in jax.tree.leaves(lora_p))), secs)


# --------------------------------------------------------------------------------------
# Several adapters at once (model "multi").


def make_call(name: str, kind: str, fn, state: tuple, batch: tuple, rank=None) -> Variant:
  """A jitted ``fn(*state, *batch)`` that updates nothing (an inference pass)."""
  state = _copy(tuple(state))
  compiled, secs = _compile(fn, *state, *batch)
  return Variant(name, kind, rank, compiled, state, tuple(batch), 0, 0, 0, secs)


def make_step(name: str, kind: str, params, loss, batch: tuple, rank) -> Variant:
  """``jlora.train_step(loss, jlora.optimizer(adam, params))``, params and state donated."""
  params = _copy(params)
  tx = jlora.optimizer(optax.adam(LR), params)
  opt_state = tx.init(params)
  step = jlora.train_step(loss, tx)
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, *batch).compile()
  return Variant(name, kind, rank, compiled, (params, opt_state), tuple(batch), 2,
                 _nbytes(opt_state), jlora.count_params(params).trainable,
                 time.perf_counter() - t0)


def build_multi_variants(s: Setup, spec: dict, seed: int) -> list[Variant]:
  """The variants of the ``multi`` model (see the module docstring)."""
  r, n, k = spec["rank"], spec["adapters"], spec["mix"]
  x, base = s.inputs[0], s.params
  apply = jlora.lora(s.apply)
  one = lora_params(s, r, seed)
  trees = [jlora.partition(lora_params(s, r, seed + 1 + i))[0] for i in range(n)]
  stacked = jlora.combine(jlora.stack_adapters(trees), base)
  ids = jnp.arange(x.shape[0], dtype=jnp.int32) % n
  mixed = {f"a{i}": trees[i] for i in range(k)}
  weights = jnp.linspace(0.5, 1.5, k)
  per_example = lambda p, x, ids: apply(p, x, adapter_ids=ids)
  mix_forward = lambda ads, base, w, x: apply(jlora.combine(jlora.mix(ads, w), base), x)
  loss_one = lambda p, x, t: _mse(apply(p, x), t)
  loss_many = lambda p, x, ids, t: _mse(apply(p, x, adapter_ids=ids), t)
  makers = [
      lambda: make_call("fwd_base", "forward", s.apply, (base,), (x,)),
      lambda: make_call(f"fwd_one_r{r}", "forward", apply, (one,), (x,), r),
      lambda: make_call(f"fwd_merged_r{r}", "forward", jlora.lora(s.apply, mode="merged"),
                        (one,), (x,), r),
      lambda: make_call(f"fwd_{n}x_r{r}", "forward", per_example, (stacked,), (x, ids), r),
      lambda: make_call(f"fwd_mix{k}_r{r}", "forward", mix_forward, (mixed, base), (weights, x),
                        k * r),
      lambda: make_call(f"fwd_one_r{k * r}", "forward", apply, (lora_params(s, k * r, seed),),
                        (x,), k * r),
      lambda: make_step(f"step_one_r{r}", "step", one, loss_one, (x, s.target), r),
      lambda: make_step(f"step_{n}x_r{r}", "step", stacked, loss_many, (x, ids, s.target), r),
  ]
  variants = []
  for make in makers:
    v = make()
    print(f"  compiled {s.name}/{v.name} in {v.compile_s:.1f}s", flush=True)
    variants.append(v)
  return variants


def summarize_multi(s: Setup, spec: dict, variants: list[Variant]) -> list[dict]:
  """Ratios of the ``multi`` variants: forward passes against one adapter (``t/one``) and the
  base model (``t/base``), train steps against one adapter's step."""
  by = {v.name: v for v in variants}
  r = spec["rank"]
  rows = []
  for v in variants:
    one = by[f"fwd_one_r{r}"] if v.kind == "forward" else by[f"step_one_r{r}"]
    mem = memory(v.compiled)
    rows.append({
        "model": s.name, "variant": v.name, "kind": v.kind, "rank": v.rank or "",
        "wall_ms": 1e3 * statistics.median(v.wall), "t/one": paired_ratio(v.wall, one.wall),
        "t/base": paired_ratio(v.wall, by["fwd_base"].wall) if v.kind == "forward" else "",
        "cpu/one": paired_ratio(v.cpu, one.cpu), "gflops": flops(v.compiled) / 1e9,
        "flops/one": flops(v.compiled) / flops(one.compiled),
        "temp_mib": mem.get("temp", 0) / 2**20, "compile_s": v.compile_s,
        "wall_s": list(v.wall), "cpu_s": list(v.cpu), "flops": flops(v.compiled),
    })
  return rows


def check_multi_targets(rows: list[dict], spec: dict) -> list[dict]:
  """The several-adapters targets: per-example batching and mixing."""
  by = {row["variant"]: row for row in rows}
  r, n, k = spec["rank"], spec["adapters"], spec["mix"]
  out = []

  def add(target, a, b, bound):
    wall = paired_ratio(a["wall_s"], b["wall_s"])
    out.append({"model": a["model"], "target": target, "wall": wall,
                "cpu": paired_ratio(a["cpu_s"], b["cpu_s"]), "flops": a["flops"] / b["flops"],
                "met": wall <= bound})

  add(f"{n} stacked adapters r{r} (forward) <= {TARGET_PER_EXAMPLE} x one adapter",
      by[f"fwd_{n}x_r{r}"], by[f"fwd_one_r{r}"], TARGET_PER_EXAMPLE)
  add(f"{n} stacked adapters r{r} (train step) <= {TARGET_PER_EXAMPLE} x one adapter",
      by[f"step_{n}x_r{r}"], by[f"step_one_r{r}"], TARGET_PER_EXAMPLE)
  add(f"cat mix of {k} r{r} (forward) <= {TARGET_MIX} x one adapter r{k * r}",
      by[f"fwd_mix{k}_r{r}"], by[f"fwd_one_r{k * r}"], TARGET_MIX)
  return out


MULTI_COLUMNS = ["model", "variant", "t/one", "t/base", "cpu/one", "gflops", "flops/one",
                 "temp_mib", "wall_ms"]


# --------------------------------------------------------------------------------------
# Compiled-program facts.


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def memory(compiled) -> dict:
  """XLA's buffer assignment. ``peak`` = argument + output + temp - alias (donated
  outputs that reuse argument buffers are counted once)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  fields = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
            ("argument", "output", "temp", "alias", "generated_code")}
  fields["peak"] = fields["argument"] + fields["output"] + fields["temp"] - fields["alias"]
  return fields


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:\(?)([a-z0-9]+)\[([0-9,]*)\][^ ]* ([a-z\-]+)\(")
_OPERANDS = re.compile(r"[a-z\-]+\(%([\w.\-]+)(?:, %([\w.\-]+))?")
BIG = 1 << 20   # elements: a "big" array (4 MiB in float32)


def hlo_stats(hlo: str, kernel_shapes, tokens) -> dict:
  """Op counts from optimized HLO text (every computation, fusion bodies included).

  * ``dot``, ``convolution``, ``custom_call``, ``fusion``, ``transpose``, ``copy``: op counts.
  * ``big_transpose``: transposes and copies whose result has >= 2**20 elements. XLA:CPU
    emits these when it lays an activation out for a dot it cannot run in place; inside
    a loop fusion they are slow.
  * ``kernel_dot``: weight-gradient-like products: dots whose result has an adapted
    kernel's shape (any axis order, or a 2-D flattening) and which contract over a
    token count in ``tokens``; convolutions whose result has a conv kernel's shape.
    Zero for a factored step; a merged step has one per adapted kernel.
  * ``kernel_add``: adds with a kernel-shaped result (merges ``W + s·A·B``, or updates).
  """
  wanted = set()
  for shp in kernel_shapes:
    wanted.add(tuple(sorted(shp)))
    for cut in range(1, len(shp)):
      wanted.add(tuple(sorted((math.prod(shp[:cut]), math.prod(shp[cut:])))))
  conv_kernels = {tuple(sorted(shp)) for shp in kernel_shapes if len(shp) >= 3}
  tokens = set(tokens)
  shapes, ops, kernel, targets = {}, Counter(), Counter(), Counter()
  lines = hlo.splitlines()
  for ln in lines:                       # every instruction's shape, by name
    m = _INSTR.match(ln)
    if m:
      shapes[m.group(1)] = tuple(int(d) for d in m.group(3).split(",") if d)
  for ln in lines:
    m = _INSTR.match(ln)
    if not m:
      continue
    dims, op = shapes[m.group(1)], m.group(4)
    ops[op] += 1
    if op == "custom-call":
      t = re.search(r'custom_call_target="([^"]+)"', ln)
      targets[t.group(1) if t else "?"] += 1
    if op in ("transpose", "copy") and math.prod(dims) >= BIG:
      kernel["big_transpose"] += 1
    if len(dims) < 2 or tuple(sorted(dims)) not in wanted:
      continue
    if op == "dot":
      operands = _OPERANDS.search(ln[ln.index(" dot(") + 1:])
      lhs = shapes.get(operands.group(1), ()) if operands else ()
      cdims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ln)
      contracted = math.prod(lhs[int(d)] for d in cdims.group(1).split(",") if d) \
          if cdims and lhs else 0
      if contracted in tokens:
        kernel["dot"] += 1
    elif op == "convolution" and tuple(sorted(dims)) in conv_kernels:
      kernel["dot"] += 1
    elif op in ("add", "transpose", "copy"):
      kernel[op] += 1
  return {"dot": ops["dot"], "convolution": ops["convolution"],
          "custom_call": ops["custom-call"], "fusion": ops["fusion"],
          "transpose": ops["transpose"], "copy": ops["copy"],
          "big_transpose": kernel["big_transpose"], "custom_call_targets": dict(targets),
          "kernel_dot": kernel["dot"], "kernel_add": kernel["add"],
          "kernel_transpose": kernel["transpose"] + kernel["copy"]}


# --------------------------------------------------------------------------------------
# The run.


def make_forward(s: Setup, name: str, params, apply) -> Variant:
  """A jitted forward pass (inference): ``apply(params, *inputs)``."""
  params = _copy(params)
  compiled, secs = _compile(lambda p, *inputs: apply(p, *inputs), params, *s.inputs)
  return Variant(name, "forward", None, compiled, (params,), tuple(s.inputs), 0, 0, 0, secs)


def build_variants(s: Setup, size: dict, seed: int, notes: list) -> list[Variant]:
  pr = size["peer_rank"]
  makers = [("full", lambda: make_full(s)), ("floor", lambda: make_floor(s))]
  makers += [(f"jlora_r{r}", lambda r=r: make_jlora(s, r, seed)) for r in s.ranks]
  makers += [(f"jlora_merged_r{pr}", lambda: make_jlora(s, pr, seed, mode="merged"))]
  # Inference: the merged mode's forward against the base model's forward.
  makers += [("fwd_base", lambda: make_forward(s, "fwd_base", s.params, s.apply)),
             (f"fwd_merged_r{pr}", lambda: make_forward(
                 s, f"fwd_merged_r{pr}", lora_params(s, pr, seed), jlora.lora(s.apply, mode="merged")))]
  if size["peers"]:
    if s.nnx_builder is not None:
      makers.append((f"nnx_lora_r{pr}", lambda: make_nnx_lora(s, pr, seed)))
    try:
      import qwix  # noqa: F401  (benchmark-only optional dependency)
      makers.append((f"qwix_r{pr}", lambda: make_qwix(s, pr, seed)))
    except ImportError:
      notes.append(f"{s.name}: qwix is not installed (pip install qwix); variant skipped")
  variants = []
  for name, make in makers:
    try:
      v = make()
    except Exception as e:  # a peer that does not run on this model: note it and go on
      if name.startswith(("nnx_lora", "qwix")):
        notes.append(f"{s.name}: {name} skipped ({type(e).__name__}: {str(e)[:200]})")
        continue
      raise
    print(f"  compiled {s.name}/{v.name} in {v.compile_s:.1f}s", flush=True)
    variants.append(v)
  return variants


def time_variants(variants: list[Variant], warmup: int, rounds: int, desc: str):
  for _ in range(warmup):
    for v in variants:
      v.call()
  for v in variants:
    v.losses.clear()
  for rnd in common.progress(range(rounds), total=rounds, desc=desc):
    k = rnd % len(variants)
    for v in variants[k:] + variants[:k]:       # rotate the order each round
      w0, c0 = time.perf_counter(), time.process_time()
      v.call()
      v.wall.append(time.perf_counter() - w0)
      v.cpu.append(time.process_time() - c0)


def paired_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of ``a[i] / b[i]`` (same round, so same machine load)."""
  return float(statistics.median(x / y for x, y in zip(a, b)))


def summarize(s: Setup, variants: list[Variant]) -> list[dict]:
  by = {v.name: v for v in variants}
  full, floor = by["full"], by["floor"]
  f_full, f_floor = flops(full.compiled), flops(floor.compiled)
  kernel_shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(s.params) if np.ndim(x) >= 2}
  adapted = {tuple(a.kernel.shape) for a in jlora.adapters(lora_params(s, min(s.ranks), 0))}
  rows = []
  for v in variants:
    f = flops(v.compiled)
    mem = memory(v.compiled)
    hlo = hlo_stats(v.compiled.as_text(), adapted or kernel_shapes, s.tokens)
    rows.append({
        "model": s.name, "variant": v.name, "kind": v.kind, "rank": v.rank or "",
        "wall_ms": 1e3 * statistics.median(v.wall), "cpu_ms": 1e3 * statistics.median(v.cpu),
        "t/full": paired_ratio(v.wall, full.wall), "t/floor": paired_ratio(v.wall, floor.wall),
        "cpu/full": paired_ratio(v.cpu, full.cpu), "cpu/floor": paired_ratio(v.cpu, floor.cpu),
        "gflops": f / 1e9, "flops/full": f / f_full, "flops/floor": f / f_floor,
        "peak_mib": mem.get("peak", 0) / 2**20, "temp_mib": mem.get("temp", 0) / 2**20,
        "opt_state_mib": v.opt_state_bytes / 2**20, "trainable": v.trainable,
        "compile_s": v.compile_s,
        "loss_first": v.losses[0] if v.losses else None,
        "loss_last": v.losses[-1] if v.losses else None,
        "wall_s": list(v.wall), "cpu_s": list(v.cpu), "memory": mem, **hlo, "flops": f,
    })
  return rows


def check_targets(rows: list[dict], peer_rank: int) -> list[dict]:
  """The issue's targets. ``met`` reads the wall-time ratio; the CPU-time ratio (process
  CPU, all threads) and XLA's FLOP ratio are shown beside it: on a shared machine the
  CPU ratio is the steadier of the two times, and the FLOP ratio is what the hardware
  cannot beat."""
  out = []

  def add(model, target, a, b, bound):
    wall = paired_ratio(a["wall_s"], b["wall_s"])
    out.append({"model": model, "target": target, "wall": wall,
                "cpu": paired_ratio(a["cpu_s"], b["cpu_s"]), "flops": a["flops"] / b["flops"],
                "met": wall <= bound})

  for model in dict.fromkeys(r["model"] for r in rows):
    by = {r["variant"]: r for r in rows if r["model"] == model}
    j = by.get(f"jlora_r{peer_rank}")
    if j is None:
      continue
    add(model, f"jlora r{peer_rank} <= {TARGET_FLOOR} x floor", j, by["floor"], TARGET_FLOOR)
    if model == "mlp":
      add(model, f"jlora r{peer_rank} <= {TARGET_FULL_MLP} x full", j, by["full"], TARGET_FULL_MLP)
    if f"fwd_merged_r{peer_rank}" in by:
      add(model, f"merged forward r{peer_rank} <= {TARGET_FORWARD} x base forward",
          by[f"fwd_merged_r{peer_rank}"], by["fwd_base"], TARGET_FORWARD)
    ranks = sorted(r["rank"] for r in by.values() if r["kind"] == "jlora")
    if len(ranks) > 1:
      add(model, f"jlora r{ranks[-1]} <= {TARGET_RANK} x r{ranks[0]}", by[f"jlora_r{ranks[-1]}"],
          by[f"jlora_r{ranks[0]}"], TARGET_RANK)
  return out


COLUMNS = ["model", "variant", "t/full", "t/floor", "cpu/full", "cpu/floor", "gflops",
           "flops/full", "flops/floor", "peak_mib", "temp_mib", "opt_state_mib", "trainable"]
HLO_COLUMNS = ["model", "variant", "dot", "convolution", "custom_call", "fusion", "transpose",
               "copy", "big_transpose", "kernel_dot", "kernel_add", "kernel_transpose"]


#: The models with single-adapter train-step variants (``multi`` has its own, above).
TRAIN_MODELS = ("mlp", "transformer", "unet")


def parse_args(doc: str, argv, *int_options: str, default_models=None):
  """``common.parse_args`` plus ``--models`` (a comma-separated subset of the bench models;
  ``default_models`` or all of them when absent) and the given integer options; returns
  ``(args, options, models)``."""
  extra = argparse.ArgumentParser(add_help=False)
  extra.add_argument("--models", default=None,
                     help="comma-separated subset of mlp,transformer,unet,multi")
  for name in int_options:
    extra.add_argument(f"--{name}", type=int, default=None)
  known, rest = extra.parse_known_args(argv if argv is not None else sys.argv[1:])
  args = common.parse_args(doc.splitlines()[0], rest)
  models = (known.models.split(",") if known.models
            else list(default_models or SIZES[args.size]["models"]))
  return args, known, models


def main(argv=None):
  args, known, models = parse_args(__doc__, argv, "rounds")
  size = dict(SIZES[args.size])
  if known.rounds:
    size["rounds"] = known.rounds
  results = common.Results(NAME, args)
  print(f"bench ({args.size}): models {models}, {size['warmup']} warm-up + {size['rounds']} "
        f"rounds, jax {jax.__version__} on {jax.default_backend()}", flush=True)

  notes: list[str] = []
  rows: list[dict] = []
  multi_rows: list[dict] = []
  multi_targets: list[dict] = []
  shapes = {}
  for name in models:
    spec = size["models"][name]
    s = build_setup(name, spec, args.seed)
    shapes[name] = s.shape
    print(f"[{name}] {s.shape}", flush=True)
    if name == "multi":
      variants = build_multi_variants(s, spec, args.seed)
    else:
      variants = build_variants(s, size, args.seed, notes)
    time_variants(variants, size["warmup"], size["rounds"], desc=name)
    if name == "multi":
      multi_rows = summarize_multi(s, spec, variants)
      multi_targets = check_multi_targets(multi_rows, spec)
    else:
      rows += summarize(s, variants)
    del variants

  targets = check_targets(rows, size["peer_rank"]) + multi_targets
  if rows:
    results.table(rows, COLUMNS, title="Train step: time, FLOP and memory ratios "
                  "(time ratios: median over rounds of per-round ratios)", stem="results")
    results.table(rows, HLO_COLUMNS, title="Optimized HLO: op counts (kernel_*: result has a "
                  "frozen adapted kernel's shape)", stem="hlo")
  if multi_rows:
    results.table(multi_rows, MULTI_COLUMNS, title="Several adapters at once (transformer, "
                  "64-example batch): time ratios against one adapter and the base model "
                  "(medians of per-round ratios)", stem="multi")
  if targets:
    results.table(targets, ["model", "target", "wall", "cpu", "flops", "met"],
                  title="Targets (ratios; met = wall ratio within the bound)", stem="targets")
  for n in notes:
    print("note:", n)
  path = results.save_json({
      "rounds": size["rounds"], "warmup": size["warmup"], "peer_rank": size["peer_rank"],
      "shapes": shapes, "notes": notes, "targets": targets, "rows": rows,
      "multi_rows": multi_rows,
      "memory_peak": "argument + output + temp - alias bytes (compiled.memory_analysis())",
      "argv": sys.argv[1:] if argv is None else list(argv)})
  print(f"wrote {path}", flush=True)
  return rows


if __name__ == "__main__":
  main()

"""Tiny models on the meshes of the sharding tests, and a runner for their LoRA step.

Used by ``test_mesh.py`` (8 simulated devices in one process) and by
``multihost_worker.py`` (the same step from two processes). Every setup places the
base by a spec per leaf path, lets ``jlora.init`` place the adapters, gives B random
values (so every product of the branch matters from step 1) without moving them,
and trains 5 Adam steps with ``jlora.train_step``.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jlora
from jlora import tree as tree_lib
from jlora.optim import trainable_roles

D, HEADS, HEAD_DIM, FF, BATCH, SEQ, RANK, LAYERS = 16, 8, 4, 32, 8, 4, 4, 2
TARGETS = r"(query|key|value|out|fc1|fc2)/kernel$"
STEPS = 5


class LinenBlock(nn.Module):
  """Attention (q/k/v ``(D, HEADS, HEAD_DIM)``, out ``(HEADS, HEAD_DIM, D)``) and an MLP,
  each on a residual (no norms: they add compile time and nothing to shard)."""

  @nn.compact
  def __call__(self, x, _=None):
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM,
                                            name="attn")(x)
    x = x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(FF, name="fc1")(x)))
    return x, None


class LinenStack(nn.Module):
  """``LAYERS`` blocks under ``nn.scan``: every kernel gets a leading stack axis."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=LAYERS)
    return scan(name="layers")(x, None)[0]


class NNXBlock(nnx.Module):
  """``LinenBlock`` in NNX; ``row`` is the ``out_sharding`` of the row-parallel layers,
  which Explicit mesh axes need (``P('data')``) and Auto axes refuse."""

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D,
                                       qkv_features=HEADS * HEAD_DIM, decode=False, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(D, FF, rngs=rngs), nnx.Linear(FF, D, rngs=rngs)

  def __call__(self, x, row=None):
    x = x + self.attn(x, out_sharding=row)
    return x + self.fc2(nnx.gelu(self.fc1(x)), out_sharding=row)


# Megatron: q/k/v and fc1 column-parallel (their outputs over 'model'), out and fc2
# row-parallel (their inputs over 'model'); the first matching rule wins.
MEGATRON = ((r"(query|key|value)/kernel$", P(None, "model", None)),
            (r"(query|key|value)/bias$", P("model", None)),
            (r"out/kernel$", P("model", None, None)),
            (r"fc1/kernel$", P(None, "model")),
            (r"fc1/bias$", P("model")),
            (r"fc2/kernel$", P("model", None)))
# FSDP: every kernel sharded on its first input axis over 'data'.
FSDP = ((r"kernel$", P("data")),)


class Setup(NamedTuple):
  mesh_shape: tuple
  axis_names: tuple
  model: str            # "linen", "linen_scan" or "nnx"
  rules: tuple          # ((path regex, spec without stack axes), ...)


SETUPS = {
    "dp": Setup((8,), ("data",), "linen", ()),
    "tp": Setup((2, 4), ("data", "model"), "nnx", MEGATRON),
    "tp_linen": Setup((2, 4), ("data", "model"), "linen", MEGATRON),
    "fsdp": Setup((8,), ("data",), "linen", FSDP),
    "scan_tp": Setup((2, 4), ("data", "model"), "linen_scan", MEGATRON),
    "scan_fsdp": Setup((8,), ("data",), "linen_scan", FSDP),
}
# What the two-process test runs: (setup, Explicit axes, unroll_max_rank).
TWO_PROCESS_CASE = ("tp", True, 0)


def data():
  kx, ky = jax.random.split(jax.random.key(0))
  return (np.asarray(jax.random.normal(kx, (BATCH, SEQ, D))),
          np.asarray(jax.random.normal(ky, (BATCH, SEQ, D))))


def model(name: str, explicit: bool = False):
  """``(apply, base params)``; ``apply(params, x)`` is the plain model, for one device
  and for the mesh alike (NNX passes its row-parallel ``out_sharding`` on Explicit axes)."""
  s = SETUPS[name]
  if s.model == "nnx":
    graphdef, state = nnx.split(NNXBlock(nnx.Rngs(1)))
    row = P("data") if explicit else None
    return (lambda p, x: nnx.merge(graphdef, p)(x, row)), state
  x, _ = data()
  m = LinenStack() if s.model == "linen_scan" else LinenBlock()
  apply = (lambda p, x: m.apply(p, x)) if s.model == "linen_scan" else (
      lambda p, x: m.apply(p, x)[0])
  return apply, m.init(jax.random.key(1), jnp.asarray(x))


def mesh(name: str, explicit: bool):
  s = SETUPS[name]
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(s.mesh_shape, s.axis_names, axis_types=(kind,) * len(s.axis_names))


def base_spec(name: str, path, ndim: int) -> P:
  """The spec of a base leaf: the first matching rule, a stack axis in front under scan."""
  s, where = SETUPS[name], tree_lib.path_str(path)
  spec = next((sp for rx, sp in s.rules if re.search(rx, where)), P())
  if s.model == "linen_scan" and spec != P():
    spec = P(None, *spec)
  return spec if len(spec) <= ndim else P()


def place_base(name: str, base, mesh_):
  """Every base leaf placed as a global array (``make_array_from_callback``, so each
  process puts only its own shards: this is also the multi-process recipe)."""
  def put(path, leaf):
    v = np.asarray(tree_lib.value(leaf))
    s = NamedSharding(mesh_, base_spec(name, path, v.ndim))
    return tree_lib.rewrap(leaf, jax.make_array_from_callback(v.shape, s, lambda i: v[i]))
  flat = tree_lib.flatten(base)
  return tree_lib.unflatten({p: put(p, v) for p, v in flat.items()}, base)


def placed(name: str, explicit: bool):
  """``(mesh, apply, base placed on it, x and y sharded over 'data')`` of a setup."""
  mesh_ = mesh(name, explicit)
  apply, base = model(name, explicit)
  batch = NamedSharding(mesh_, P("data"))
  x, y = (jax.make_array_from_callback(v.shape, batch, lambda i, v=v: v[i]) for v in data())
  return mesh_, apply, place_base(name, base, mesh_), x, y


def random_b(params):
  """B random (a fixed draw per path), each leaf left where it was."""
  flat = tree_lib.flatten(params)
  out = dict(flat)
  for i, (p, role) in enumerate(sorted(trainable_roles(flat).items(), key=lambda t: str(t[0]))):
    if role == "lora_b":
      v = tree_lib.value(flat[p])
      new = (0.1 * np.random.default_rng(i).standard_normal(v.shape)).astype(v.dtype)
      if v.committed:
        new = jax.make_array_from_callback(v.shape, v.sharding, lambda i, new=new: new[i])
      out[p] = tree_lib.rewrap(flat[p], jnp.asarray(new))
  return tree_lib.unflatten(out, params)


def lora_params(name: str, apply, base, x):
  cfg = jlora.LoraConfig(rank=RANK, targets=TARGETS)
  return random_b(jlora.init(jax.random.key(2), base, cfg, fn=apply, args=(x,)))


def make_loss(apply, unroll_max_rank=0):
  lora_apply = jlora.lora(apply, unroll_max_rank=unroll_max_rank)

  def loss(p, x, y):
    return jnp.mean((lora_apply(p, x) - y) ** 2)
  return loss


def reference(name: str) -> list[float]:
  """The losses of the same 5 steps on one device."""
  x, y = data()
  apply, base = model(name)
  params = lora_params(name, apply, base, jnp.asarray(x))
  tx = jlora.optimizer(optax.adam(1e-2), params)
  step, opt = jlora.train_step(make_loss(apply), tx), tx.init(params)
  losses = []
  for _ in range(STEPS):
    params, opt, loss = step(params, opt, x, y)
    losses.append(float(loss))
  return losses


class Run(NamedTuple):
  losses: list
  specs: list            # per step: {path: spec entries} of every adapter leaf and Adam moment
  expected: dict         # the same, as jlora.init and tx.init placed them
  cache_size: int
  warnings: list
  hlo: str
  mesh: object
  params: object
  opt_state: object


def _specs(tree) -> dict:
  def entries(x):
    s = x.sharding
    return tuple(s.spec) + (None,) * (x.ndim - len(s.spec))
  return {p: entries(tree_lib.value(v)) for p, v in tree_lib.flatten(tree).items()}


def run(name: str, explicit: bool, *, steps: int = STEPS, unroll_max_rank: int = 0) -> Run:
  """The LoRA step on the setup's mesh: adapters placed by ``jlora.init``, 5 steps.
  ``unroll_max_rank`` is ``jlora.lora``'s: 0 (its default) runs the branch's rank-r
  products as dots, 16 unrolls them into elementwise work (``jlora.branch``)."""
  mesh_, apply, base, x, y = placed(name, explicit)
  with jax.set_mesh(mesh_):
    params = lora_params(name, apply, base, x)
    tx = jlora.optimizer(optax.adam(1e-2), params)
    opt = tx.init(params)
    expected = _specs((params, opt))
    step = jlora.train_step(make_loss(apply, unroll_max_rank), tx)
    hlo = step.lower(params, opt, x, y).compile().as_text()
    losses, specs = [], []
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      for _ in range(steps):
        params, opt, loss = step(params, opt, x, y)
        losses.append(float(loss))
        specs.append(_specs((params, opt)))
  return Run(losses, specs, expected, step._cache_size(), [str(w.message) for w in caught], hlo,
             mesh_, params, opt)


# ---------------------------------------------------------------------------
# Checkpoints of a run.


def template(name: str, explicit: bool):
  """``(params, opt_state)`` to load a checkpoint of ``run(name, explicit)`` onto: the
  base placed again, fresh adapters from ``jlora.init``, a fresh Adam state."""
  mesh_, apply, base, x, _ = placed(name, explicit)
  with jax.set_mesh(mesh_):
    params = lora_params(name, apply, base, x)
    return params, jlora.optimizer(optax.adam(1e-2), params).init(params)


def checkpointed(params, opt_state=None) -> dict:
  """``{name: array}`` of what ``jlora.save`` writes: the adapter leaves of ``params``
  (``params/<path>``) and every leaf of ``opt_state`` (``opt_state<keystr>``)."""
  out = {"params/" + tree_lib.path_str(p): tree_lib.value(v)
         for p, v in tree_lib.flatten(params).items() if str(p[-1]).startswith("lora_")}
  for kp, v in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    out["opt_state" + jax.tree_util.keystr(kp)] = v
  return out


def digest(x) -> str:
  """SHA-256 of a host array's dtype, shape and bytes."""
  x = np.ascontiguousarray(x)
  return hashlib.sha256(f"{x.dtype.str}{x.shape}".encode() + x.tobytes()).hexdigest()

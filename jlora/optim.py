"""Optimizer masking and the jitted train step: only adapter leaves move.

The train step differentiates the trainable adapter leaves alone, the equinox
way: split them off, take the gradient with respect to that small tree, and put
the tree back together inside the loss. Every other leaf (frozen kernels,
biases, integer counters and rng keys of an NNX state) is a constant of the
loss: it never reaches ``jax.grad`` and gets no gradient work at all.

Two traps ``optimizer`` avoids (both measured in shared/references):

* ``optax.masked(tx, mask)`` passes the *raw gradient* through as the update of
  every unmasked leaf, so the frozen weights train after all. Here the frozen
  leaves get an exact zero.
* A global-norm clip chained *before* the mask reads every frozen gradient, which
  keeps those weight gradients alive in XLA. Here the user's transform only ever
  sees the adapter gradients, so a clip inside ``tx`` is over the adapters alone.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jlora import adapter as adapter_lib
from jlora import sharding as sharding_lib
from jlora import tree as tree_lib
from jlora.tree import Path


def trainable_roles(flat) -> dict[Path, str]:
  """``{leaf path: role}`` of the trainable leaves (``lora_a``, ``lora_b``, ``lora_m``)
  of every complete adapter in a flat view."""
  return {p: role for roles in adapter_lib.find(flat).values()
          for role, p in roles.items() if role in adapter_lib.TRAINABLE_ROLES}


def trainable_mask(params):
  """A bool pytree shaped like ``params``: True exactly on the trainable adapter leaves."""
  trainable = trainable_roles(tree_lib.flatten(params))
  return tree_lib.map_paths(lambda p, _: p in trainable, params)


def split_trainable(params):
  """``(trainable, rest)``: a tree of the trainable adapter leaves only, and a flat
  ``{path: leaf}`` of every other leaf. ``join_trainable`` puts them back."""
  flat = tree_lib.flatten(params)
  trainable = trainable_roles(flat)
  return (tree_lib.unflatten({p: flat[p] for p in trainable}, params),
          {p: v for p, v in flat.items() if p not in trainable})


def join_trainable(trainable, rest, like):
  """The inverse of ``split_trainable``: a tree shaped like ``like``."""
  return tree_lib.unflatten({**rest, **tree_lib.flatten(trainable)}, like)


def value_and_grad(fn: Callable, *, has_aux: bool = False) -> Callable:
  """``jax.value_and_grad`` of ``fn(params, *args)`` with respect to the trainable
  adapter leaves alone.

  Returns ``f(params, *args) -> (value, grads)`` where ``grads`` is a tree of the
  trainable leaves only (``split_trainable(params)[0]``'s structure). Every other
  leaf is a constant of ``fn``: no gradient is traced for it, and integer or key
  leaves are fine.
  """
  def wrapped(params, *args):
    trainable, rest = split_trainable(params)
    return jax.value_and_grad(lambda t: fn(join_trainable(t, rest, params), *args),
                              has_aux=has_aux)(trainable)
  return wrapped


class AdapterOptimizer(optax.GradientTransformation):
  """What ``jlora.optimizer`` returns: an optax transformation over a params
  tree that updates its trainable adapter leaves only."""


def _is_b(path: Path) -> bool:
  """Whether a leaf of a trainable-only tree is a ``lora_b``: there every leaf is an
  adapter leaf, so its name ends in its role."""
  name = path[-1]
  return isinstance(name, str) and (name == "lora_b" or name.endswith("_lora_b"))


def _scale_b(ratio: float) -> optax.GradientTransformation:
  """Multiply the updates of ``lora_b`` leaves by ``ratio`` (LoRA+); on trainable-only trees."""
  def update(updates, state, params=None):
    del params
    return tree_lib.map_paths(lambda p, u: u * ratio if _is_b(p) else u, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def optimizer(tx: optax.GradientTransformation, params, *,
              lora_plus_ratio: float | None = None) -> AdapterOptimizer:
  """Wrap ``tx`` so that only the trainable adapter leaves are updated.

  Args:
    tx: any optax transformation. It sees only the adapter leaves (``lora_a``,
      ``lora_b``, ``lora_m``), as a tree of those leaves alone; its state holds
      nothing for the base.
    params: adapted params, to check that there are adapters. Which leaves train
      is read from the tree each call gets, so one optimizer serves trees with
      different targets.
    lora_plus_ratio: LoRA+ (Hayou et al. 2024, arXiv 2402.12354): the updates of
      ``lora_b`` are multiplied by this ratio, i.e. B's learning rate is
      ``ratio`` times A's (e.g. 16). None leaves them alone.

  Returns:
    An ``optax.GradientTransformation``: ``init(params)``, and ``update(updates,
    state, params)`` where ``updates`` is either a gradient tree shaped like
    ``params`` (the result is too, with an exact zero on every frozen leaf) or a
    tree of the trainable leaves alone, as ``split_trainable`` and
    ``value_and_grad`` give and ``train_step`` passes (the result is too; then
    ``params`` must be given).
  """
  if not trainable_roles(tree_lib.flatten(params)):
    raise ValueError("params has no adapters; call jlora.init(key, params, cfg) first.")
  if lora_plus_ratio is not None:
    if not lora_plus_ratio > 0:
      raise ValueError(f"lora_plus_ratio must be > 0; got {lora_plus_ratio!r}.")
    tx = optax.chain(tx, _scale_b(float(lora_plus_ratio)))

  def init(params):
    # The state lives where the params do: each moment beside its param, built there.
    trainable = split_trainable(params)[0]
    where = tree_lib.flatten(trainable)
    if all(sharding_lib.carried(v) is None for v in where.values()):
      return tx.init(trainable)
    state = jax.eval_shape(tx.init, trainable)
    return sharding_lib.build(tx.init, (trainable,), sharding_lib.shardings(state, params=trainable))

  def update(updates, state, params=None):
    flat = tree_lib.flatten(updates)
    roles = trainable_roles(tree_lib.flatten(params) if params is not None else flat)
    if not roles:
      raise ValueError("no adapters found: pass `params` to update() when the updates are"
                       " a tree of the trainable leaves alone.")
    missing = [tree_lib.path_str(p) for p in roles if p not in flat]
    if missing:
      raise ValueError(f"the updates have no leaves at {missing[:4]}, which train.")
    only = {p: flat[p] for p in roles}
    inner_params = None if params is None else split_trainable(params)[0]
    inner, state = tx.update(tree_lib.unflatten(only, updates), state, inner_params)
    if len(flat) == len(roles):
      return inner, state
    zeros = {p: tree_lib.rewrap(v, jnp.zeros_like(tree_lib.value(v)))
             for p, v in flat.items() if p not in roles}
    return tree_lib.unflatten({**zeros, **tree_lib.flatten(inner)}, updates), state

  return AdapterOptimizer(init, update)


def train_step(loss_fn: Callable, tx: AdapterOptimizer, *,
               has_aux: bool = False, jit: bool = True, donate: bool = True):
  """A train step ``step(params, opt_state, *batch) -> (params, opt_state, loss)``.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux``), written with ``jlora.lora(apply)`` inside.
    tx: ``jlora.optimizer(...)``; ``opt_state`` is ``tx.init(params)``.
    has_aux: return ``(params, opt_state, (loss, aux))``.
    jit: compile the step with ``jax.jit``.
    donate: donate ``params`` and ``opt_state`` to the jitted step, so their
      buffers are reused in place on GPU and TPU. The frozen leaves of the tree
      ``jlora.init`` returned are the very arrays of the base you passed it, so
      after the first step that base is deleted too: pass a copy
      (``jax.tree.map(jnp.copy, base)``) to ``init`` if you need the base
      afterwards, or use ``jlora.partition(params)[1]``.

  On a mesh the step returns params and optimizer state sharded exactly as they
  came in (``jlora.sharding.keep_placement``), so it compiles once and donation
  works; the batch is placed as you place it.

  The step differentiates the loss with respect to the trainable adapter leaves
  only (``split_trainable``), so it accepts any tree (integer and key leaves
  too), computes no weight gradient for a frozen leaf, and makes no host round
  trip: the loss comes back as a device array.
  """
  if not isinstance(tx, AdapterOptimizer):
    raise TypeError("train_step needs the optimizer from jlora.optimizer(tx, params); got"
                    f" {type(tx).__name__}.")

  grad_fn = value_and_grad(loss_fn, has_aux=has_aux)

  def step(params, opt_state, *batch):
    loss, grads = grad_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    trainable, rest = split_trainable(params)
    trainable = jax.tree.map(lambda x, u: x + u.astype(x.dtype), trainable, updates)
    return join_trainable(trainable, rest, params), opt_state, loss

  if not jit:
    return step
  return sharding_lib.keep_placement(step, 2, donate_argnums=(0, 1) if donate else ())

"""Optimizer masking and the jitted train step: only adapter leaves move.

Two traps this module avoids (both measured in shared/references):

* ``optax.masked(tx, mask)`` passes the *raw gradient* through as the update of
  every unmasked leaf, so the frozen weights train after all. We route frozen
  leaves to ``optax.set_to_zero()`` instead.
* A global-norm clip chained *before* the mask reads every frozen gradient, which
  keeps those weight gradients alive in XLA. Inside ``optimizer`` the user's
  transform only ever sees the adapter gradients, so a clip inside ``tx`` is
  over the adapters alone.

The train step goes further: it stops the gradient of every frozen leaf before
calling the loss, so the frozen kernels' weight gradients are never even traced;
nothing depends on XLA's dead-code elimination.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from jlora import tree as tree_lib


def trainable_mask(params):
  """A bool pytree shaped like ``params``: True exactly on ``lora_a``, ``lora_b``, ``lora_m``."""
  return tree_lib.map_paths(lambda p, _: tree_lib.is_trainable_path(p), params)


def _labels(params):
  return tree_lib.map_paths(
      lambda p, _: "adapter" if tree_lib.is_trainable_path(p) else "frozen", params)


def freeze(params):
  """``params`` with ``stop_gradient`` on every leaf that is not a trainable adapter leaf.

  ``jax.grad`` of a function of ``freeze(params)`` returns exact zeros for the
  frozen leaves without computing anything for them.
  """
  return tree_lib.map_paths(
      lambda p, x: x if tree_lib.is_trainable_path(p) else jax.lax.stop_gradient(x), params)


def _scale_b(ratio: float) -> optax.GradientTransformation:
  """Multiply the updates of ``lora_b`` leaves by ``ratio`` (LoRA+)."""
  def update(updates, state, params=None):
    del params
    return tree_lib.map_paths(
        lambda p, u: u * ratio if tree_lib.role_of(tree_lib.split_leaf(p)[1]) == "lora_b" else u,
        updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def optimizer(tx: optax.GradientTransformation, params, *,
              lora_plus_ratio: float | None = None) -> optax.GradientTransformation:
  """Wrap ``tx`` so that only the trainable adapter leaves are updated.

  Args:
    tx: any optax transformation. It sees only the adapter leaves (``lora_a``,
      ``lora_b``, ``lora_m``); its state holds nothing for the base.
    params: the adapted params (used to check that adapters exist).
    lora_plus_ratio: LoRA+ (Hayou et al. 2024, arXiv 2402.12354): the updates of
      ``lora_b`` are multiplied by this ratio, i.e. B's learning rate is
      ``ratio`` times A's (e.g. 16). None leaves them alone.

  Returns:
    A transformation whose update is exactly zero on every other leaf.
  """
  if not any(tree_lib.is_trainable_path(p) for p in tree_lib.flatten(params)):
    raise ValueError("params has no adapter leaves; call jlora.init(key, params, cfg) first.")
  masked = optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, _labels)
  # The state lives where the params do (see tree.placed_like).
  reference = next(iter(jax.tree.leaves(params)), None)
  inner_init = masked.init
  masked = masked._replace(init=lambda p: tree_lib.placed_like(reference, inner_init(p)))
  if lora_plus_ratio is None:
    return masked
  if not lora_plus_ratio > 0:
    raise ValueError(f"lora_plus_ratio must be > 0; got {lora_plus_ratio!r}.")
  return optax.chain(masked, _scale_b(float(lora_plus_ratio)))


def train_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
               has_aux: bool = False, jit: bool = True, donate: bool = True):
  """A train step ``step(params, opt_state, *batch) -> (params, opt_state, loss)``.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux``), written with ``jlora.lora(apply)`` inside.
    tx: the optimizer, normally ``jlora.optimizer(...)``; ``opt_state`` is
      ``tx.init(params)``.
    has_aux: return ``(params, opt_state, (loss, aux))``.
    jit: compile the step with ``jax.jit``.
    donate: donate ``params`` and ``opt_state`` to the jitted step, so their
      buffers are reused in place on GPU and TPU. The frozen leaves of the tree
      ``jlora.init`` returned are the very arrays of the base you passed it, so
      after the first step that base is deleted too: pass a copy
      (``jax.tree.map(jnp.copy, base)``) to ``init`` if you need the base
      afterwards, or use ``jlora.partition(params)[1]``.

  The step differentiates ``loss_fn(freeze(params))``: frozen leaves have
  ``stop_gradient``, so their weight gradients are never traced, and it adds
  the update to adapter leaves only. It makes no host round trip: the loss
  comes back as a device array.
  """
  grad_fn = jax.value_and_grad(lambda p, *b: loss_fn(freeze(p), *b), has_aux=has_aux)

  def step(params, opt_state, *batch):
    loss, grads = grad_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = tree_lib.map_paths(
        lambda p, x, u: x + u.astype(x.dtype) if tree_lib.is_trainable_path(p) else x,
        params, updates)
    return params, opt_state, loss

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())

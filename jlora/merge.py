"""Folding adapters into kernels, and taking them back out.

These are the numerical reference for everything else: ``jlora.lora(fn)`` must
agree with ``fn(merge(params))``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora import tree as tree_lib
from jlora.partition import combine
from jlora.transform import column_norm


def wide(ad: tree_lib.Adapter):
  """The dtype merges are computed in: float32, or the kernel's if wider."""
  return jnp.promote_types(jnp.float32, ad.kernel.dtype)


def delta(ad: tree_lib.Adapter):
  """``s * tensordot(A, B, 1)`` per stacked layer, in ``wide(ad)``, shape of the kernel."""
  kshape = jnp.shape(ad.kernel)
  ns = ad.n_stack
  stack = kshape[:ns]
  fan_in = math.prod(kshape[ns:ns + ad.n_in])
  dt = wide(ad)
  a2 = jnp.reshape(ad.a, stack + (fan_in, ad.rank)).astype(dt)
  b2 = jnp.reshape(ad.b, stack + (ad.rank, -1)).astype(dt)
  scale = jnp.reshape(jnp.asarray(ad.scale, dt), stack + (1, 1))
  return jnp.reshape(scale * (a2 @ b2), kshape)


def deltas(params) -> dict:
  """``{kernel path: s * tensordot(A, B, 1)}`` for every adapter (kernel-shaped, in
  ``wide(ad)``): the update each adapter makes, before any DoRA rescaling."""
  return {ad.path: delta(ad) for ad in tree_lib.adapters(params)}


def dora_factor(ad: tree_lib.Adapter, v):
  """``m / ||V||`` (shape ``S + O``) for the DoRA kernel ``m * V / ||V||``.

  The norm is a constant to autodiff, as the DoRA paper recommends (Sec. 4.3) and
  PEFT does, in every mode: so the merged and factored paths share gradients.
  """
  return ad.m.astype(v.dtype) / jax.lax.stop_gradient(column_norm(v, ad.n_stack, ad.n_in))


def merged_kernel(ad: tree_lib.Adapter):
  """``W + delta`` (DoRA: ``m * (W + delta) / ||W + delta||``) in the kernel's dtype."""
  v = ad.kernel.astype(wide(ad)) + delta(ad)
  if ad.m is not None:
    f = dora_factor(ad, v)
    v = v * jnp.expand_dims(f, tuple(range(ad.n_stack, ad.n_stack + ad.n_in)))
  return v.astype(ad.kernel.dtype)


def merge(params):
  """The base-structured tree with every adapter folded into its kernel.

  Returns a tree with exactly the structure ``params`` had before ``jlora.init``:
  adapter leaves are gone, and each adapted kernel is ``W + s * A @ B`` (DoRA:
  ``m * V / ||V||_col`` with ``V = W + s * A @ B``), in the kernel's dtype. Needs
  nothing but the tree: each adapter carries its own scale.
  """
  flat = tree_lib.flatten(params)
  out = {p: leaf for p, leaf in flat.items() if not tree_lib.is_adapter_path(p)}
  for ad in tree_lib.iter_adapters(flat):
    out[ad.path] = tree_lib.rewrap(flat[ad.path], merged_kernel(ad))
  return tree_lib.unflatten(out, params)


def unmerge(merged, adapter):
  """Take ``adapter`` back out of a merged tree: the inverse of ``merge``.

  Args:
    merged: a base-structured tree whose kernels had ``adapter`` merged in.
    adapter: the adapter tree (``jlora.partition(params)[0]``) or a full
      adapted tree.

  Returns:
    ``combine(adapter, base)`` with each kernel ``W - s * A @ B``, so that
    ``unmerge(merge(p), partition(p)[0]) == p`` up to rounding.

  Raises:
    ValueError: for DoRA adapters, whose merged kernel no longer holds ``||V||``
      (PEFT caches it on the layer instead): keep the unmerged tree for those.
  """
  flat_adapter = {p: v for p, v in tree_lib.flatten(adapter).items() if tree_lib.is_adapter_path(p)}
  params = combine(tree_lib.unflatten(flat_adapter, adapter), merged)
  flat = tree_lib.flatten(params)
  out = dict(flat)
  for ad in tree_lib.iter_adapters(flat):
    if ad.m is not None:
      raise ValueError(
          f"cannot unmerge the DoRA adapter of {ad.path!r}: the merged kernel"
          " m * V / ||V|| does not determine ||V||. Keep the unmerged params.")
    w = ad.kernel.astype(wide(ad)) - delta(ad)
    out[ad.path] = tree_lib.rewrap(flat[ad.path], w.astype(ad.kernel.dtype))
  return tree_lib.unflatten(out, params)

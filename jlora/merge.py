"""The adapter math, and folding adapters into kernels and back out.

These are the numerical reference for everything else: ``jlora.lora(fn)`` must
agree with ``fn(merge(params))``. Every layout is computed through its canonical
matrices (``Split.a_matrix`` and friends): ``delta = s · A₂ @ B₂`` with
``A₂ : stack + (fan_in, r)`` and ``B₂ : stack + (r, fan_out)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora import adapter as adapter_lib
from jlora import quant
from jlora import tree as tree_lib
from jlora.adapter import Adapter, Split


def wide(ad: Adapter):
  """The dtype merges are computed in: float32, or the kernel's if wider."""
  return jnp.promote_types(jnp.float32, ad.kernel.dtype)


def delta(ad: Adapter):
  """``s · A @ B`` per stacked layer, laid out like the kernel, in ``wide(ad)``."""
  split, dt = ad.split, wide(ad)
  a2 = split.a_matrix(jnp.asarray(ad.a)).astype(dt)
  b2 = split.b_matrix(jnp.asarray(ad.b)).astype(dt)
  scale = jnp.asarray(ad.scale, dt)[..., None, None]
  return split.kernel_from_matrix(scale * (a2 @ b2), jnp.shape(ad.kernel))


def deltas(params) -> dict:
  """``{kernel path: s · A @ B}`` for every adapter (kernel-shaped, in ``wide(ad)``):
  the update each adapter makes, before any DoRA rescaling."""
  return {ad.path: delta(ad) for ad in adapter_lib.adapters(params)}


def column_norm(v, split: Split):
  """``‖v‖₂`` over the input axes of a kernel-shaped ``v``: shape ``stack + out``."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=split.in_axes(v.ndim)))


def dora_factor(ad: Adapter, v):
  """``m / ‖V‖`` (shape ``stack + out``) for the DoRA kernel ``m · V / ‖V‖``.

  The norm is a constant to autodiff, as the DoRA paper recommends (Sec. 4.3) and
  PEFT does, in every mode: so the merged and factored paths share gradients.
  """
  return ad.m.astype(v.dtype) / jax.lax.stop_gradient(column_norm(v, ad.split))


def merged_kernel(ad: Adapter, dtype=None):
  """``W + delta`` (DoRA: ``m · (W + delta) / ‖W + delta‖``) in ``dtype``, by default the
  kernel's (a quantized kernel's float dtype: ``W`` is its dequantized value)."""
  v = ad.kernel.astype(wide(ad)) + delta(ad)
  if ad.m is not None:
    v = v * jnp.expand_dims(dora_factor(ad, v), ad.split.in_axes(v.ndim))
  return v.astype(dtype or ad.kernel.dtype)


def residual_kernel(w, split: Split, a0, b0):
  """``W - A0 @ B0`` on the canonical matrices, computed in float32, in ``W``'s dtype.

  The kernel a residual init (PiSSA, OLoRA) leaves in the tree; ``a0``/``b0`` are
  its ``lora_a0``/``lora_b0`` leaves (scale folded into ``a0``). ``jlora.init`` and
  the loaders that put a saved adapter onto the original base both call this, so
  the same ``W`` gives the same residual bit for bit.
  """
  return _add_low_rank(w, split, a0, b0, -1.0)


def original_kernel(w, split: Split, a0, b0):
  """The original ``W`` of a residual kernel: ``W_res + A0 @ B0``, up to rounding."""
  return _add_low_rank(w, split, a0, b0, 1.0)


def _add_low_rank(w, split: Split, a0, b0, sign: float):
  w = jnp.asarray(w)
  a2 = split.a_matrix(jnp.asarray(a0, jnp.float32))
  b2 = split.b_matrix(jnp.asarray(b0, jnp.float32))
  w2 = split.kernel_matrix(w.astype(jnp.float32)) + sign * (a2 @ b2)
  return split.kernel_from_matrix(w2, w.shape).astype(w.dtype)


def merge(params, *, dtype=None):
  """The float model: every adapter folded into its kernel, every quantized kernel
  dequantized.

  Args:
    params: a params tree, with or without adapters, on a float or a quantized
      (``jlora.quantize``) base.
    dtype: the dtype of every merged or dequantized kernel; ``None`` keeps each
      kernel's own float dtype. Other leaves are never cast.

  Returns:
    A tree with exactly the structure of the float params before ``jlora.quantize``
    and ``jlora.init``: adapter and quantization leaves are gone, and each adapted
    kernel is ``W + s · A @ B`` (DoRA: ``m · V / ‖V‖`` with ``V = W + s · A @ B``),
    computed in float32 (or wider), where ``W`` is the dequantized kernel on a
    quantized base. This is the tree ``fn`` accepts. Needs nothing but the tree: each
    adapter carries its own scale and each quantized kernel its own scales.
  """
  flat = tree_lib.flatten(params)
  found = adapter_lib.find(flat)
  qfound = quant.find(flat)
  drop = tree_lib.owned(found) | tree_lib.owned(qfound)
  out = {p: leaf for p, leaf in flat.items() if p not in drop}
  for kp, roles in qfound.items():
    if kp not in found:
      out[kp] = tree_lib.rewrap(flat[kp], quant.read(flat, kp, roles).dequantize(dtype))
  for kp, roles in found.items():
    out[kp] = tree_lib.rewrap(flat[kp], merged_kernel(adapter_lib.read(flat, kp, roles), dtype))
  return tree_lib.unflatten(out, params)


def unmerge(merged, adapter):
  """Take ``adapter`` back out of a merged tree: the inverse of ``merge``.

  Args:
    merged: a base-structured tree whose kernels had ``adapter`` merged in.
    adapter: the adapter tree (``jlora.partition(params)[0]``) or a full
      adapted tree.

  Returns:
    ``combine(adapter, base)`` with each kernel ``W - s · A @ B``, so that
    ``unmerge(merge(p), partition(p)[0]) == p`` up to rounding.

  Raises:
    ValueError: for DoRA adapters, whose merged kernel no longer holds ``‖V‖``
      (PEFT caches it on the layer instead): keep the unmerged tree for those.
  """
  from jlora.partition import combine, partition  # partition builds on this module's data model
  if adapter_lib.find(tree_lib.flatten(adapter)):
    adapter = partition(adapter)[0]
  params = combine(adapter, merged)
  flat = tree_lib.flatten(params)
  out = dict(flat)
  for ad in adapter_lib.iter_adapters(flat):
    if quant.is_quantized(ad.kernel):
      raise ValueError(
          f"cannot unmerge into the quantized kernel {ad.name!r}: W - s · A @ B is not on its"
          " quantization grid. Pass the float tree jlora.merge(params) returns.")
    if ad.m is not None:
      raise ValueError(
          f"cannot unmerge the DoRA adapter of {ad.name!r}: the merged kernel"
          " m · V / ‖V‖ does not determine ‖V‖. Keep the unmerged params.")
    w = ad.kernel.astype(wide(ad)) - delta(ad)
    out[ad.path] = tree_lib.rewrap(flat[ad.path], w.astype(ad.kernel.dtype))
  return tree_lib.unflatten(out, params)

"""Tracing a user function ``fn(params, *args, **kw)`` to a jaxpr, with public JAX APIs.

Both the split reader (``split.py``) and the factored interpreter (``apply.py``)
need the same thing: ``fn``'s computation as a ``ClosedJaxpr``, and which of its
inputs is which params leaf. Array leaves of ``(params, args, kw)`` become jaxpr
inputs; every other leaf (Python scalars, strings, None, flags) is closed over as
a static value, exactly as ``fn`` would see it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jlora import explicit
from jlora import tree as tree_lib


class Traced(NamedTuple):
  closed: Any            # jax.extend.core.ClosedJaxpr
  inputs: list           # the dynamic leaves, in jaxpr-invar order
  param_index: dict      # {params leaf path: position in ``inputs``}
  out_tree: Any          # treedef of fn's output


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or (
      hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type))


def _split_leaves(params, args, kwargs):
  """``(leaves, treedef, dynamic)``: the leaves of ``(params, args, kwargs)`` and the
  positions of the arrays among them."""
  leaves, treedef = jax.tree_util.tree_flatten((params, tuple(args), dict(kwargs or {})))
  return leaves, treedef, [i for i, x in enumerate(leaves) if _is_dynamic(x)]


def _aval(x) -> jax.ShapeDtypeStruct:
  """The abstract value ``x`` is traced as: its shape and dtype, and on Explicit mesh
  axes its sharding, which is part of its type there (and so of the program's)."""
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=explicit.typed(x))


def signature(params, args=(), kwargs=None):
  """A hashable key for ``trace``'s result, or None when a static leaf is unhashable.

  Two calls with the same key trace to the same jaxpr: the same tree structure,
  the same shape, dtype and (Explicit) sharding of every array leaf, and equal
  static leaves.
  """
  leaves, treedef, dynamic = _split_leaves(params, args, kwargs)
  dyn = set(dynamic)
  key = (treedef, tuple((np.shape(leaves[i]), str(leaves[i].dtype), explicit.typed(leaves[i]))
                        if i in dyn else ("static", leaves[i]) for i in range(len(leaves))))
  try:
    hash(key)
  except TypeError:
    return None
  return key


def trace_inputs(params, args=(), kwargs=None) -> list:
  """The dynamic leaves of a call, in the order of ``trace``'s jaxpr inputs."""
  leaves, _, dynamic = _split_leaves(params, args, kwargs)
  return [leaves[i] for i in dynamic]


def trace(fn, params, args=(), kwargs=None) -> Traced:
  """``fn(params, *args, **kwargs)`` as a jaxpr over its array leaves."""
  kwargs = kwargs or {}
  leaves, treedef, dynamic = _split_leaves(params, args, kwargs)
  param_paths = [tree_lib.keypath(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  def flat_fn(*dyn):
    full = list(leaves)
    for i, v in zip(dynamic, dyn):
      full[i] = v
    p, a, kw = jax.tree_util.tree_unflatten(treedef, full)
    return fn(p, *a, **kw)

  avals = [_aval(leaves[i]) for i in dynamic]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
  # params' leaves come first among the leaves of (params, args, kw)
  param_index = {param_paths[i]: k for k, i in enumerate(dynamic) if i < len(param_paths)}
  return Traced(closed, [leaves[i] for i in dynamic], param_index,
                jax.tree_util.tree_structure(out_shape))

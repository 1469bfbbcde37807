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

from jlora import tree as tree_lib


class Traced(NamedTuple):
  closed: Any            # jax.extend.core.ClosedJaxpr
  inputs: list           # the dynamic leaves, in jaxpr-invar order
  param_index: dict      # {params leaf path: position in ``inputs``}
  out_tree: Any          # treedef of fn's output


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or (
      hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type))


def trace(fn, params, args=(), kwargs=None) -> Traced:
  """``fn(params, *args, **kwargs)`` as a jaxpr over its array leaves."""
  kwargs = kwargs or {}
  leaves, treedef = jax.tree_util.tree_flatten((params, tuple(args), dict(kwargs)))
  dynamic = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
  n_param_leaves = len(jax.tree_util.tree_leaves(params))
  param_paths = [tree_lib.keypath_str(kp)
                 for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  def flat_fn(*dyn):
    full = list(leaves)
    for i, v in zip(dynamic, dyn):
      full[i] = v
    p, a, kw = jax.tree_util.tree_unflatten(treedef, full)
    return fn(p, *a, **kw)

  avals = [jax.ShapeDtypeStruct(np.shape(leaves[i]), leaves[i].dtype) for i in dynamic]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
  param_index = {param_paths[i]: k for k, i in enumerate(dynamic) if i < n_param_leaves}
  return Traced(closed, [leaves[i] for i in dynamic], param_index,
                jax.tree_util.tree_structure(out_shape))


def sub_jaxpr(eqn):
  """The jaxpr a call-like equation runs on its own inputs, or None.

  Covers ``jit``, ``closed_call``, ``remat``/``checkpoint``, ``custom_jvp_call``
  and ``custom_vjp_call``: the one jaxpr-valued parameter whose arity matches
  the equation's. Returns ``(jaxpr, consts)``.
  """
  for v in eqn.params.values():
    jaxpr, consts = (v.jaxpr, v.consts) if hasattr(v, "consts") else (v, ())
    if hasattr(jaxpr, "eqns") and hasattr(jaxpr, "invars") and (
        len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars)):
      return jaxpr, consts
  return None

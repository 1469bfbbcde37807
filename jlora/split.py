"""Reading each kernel's in/out split from the model itself.

``read(fn, params, args)`` traces ``fn(params, *args)`` abstractly and follows each
kernel from the params into the first op that consumes it as a weight:

* ``dot_general``: the kernel axes it contracts are the inputs; its batch axes
  (a ``vmap`` over stacked layers) are stack axes;
* ``conv_general_dilated``: the spatial and input-feature axes are inputs;
* ``gather`` (an embedding lookup): the indexed axes are inputs.

Axes that a ``scan`` slices off on the way (``nn.scan`` over layers) are stack
axes. Transposes, dtype casts and nested calls (``jit``, ``remat``, custom
derivatives) are seen through. This is exact for any layer in any framework, as
long as the split is ``stack + in + out`` in axis order, which is what the
adapter layout can express.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jlora import tracing
from jlora.targets import Split

_PASS_THROUGH = ("transpose", "convert_element_type", "copy", "copy_p",
                 "reduce_precision", "optimization_barrier")


class _Track(NamedTuple):
  path: str
  axes: tuple        # original kernel axis of each current axis
  stacked: frozenset  # original axes already sliced away by a scan


class Use(NamedTuple):
  path: str
  stack: frozenset
  inputs: frozenset
  kind: str
  grouped: bool = False


def read(fn, params, args=(), kwargs=None, paths=None) -> dict[str, tuple[Split, str]]:
  """``{kernel path: (Split, kind)}`` for the kernels whose first weight use fits.

  Kernels that reach no weight op, or whose first use does not split as
  ``stack + in + out``, are left out (the default rule applies to them).

  Raises:
    ValueError: a targeted kernel feeds a grouped convolution.
  """
  traced = tracing.trace(fn, params, args, kwargs)
  paths = set(traced.param_index) if paths is None else set(paths)
  tracks = {}
  for p, k in traced.param_index.items():
    if p in paths:
      nd = jax.numpy.ndim(traced.inputs[k])
      tracks[traced.closed.jaxpr.invars[k]] = _Track(p, tuple(range(nd)), frozenset())
  uses: dict[str, Use] = {}
  _walk(traced.closed.jaxpr, tracks, uses)
  out = {}
  for p, use in uses.items():
    if use.grouped:
      raise ValueError(
          f"kernel {p!r} feeds a grouped convolution (feature_group_count > 1);"
          " jlora has no grouped-conv adapter yet. Exclude it with `exclude=`.")
    ndim = jax.numpy.ndim(traced.inputs[traced.param_index[p]])
    n_stack, n_in = len(use.stack), len(use.inputs)
    if (use.stack == frozenset(range(n_stack))
        and use.inputs == frozenset(range(n_stack, n_stack + n_in))
        and 0 < n_in < ndim - n_stack):
      out[p] = (Split(n_stack, n_in), use.kind)
  return out


def _record(uses, track: _Track, stack_pos, in_pos, kind, grouped=False):
  if track.path in uses:
    return
  stack = track.stacked | {track.axes[i] for i in stack_pos}
  uses[track.path] = Use(track.path, frozenset(stack),
                         frozenset(track.axes[i] for i in in_pos), kind, grouped)


def _walk(jaxpr, tracks: dict, uses: dict):
  for eqn in jaxpr.eqns:
    ins = [tracks.get(v) if not isinstance(v, jax.extend.core.Literal) else None
           for v in eqn.invars]
    if not any(ins):
      continue
    name = eqn.primitive.name
    if name in _PASS_THROUGH and ins[0] is not None:
      t = ins[0]
      perm = eqn.params.get("permutation")
      axes = tuple(t.axes[i] for i in perm) if perm is not None else t.axes
      tracks[eqn.outvars[0]] = t._replace(axes=axes)
    elif name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      for t, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if t is not None:
          kind = "dense" if len(t.axes) == 2 else "general"
          _record(uses, t, b, c, kind)
    elif name == "conv_general_dilated" and ins[1] is not None:
      t, dn = ins[1], eqn.params["dimension_numbers"]
      out_axis = dn.rhs_spec[0]
      grouped = eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1
      _record(uses, t, (), [i for i in range(len(t.axes)) if i != out_axis], "conv", grouped)
    elif name == "gather" and ins[0] is not None:
      dn = eqn.params["dimension_numbers"]
      _record(uses, ins[0], dn.operand_batching_dims, dn.start_index_map, "embed")
    elif name == "scan":
      _walk_scan(eqn, ins, uses)
    else:
      sub = tracing.sub_jaxpr(eqn)
      if sub is not None:
        _walk(sub[0], {v: t for v, t in zip(sub[0].invars, ins) if t is not None}, uses)


def _walk_scan(eqn, ins, uses):
  body = eqn.params["jaxpr"].jaxpr
  n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
  inner = {}
  for i, (v, t) in enumerate(zip(body.invars, ins)):
    if t is None:
      continue
    if i < n_consts:
      inner[v] = t
    elif i >= n_consts + n_carry:  # xs: the scan slices axis 0 off
      inner[v] = _Track(t.path, t.axes[1:], t.stacked | {t.axes[0]})
  _walk(body, inner, uses)

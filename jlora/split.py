"""Reading each kernel's in/out split from the model itself.

``read(fn, params, args)`` traces ``fn(params, *args)`` abstractly and follows each
kernel from the params into the first op that consumes it as a weight:

* ``dot_general``: the kernel axes it contracts are the inputs; its batch axes
  (a ``vmap`` over stacked layers) are stack axes;
* ``conv_general_dilated``: the spatial and input-feature axes are inputs;
* ``gather`` (an embedding lookup): the indexed axes are inputs.

Axes that a ``scan`` slices off on the way (``nn.scan`` over layers), or that
``W[i]`` picks and squeezes away (a loop over stacked layers), are stack axes.
Transposes, casts, barriers and calls (``jit``, ``remat``, custom derivatives,
``cond`` and ``while`` bodies) are seen through, by the same walker that
``jlora.lora`` runs (``walk.Walker``). The split must be ``stack + in + out`` or
``stack + out + in``; a use that contracts any other set of axes is reported,
so ``jlora.init`` can say so instead of guessing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jlora import tracing
from jlora import walk
from jlora.adapter import Split
from jlora.targets import Read
from jlora.tree import Path, path_str


class _Track(NamedTuple):
  path: Path
  axes: tuple          # original kernel axis of each current axis
  stacked: frozenset   # original axes already sliced away (scan, W[i])


class _Use(NamedTuple):
  stack: frozenset
  inputs: frozenset
  kind: str
  grouped: bool = False


def read(fn, params, args=(), kwargs=None) -> dict[Path, Read]:
  """``{kernel path: Read}`` for every params leaf that reaches a weight op.

  Raises:
    ValueError: a kernel feeds a grouped convolution.
  """
  traced = tracing.trace(fn, params, args, kwargs)
  jaxpr = traced.closed.jaxpr
  args = [None] * len(jaxpr.invars)
  for p, k in traced.param_index.items():
    args[k] = _Track(p, tuple(range(jax.numpy.ndim(traced.inputs[k]))), frozenset())
  reader = _Reader()
  reader.run(jaxpr, [None] * len(jaxpr.constvars), args)
  out = {}
  for p, use in reader.uses.items():
    if use.grouped:
      raise ValueError(
          f"kernel {path_str(p)!r} feeds a grouped convolution (feature_group_count > 1);"
          " jlora has no grouped-conv adapter yet. Exclude it with `exclude=`.")
    ndim = jax.numpy.ndim(traced.inputs[traced.param_index[p]])
    out[p] = _to_read(use, ndim)
  return out


def _to_read(use: _Use, ndim: int) -> Read:
  n_stack, n_in = len(use.stack), len(use.inputs)
  ins = sorted(use.inputs)
  if use.stack != frozenset(range(n_stack)):
    return Read(None, use.kind, f"its stacked axes {sorted(use.stack)} are not its leading axes")
  if not 0 < n_in < ndim - n_stack:
    return Read(None, use.kind, f"the model contracts its axes {ins} of {ndim}, leaving no"
                " output axis" if n_in else "the model contracts none of its axes")
  if ins == list(range(n_stack, n_stack + n_in)):
    return Read(Split(n_stack, n_in, False), use.kind)
  if ins == list(range(ndim - n_in, ndim)):
    return Read(Split(n_stack, n_in, True), use.kind)
  return Read(None, use.kind, f"the model contracts its axes {ins} (of {ndim})")


class _Reader(walk.Walker):
  """Follows ``_Track``s and records the first weight use of each kernel."""

  def __init__(self):
    self.uses: dict[Path, _Use] = {}

  def tracked(self, x):
    return isinstance(x, _Track)

  def untracked(self, eqn, ins):
    return [None] * len(eqn.outvars)  # only the kernels' axes matter here

  def _record(self, t: _Track, stack_pos, in_pos, kind, grouped=False):
    if t.path not in self.uses:
      stack = t.stacked | {t.axes[i] for i in stack_pos}
      self.uses[t.path] = _Use(frozenset(stack), frozenset(t.axes[i] for i in in_pos), kind,
                               grouped)

  # -- relabelling -------------------------------------------------------------

  def transpose(self, eqn, ins):
    t = ins[0]
    return [t._replace(axes=tuple(t.axes[i] for i in eqn.params["permutation"]))]

  def cast(self, eqn, ins):
    return [ins[0]]

  def slice(self, eqn, ins):  # W[i]: the picked axis goes at the squeeze that follows
    return [ins[0]] if isinstance(ins[0], _Track) else [None]

  def squeeze(self, eqn, ins):
    t, dims = ins[0], set(eqn.params["dimensions"])
    return [_Track(t.path, tuple(a for i, a in enumerate(t.axes) if i not in dims),
                   t.stacked | {t.axes[i] for i in dims})]

  def barrier(self, eqn, ins):
    return list(ins)

  # -- weight uses -------------------------------------------------------------

  def dot(self, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for t, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
      if isinstance(t, _Track):
        self._record(t, b, c, "dense" if len(t.axes) == 2 else "general")
    return [None]

  def conv(self, eqn, ins):
    t = ins[1]
    if isinstance(t, _Track):
      dn = eqn.params["dimension_numbers"]
      grouped = eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1
      out_axis = dn.rhs_spec[0]
      self._record(t, (), [i for i in range(len(t.axes)) if i != out_axis], "conv", grouped)
    return [None]

  def gather(self, eqn, ins):
    t = ins[0]
    if isinstance(t, _Track):
      dn = eqn.params["dimension_numbers"]
      self._record(t, dn.operand_batching_dims, dn.start_index_map, "embed")
    return [None]

  # -- bodies ------------------------------------------------------------------

  def remat(self, eqn, ins):
    return self.call(eqn, ins)

  def custom(self, eqn, ins):
    # The custom rule's primal body shows how the kernel is used. (``lora`` keeps
    # the rule and gives it the merged kernel, but the split is the same.)
    return self.call(eqn, ins)

  def scan(self, eqn, ins):
    body = eqn.params["jaxpr"]
    nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
    inner = []
    for i, t in enumerate(ins):
      if isinstance(t, _Track) and i >= nc + ncar:  # xs: the scan slices axis 0 off
        t = _Track(t.path, t.axes[1:], t.stacked | {t.axes[0]})
      inner.append(t if i < nc or i >= nc + ncar else None)
    self.run(body.jaxpr, body.consts, inner)
    return [None] * len(eqn.outvars)

  def cond(self, eqn, ins):
    for branch in eqn.params["branches"]:
      self.run(branch.jaxpr, branch.consts, ins[1:])
    return [None] * len(eqn.outvars)

  def while_loop(self, eqn, ins):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    body = p["body_jaxpr"]
    carry = [None] * (len(ins) - nc - nb)
    self.run(body.jaxpr, body.consts, ins[nc:nc + nb] + carry)
    return [None] * len(eqn.outvars)

  def other(self, eqn, ins):
    return [None] * len(eqn.outvars)


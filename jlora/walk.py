"""One walker over a traced model: the primitive table and the evaluation loop.

Two passes follow kernels through a model's jaxpr: ``split.read`` (which axes
does the model contract?) and ``apply.lora`` (run it with the adapter
factored). Both subclass ``Walker``, so both see the same primitives the same
way: ``KIND`` is the only table of primitive names in jlora. An equation none
of whose inputs is tracked is ``untracked`` (evaluated as it stands, or skipped);
one with a tracked input goes to the method named by its kind, and a primitive
that is not in the table goes to ``other``.

The names are those of jax 0.6 to 0.10 (``pjit`` became ``jit``; remat has been
``remat2`` throughout).
"""

from __future__ import annotations

import contextlib

from jax.extend.core import Literal

#: Primitive name -> the ``Walker`` method that handles an equation with a tracked input.
KIND = {
    # the same values, axes relabelled
    "transpose": "transpose",
    "convert_element_type": "cast", "reduce_precision": "cast", "copy": "cast",
    # the ops that use a kernel as a weight
    "dot_general": "dot", "conv_general_dilated": "conv", "gather": "gather",
    # picking layers out of a stack: W[i] is slice or dynamic_slice, then squeeze
    "slice": "slice", "dynamic_slice": "slice", "squeeze": "squeeze",
    "optimization_barrier": "barrier",
    # calls with no semantics of their own: evaluated inline
    "jit": "call", "pjit": "call", "closed_call": "call",
    "remat2": "remat",
    "custom_jvp_call": "custom", "custom_vjp_call": "custom",
    "scan": "scan", "cond": "cond", "while": "while_loop",
}


def sub_jaxpr(eqn, param: str | None = None):
  """``(jaxpr, consts)`` of a call-like equation's body.

  With ``param``, that parameter's; otherwise the one jaxpr-valued parameter
  whose arity matches the equation's (``jit``, ``closed_call``, ``remat2``,
  ``custom_jvp_call``, ``custom_vjp_call``).
  """
  values = [eqn.params[param]] if param else eqn.params.values()
  for v in values:
    jaxpr, consts = (v.jaxpr, v.consts) if hasattr(v, "consts") else (v, ())
    if param or (hasattr(jaxpr, "eqns") and len(jaxpr.invars) == len(eqn.invars)
                 and len(jaxpr.outvars) == len(eqn.outvars)):
      return jaxpr, list(consts)
  raise ValueError(f"`{eqn.primitive.name}` has no body of matching arity")


def bind(eqn, ins) -> list:
  """Apply an equation as it stands. ``get_bind_params`` returned ``(subfuns,
  params)`` before jax 0.7 and ``params`` since; both are accepted."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    out = eqn.primitive.bind(*subfuns, *ins, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class Walker:
  """Evaluates a jaxpr whose inputs may be *tracked* values (adapted kernels).

  Subclasses define ``tracked``, ``untracked`` and one method per kind of
  ``KIND`` (plus ``other``); each takes ``(eqn, ins)`` and returns the list of
  outputs. ``call`` is provided: it evaluates the body inline.
  """

  def tracked(self, x) -> bool:
    raise NotImplementedError

  def untracked(self, eqn, ins) -> list:
    raise NotImplementedError

  def run(self, jaxpr, consts, args) -> list:
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if any(self.tracked(x) for x in ins):
        outs = getattr(self, KIND.get(eqn.primitive.name, "other"))(eqn, ins)
      else:
        outs = self.untracked(eqn, ins)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def call(self, eqn, ins) -> list:
    jaxpr, consts = sub_jaxpr(eqn)
    return self.run(jaxpr, consts, ins)

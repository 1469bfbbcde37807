"""``jlora.lora(fn)``: run model code written for base params, with adapters, factored.

How it works. ``fn`` is traced once (per input shapes) into a jaxpr over the base
params, with public JAX APIs only (``jax.make_jaxpr``, ``Primitive.bind``). The
jaxpr is then evaluated equation by equation. Every adapted kernel enters as a
``_Kernel``: the frozen ``W`` (behind ``stop_gradient``) together with its
``A``, ``B`` and scale, and a label per axis saying whether it is a stack, input
or output axis of the kernel. Transposes and dtype casts on it only relabel. When
it reaches the op that uses it as a weight, that op is rewritten:

* ``dot_general(x, W)``  ->  ``x·W + s·(x·A)·B``   (DoRA: times ``m/||W+sAB||``);
* ``conv(x, W)``         ->  ``conv(x, W) + s·conv(x, A)·B``  (the LoCon form);
* ``gather(W, idx)``     ->  ``W[idx] + s·A[idx]·B``  (embedding lookups).

``W + s·A·B`` is never formed, and since ``W`` is a constant to autodiff, its
weight gradient is never computed: the backward pass has only the input
gradient through ``W`` and the rank-r products. ``jit`` and ``checkpoint``
(remat) calls are followed inside, ``scan`` bodies are rebuilt (stacked kernels
of ``nn.scan`` are sliced per layer like any other ``xs``), and any other use of
a kernel falls back to the merged kernel ``merge.merged_kernel``: still exact,
reported once per path.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from jlora import merge as merge_lib
from jlora.branch import UNROLL_MAX_RANK, lora_branch, lora_matmul
from jlora import tracing
from jlora import tree as tree_lib

_PASS_THROUGH = ("convert_element_type", "copy", "copy_p")
_INLINE = ("jit", "pjit", "closed_call", "core_call")
_REMAT = ("remat", "remat2", "checkpoint")


class LoraFallbackWarning(UserWarning):
  """A kernel reached an op with no factored rule and was merged for it."""


class _Kernel(NamedTuple):
  """An adapted kernel inside the interpreter.

  ``ad`` holds the arrays in their canonical layout (``tree.Adapter``), its
  kernel already behind ``stop_gradient``. ``axes`` labels each axis of the
  kernel as the program currently sees it: ``("s", k)``, ``("i", k)`` or
  ``("o", k)`` for the k-th stack, input or output axis. ``dtype`` is the dtype
  the program has cast it to.
  """
  ad: tree_lib.Adapter
  axes: tuple
  dtype: Any

  @property
  def stack_labels(self) -> list:
    return [("s", j) for j in range(self.ad.n_stack)]

  @property
  def canonical(self):
    return (tuple(self.stack_labels) + tuple(("i", k) for k in range(self.ad.n_in))
            + tuple(("o", k) for k in range(self.ad.n_out)))

  def _to_current(self, canonical_array):
    perm = [self.canonical.index(lab) for lab in self.axes]
    return jnp.transpose(canonical_array, perm).astype(self.dtype)

  def base(self):
    """The frozen kernel as the program sees it (no adapter)."""
    return self._to_current(self.ad.kernel)

  def merged(self):
    """``W + delta`` (or DoRA's kernel) as the program sees it."""
    return self._to_current(merge_lib.merged_kernel(self.ad))

  def factor_dora(self):
    """``m / ||W + s·A·B||`` with the norm detached (DoRA paper, Sec. 4.3): ``S + O``."""
    v = self.ad.kernel.astype(merge_lib.wide(self.ad)) + merge_lib.delta(self.ad)
    return merge_lib.dora_factor(self.ad, v)


class _Ctx:
  """Per-call state: the dropout key stream and where fallbacks were reported."""

  def __init__(self, rng, reported: set, on_fallback: str):
    self.rng, self.count = rng, 0
    self.reported, self.on_fallback = reported, on_fallback

  def next_key(self):
    self.count += 1
    return jax.random.fold_in(self.rng, self.count)

  def fallback(self, k: _Kernel, why: str):
    msg = (f"jlora.lora: kernel {k.ad.path!r} reaches {why}, which has no factored"
           " rule; using the merged kernel W + s·A·B there (exact, but it costs a"
           " full weight gradient).")
    if self.on_fallback == "error":
      raise NotImplementedError(msg)
    if self.on_fallback == "warn" and (k.ad.path, why) not in self.reported:
      self.reported.add((k.ad.path, why))
      warnings.warn(msg, LoraFallbackWarning, stacklevel=4)
    return k.merged()


def lora(fn, *, mode: str = "factored", on_fallback: str = "warn"):
  """Wrap ``fn(params, *args, **kw)``, written for base params, to run with adapters.

  Args:
    fn: a function of a base params tree: a linen ``model.apply``, an NNX
      ``lambda state, x: nnx.merge(graphdef, state)(x)``, or any plain function.
    mode: ``"factored"`` (training: ``x·W + s·(x·A)·B``, no merged kernel, no
      weight gradient for ``W``) or ``"merged"`` (``fn(jlora.merge(params))``: for
      inference, and the reference the factored mode is tested against).
    on_fallback: what to do when a kernel reaches an op with no factored rule:
      ``"warn"`` once per path (default), ``"error"``, or ``"ignore"``.

  Returns:
    ``wrapped(params, *args, lora_rng=None, **kw)``. ``params`` may hold adapter
    leaves. ``lora_rng`` turns on the adapters' input dropout (the rate stored in
    ``lora_dropout``); without it dropout is off. Its output equals
    ``fn(jlora.merge(params), *args, **kw)`` to float tolerance, under ``jit``,
    ``grad``, ``vmap``, ``scan`` and ``remat``. The matmul branch is a
    ``custom_vjp`` (``jlora.branch``), so forward-mode derivatives (``jax.jvp``,
    ``jacfwd``) need ``mode="merged"``.
  """
  if mode not in ("factored", "merged"):
    raise ValueError(f"mode must be 'factored' or 'merged'; got {mode!r}.")
  if on_fallback not in ("warn", "error", "ignore"):
    raise ValueError(f"on_fallback must be 'warn', 'error' or 'ignore'; got {on_fallback!r}.")
  reported: set = set()

  @functools.wraps(fn)
  def wrapped(params, *args, lora_rng=None, **kwargs):
    flat = tree_lib.flatten(params)
    ads = list(tree_lib.iter_adapters(flat))
    if mode == "merged" or not ads:
      return fn(merge_lib.merge(params), *args, **kwargs)
    base = tree_lib.unflatten(
        {p: v for p, v in flat.items() if not tree_lib.is_adapter_path(p)}, params)
    traced = tracing.trace(fn, base, args, kwargs)
    jaxpr = traced.closed.jaxpr
    env = dict(zip(jaxpr.constvars, traced.closed.consts))
    env.update(zip(jaxpr.invars, traced.inputs))
    for ad in ads:
      frozen = ad._replace(kernel=jax.lax.stop_gradient(ad.kernel),
                           scale=jax.lax.stop_gradient(ad.scale))
      k = _Kernel(frozen, None, ad.kernel.dtype)
      env[jaxpr.invars[traced.param_index[ad.path]]] = k._replace(axes=k.canonical)
    ctx = _Ctx(lora_rng, reported, on_fallback)
    outs = _eval(jaxpr, env, ctx)
    return jax.tree_util.tree_unflatten(traced.out_tree, [_plain(o, ctx, "the output") for o in outs])

  return wrapped


# ---------------------------------------------------------------------------
# The interpreter.


def _plain(x, ctx: _Ctx, why: str):
  return ctx.fallback(x, why) if isinstance(x, _Kernel) else x


def _eval(jaxpr, env: dict, ctx: _Ctx) -> list:
  """Evaluate ``jaxpr`` with ``env`` holding its inputs (arrays or ``_Kernel``s)."""
  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if any(isinstance(x, _Kernel) for x in ins):
      outs = _rule(eqn, ins, ctx)
    else:
      outs = _bind(eqn, ins)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn, ins) -> list:
  """Apply an equation as it stands. ``get_bind_params`` returned ``(subfuns,
  params)`` before jax 0.7 and ``params`` since; both are accepted."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    out = eqn.primitive.bind(*subfuns, *ins, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _rule(eqn, ins, ctx: _Ctx) -> list:
  name = eqn.primitive.name
  k = ins[0]
  if name == "transpose" and isinstance(k, _Kernel):
    return [k._replace(axes=tuple(k.axes[i] for i in eqn.params["permutation"]))]
  if name in _PASS_THROUGH and isinstance(k, _Kernel):
    return [k._replace(dtype=jnp.dtype(eqn.params.get("new_dtype", k.dtype)))]
  if name == "dot_general":
    out = _dot_general(eqn, ins, ctx)
  elif name == "conv_general_dilated" and not isinstance(ins[0], _Kernel):
    out = _conv(eqn, ins, ctx)
  elif name == "gather" and isinstance(k, _Kernel):
    out = _gather(eqn, ins, ctx)
  elif name in _INLINE:
    jaxpr, consts = tracing.sub_jaxpr(eqn)
    return _eval(jaxpr, {**dict(zip(jaxpr.constvars, consts)), **dict(zip(jaxpr.invars, ins))}, ctx)
  elif name in _REMAT:
    return _remat(eqn, ins, ctx)
  elif name == "scan":
    return _scan(eqn, ins, ctx)
  else:
    out = None
  if out is not None:
    return [out]
  return _bind(eqn, [_plain(x, ctx, f"`{name}`") for x in ins])


# ---------------------------------------------------------------------------
# Factored rules. Each returns None when its preconditions fail, which sends the
# op to the merged fallback.


def _lora_input(x, k: _Kernel, ctx: _Ctx):
  """The input of the adapter branch: ``x``, or ``dropout(x)`` when an rng is given."""
  if ctx.rng is None or k.ad.dropout is None:
    return x
  rate = k.ad.dropout
  if jnp.ndim(rate) != 0:
    return None  # a per-layer rate inside a batched (vmapped) use: no rule
  keep = jax.random.bernoulli(ctx.next_key(), 1.0 - rate, jnp.shape(x))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def _labels_a(k: _Kernel):
  return k.stack_labels + [("i", j) for j in range(k.ad.n_in)] + ["r"]


def _labels_b(k: _Kernel):
  return k.stack_labels + ["r"] + [("o", j) for j in range(k.ad.n_out)]


def _dot_general(eqn, ins, ctx: _Ctx):
  """``x·W`` (W on either side) contracting only W's inputs, or only its outputs."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  kernel_left = isinstance(ins[0], _Kernel)
  if kernel_left == isinstance(ins[1], _Kernel):
    return None  # two kernels multiplied together: no rule
  (k, kc, kb), (x, xc, xb) = ((ins[0], lc, lb), (ins[1], rc, rb)) if kernel_left else \
      ((ins[1], rc, rb), (ins[0], lc, lb))
  c_labels = [k.axes[i] for i in kc]
  b_labels = [k.axes[i] for i in kb]
  # Stack axes must pair with batch axes of x (as under vmap), and the contraction
  # must stay on one side of the rank-r bottleneck.
  if set(b_labels) != set(k.stack_labels):
    return None
  side = {lab[0] for lab in c_labels}
  if side not in ({"i"}, {"o"}):
    return None
  contract_in = side == {"i"}
  if len(c_labels) != (k.ad.n_in if contract_in else k.ad.n_out):
    return None  # the branch is (x·A)·B as matrices: every axis of one side contracts
  if k.ad.m is not None and not contract_in:
    return None  # DoRA's column norm runs over the inputs
  xl = _lora_input(x, k, ctx)
  if xl is None:
    return None
  kw = {p: eqn.params[p] for p in ("precision", "preferred_element_type") if p in eqn.params}
  x_labels = [("x", i) for i in range(x.ndim)]
  for i, lab in zip(list(xc) + list(xb), c_labels + b_labels):
    x_labels[i] = lab
  a = (k.ad.a.astype(k.dtype), _labels_a(k))
  b = (k.ad.b.astype(k.dtype), _labels_b(k))
  (p, p_labels), (q, q_labels) = (a, b) if contract_in else (b, a)
  # Lay the branch out as matrices (one per stacked layer): x (L?, T, C),
  # p (L?, C, r), q (L?, r, N). For Dense and attention layouts these are bitcasts.
  x_free = [lab for lab in x_labels if lab[0] == "x"]
  q_free = [lab for lab in q_labels if lab != "r" and lab not in b_labels]
  sizes = {**dict(zip(x_labels, np.shape(xl))), **dict(zip(q_labels, np.shape(q)))}
  lead = [math.prod(sizes[lab] for lab in b_labels)] if b_labels else []
  flat = lambda arr, labels, order, *shape: jnp.reshape(
      jnp.transpose(arr, [labels.index(lab) for lab in order]), lead + list(shape))
  prod = lambda labs: math.prod(sizes[lab] for lab in labs)
  x2 = flat(xl, x_labels, b_labels + x_free + c_labels, prod(x_free), prod(c_labels))
  p2 = flat(p, p_labels, b_labels + c_labels + ["r"], prod(c_labels), k.ad.rank)
  q2 = flat(q, q_labels, b_labels + ["r"] + q_free, k.ad.rank, prod(q_free))
  stack = k.stack_labels
  scale = jnp.reshape(_expand(k.ad.scale, stack, b_labels), (-1,)) if b_labels else k.ad.scale
  k_free = [lab for lab in k.axes if lab not in c_labels and lab not in b_labels]
  target = b_labels + (k_free + x_free if kernel_left else x_free + k_free)
  if (k.ad.rank > UNROLL_MAX_RANK and not b_labels and xl is x and not kernel_left
      and x_labels == x_free + c_labels and list(k.axes) == c_labels + k_free == c_labels + q_free
      and x.dtype == k.dtype and kw.get("preferred_element_type") in (None, x.dtype)):
    # x·W + s·(x·A)·B as one product of plain matrices (see branch.lora_matmul); every
    # reshape here is a bitcast, since x and W are already laid out (T, C) and (C, N).
    y = lora_matmul(x2, jnp.reshape(k.base(), (prod(c_labels), prod(k_free))), p2, q2, scale,
                    kw.get("precision"))
    y = jnp.reshape(y, [sizes[lab] for lab in x_free + k_free])
    return y if k.ad.m is None else y * _dora_factor(k, target, y.dtype)
  u = lora_branch(x2, p2, q2, scale, bool(b_labels), kw.get("precision"))
  u = jnp.reshape(u, [sizes[lab] for lab in b_labels + x_free + q_free])
  u_labels = b_labels + x_free + q_free
  y_lora = jnp.transpose(u, [u_labels.index(lab) for lab in target])
  y = jax.lax.dot_general(*((k.base(), x) if kernel_left else (x, k.base())),
                          eqn.params["dimension_numbers"], **kw)
  if k.ad.m is not None:
    f = _dora_factor(k, target, y.dtype)
    y, y_lora = y * f, y_lora * f
  return y + y_lora.astype(y.dtype)


def _dora_factor(k: _Kernel, labels, dtype):
  """DoRA's ``m / ‖W + sBA‖`` (detached norm) laid out to scale a product with axes ``labels``."""
  return _expand(k.factor_dora().astype(dtype),
                 k.stack_labels + [("o", j) for j in range(k.ad.n_out)], labels)


def _expand(arr, arr_labels, out_labels):
  """Lay ``arr`` (axes ``arr_labels``) out to broadcast against axes ``out_labels``.

  Every label of ``arr`` must appear in ``out_labels``; other output axes get size 1.
  """
  present = [lab for lab in out_labels if lab in arr_labels]
  arr = jnp.transpose(arr, [arr_labels.index(lab) for lab in present])
  it = iter(np.shape(arr))
  return jnp.reshape(arr, [next(it) if lab in arr_labels else 1 for lab in out_labels])


def _a_like_kernel(k: _Kernel):
  """A in the kernel's current axis order, with r in the (single) output slot."""
  perm = [k.ad.n_in if lab[0] == "o" else lab[1] for lab in k.axes]
  return jnp.transpose(k.ad.a.astype(k.dtype), perm)


def _up_project(k: _Kernel, y, t, c: int):
  """``y + s·(t·B)`` where axis ``c`` of ``t`` holds the rank and of ``y`` the output;
  DoRA rescales both terms along that axis."""
  t = jnp.asarray(k.ad.scale, t.dtype) * t  # scale the r-wide intermediate, the cheaper side
  y_lora = jnp.moveaxis(jnp.moveaxis(t, c, -1) @ k.ad.b.astype(k.dtype), -1, c)
  if k.ad.m is not None:
    f = _dora_factor(k, [("o", 0) if i == c else ("y", i) for i in range(y.ndim)], y.dtype)
    y, y_lora = y * f, y_lora * f
  return y + y_lora.astype(y.dtype)


def _conv(eqn, ins, ctx: _Ctx):
  """``conv(x, W) + s·conv(x, A)·B``: a rank-r conv, then a 1x1 map to the outputs."""
  x, k = ins
  p = eqn.params
  dn = p["dimension_numbers"]
  if (p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or k.ad.n_stack
      or k.ad.n_out != 1 or k.axes[dn.rhs_spec[0]] != ("o", 0)):
    return None
  xl = _lora_input(x, k, ctx)
  if xl is None:
    return None
  conv = functools.partial(jax.lax.conv_general_dilated_p.bind, **p)
  return _up_project(k, conv(x, k.base()), conv(xl, _a_like_kernel(k)), dn.out_spec[1])


def _gather(eqn, ins, ctx: _Ctx):
  """``W[idx] + s·A[idx]·B`` for lookups that take whole rows along the output axis."""
  k, idx = ins
  p = eqn.params
  dn = p["dimension_numbers"]
  o_pos = [i for i, lab in enumerate(k.axes) if lab[0] == "o"]
  if (k.ad.n_stack or len(o_pos) != 1 or dn.operand_batching_dims
      or o_pos[0] in dn.collapsed_slice_dims or o_pos[0] in dn.start_index_map
      or p["slice_sizes"][o_pos[0]] != k.ad.kernel.shape[-1]):
    return None
  o = o_pos[0]
  sizes = tuple(k.ad.rank if i == o else s for i, s in enumerate(p["slice_sizes"]))
  y = jax.lax.gather_p.bind(k.base(), idx, **p)
  t = jax.lax.gather_p.bind(_a_like_kernel(k), idx, **{**p, "slice_sizes": sizes})
  kept = [i for i in range(len(k.axes)) if i not in dn.collapsed_slice_dims]
  return _up_project(k, y, t, dn.offset_dims[kept.index(o)])


# ---------------------------------------------------------------------------
# Control flow: kernels cross into ``checkpoint`` and ``scan`` bodies as arrays.


def _pack(ins):
  """Split inputs into flat arrays and a rebuild function (kernels -> their arrays)."""
  flat, specs = [], []
  for x in ins:
    if isinstance(x, _Kernel):
      leaves, treedef = jax.tree_util.tree_flatten(x.ad._replace(path=None))
      specs.append((treedef, len(leaves), x))
      flat.extend(leaves)
    else:
      specs.append(None)
      flat.append(x)

  def unpack(arrays):
    out, i = [], 0
    for spec in specs:
      if spec is None:
        out.append(arrays[i])
        i += 1
      else:
        treedef, n, k = spec
        ad = jax.tree_util.tree_unflatten(treedef, arrays[i:i + n])._replace(path=k.ad.path)
        out.append(k._replace(ad=ad))
        i += n
    return out
  return flat, unpack


def _remat(eqn, ins, ctx: _Ctx):
  jaxpr, consts = tracing.sub_jaxpr(eqn)
  flat, unpack = _pack(ins)
  has_rng = ctx.rng is not None

  def body(rng, *arrays):
    inner = _Ctx(rng, ctx.reported, ctx.on_fallback) if has_rng else ctx
    env = {**dict(zip(jaxpr.constvars, consts)), **dict(zip(jaxpr.invars, unpack(list(arrays))))}
    return [_plain(o, inner, "the output of a remat block") for o in _eval(jaxpr, env, inner)]

  rng = ctx.next_key() if has_rng else None
  policy = eqn.params.get("policy")
  return jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                        policy=policy)(rng, *flat)


def _scan(eqn, ins, ctx: _Ctx):
  p = eqn.params
  closed = p["jaxpr"]
  nc, ncar = p["num_consts"], p["num_carry"]
  consts, carry, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
  carry = [_plain(c, ctx, "a scan carry") for c in carry]
  sliced = []
  for x in xs:
    if isinstance(x, _Kernel):
      x = _stack_major(x) or _plain(x, ctx, "a scan over a non-stack axis")
    sliced.append(x)
  c_flat, c_unpack = _pack(consts)
  x_flat, x_unpack = _pack(sliced)
  has_rng = ctx.rng is not None
  body_jaxpr = closed.jaxpr

  def body(state, x_arrays):
    carry_vals, rng = state
    if has_rng:
      rng, sub = jax.random.split(rng)
    inner = _Ctx(sub, ctx.reported, ctx.on_fallback) if has_rng else ctx
    xs_in = [_unstack(x) if isinstance(x, _Kernel) else x for x in x_unpack(list(x_arrays))]
    env = dict(zip(body_jaxpr.constvars, closed.consts))
    env.update(zip(body_jaxpr.invars, c_unpack(c_flat) + list(carry_vals) + xs_in))
    outs = [_plain(o, inner, "a scan output") for o in _eval(body_jaxpr, env, inner)]
    return (outs[:ncar], rng), outs[ncar:]

  rng0 = ctx.next_key() if has_rng else None
  (carry_out, _), ys = jax.lax.scan(body, (carry, rng0), x_flat, length=p["length"],
                                    reverse=p["reverse"], unroll=p["unroll"])
  return list(carry_out) + list(ys)


def _stack_major(k: _Kernel):
  """``k`` with the stack axis that the scan slices moved first in every array, or None."""
  lab = k.axes[0]
  if lab[0] != "s":
    return None
  j = lab[1]
  move = lambda arr: None if arr is None else jnp.moveaxis(arr, j, 0)
  ad = k.ad._replace(kernel=move(k.ad.kernel), a=move(k.ad.a), b=move(k.ad.b),
                     scale=move(k.ad.scale), m=move(k.ad.m), dropout=move(k.ad.dropout))
  relabel = lambda lab: ("s", 0) if lab == ("s", j) else (
      ("s", lab[1] + 1) if lab[0] == "s" and lab[1] < j else lab)
  return k._replace(ad=ad, axes=tuple(relabel(lab) for lab in k.axes))


def _unstack(k: _Kernel):
  """A per-iteration slice of a stack-major kernel: drop the leading stack label."""
  relabel = lambda lab: ("s", lab[1] - 1) if lab[0] == "s" else lab
  return k._replace(axes=tuple(relabel(lab) for lab in k.axes[1:]))


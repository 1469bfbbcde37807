"""``jlora.lora(fn)``: run model code written for base params, with adapters, factored.

How it works. ``fn`` is traced once per input signature into a jaxpr over the
base params, with public JAX APIs only (``jax.make_jaxpr``, ``Primitive.bind``).
The jaxpr is then evaluated equation by equation (``walk.Walker``). Every adapted
kernel enters as a ``_Kernel``: the frozen ``W`` (behind ``stop_gradient``)
together with its ``A``, ``B`` and scale, and a label per axis saying whether it
is a stack, input or output axis of the kernel. Transposes, dtype casts and
picking layers out of a stack (``W[i]``) only relabel or slice. When it reaches
the op that uses it as a weight, that op is rewritten:

* ``dot_general(x, W)``  ->  ``x·W + s·(x·A)·B``   (DoRA: times ``m/‖W+sAB‖``);
* ``conv(x, W)``         ->  ``conv(x, W) + s·conv(x, A)·B``  (the LoCon form);
* ``gather(W, idx)``     ->  ``W[idx] + s·A[idx]·B``  (embedding lookups).

``W + s·A·B`` is never formed, and since ``W`` is a constant to autodiff, its
weight gradient is never computed: the backward pass has only the input
gradient through ``W`` and the rank-r products. ``jit`` calls are followed
inside; ``remat``, ``scan``, ``cond`` and ``while`` bodies are rebuilt around the
kernels' arrays (stacked kernels of ``nn.scan`` are sliced per layer like any
other ``xs``). Any other use of a kernel falls back to the merged kernel
``merge.merged_kernel``: still exact, reported once per path and reason. That
includes a kernel entering a ``custom_jvp``/``custom_vjp`` function: its rule is
kept, and it is given the merged kernel.

A quantized kernel (``jlora.quantize``) is tracked the same way, with or without an
adapter: ``fn`` is traced on float placeholders of its shape, and the frozen product
``x·W`` dequantizes it inside ``quant.frozen_product``, a ``custom_vjp`` whose backward
pass keeps the integers and dequantizes again, so one layer's float kernel exists at a
time. An embedding lookup dequantizes the table it reads.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora import adapter as adapter_lib
from jlora import explicit
from jlora import merge as merge_lib
from jlora import per_example
from jlora import quant
from jlora import tracing
from jlora import tree as tree_lib
from jlora import walk
from jlora.adapter import Adapter, Split
from jlora.branch import lora_branch, lora_matmul

#: How many traced signatures ``lora(fn)`` keeps per wrapped function.
_CACHE_SIZE = 32


class LoraFallbackWarning(UserWarning):
  """A kernel reached an op with no factored rule and was merged for it."""


_ARRAYS = ("kernel", "a", "b", "scale", "m", "dropout")


class _Kernel(NamedTuple):
  """A tracked kernel inside the interpreter: an adapted kernel, or a quantized one.

  ``ad`` holds the arrays as stored (``adapter.Adapter``), its kernel already
  behind ``stop_gradient``; the kernel is an array or a ``quant.Quantized``. A
  quantized kernel without an adapter is tracked too (it cannot reach an op as
  it is stored): its ``a`` and ``b`` are None, its ``split`` has no input axes,
  and its stack axes are the leading axes every one of its leaves holds whole.
  ``axes`` labels each axis of the kernel as the program currently sees it:
  ``("s", k)``, ``("i", k)`` or ``("o", k)`` for the k-th stack, input or output
  axis. ``dtype`` is the dtype the program has cast it to. Stack axes lead every
  array of ``ad``, so the k-th stack axis is axis k of each.
  """
  ad: Adapter
  split: Split
  axes: tuple
  dtype: Any

  @property
  def has_adapter(self) -> bool:
    return self.ad.a is not None

  @property
  def quantized(self) -> bool:
    return quant.is_quantized(self.ad.kernel)

  @property
  def stack_labels(self) -> list:
    return [("s", j) for j in range(self.split.n_stack)]

  @property
  def in_labels(self) -> list:
    return [("i", j) for j in range(self.split.n_in)]

  @property
  def out_labels(self) -> list:
    return [("o", j) for j in range(self.split.n_out(np.ndim(self.ad.kernel)))]

  @property
  def stored(self) -> list:
    """The labels of the kernel's axes as stored."""
    body = (self.out_labels + self.in_labels if self.split.out_first
            else self.in_labels + self.out_labels)
    return self.stack_labels + body

  @property
  def a_labels(self) -> list:
    return self.stack_labels + (["r"] + self.in_labels if self.split.out_first
                                else self.in_labels + ["r"])

  @property
  def b_labels(self) -> list:
    return self.stack_labels + (self.out_labels + ["r"] if self.split.out_first
                                else ["r"] + self.out_labels)

  @property
  def rank(self) -> int:
    return np.shape(self.ad.a)[self.ad.n_stack if self.split.out_first else -1]

  def current(self, stored_array):
    """A kernel-shaped array as stored -> as the program sees it (axes and dtype)."""
    perm = [self.stored.index(lab) for lab in self.axes]
    return jnp.transpose(stored_array, perm).astype(self.dtype)

  def base(self):
    """The frozen kernel as the program sees it (no adapter), dequantized if need be."""
    w = self.ad.kernel
    return self.current(w.dequantize(jnp.float32) if self.quantized else w)

  def merged(self):
    """``W + delta`` (or DoRA's kernel) as the program sees it."""
    return self.current(merge_lib.merged_kernel(self.ad)) if self.has_adapter else self.base()

  def product(self, op, x, view):
    """``op(x, view(W))`` for an ``op`` linear in ``x``, where ``view`` takes the
    kernel as stored (float32 when it is quantized) to the operand ``op`` wants.
    A quantized ``W`` is dequantized inside ``quant.frozen_product``, so the
    backward pass keeps its integers, not a float copy."""
    if self.quantized:
      return quant.frozen_product(op, lambda w: view(w).astype(self.dtype), x, self.ad.kernel)
    return op(x, view(self.ad.kernel).astype(self.dtype))

  def factor_dora(self):
    """``m / ‖W + s·A·B‖`` with the norm detached (DoRA paper, Sec. 4.3): ``S + O``."""
    v = self.ad.kernel.astype(merge_lib.wide(self.ad)) + merge_lib.delta(self.ad)
    return merge_lib.dora_factor(self.ad, v)

  def map_arrays(self, fn, **replace):
    """Apply ``fn`` to every array of the adapter and of a quantized kernel's
    leaves (all lead with the stack axes)."""
    arrays = {f: jax.tree.map(fn, getattr(self.ad, f)) for f in _ARRAYS}
    return self._replace(ad=self.ad._replace(**arrays), **replace)


def _entering(ad: Adapter, split: Split | None = None) -> _Kernel:
  # Only W is frozen. The scale keeps its gradient (a strength, or jlora.mix's weights,
  # may be differentiated); where it is a constant, XLA drops that cotangent.
  frozen = ad._replace(kernel=jax.tree.map(jax.lax.stop_gradient, ad.kernel))
  k = _Kernel(frozen, split or ad.split, (), ad.kernel.dtype)
  return k._replace(axes=tuple(k.stored))


def _entering_quantized(path, q: quant.Quantized) -> _Kernel:
  """A quantized kernel with no adapter: its leading whole axes are its stack axes."""
  return _entering(Adapter(path, q, None, None, None), Split(q.whole_axes(), 0))


def lora(fn, *, mode: str = "factored", on_fallback: str = "warn", unroll_max_rank: int = 0):
  """Wrap ``fn(params, *args, **kw)``, written for base params, to run with adapters.

  Args:
    fn: a function of a base params tree: a linen ``model.apply``, an NNX
      ``lambda state, x: nnx.merge(graphdef, state)(x)``, or any plain function.
    mode: ``"factored"`` (training: ``x·W + s·(x·A)·B``, no merged kernel, no
      weight gradient for ``W``) or ``"merged"`` (``fn(jlora.merge(params))``: for
      inference, and the reference the factored mode is tested against).
    on_fallback: what to do when a kernel reaches an op with no factored rule:
      ``"warn"`` once per path and reason (default), ``"error"``, or ``"ignore"``.
    unroll_max_rank: the K=r products of adapters up to this rank are written
      as multiply-adds that XLA fuses into neighbouring work; above it, a
      plain-matrix product runs as one ``branch.lora_matmul``. 0 (the default)
      never unrolls: see ``jlora.branch`` for what was measured.

  Returns:
    ``wrapped(params, *args, lora_rng=None, adapter_ids=None, **kw)``. ``params``
    may hold adapter leaves. ``lora_rng`` turns on the adapters' input dropout (the
    rate stored in ``lora_dropout``); without it dropout is off. ``adapter_ids``
    (int ``(batch,)``) runs a stacked adapter tree (``jlora.stack_adapters``) with
    adapter ``ids[b]`` on example ``b`` of every array argument, ``-1`` the base
    model (``jlora.per_example``); a stacked tree without it is an error. Its output equals
    ``fn(jlora.merge(params), *args, **kw)`` to float tolerance, under ``jit``,
    ``grad``, ``vmap``, ``scan`` and ``remat``. ``params`` may be a quantized base
    (``jlora.quantize``), with or without adapters; pass it to ``jit`` as an
    argument, not closed over (see ``jlora.quantize``). ``fn`` is traced once per
    signature (tree structure, shapes and dtypes of the arrays, and the values
    of the other leaves); like ``jax.jit``, it sees arrays it closes over as
    they were at that trace. The matmul branch is a ``custom_vjp``
    (``jlora.branch``), so forward-mode derivatives (``jax.jvp``, ``jacfwd``)
    need ``mode="merged"``.
  """
  if mode not in ("factored", "merged"):
    raise ValueError(f"mode must be 'factored' or 'merged'; got {mode!r}.")
  if on_fallback not in ("warn", "error", "ignore"):
    raise ValueError(f"on_fallback must be 'warn', 'error' or 'ignore'; got {on_fallback!r}.")
  if isinstance(unroll_max_rank, bool) or not isinstance(unroll_max_rank, int):
    raise ValueError(f"unroll_max_rank must be an int; got {unroll_max_rank!r}.")
  reported: set = set()
  cache: dict = {}

  def traced_for(base, args, kwargs) -> tracing.Traced:
    key = tracing.signature(base, args, kwargs)
    if key is None:
      return tracing.trace(fn, base, args, kwargs)
    if key not in cache:
      if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
      cache[key] = tracing.trace(fn, base, args, kwargs)
    return cache[key]

  def factored(params, flat, found, adapters: dict, args, kwargs, rng,
               whole_product: bool = True):
    """``fn`` on ``params`` (flat view ``flat``, its adapters ``found`` as
    ``adapter.find`` gives them) with ``{kernel path: Adapter}`` applied, factored;
    quantized kernels without an adapter enter as frozen quantized products."""
    owned = tree_lib.owned(found)
    quantized = quant.find(flat)
    # ``fn`` is traced on the float model: quantized kernels as float placeholders.
    base = tree_lib.unflatten({p: v for p, v in quant.float_view(flat).items()
                               if p not in owned}, params)
    traced = traced_for(base, args, kwargs)
    # The traced inputs are the arrays of this call (a cached trace holds an old call's).
    inputs = tracing.trace_inputs(base, args, kwargs)
    for kp, roles in quantized.items():
      if kp not in adapters:
        inputs[traced.param_index[kp]] = _entering_quantized(kp, quant.read(flat, kp, roles))
    for kp, ad in adapters.items():
      inputs[traced.param_index[kp]] = _entering(ad)
    walker = _Factored(rng, reported, on_fallback, unroll_max_rank, whole_product)
    outs = walker.run(traced.closed.jaxpr, traced.closed.consts, inputs)
    return jax.tree_util.tree_unflatten(traced.out_tree,
                                        [walker.plain(o, "the output") for o in outs])

  @functools.wraps(fn)
  def wrapped(params, *args, lora_rng=None, adapter_ids=None, **kwargs):
    flat = tree_lib.flatten(params)
    found = adapter_lib.find(flat)
    if adapter_ids is not None:
      return per_example.call(fn, factored, mode, params, flat, found, adapter_ids, lora_rng,
                              args, kwargs)
    if mode == "merged" or not (found or quant.find(flat)):
      return fn(merge_lib.merge(params), *args, **kwargs)
    adapters = {kp: adapter_lib.read(flat, kp, roles) for kp, roles in found.items()}
    return factored(params, flat, found, adapters, args, kwargs, lora_rng)

  return wrapped


# ---------------------------------------------------------------------------
# The interpreter.


class _Factored(walk.Walker):
  """Evaluates a jaxpr with ``_Kernel``s factored (see the module docstring)."""

  def __init__(self, rng, reported: set, on_fallback: str, unroll_max_rank: int,
               whole_product: bool = True):
    self.rng, self.count = rng, 0
    self.reported, self.on_fallback = reported, on_fallback
    self.unroll_max_rank = unroll_max_rank
    # Off under adapter_ids: there each example has its own factors, and lora_matmul's
    # concatenated [W ; sB] would be one kernel-sized copy per example.
    self.whole_product = whole_product

  def with_rng(self, rng) -> "_Factored":
    """The same walker with its own dropout key stream (inside a scan or remat body)."""
    return _Factored(rng, self.reported, self.on_fallback, self.unroll_max_rank,
                     self.whole_product)

  def next_key(self):
    self.count += 1
    return jax.random.fold_in(self.rng, self.count)

  def tracked(self, x):
    return isinstance(x, _Kernel)

  def untracked(self, eqn, ins):
    return walk.bind(eqn, ins)

  def fallback(self, k: _Kernel, why: str):
    if k.has_adapter:
      msg = (f"jlora.lora: kernel {k.ad.name!r} reaches {why}, which has no factored"
             " rule; using the merged kernel W + s·A·B there (exact, but it costs a"
             " full weight gradient).")
    else:
      msg = (f"jlora.lora: quantized kernel {k.ad.name!r} reaches {why}, which has no"
             " rule for quantized kernels; using the dequantized kernel there (exact, but"
             " the backward pass may keep it in float).")
    if self.on_fallback == "error":
      raise NotImplementedError(msg)
    if self.on_fallback == "warn" and (k.ad.path, why) not in self.reported:
      self.reported.add((k.ad.path, why))
      warnings.warn(msg, LoraFallbackWarning, stacklevel=4)
    return k.merged()

  def plain(self, x, why: str):
    return self.fallback(x, why) if isinstance(x, _Kernel) else x

  def other(self, eqn, ins, why: str | None = None):
    why = why or f"`{eqn.primitive.name}`"
    return walk.bind(eqn, [self.plain(x, why) for x in ins])

  # -- relabelling -------------------------------------------------------------

  def transpose(self, eqn, ins):
    k = ins[0]
    return [k._replace(axes=tuple(k.axes[i] for i in eqn.params["permutation"]))]

  def cast(self, eqn, ins):
    k = ins[0]
    return [k._replace(dtype=jnp.dtype(eqn.params.get("new_dtype", k.dtype)))]

  def slice(self, eqn, ins):
    """``W[i:j]`` or ``W[i]`` along stack axes: the same slice of every array."""
    k = ins[0]
    if not isinstance(k, _Kernel) or any(isinstance(x, _Kernel) for x in ins[1:]):
      return self.other(eqn, ins)
    shape = [np.shape(k.ad.kernel)[k.stored.index(lab)] for lab in k.axes]
    if eqn.primitive.name == "slice":
      p = eqn.params
      if any(s not in (None, 1) for s in (p["strides"] or ())):
        return self.other(eqn, ins, "a strided slice")
      starts, sizes = p["start_indices"], [b - a for a, b in zip(p["start_indices"],
                                                                 p["limit_indices"])]
    else:
      starts, sizes = ins[1:], eqn.params["slice_sizes"]
    cuts = {}
    for lab, start, size, dim in zip(k.axes, starts, sizes, shape):
      if size == dim:
        continue
      if lab[0] != "s":
        return self.other(eqn, ins, "a slice of its input or output axes")
      cuts[lab[1]] = (start, size)
    out = k
    for j, (start, size) in cuts.items():
      out = out.map_arrays(lambda arr, j=j, start=start, size=size:
                           jax.lax.dynamic_slice_in_dim(arr, start, size, axis=j))
    return [out]

  def squeeze(self, eqn, ins):
    """Dropping picked stack axes (``W[i]``): drop them from every array."""
    k, dims = ins[0], eqn.params["dimensions"]
    gone = [k.axes[i][1] for i in dims if k.axes[i][0] == "s"]
    if len(gone) != len(dims):
      return self.other(eqn, ins, "a squeeze of its input or output axes")
    out = k.map_arrays(lambda arr: jnp.squeeze(arr, axis=tuple(gone)))
    relabel = lambda lab: ("s", lab[1] - sum(g < lab[1] for g in gone)) if lab[0] == "s" else lab
    return [out._replace(axes=tuple(relabel(lab) for i, lab in enumerate(k.axes) if i not in dims),
                         split=out.split._replace(n_stack=out.split.n_stack - len(gone)))]

  def barrier(self, eqn, ins):
    flat, unpack = _pack(ins)
    return unpack(list(jax.lax.optimization_barrier(tuple(flat))))

  # -- weight uses -------------------------------------------------------------

  def dot(self, eqn, ins):
    return _or_fallback(self, eqn, ins, _dot_general(eqn, ins, self))

  def conv(self, eqn, ins):
    out = "an adapted kernel as the image" if isinstance(ins[0], _Kernel) else _conv(eqn, ins, self)
    return _or_fallback(self, eqn, ins, out)

  def gather(self, eqn, ins):
    out = _gather(eqn, ins, self) if isinstance(ins[0], _Kernel) else "an adapted kernel as indices"
    return _or_fallback(self, eqn, ins, out)

  def custom(self, eqn, ins):
    return self.other(eqn, ins, f"`{eqn.primitive.name}` (a custom derivative rule, kept as"
                      " written)")

  # -- bodies: kernels cross into them as their arrays -------------------------

  def remat(self, eqn, ins):
    jaxpr, consts = walk.sub_jaxpr(eqn)
    flat, unpack = _pack(ins)
    has_rng = self.rng is not None

    def body(rng, *arrays):
      inner = self.with_rng(rng) if has_rng else self
      outs = inner.run(jaxpr, consts, unpack(list(arrays)))
      return [inner.plain(o, "the output of a remat block") for o in outs]

    rng = self.next_key() if has_rng else None
    return jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                          policy=eqn.params.get("policy"))(rng, *flat)

  def scan(self, eqn, ins):
    p = eqn.params
    closed = p["jaxpr"]
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
    carry = [self.plain(c, "a scan carry") for c in carry]
    sliced = []
    for x in xs:
      if isinstance(x, _Kernel):
        x = _stack_major(x) or self.plain(
            x, "a scan over one of its input or output axes (if it is a stack of layers,"
            " pass `fn=`/`args=` to jlora.init, or set `stack_axes`, so the adapter gets"
            " one factor per layer)")
      sliced.append(x)
    c_flat, c_unpack = _pack(consts)
    x_flat, x_unpack = _pack(sliced)
    has_rng = self.rng is not None

    def body(state, x_arrays):
      carry_vals, rng = state
      sub = None
      if has_rng:
        rng, sub = jax.random.split(rng)
      inner = self.with_rng(sub) if has_rng else self
      xs_in = [_unstack(x) if isinstance(x, _Kernel) else x for x in x_unpack(list(x_arrays))]
      outs = inner.run(closed.jaxpr, closed.consts, c_unpack(c_flat) + list(carry_vals) + xs_in)
      outs = [inner.plain(o, "a scan output") for o in outs]
      return (outs[:ncar], rng), outs[ncar:]

    rng0 = self.next_key() if has_rng else None
    (carry_out, _), ys = jax.lax.scan(body, (carry, rng0), x_flat, length=p["length"],
                                      reverse=p["reverse"], unroll=p["unroll"])
    return list(carry_out) + list(ys)

  def cond(self, eqn, ins):
    index = self.plain(ins[0], "a cond predicate")
    flat, unpack = _pack(ins[1:])

    def branch(closed):
      def run(*arrays):
        outs = self.run(closed.jaxpr, closed.consts, unpack(list(arrays)))
        return [self.plain(o, "a cond output") for o in outs]
      return run
    return list(jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *flat))

  def while_loop(self, eqn, ins):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    c_consts = [self.plain(x, "a while condition") for x in ins[:nc]]
    init = [self.plain(x, "a while carry") for x in ins[nc + nb:]]
    b_flat, b_unpack = _pack(ins[nc:nc + nb])
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fun(carry):
      return self.run(cond.jaxpr, cond.consts, c_consts + list(carry))[0]

    def body_fun(carry):
      outs = self.run(body.jaxpr, body.consts, b_unpack(b_flat) + list(carry))
      return [self.plain(o, "a while carry") for o in outs]
    return list(jax.lax.while_loop(cond_fun, body_fun, init))


def _or_fallback(walker: _Factored, eqn, ins, out) -> list:
  if isinstance(out, str):
    return walker.other(eqn, ins, f"`{eqn.primitive.name}` ({out})")
  return [out]


# ---------------------------------------------------------------------------
# Factored rules. Each returns its result, or a string saying which precondition
# failed, which sends the op to the merged fallback with that reason.


def _lora_input(x, k: _Kernel, walker: _Factored):
  """The input of the adapter branch: ``x``, or ``dropout(x)`` when an rng is given."""
  if walker.rng is None or k.ad.dropout is None:
    return x
  rate = k.ad.dropout
  if jnp.ndim(rate) != 0:
    return "dropout with a per-layer rate inside a batched (vmapped) product"
  keep = jax.random.bernoulli(walker.next_key(), 1.0 - rate, jnp.shape(x))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def _dot_general(eqn, ins, walker: _Factored):
  """``x·W`` (W on either side) contracting only W's inputs, or only its outputs; or why not."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  kernel_left = isinstance(ins[0], _Kernel)
  if kernel_left == isinstance(ins[1], _Kernel):
    return "two adapted kernels multiplied together"
  (k, kc, kb), (x, xc, xb) = ((ins[0], lc, lb), (ins[1], rc, rb)) if kernel_left else \
      ((ins[1], rc, rb), (ins[0], lc, lb))
  kw = {p: eqn.params[p] for p in ("precision", "preferred_element_type") if p in eqn.params}
  if not k.has_adapter:
    return _base_product(eqn, k, x, kernel_left, kw)
  c_labels = [k.axes[i] for i in kc]
  b_labels = [k.axes[i] for i in kb]
  # Stack axes must pair with batch axes of x (as under vmap), and the contraction
  # must stay on one side of the rank-r bottleneck.
  if set(b_labels) != set(k.stack_labels):
    return "its batch axes are not exactly its stack axes"
  side = {lab[0] for lab in c_labels}
  if side not in ({"i"}, {"o"}):
    return "it contracts input and output axes together"
  contract_in = side == {"i"}
  if len(c_labels) != (k.ad.n_in if contract_in else k.ad.n_out):
    # the branch is (x·A)·B as matrices: every axis of one side contracts
    return f"it contracts only some of the kernel's {'input' if contract_in else 'output'} axes"
  if k.ad.m is not None and not contract_in:
    return "it contracts the output axes of a DoRA kernel, whose column norm runs over the inputs"
  xl = _lora_input(x, k, walker)
  if isinstance(xl, str):
    return xl
  x_labels = [("x", i) for i in range(x.ndim)]
  for i, lab in zip(list(xc) + list(xb), c_labels + b_labels):
    x_labels[i] = lab
  a = (k.ad.a.astype(k.dtype), k.a_labels)
  b = (k.ad.b.astype(k.dtype), k.b_labels)
  (p, p_labels), (q, q_labels) = (a, b) if contract_in else (b, a)
  # Lay the branch out as matrices (one per stacked layer): x (L?, T, C),
  # p (L?, C, r), q (L?, r, N). For Dense and attention layouts these are bitcasts.
  x_free = [lab for lab in x_labels if lab[0] == "x"]
  q_free = [lab for lab in q_labels if lab != "r" and lab not in b_labels]
  sizes = {**dict(zip(x_labels, np.shape(xl))), **dict(zip(q_labels, np.shape(q)))}
  lead = [len(b_labels)] if b_labels else []
  flat = lambda arr, labels, groups: explicit.merge_axes(
      jnp.transpose(arr, [labels.index(lab) for g in groups for lab in g]),
      lead + [len(g) for g in groups[1:]])
  prod = lambda labs: math.prod(sizes[lab] for lab in labs)
  x2 = flat(xl, x_labels, [b_labels, x_free, c_labels])
  p2 = flat(p, p_labels, [b_labels, c_labels, ["r"]])
  q2 = flat(q, q_labels, [b_labels, ["r"], q_free])
  scale = jnp.reshape(_expand(k.ad.scale, k.stack_labels, b_labels), (-1,)) if b_labels \
      else k.ad.scale
  k_free = [lab for lab in k.axes if lab not in c_labels and lab not in b_labels]
  target = b_labels + (k_free + x_free if kernel_left else x_free + k_free)
  unroll = k.rank <= walker.unroll_max_rank
  base = lambda: _base_product(eqn, k, x, kernel_left, kw)
  # On Explicit mesh axes the branch is laid out like the base product's output
  # (``y_at``: its spec entry per label); elsewhere nothing is said about layouts.
  y = base() if explicit.typed(x) is not None else None
  y_at = {} if y is None else dict(zip(target, explicit.entries(y)))
  if y is not None:
    p2, q2 = _branch_layout(x2, p2, q2, y_at, q_free, sizes, bool(b_labels))
  elif (not unroll and walker.whole_product and not b_labels and xl is x and not kernel_left
        and not k.quantized and jax.device_count() == 1
        and x_labels == x_free + c_labels and list(k.axes) == c_labels + k_free == c_labels + q_free
        and x.dtype == k.dtype and kw.get("preferred_element_type") in (None, x.dtype)):
    # x·W + s·(x·A)·B as one product of plain matrices (see branch.lora_matmul); every
    # reshape here is a bitcast, since x and W are already laid out (T, C) and (C, N).
    # One device only: its concatenations are laid out for one, and a partitioner
    # reshards them (measured with FSDP on Auto mesh axes: all-to-alls and permutes).
    y = lora_matmul(x2, jnp.reshape(k.base(), (prod(c_labels), prod(k_free))), p2, q2, scale,
                    kw.get("precision"))
    y = jnp.reshape(y, [sizes[lab] for lab in x_free + k_free])
    return y if k.ad.m is None else y * _dora_factor(k, target, y.dtype)
  u = lora_branch(x2, p2, q2, scale, bool(b_labels), kw.get("precision"), unroll)
  u_labels = b_labels + x_free + q_free
  u = explicit.split_axes(u, lead + [len(x_free), len(q_free)], [sizes[lab] for lab in u_labels],
                          [y_at.get(lab) for lab in u_labels])
  y_lora = jnp.transpose(u, [u_labels.index(lab) for lab in target])
  y = base() if y is None else y
  if k.ad.m is not None:
    f = _dora_factor(k, target, y.dtype)
    y, y_lora = y * f, y_lora * f
  return y + y_lora.astype(y.dtype)


def _base_product(eqn, k: _Kernel, x, kernel_left: bool, kw: dict):
  """The frozen product ``dot_general(x, W)`` of ``eqn``, as one plain matrix product.

  Where the stored kernel reads as ``stack + (C, N)`` or ``stack + (N, C)`` by a reshape
  alone (its batch axes lead, and its contracted and free axes each form one run, as in
  Dense, q/k/v ``(d, heads, head_dim)`` and out ``(heads, head_dim, d)`` kernels), ``x`` is
  laid out ``(stack?, T, C)`` to match and multiplied with that view of the stored kernel.
  The model's own ``dot_general`` on the multi-axis kernel instead made XLA:CPU copy every
  q/k/v/out kernel into another layout on every step (13 kernel-sized float32 copies on
  ``experiments.bench``'s transformer). Any other layout runs the equation as written.

  On Explicit mesh axes the equation runs as written, with its ``out_sharding``: the
  reshapes above are not all expressible there, and the layout is the model's own.

  Returns the product in ``eqn``'s output layout.
  """
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  (kc, kb, xc, xb) = (lc, lb, rc, rb) if kernel_left else (rc, rb, lc, lb)
  c_labels = [k.axes[i] for i in kc]
  b_labels = [k.axes[i] for i in kb]
  k_free = [lab for lab in k.axes if lab not in c_labels and lab not in b_labels]
  stored = k.stored
  nb = len(b_labels)
  roles = ["b" if lab in b_labels else "c" if lab in c_labels else "f" for lab in stored]
  runs = (["c"] * len(c_labels) + ["f"] * len(k_free), ["f"] * len(k_free) + ["c"] * len(c_labels))
  if (explicit.typed(x) is not None or not k_free or roles[:nb] != ["b"] * nb
      or roles[nb:] not in runs):
    dn = eqn.params["dimension_numbers"]
    out_sharding = {p: eqn.params[p] for p in ("out_sharding",) if p in eqn.params}
    op = lambda x, w: jax.lax.dot_general(*((w, x) if kernel_left else (x, w)), dn, **kw,
                                          **out_sharding)
    return k.product(op, x, k.current)
  c_first = roles[nb] == "c"
  s_b, s_c, s_f = stored[:nb], [lab for lab in stored if lab in c_labels], \
      [lab for lab in stored if lab in k_free]
  x_of = dict(zip(c_labels + b_labels, list(xc) + list(xb)))   # kernel label -> x axis
  x_free = [i for i in range(x.ndim) if i not in x_of.values()]
  size = dict(zip(stored, np.shape(k.ad.kernel)))
  prod = lambda labs: math.prod(size[lab] for lab in labs)
  lead = [prod(s_b)] if nb else []
  x_sizes = [np.shape(x)[i] for i in x_free]
  # x keeps its free axes apart (the product has the rank of the model's own).
  x2 = jnp.reshape(jnp.transpose(x, [x_of[lab] for lab in s_b] + x_free + [x_of[lab] for lab in s_c]),
                   lead + x_sizes + [prod(s_c)])
  w_shape = lead + ([prod(s_c), prod(s_f)] if c_first else [prod(s_f), prod(s_c)])
  dn = (((x2.ndim - 1,), (nb if c_first else nb + 1,)), ((0,), (0,)) if nb else ((), ()))
  y = k.product(lambda x, w: jax.lax.dot_general(x, w, dn, **kw), x2,
                lambda w: jnp.reshape(w, w_shape))
  y_labels = s_b + [("x", i) for i in x_free] + s_f
  y = jnp.reshape(y, [size[lab] for lab in s_b] + x_sizes + [size[lab] for lab in s_f])
  x_labels = [("x", i) for i in x_free]
  target = b_labels + (k_free + x_labels if kernel_left else x_labels + k_free)
  return jnp.transpose(y, [y_labels.index(lab) for lab in target])


def _branch_layout(x2, p2, q2, y_entries: dict, q_free: list, sizes: dict, batched: bool):
  """On Explicit mesh axes: the factors laid out for the branch to run where the base
  product runs. ``p2 (L?, C, r)`` takes ``x2``'s sharding of the contracted axis (an
  FSDP-sharded A is gathered, like its kernel; under tensor parallelism this is
  already so), and ``q2 (L?, r, N)`` takes the base output's sharding of its output
  axes (``y_entries``, per label). Each ``reshard`` is outside the branch's
  ``custom_vjp``, so autodiff transposes it (to a slice of the summed gradient)."""
  xe = explicit.entries(x2)
  lead = xe[:1] if batched else ()
  mesh = explicit.typed(x2).mesh
  _, n = explicit.merged(tuple(y_entries[lab] for lab in q_free),
                         tuple(sizes[lab] for lab in q_free), dict(mesh.shape))
  return (explicit.reshard(p2, explicit.like(p2, lead + (xe[-1], None))),
          explicit.reshard(q2, explicit.like(q2, lead + (None, n))))


def _dora_factor(k: _Kernel, labels, dtype):
  """DoRA's ``m / ‖W + sBA‖`` (detached norm) laid out to scale a product with axes ``labels``."""
  return _expand(k.factor_dora().astype(dtype), k.stack_labels + k.out_labels, labels)


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
  labels = k.a_labels
  perm = [labels.index("r" if lab[0] == "o" else lab) for lab in k.axes]
  return jnp.transpose(k.ad.a.astype(k.dtype), perm)


def _up_project(k: _Kernel, y, t, c: int):
  """``y + s·(t·B)`` where axis ``c`` of ``t`` holds the rank and of ``y`` the output;
  DoRA rescales both terms along that axis."""
  t = jnp.asarray(k.ad.scale, t.dtype) * t  # scale the r-wide intermediate, the cheaper side
  b2 = k.split.b_matrix(k.ad.b).astype(k.dtype)  # (r, out)
  y_lora = jnp.moveaxis(jnp.moveaxis(t, c, -1) @ b2, -1, c)
  if k.ad.m is not None:
    f = _dora_factor(k, [("o", 0) if i == c else ("y", i) for i in range(y.ndim)], y.dtype)
    y, y_lora = y * f, y_lora * f
  return y + y_lora.astype(y.dtype)


def _conv(eqn, ins, walker: _Factored):
  """``conv(x, W) + s·conv(x, A)·B``: a rank-r conv, then a 1x1 map to the outputs."""
  x, k = ins
  p = eqn.params
  dn = p["dimension_numbers"]
  if not k.has_adapter:
    return k.product(functools.partial(jax.lax.conv_general_dilated_p.bind, **p), x, k.current)
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return "a grouped convolution"
  if k.ad.n_stack or k.ad.n_out != 1 or k.axes[dn.rhs_spec[0]] != ("o", 0):
    return "the kernel's output axis is not the convolution's output feature axis"
  xl = _lora_input(x, k, walker)
  if isinstance(xl, str):
    return xl
  conv = functools.partial(jax.lax.conv_general_dilated_p.bind, **p)
  return _up_project(k, k.product(conv, x, k.current), conv(xl, _a_like_kernel(k)),
                     dn.out_spec[1])


def _gather(eqn, ins, walker: _Factored):
  """``W[idx] + s·A[idx]·B`` for lookups that take whole rows along the output axis."""
  k, idx = ins
  if isinstance(idx, _Kernel):
    return "an adapted kernel used as indices"
  p = eqn.params
  if not k.has_adapter:  # no gradient reaches the table: dequantizing it is all
    return jax.lax.gather_p.bind(k.base(), idx, **p)
  dn = p["dimension_numbers"]
  o_pos = [i for i, lab in enumerate(k.axes) if lab[0] == "o"]
  if (k.ad.n_stack or len(o_pos) != 1 or dn.operand_batching_dims
      or o_pos[0] in dn.collapsed_slice_dims or o_pos[0] in dn.start_index_map
      or p["slice_sizes"][o_pos[0]] != np.shape(k.ad.kernel)[k.stored.index(("o", 0))]):
    return "a lookup that does not take whole rows along the output axis"
  o = o_pos[0]
  sizes = tuple(k.rank if i == o else s for i, s in enumerate(p["slice_sizes"]))
  y = jax.lax.gather_p.bind(k.base(), idx, **p)
  t = jax.lax.gather_p.bind(_a_like_kernel(k), idx, **{**p, "slice_sizes": sizes})
  kept = [i for i in range(len(k.axes)) if i not in dn.collapsed_slice_dims]
  return _up_project(k, y, t, dn.offset_dims[kept.index(o)])


# ---------------------------------------------------------------------------
# Kernels cross into rebuilt bodies (remat, scan, cond, while) as flat arrays.


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


def _stack_major(k: _Kernel):
  """``k`` with the stack axis that the scan slices moved first in every array, or None."""
  lab = k.axes[0]
  if lab[0] != "s":
    return None
  j = lab[1]
  relabel = lambda lab: ("s", 0) if lab == ("s", j) else (
      ("s", lab[1] + 1) if lab[0] == "s" and lab[1] < j else lab)
  return k.map_arrays(lambda arr: jnp.moveaxis(arr, j, 0),
                      axes=tuple(relabel(lab) for lab in k.axes))


def _unstack(k: _Kernel):
  """A per-iteration slice of a stack-major kernel: drop the leading stack label."""
  relabel = lambda lab: ("s", lab[1] - 1) if lab[0] == "s" else lab
  return k._replace(axes=tuple(relabel(lab) for lab in k.axes[1:]),
                    split=k.split._replace(n_stack=k.split.n_stack - 1))

"""The adapter branch ``(x·A)·(s·B)`` with a hand-ordered backward pass.

Autodiff of ``t·B`` gives ``dB = dot(g, t)`` contracting the tokens with the big
cotangent ``g`` (tokens x out) on the left, and XLA:CPU then writes out ``gᵀ`` in
a transposing copy per layer: measured in ``experiments/bench.py``, those copies
made the factored step slower than full fine-tuning although its FLOPs are at the
floor. This ``custom_vjp`` fixes the form of every backward product instead:

* ``gb = g·(sB)ᵀ`` (tokens x r) and ``dx = gb·Aᵀ``;
* ``dA = (gbᵀ·x)ᵀ`` and ``dB = s·(tᵀ·g)``: the tokens-by-r operand is always the
  one that gets transposed, and the result is ``(r, big)``.

With ``unroll``, the two products whose inner dimension is r (``t·sB`` forward,
``gb·Aᵀ`` backward) are written as r broadcast multiply-adds, which XLA fuses
into the neighbouring elementwise work instead of running a K=r matmul that
writes a tokens x out array. ``jlora.lora`` unrolls only up to its
``unroll_max_rank`` option, 0 by default: on XLA:CPU the unrolled form measured no
faster than the one below at rank 8 (step time 0.99x on the MLP stack and 1.01x on
the transformer of ``experiments/bench.py``, interleaved medians), and it made a
12-layer unrolled transformer's step 1.5x slower to trace and compile
(``experiments/compile_time.py``).

Otherwise ``lora_matmul`` computes the whole adapted product
``x·W + (x·A)·(s·B)`` instead (plain matrices only). Written as a dot plus a K=r dot,
that sum is a tokens x out array that XLA:CPU recomputes in every consumer fusion,
so both dot outputs stay alive until the backward pass (measured: +122 MiB of temp
buffer on the rank-64 MLP stack of ``experiments/bench.py``, and this runtime maps
and faults in every temp page on every step). Where it is the smaller copy, the
rank-r products are folded into the big ones by concatenation instead. "Smaller"
counts the tokens too: the concatenated kernel is a new (C + r) x N (or N x (C + r))
array, built from parameters alone, and XLA:CPU schedules every layer's such copy
at the start of the step, so all of them are alive at once. It pays only when it
replaces a larger tokens-sized array, i.e. when there are more than C + r (N + r)
tokens. With few tokens (8 x 16 on the 8-block d=1024 transformer of
``experiments.qlora``) the copies cost 32 MiB per block: the step's temp was 280 MiB
with them and 119 MiB without. So, with T tokens:

* forward, when ``C + r < min(N, T)``: ``y = [x | t]·[W ; sB]``;
* backward, when ``N + r < min(C, T)``: ``dx = [g | gb]·[W | A]ᵀ``.

The scale ``s`` gets its true cotangent, ``Σ (tᵀ·g) ⊙ B``: an ``(r, N)`` product
summed, made from ``tᵀ·g``, which ``dB`` needs anyway. So ``jax.grad`` with respect
to ``lora_scale`` (a strength, or the weights of ``jlora.mix``) is exact. In a train
step the scale is a constant and XLA removes this cotangent with the rest of the
dead code: the compiled step's FLOPs are the same as with a zero cotangent
(``tests/test_mix.py`` checks it).

A ``custom_vjp`` has no forward-mode derivative: ``jax.jvp``/``jacfwd`` through
``jlora.lora(fn)`` need ``mode="merged"``.

On Explicit mesh axes (``jlora.explicit``) a hand-written backward must name the
sharding of every product JAX cannot infer, as JAX's own transpose rules do: each
cotangent is sharded like its primal (``gb`` like ``t``, ``dx`` like ``x``, ``dA``
like ``A``, ``dB`` like ``B``), and ``t = x·A`` like ``x`` with the rank unsharded.
``dA`` and ``dB`` contract the tokens, which data parallelism shards on both sides;
``t`` and ``gb`` contract axes that a row- or column-parallel layer shards on both
sides. ``lora_matmul`` is for one device (``jlora.lora`` does not use it on a mesh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlora import explicit


def _dot(a, b, ca: int, cb: int, batched: bool, precision, out_sharding=None):
  """Contract axis ``ca`` of ``a`` with ``cb`` of ``b``; axis 0 is shared when batched.
  ``out_sharding``: the result's, on Explicit mesh axes (None elsewhere)."""
  batch = ((0,), (0,)) if batched else ((), ())
  return jax.lax.dot_general(a, b, (((ca,), (cb,)), batch), precision=precision,
                             out_sharding=out_sharding)


def _times_rank(t, m, m_rank_axis: int, batched: bool, precision, unroll: bool,
                out_sharding=None):
  """``t (L?, T, r)`` times ``m`` with its rank on ``m_rank_axis``: ``(L?, T, N)``."""
  if not unroll:
    return _dot(t, m, t.ndim - 1, m_rank_axis, batched, precision, out_sharding)
  if m_rank_axis != m.ndim - 2:
    m = jnp.swapaxes(m, -1, -2)  # (L?, r, N): one small transpose, then row slices
  # Four primitives per rank (two slices, a broadcasting multiply, an add): the
  # fewest that express it, since every one costs trace and compile time.
  out = None
  for j in range(t.shape[-1]):
    term = jax.lax.mul(jax.lax.slice_in_dim(t, j, j + 1, axis=t.ndim - 1),
                       jax.lax.slice_in_dim(m, j, j + 1, axis=m.ndim - 2))
    out = term if out is None else jax.lax.add(out, term)
  return out


def _scaled(s, m, batched: bool):
  return (s[:, None, None] if batched else s).astype(m.dtype) * m


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def lora_branch(x, a, b, s, batched: bool = False, precision=None, unroll: bool = False):
  """``(x·a)·(s·b)``.

  Args:
    x: ``(T, C)``, or ``(L, T, C)`` when ``batched`` (L stacked layers under vmap).
    a: ``(C, r)`` or ``(L, C, r)``.
    b: ``(r, N)`` or ``(L, r, N)``.
    s: the scale, ``()`` or ``(L,)``.
    unroll: write the K=r products as r multiply-adds.

  Returns:
    ``(T, N)`` or ``(L, T, N)``.
  """
  return _forward(x, a, b, s, batched, precision, unroll)[0]


def _forward(x, a, b, s, batched, precision, unroll):
  xe = explicit.entries(x)
  t = _dot(x, a, x.ndim - 1, a.ndim - 2, batched, precision,
           explicit.like(x, xe[:-1] + (None,)))
  u = _times_rank(t, _scaled(s, b, batched), b.ndim - 2, batched, precision, unroll,
                  explicit.like(x, xe[:-1] + explicit.entries(b)[-1:]))
  return u, (x, a, b, s, t)


def _backward(batched, precision, unroll, res, g):
  x, a, b, s, t = res
  gb = _dot(g, _scaled(s, b, batched), g.ndim - 1, b.ndim - 1, batched, precision,
            explicit.typed(t))
  dx = _times_rank(gb, a, a.ndim - 1, batched, precision, unroll, explicit.typed(x))
  ae = explicit.entries(a)
  da, db, ds = _factor_grads(x, t, g, gb, b, s, batched, precision,
                             explicit.like(a, ae[:-2] + (None, ae[-2])), explicit.typed(b))
  return (dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), ds)


def _factor_grads(x, t, g, gb, b, s, batched, precision, da_t_sharding=None, db_sharding=None):
  """``dA = (gbᵀ·x)ᵀ``, ``dB = s·(tᵀ·g)`` and ``ds = Σ (tᵀ·g) ⊙ B``.

  The token contractions take the r-wide operand on the left (the one XLA
  transposes). ``x`` may carry extra trailing columns (``lora_matmul`` saves ``[x |
  t]``); only ``dA``'s matching rows are extra then. ``ds`` has the shape and dtype
  of ``s``; where ``s`` is a constant, XLA drops it as dead code. On Explicit axes
  ``da_t_sharding`` and ``db_sharding`` are those of ``dAᵀ`` and ``dB``.
  """
  n = 1 if batched else 0  # the token axis
  da = jnp.swapaxes(_dot(gb, x, n, n, batched, precision, da_t_sharding), -1, -2)
  tg = _dot(t, g, n, n, batched, precision, db_sharding)          # (L?, r, N)
  ds = jnp.sum(tg.astype(jnp.float32) * b.astype(jnp.float32), axis=(-2, -1))
  return da, _scaled(s, tg, batched), ds.astype(jnp.result_type(s))


lora_branch.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lora_matmul(x, w, a, b, s, precision=None):
  """``x·w + (x·a)·(s·b)`` for a rank above the unrolled ones.

  Args:
    x: ``(T, C)``.
    w: ``(C, N)``, the frozen kernel (its cotangent is zero: it is never computed).
    a: ``(C, r)``.
    b: ``(r, N)``.
    s: the scale, ``()``.

  Returns:
    ``(T, N)``.
  """
  return _matmul_forward(x, w, a, b, s, precision)[0]


def _matmul_forward(x, w, a, b, s, precision):
  (c, n), r = w.shape, a.shape[1]
  t = _dot(x, a, 1, 0, False, precision)
  sb = _scaled(s, b, False)
  if c + r < min(n, x.shape[0]):
    xt = jnp.concatenate([x, t], axis=1)                  # (T, C + r), saved in place of x
    y = _dot(xt, jnp.concatenate([w, sb], axis=0), 1, 0, False, precision)
  else:
    xt = x
    y = _dot(x, w, 1, 0, False, precision) + _dot(t, sb, 1, 0, False, precision)
  return y, (xt, w, a, b, s, t)


def _matmul_backward(precision, res, g):
  xt, w, a, b, s, t = res
  (c, n), r = w.shape, a.shape[1]
  gb = _dot(g, _scaled(s, b, False), 1, 1, False, precision)      # (T, r)
  if n + r < min(c, g.shape[0]):
    dx = _dot(jnp.concatenate([g, gb], axis=1), jnp.concatenate([w, a], axis=1), 1, 1, False,
              precision)
  else:
    dx = _dot(g, w, 1, 1, False, precision) + _dot(gb, a, 1, 1, False, precision)
  da, db, ds = _factor_grads(xt, t, g, gb, b, s, False, precision)
  da = da[:c]                                                       # x is xt's first C columns
  return (dx.astype(xt.dtype), jnp.zeros_like(w), da.astype(a.dtype), db.astype(b.dtype), ds)


lora_matmul.defvjp(_matmul_forward, _matmul_backward)

"""Per-example adapters in one batch: ``jlora.stack_adapters`` and ``adapter_ids=``.

Multi-LoRA serving answers each request with its own adapter, batched together;
training several adapters in one batch is the same computation. Here:

* ``stack_adapters([t₀, t₁, ...])`` puts ``n`` adapter trees of one base model into
  one *stacked* tree: per kernel, every adapter leaf gains a leading adapter axis
  of length ``n``, ranks are zero-padded to the largest (as vLLM pads to
  ``max_lora_rank``), an adapter that does not adapt a kernel is all zeros there,
  and the marker leaf ``lora_ranks`` (int32 ``(n,)``) holds the true ranks (see
  ``jlora.adapter``). ``jlora.combine``, ``partition``, ``count_params`` (true ranks,
  not the padding) and ``summary`` accept it; ``unstack_adapters`` undoes it.
* ``jlora.lora(fn)(params, *args, adapter_ids=ids)`` runs example ``b`` of every
  array argument (its axis 0) with adapter ``ids[b]``, and ``-1`` with the base
  model. Each output is what ``fn`` returns for that one example, stacked along
  axis 0, so every output of ``fn`` must lead with the batch axis.

How. The call is ``jax.vmap`` over the examples of the factored interpreter run
on one example at a time (a batch of one), with that example's adapter gathered
from the stack: ``A[ids[b]]``, ``B[ids[b]]``, scale ``s[ids[b]]`` (0 for ``-1``).
The frozen kernel is the same for every example, so ``vmap`` keeps the base
product one matmul over the whole batch; only the rank-r branch is per example,
a batched product over the gathered factors (BGMV, as Punica and vLLM call it). Two
things do cost a kernel-sized array per example: DoRA (each example's ``‖W + s·A·B‖``)
and a kernel that reaches an op with no factored rule (the merged fallback, reported as
always). Gradients follow: ``jax.grad`` with respect to the stack is the sum of each
example's gradient (the gather's transpose adds them up). A jitted function of
``(params, x, ids)`` accepts any other stack of the same shapes and any ``ids``
without recompiling: that is hot swapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import adapter as adapter_lib
from jlora import factors as factors_lib
from jlora import merge as merge_lib
from jlora import tracing
from jlora import tree as tree_lib
from jlora.adapter import Adapter, StackedAdapter
from jlora.factors import Factors, Site


def stack_adapters(adapters):
  """``n`` adapter trees of one base model as one stacked tree (module docstring).

  Args:
    adapters: a sequence of adapter trees (``jlora.partition(params)[0]``, or the
      adapted params), or ``{name: tree}``; adapter ``i`` (the i-th, in dict order)
      is the one ``adapter_ids`` calls ``i``.

  Returns:
    An adapter tree. At every kernel any of them adapts (kernel ``S + I + O``, the
    largest rank ``R``): ``lora_a`` ``(n,) + S + I + (R,)``, ``lora_b`` ``(n,) + S +
    (R,) + O`` (output-first layouts keep theirs), ``lora_scale`` ``(n,) + S``,
    ``lora_ranks`` int32 ``(n,)``; ``lora_m`` ``(n,) + S + O`` and ``lora_dropout``
    ``(n,) + S`` where the adapters have them (rate 0 for those that do not).

  Raises:
    ValueError: no adapters, a stacked input, adapters of one kernel that do not fit
      one kernel shape and layout, or a DoRA kernel that not every adapter adapts
      with DoRA (its magnitude would need the kernel). Messages name the kernel.
  """
  names = list(adapters) if isinstance(adapters, Mapping) else list(range(len(adapters)))
  trees = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
  if not trees:
    raise ValueError("stack_adapters needs at least one adapter tree.")
  n = len(trees)
  sites: dict[Site, dict[int, Factors]] = {}
  for i, (name, t) in enumerate(zip(names, trees)):
    for site, f in factors_lib.read(t, f"adapter {name!r}").items():
      sites.setdefault(site, {})[i] = f
  out, templates = {}, {}
  for site, entries in sites.items():
    factors_lib.check_same_kernel(site, {names[i]: f for i, f in entries.items()})
    dora = [i for i, f in entries.items() if f.ad.m is not None]
    if dora and len(dora) != n:
      plain = [names[i] for i in range(n) if i not in dora]
      raise ValueError(
          f"the kernel {site.name!r} has DoRA adapters ({[names[i] for i in dora]}) but"
          f" {plain} adapt it without DoRA, or not at all: a stack holds one kind per kernel,"
          " and a plain adapter's DoRA magnitude would need the kernel. Stack DoRA adapters"
          " with DoRA adapters of the same targets.")
    out[site] = _stack_site(entries, n)
    templates[site] = next(iter(entries.values()))
  return factors_lib.build(out, trees[0], templates)


def _stack_site(entries: Mapping[int, Factors], n: int) -> dict:
  """The stacked leaves of one kernel: every adapter padded to the largest rank."""
  f0 = next(iter(entries.values()))
  r_max = max(f.rank for f in entries.values())
  a_dtype = jnp.result_type(*[f.ad.a for f in entries.values()])
  b_dtype = jnp.result_type(*[f.ad.b for f in entries.values()])
  pad = lambda x, axis, dtype: jnp.pad(
      jnp.asarray(x, dtype), [(0, r_max - np.shape(x)[axis]) if i == axis else (0, 0)
                              for i in range(np.ndim(x))])
  a_zero = np.zeros(_with(np.shape(f0.ad.a), f0.a_rank_axis, r_max), a_dtype)
  b_zero = np.zeros(_with(np.shape(f0.ad.b), f0.b_rank_axis, r_max), b_dtype)
  stack = np.shape(f0.ad.scale)
  rows = {"lora_a": [], "lora_b": [], "lora_scale": [], "lora_m": [], "lora_dropout": []}
  has_dropout = any(f.ad.dropout is not None for f in entries.values())
  for i in range(n):
    f = entries.get(i)
    rows["lora_a"].append(a_zero if f is None else pad(f.ad.a, f.a_rank_axis, a_dtype))
    rows["lora_b"].append(b_zero if f is None else pad(f.ad.b, f.b_rank_axis, b_dtype))
    rows["lora_scale"].append(jnp.zeros(stack, jnp.float32) if f is None
                              else jnp.asarray(f.ad.scale, jnp.float32))
    if f0.ad.m is not None:
      rows["lora_m"].append(f.ad.m)
    if has_dropout:
      rows["lora_dropout"].append(jnp.zeros(stack, jnp.float32) if f is None or f.ad.dropout is None
                                  else jnp.asarray(f.ad.dropout, jnp.float32))
  out = {role: jnp.stack(xs) for role, xs in rows.items() if xs}
  out[adapter_lib.STACKED_ROLE] = jnp.asarray(
      [0 if i not in entries else entries[i].rank for i in range(n)], jnp.int32)
  return out


def _with(shape, axis: int, size: int) -> tuple:
  return tuple(size if i == axis else d for i, d in enumerate(shape))


def unstack_adapters(stacked) -> list:
  """The adapter trees of a stack, each cut back to its own rank: the inverse of
  ``stack_adapters`` (a kernel an adapter did not adapt, rank 0, is left out).

  Reads ``lora_ranks`` as numbers, so it runs outside ``jax.jit``.

  Raises:
    ValueError: ``stacked`` is not a stacked tree (or stacked adapted params).
  """
  read = factors_lib.read(stacked, "the tree", stacked=True)
  ns = {int(np.shape(f.ranks)[0]) for f in read.values()}
  if len(ns) != 1:
    raise ValueError(f"the stacked adapters hold different numbers of adapters: {sorted(ns)}.")
  trees = []
  for i in range(ns.pop()):
    out, templates = {}, {}
    for site, f in read.items():
      r = int(np.asarray(f.ranks)[i])
      if r == 0:
        continue
      cut = lambda x, axis: jax.lax.slice_in_dim(x[i], 0, r, axis=axis - 1)
      leaves = {"lora_a": cut(f.ad.a, f.a_rank_axis), "lora_b": cut(f.ad.b, f.b_rank_axis),
                "lora_scale": f.ad.scale[i]}
      if f.ad.m is not None:
        leaves["lora_m"] = f.ad.m[i]
      if f.ad.dropout is not None:
        leaves["lora_dropout"] = f.ad.dropout[i]
      out[site], templates[site] = leaves, f
    trees.append(factors_lib.build(out, stacked, templates))
  return trees


# ---------------------------------------------------------------------------
# wrapped(params, *args, adapter_ids=ids)


def call(fn, factored, mode: str, params, flat, found, adapter_ids, rng, args, kwargs):
  """``jlora.lora(fn)(params, *args, adapter_ids=ids, lora_rng=rng, **kwargs)``.

  ``factored(params, flat, found, {kernel path: Adapter}, args, kwargs, rng, whole_product)`` is
  ``jlora.lora``'s factored evaluation of ``fn``; ``mode="merged"`` merges each
  example's adapter instead (a kernel per example: the reference, not a fast path).
  """
  if not found:
    raise ValueError("adapter_ids was given, but params has no adapters: pass the base"
                     " combined with a stacked adapter tree (jlora.stack_adapters).")
  plain = [tree_lib.path_str(kp) for kp, roles in found.items()
           if not adapter_lib.is_stacked(roles)]
  if plain:
    raise ValueError(
        f"adapter_ids needs every adapter stacked, but {plain[:4]} hold a plain adapter: build"
        " the adapters with jlora.stack_adapters (an adapter for every example must be in the"
        " stack; -1 is the base model).")
  stacks = {kp: adapter_lib.read_stacked(flat, kp, roles) for kp, roles in found.items()}
  n = {st.n for st in stacks.values()}
  if len(n) != 1:
    raise ValueError(f"the stacked adapters hold different numbers of adapters: {sorted(n)}.")
  n = n.pop()
  ids = _check_ids(adapter_ids, n)
  batch = np.shape(ids)[0]
  owned = tree_lib.owned(found)
  # the float base model (a quantized base dequantized) for the merged reference
  base_flat = tree_lib.flatten(merge_lib.merge(
      tree_lib.unflatten({p: v for p, v in flat.items() if p not in owned}, params)))
  leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
  dynamic = [i for i, x in enumerate(leaves) if tracing._is_dynamic(x)]
  wrong = [np.shape(leaves[i]) for i in dynamic if np.ndim(leaves[i]) < 1
           or np.shape(leaves[i])[0] != batch]
  if wrong:
    raise ValueError(f"adapter_ids has {batch} entries, one per example along axis 0 of every"
                     f" array argument, but some arguments have shapes {wrong[:4]}.")

  def one(dyn, i, key):
    full = list(leaves)
    for j, x in zip(dynamic, dyn):
      full[j] = x[None]  # the example as a batch of one
    args_b, kwargs_b = jax.tree_util.tree_unflatten(treedef, full)
    adapters = {kp: pick(st, i, n) for kp, st in stacks.items()}
    if mode == "merged":
      merged = dict(base_flat)
      for kp, ad in adapters.items():
        merged[kp] = tree_lib.rewrap(base_flat[kp], merge_lib.merged_kernel(ad))
      out = fn(tree_lib.unflatten(merged, params), *args_b, **kwargs_b)
    else:
      out = factored(params, flat, found, adapters, args_b, kwargs_b, key, whole_product=False)
    return jax.tree.map(_unbatch, out)

  keys = None if rng is None else jax.random.split(rng, batch)
  return jax.vmap(one, in_axes=(0, 0, None if keys is None else 0))(
      [leaves[i] for i in dynamic], ids, keys)


def pick(st: StackedAdapter, i, n: int) -> Adapter:
  """Adapter ``i`` of a stack for one example; ``i = -1`` gives the base model (scale
  0, and for DoRA the magnitude ``‖W‖``, so the factor is exactly 1); any other id
  outside ``[0, n)`` gives NaN."""
  ad = st.take(jnp.clip(i, 0, n - 1))
  valid = (i >= 0) & (i < n)
  scale = jnp.where(i == -1, 0.0, jnp.where(valid, ad.scale, jnp.nan)).astype(ad.scale.dtype)
  ad = ad._replace(scale=scale)
  if ad.m is not None:
    norm = merge_lib.column_norm(ad.kernel.astype(merge_lib.wide(ad)), ad.split)
    ad = ad._replace(m=jnp.where(i == -1, norm.astype(ad.m.dtype), ad.m))
  if ad.dropout is not None:
    ad = ad._replace(dropout=jnp.where(i == -1, 0.0, ad.dropout).astype(ad.dropout.dtype))
  return ad


def _check_ids(adapter_ids, n: int):
  ids = jnp.asarray(adapter_ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"adapter_ids must be a vector of ints, one per example; got shape"
                     f" {ids.shape}, dtype {ids.dtype}.")
  if not isinstance(ids, jax.core.Tracer):
    bad = np.asarray(ids)[(np.asarray(ids) < -1) | (np.asarray(ids) >= n)]
    if bad.size:
      raise ValueError(f"adapter_ids must lie in [-1, {n}) for a stack of {n} adapters"
                       f" (-1: the base model); got {sorted(set(bad.tolist()))[:4]}.")
  return ids


def _unbatch(out):
  if np.ndim(out) < 1 or np.shape(out)[0] != 1:
    raise ValueError(
        "with adapter_ids, every output of fn must lead with the batch axis (the output for a"
        f" batch is the per-example outputs stacked), but for one example fn returned shape"
        f" {np.shape(out)}. Return per-example values (e.g. losses of shape (batch,)) and"
        " reduce them outside.")
  return out[0]

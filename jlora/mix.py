"""``jlora.mix``: several adapters as one.

Each adapter ``i`` (scale ``sᵢ``, factors ``Aᵢ``, ``Bᵢ``) moves a kernel by
``sᵢ·AᵢBᵢ``; with weights ``wᵢ`` the mix is meant to move it by ``Σ wᵢ·sᵢ·AᵢBᵢ``, as
diffusers' ``set_adapters`` runs several LoRAs side by side. Three ways to write that
as one adapter (``A``, ``B``, scale 1), per kernel:

* ``"cat"`` (exact): ``A = [A₁ | A₂ | ...]`` along the rank and ``B = [w₁s₁B₁ ; w₂s₂B₂
  ; ...]``, so ``AB = Σ wᵢsᵢAᵢBᵢ`` with rank ``Σ rᵢ``. Its cost is that of one adapter
  of rank ``Σ rᵢ``.
* ``"svd"``: the best rank-``k`` approximation of that sum (Eckart-Young): the top
  ``k`` singular triples of ``Σ wᵢsᵢAᵢBᵢ``, split ``A = U√S``, ``B = √S·Vᵀ``. Exact
  when ``k >= Σ rᵢ``.
* ``"linear"`` (PEFT's ``add_weighted_adapter``, approximate): ``A = Σ ±√|wᵢsᵢ|·Aᵢ``
  (the sign of ``wᵢsᵢ``) and ``B = Σ √|wᵢsᵢ|·Bᵢ``. Ranks must be equal, and ``AB``
  holds the cross terms ``AᵢBⱼ``: it equals the weighted sum only for one adapter.

Scales are folded into the factors and the result's ``lora_scale`` is 1, so rsLoRA
adapters mix right: PEFT copies the first adapter's ``use_rslora`` onto its combined
adapter, whose scale then comes out as ``√(Σ rᵢ)`` instead of 1.

Adapters may differ in rank and in targets: a kernel that an adapter does not adapt
counts as zero for it. A DoRA adapter is refused, for every method: its learned
magnitude ``m`` rescales the columns of ``W`` itself, so its effect is not a
low-rank ``sAB``, and a mix of factors would lose ``m`` (PEFT's combined DoRA
adapters silently get a fresh ``m = ‖W‖``). The mix carries no ``lora_dropout``: it
is for inference and for learning the weights.

The weights may be traced (``jax.jit`` arguments, or differentiated): changing them
never recompiles, and since they enter ``B`` (``cat``), ``jax.grad`` through
``jlora.lora(fn)`` gives their exact gradient in factored mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jlora import factors as factors_lib
from jlora.factors import Factors, Site

METHODS = ("cat", "svd", "linear")


def mix(adapters: Mapping[str, object], weights, *, method: str = "cat", rank: int | None = None):
  """Several adapters as one adapter tree.

  Args:
    adapters: ``{name: adapter tree}``, each as ``jlora.partition(params)[0]``
      returns it (or the adapted params themselves), all of one base model.
    weights: ``{name: weight}`` with every name of ``adapters``, or a sequence (or
      1-D array) in the order of ``adapters``. Each weight is a scalar; it may be a
      traced array.
    method: ``"cat"`` (exact, rank ``Σ rᵢ``), ``"svd"`` (the best rank-``rank``
      approximation of the exact sum) or ``"linear"`` (PEFT's, approximate, equal
      ranks); see the module docstring.
    rank: ``"svd"`` only: the rank per kernel, at most the kernel's ``min(fan_in,
      fan_out)`` (a larger one is cut to it). None: the largest rank among the
      adapters of that kernel, as PEFT does.

  Returns:
    An adapter tree with ``lora_a``, ``lora_b`` and ``lora_scale`` (= 1) at every
    kernel any adapter adapts; ``jlora.combine(it, base)`` runs it. For kernel
    shapes ``S + I + O``: ``lora_a`` ``S + I + (r,)`` and ``lora_b`` ``S + (r,) + O``
    (each adapter's layout, e.g. output-first, is kept).

  Raises:
    ValueError: an unknown method, weights that do not match the names or are not
      scalars, ``rank`` given for ``cat``/``linear``, a DoRA adapter, adapters of
      one kernel that do not fit one kernel shape and layout, or unequal ranks for
      ``linear``. Messages name the kernel and the adapters.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  if rank is not None and method != "svd":
    raise ValueError(f"rank is for method='svd' (a '{method}' mix has the rank it has); got"
                     f" rank={rank!r}.")
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
    raise ValueError(f"rank must be an int >= 1 or None; got {rank!r}.")
  if not isinstance(adapters, Mapping) or not adapters:
    raise ValueError("adapters must be a non-empty dict {name: adapter tree}.")
  w = _weights(list(adapters), weights)
  read = {name: factors_lib.read(tree, f"adapter {name!r}") for name, tree in adapters.items()}
  sites: dict[Site, dict[str, Factors]] = {}
  for name, found in read.items():
    for site, f in found.items():
      if f.ad.m is not None:
        raise ValueError(
            f"adapter {name!r} is a DoRA adapter (lora_m at {site.name!r}): its learned"
            " magnitude rescales the columns of W itself, so it is not a low-rank s·A·B and"
            " no mix of factors keeps it. Merge it into the base first (jlora.merge), or mix"
            " plain LoRA adapters.")
      sites.setdefault(site, {})[name] = f
  out, templates = {}, {}
  for site, entries in sites.items():
    factors_lib.check_same_kernel(site, entries)
    parts = [(w[name], f) for name, f in entries.items()]
    if method == "cat":
      a, b = _cat(parts)
    elif method == "svd":
      a, b = _svd(parts, rank)
    else:
      a, b = _linear(site, parts)
    f0 = next(iter(entries.values()))
    stack = np.shape(f0.ad.scale)
    out[site] = {"lora_a": a, "lora_b": b, "lora_scale": jnp.ones(stack, jnp.float32)}
    templates[site] = f0
  return factors_lib.build(out, next(iter(adapters.values())), templates)


def _weights(names: list[str], weights) -> dict:
  if isinstance(weights, Mapping):
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in names]
    if missing or extra:
      raise ValueError(f"weights must have one entry per adapter {names}; missing {missing},"
                       f" unknown {extra}.")
    values = [weights[n] for n in names]
  elif isinstance(weights, Sequence) or np.ndim(weights) == 1:
    if len(weights) != len(names):
      raise ValueError(f"{len(weights)} weights for {len(names)} adapters {names}.")
    values = [weights[i] for i in range(len(names))]
  else:
    raise ValueError(f"weights must be a dict {{name: weight}} or a sequence in the order of"
                     f" the adapters; got {type(weights).__name__}.")
  out = {}
  for n, v in zip(names, values):
    if np.ndim(v) != 0:
      raise ValueError(f"the weight of {n!r} must be a scalar; got shape {np.shape(v)}.")
    out[n] = jnp.asarray(v, jnp.float32)
  return out


def _coef(weight, f: Factors, like):
  """``wᵢ·sᵢ`` (shape ``stack``) laid out to scale ``like`` (which leads with the stack)."""
  c = weight * jnp.asarray(f.ad.scale, jnp.float32)
  return jnp.reshape(c, np.shape(c) + (1,) * (np.ndim(like) - np.ndim(c)))


def _cat(parts):
  """``[A₁ | A₂ ...]`` and ``[w₁s₁B₁ ; w₂s₂B₂ ...]`` along the rank axes."""
  f0 = parts[0][1]
  a_dtype = jnp.result_type(*[f.ad.a for _, f in parts])
  b_dtype = jnp.result_type(*[f.ad.b for _, f in parts])
  a = jnp.concatenate([f.ad.a.astype(a_dtype) for _, f in parts], axis=f0.a_rank_axis)
  b = jnp.concatenate([(_coef(w, f, f.ad.b) * f.ad.b).astype(b_dtype) for w, f in parts],
                      axis=f0.b_rank_axis)
  return a, b


def _exact_sum(parts):
  """``Σ wᵢ·sᵢ·A₂ᵢ @ B₂ᵢ`` on the canonical matrices: ``stack + (fan_in, fan_out)``, float32."""
  total = 0.0
  for w, f in parts:
    a2 = f.split.a_matrix(jnp.asarray(f.ad.a)).astype(jnp.float32)
    b2 = f.split.b_matrix(jnp.asarray(f.ad.b)).astype(jnp.float32)
    total = total + _coef(w, f, a2) * (a2 @ b2)
  return total


def _svd(parts, rank):
  """The top-``k`` singular triples of the exact sum, as ``A = U√S``, ``B = √S·Vᵀ``."""
  f0 = parts[0][1]
  delta = _exact_sum(parts)
  fan_in, fan_out = np.shape(delta)[-2:]
  k = min(rank if rank is not None else max(f.rank for _, f in parts), fan_in, fan_out)
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  root = jnp.sqrt(s[..., :k])
  a2 = u[..., :, :k] * root[..., None, :]
  b2 = root[..., :, None] * vt[..., :k, :]
  dtype = jnp.result_type(*[f.ad.a for _, f in parts])
  return (f0.split.a_from_matrix(a2, f0.kernel_shape).astype(dtype),
          f0.split.b_from_matrix(b2, f0.kernel_shape).astype(dtype))


def _linear(site: Site, parts):
  """PEFT's ``linear``: ``Σ ±√|wᵢsᵢ|·Aᵢ`` and ``Σ √|wᵢsᵢ|·Bᵢ`` (equal ranks)."""
  ranks = {f.rank for _, f in parts}
  if len(ranks) > 1:
    raise ValueError(
        f"method='linear' needs equal ranks, but the adapters of {site.name!r} have ranks"
        f" {sorted(ranks)}. Use method='cat' (exact) or 'svd'.")
  a = sum(jnp.sign(_coef(w, f, f.ad.a)) * jnp.sqrt(jnp.abs(_coef(w, f, f.ad.a))) * f.ad.a
          for w, f in parts)
  b = sum(jnp.sqrt(jnp.abs(_coef(w, f, f.ad.b))) * f.ad.b for w, f in parts)
  f0 = parts[0][1]
  return a.astype(f0.ad.a.dtype), b.astype(f0.ad.b.dtype)

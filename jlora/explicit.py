"""Sharding types inside traced code: what the factored products must say on a mesh.

On a mesh with **Explicit** axes (what ``jax.make_mesh`` makes by default in jax 0.10) every
array's sharding is part of its type, and JAX refuses an op whose output sharding
it cannot infer: a contraction whose contracted axis is sharded on both operands
(row-parallel ``x·W``, and ``x·A`` beside it), or a reshape that merges sharded
axes. Such ops must name their output sharding (``out_sharding=``). On **Auto**
axes types carry no sharding (a traced spec reads all-None even when the array is
sharded), so nothing may be inferred from them: every helper here answers None
there, which leaves the choice to XLA, as plain JAX code does.

Shardings are built on the mesh of the value's own type, never a bare
``PartitionSpec``: that needs a ``jax.set_mesh`` block, and a step jitted outside
one works too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

try:  # jax 0.6 has it under jax.experimental.shard only
  from jax.sharding import reshard as _reshard
except ImportError:  # pragma: no cover - depends on the jax version
  from jax.experimental.shard import reshard as _reshard


def typed(x) -> NamedSharding | None:
  """``x``'s sharding type when its mesh has an Explicit axis, else None (unknown)."""
  s = getattr(jax.typeof(x), "sharding", None)
  if not isinstance(s, NamedSharding) or AxisType.Explicit not in tuple(s.mesh.axis_types):
    return None
  return s


def entries(x) -> tuple:
  """One spec entry per axis of ``x`` (all None where ``typed`` is None)."""
  s = typed(x)
  spec = tuple(s.spec) if s is not None else ()
  return spec + (None,) * (jnp.ndim(x) - len(spec))


def like(x, spec) -> NamedSharding | None:
  """``spec`` on ``x``'s mesh, or None off Explicit axes."""
  s = typed(x)
  return None if s is None else NamedSharding(s.mesh, P(*spec))


def reshard(x, sharding):
  """``x`` laid out as ``sharding`` (None: as it is). Inside a trace only the
  Explicit axes of a spec can be asked for (and are: the others are dropped);
  outside, any."""
  if sharding is None:
    return x
  if not isinstance(x, jax.core.Tracer):
    return jax.device_put(x, sharding)
  if not isinstance(sharding, NamedSharding):
    return x
  names = {n for n, t in zip(sharding.mesh.axis_names, sharding.mesh.axis_types)
           if t == AxisType.Explicit}
  spec = tuple(_keep(e, names) for e in sharding.spec)
  spec += (None,) * (jnp.ndim(x) - len(spec))
  if not names or (typed(x) is not None and typed(x).mesh == sharding.mesh
                   and entries(x) == spec):
    return x
  return _reshard(x, NamedSharding(sharding.mesh, P(*spec)))


def _keep(entry, names):
  if entry is None:
    return None
  kept = tuple(n for n in ((entry,) if isinstance(entry, str) else entry) if n in names)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def _names(entry) -> tuple:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def merged(group: tuple, sizes: tuple, mesh_shape) -> tuple[bool, object]:
  """The spec entry of one axis made by merging axes of ``sizes`` sharded ``group``.

  Row-major merging keeps a block sharding only when the sharded axes lead and
  every sharded axis but the last holds one element per device (``(heads@model,
  head_dim)`` -> ``model``); ``(heads, head_dim@model)`` would need a relayout.

  Returns:
    ``(ok, entry)``: whether the merge is a block sharding, and its entry.
  """
  names, seen_unsharded = [], False
  sharded = [i for i, e in enumerate(group) if e is not None]
  for i, (e, n) in enumerate(zip(group, sizes)):
    if e is None:
      seen_unsharded = True
      continue
    ways = math.prod(mesh_shape[a] for a in _names(e))
    if seen_unsharded or (i != sharded[-1] and n != ways):
      return False, None
    names.extend(_names(e))
  return True, None if not names else names[0] if len(names) == 1 else tuple(names)


def _groups(counts):
  starts = [sum(counts[:k]) for k in range(len(counts))]
  return [slice(s, s + c) for s, c in zip(starts, counts)]


def merge_axes(x, counts: list[int]):
  """``x`` with consecutive axes merged: ``counts[k]`` axes into output axis k (0: a
  new axis of size 1). On Explicit axes the reshape names its output sharding; a
  group whose sharding cannot merge as blocks is gathered first (see ``merged``)."""
  shape = jnp.shape(x)
  out_shape = [math.prod(shape[g]) for g in _groups(counts)]
  s = typed(x)
  if s is None:
    return jnp.reshape(x, out_shape)
  ent, mesh_shape = entries(x), dict(s.mesh.shape)
  spec, fixed = [], list(ent)
  for g in _groups(counts):
    ok, e = merged(ent[g], shape[g], mesh_shape)
    if not ok:
      fixed[g] = [None] * len(fixed[g])
    spec.append(e)
  if fixed != list(ent):
    x = _reshard(x, NamedSharding(s.mesh, P(*fixed)))
  return jnp.reshape(x, out_shape, out_sharding=NamedSharding(s.mesh, P(*spec)))


def split_axes(x, counts: list[int], shape, spec):
  """The inverse of ``merge_axes``: axis k of ``x`` split into ``counts[k]`` axes of
  ``shape``, laid out as ``spec`` on Explicit axes. A group whose ``spec`` does not
  merge back to ``x``'s entry is split unsharded, then resharded to ``spec``."""
  s = typed(x)
  if s is None:
    return jnp.reshape(x, shape)
  ent, mesh_shape, shape = entries(x), dict(s.mesh.shape), tuple(shape)
  spec, direct = tuple(spec), list(spec)
  for k, g in enumerate(_groups(counts)):
    ok, e = merged(spec[g], shape[g], mesh_shape)
    if not (ok and e == ent[k]):
      direct[g] = [None] * len(direct[g])
      if ent[k] is not None:
        x = _reshard(x, NamedSharding(s.mesh, P(*(ent[:k] + (None,) + ent[k + 1:]))))
        ent = entries(x)
  y = jnp.reshape(x, shape, out_sharding=NamedSharding(s.mesh, P(*direct)))
  return y if tuple(direct) == spec else _reshard(y, NamedSharding(s.mesh, P(*spec)))

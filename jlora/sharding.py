"""Where adapter leaves and optimizer state live: beside their kernels, on their mesh.

**The rule.** A kernel laid out ``S + I + O`` (stack, input and output axes, see
``adapter.Split``) and sharded by the spec entries ``s + i + o`` gets

* ``lora_a``: ``s + i + (None,)``, and ``s + (None,) + i`` for an output-first kernel;
* ``lora_b``: ``s + (None,) + o``, and ``s + o + (None,)`` output-first;
* ``lora_m``: ``s + o``; ``lora_scale`` and ``lora_dropout``: ``s``.

Each entry is copied whole (a mesh axis name, a tuple of names, or None), so every
adapter axis is sharded, and divides, like the kernel axis it stands for, and the
rank axis is never sharded. Every product of the branch then runs where the base
product runs: a column-parallel layer adds no collective to the forward pass, a
row-parallel one adds its tokens x r partial sum to the all-reduce the base needs
anyway. ``replicate=True`` replicates every adapter leaf instead (MaxText's choice);
``replicate=("data",)`` removes just those mesh axes (follow tensor parallelism but
not an FSDP axis, say). A kernel on one device, or fully replicated, passes its
sharding on unchanged.

Three consumers:

* ``jlora.init`` builds adapters where the rule says, as global arrays
  (``jit(..., out_shardings=)``, so every process computes its own shards): from
  concrete kernels, and under ``jit`` from kernels whose sharding is in their type
  (Explicit mesh axes). Under ``jit`` on Auto axes a kernel's sharding cannot be
  seen; there, give that ``jit`` ``out_shardings=jlora.shardings(...)``.
* ``shardings(params)`` returns the placement of a whole tree, for ``jit``'s
  ``in_shardings``/``out_shardings``; ``shardings(opt_state, params=params)`` that
  of an optimizer state, whose leaves follow the params they mirror.
* ``keep_placement(step)``, what ``jlora.train_step`` compiles: the params and
  optimizer state come back sharded exactly as they went in, so the second step
  reuses the first step's executable and donation is never refused.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Union

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, Sharding

from jlora import adapter as adapter_lib
from jlora import explicit
from jlora import quant
from jlora import tree as tree_lib
from jlora.adapter import Split
from jlora.tree import Path, path_str

Replicate = Union[bool, str, Iterable[str]]


# ---------------------------------------------------------------------------
# The rule, on specs.


def _entries(spec: P, ndim: int, where: str) -> tuple:
  """``spec`` as ``ndim`` entries; ``P.UNCONSTRAINED`` says nothing, so it reads as None."""
  if len(spec) > ndim:
    raise ValueError(f"{where}: the sharding spec {spec} has {len(spec)} entries for an array"
                     f" of {ndim} axes; give at most one entry per axis.")
  if getattr(spec, "unreduced", None) or getattr(spec, "reduced", None):
    raise ValueError(f"{where}: the sharding spec {spec} has unreduced or reduced axes; a"
                     " parameter must be a plain sharded or replicated array. Reshard it first.")
  out = tuple(None if e is P.UNCONSTRAINED else e for e in spec)
  return out + (None,) * (ndim - len(out))


def _without(entry, axes: frozenset):
  if entry is None:
    return None
  kept = tuple(n for n in ((entry,) if isinstance(entry, str) else entry) if n not in axes)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def adapter_specs(spec: P, split: Split, ndim: int, *, replicate: Replicate = False,
                  where: str = "kernel") -> dict[str, P]:
  """The ``PartitionSpec`` of every adapter role of a kernel sharded by ``spec``.

  Args:
    spec: the kernel's spec (a short spec means trailing ``None``s).
    split: the kernel's layout; ``ndim`` its number of axes.
    replicate: ``False`` (follow the kernel), ``True`` (replicate) or mesh axis
      names to remove from every entry.
    where: the kernel's path, for messages.

  Returns:
    ``{role: spec}`` for ``lora_a``, ``lora_b``, ``lora_m``, ``lora_scale``,
    ``lora_dropout`` and the residual ``lora_a0``/``lora_b0`` (laid out like ``lora_a``/
    ``lora_b``), each with one entry per axis.
  """
  e = _entries(spec, ndim, where)
  if replicate is True:
    e = (None,) * ndim
  elif replicate:
    drop = frozenset([replicate] if isinstance(replicate, str) else replicate)
    e = tuple(_without(x, drop) for x in e)
  stack = e[:split.n_stack]
  ins = tuple(e[i] for i in split.in_axes(ndim))
  outs = tuple(e[i] for i in split.out_axes(ndim))
  a = stack + ((None,) + ins if split.out_first else ins + (None,))
  b = stack + (outs + (None,) if split.out_first else (None,) + outs)
  return {"lora_a": P(*a), "lora_b": P(*b), "lora_m": P(*(stack + outs)),
          "lora_scale": P(*stack), "lora_dropout": P(*stack),
          "lora_a0": P(*a), "lora_b0": P(*b)}


def adapter_shardings(sharding: Sharding, split: Split, ndim: int, *,
                      replicate: Replicate = False, where: str = "kernel") -> dict[str, Sharding]:
  """``adapter_specs`` on the kernel's mesh: ``{role: sharding}``.

  Raises:
    ValueError: the kernel's sharding is neither a ``NamedSharding`` nor on one
      device nor fully replicated, so there is nothing to follow.
  """
  if isinstance(sharding, NamedSharding):
    specs = adapter_specs(sharding.spec, split, ndim, replicate=replicate, where=where)
    return {role: NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)
            for role, spec in specs.items()}
  if len(sharding.device_set) == 1 or sharding.is_fully_replicated:
    return dict.fromkeys(adapter_lib.ROLES, sharding)
  raise ValueError(f"{where}: its {type(sharding).__name__} cannot be followed by the adapter;"
                   " place the kernel with a jax.sharding.NamedSharding.")


def kept_axes(sharding: Sharding, shape: tuple, new_shape: tuple) -> Sharding:
  """The placement of an array derived from a kernel of ``shape`` sharded by ``sharding``
  (its codes or scales, say): with the kernel's rank, each axis keeps the kernel's entry
  where its size still divides by that entry's devices, and is replicated elsewhere; with
  another rank, replicated. One device, or a non-named sharding, passes unchanged."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  if len(new_shape) != len(shape):
    return _replicated(sharding)
  sizes = dict(sharding.mesh.shape)
  devices = lambda e: int(np.prod([sizes[a] for a in ((e,) if isinstance(e, str) else e)]))
  entries = _entries(sharding.spec, len(shape), "kernel")
  kept = [e if e is not None and n % devices(e) == 0 else None
          for e, n in zip(entries, new_shape)]
  return NamedSharding(sharding.mesh, P(*kept), memory_kind=sharding.memory_kind)


def kernel_shardings(kernel, split: Split, *, replicate: Replicate = False,
                     where: str = "kernel") -> dict[str, Sharding] | None:
  """``adapter_shardings`` of the kernel an adapter is (to be) placed beside, from the
  sharding the kernel carries; None when it carries none (uncommitted, or traced on
  Auto axes). ``kernel`` may be a ``quant.Quantized``, whose codes have the kernel's
  axes (4-bit codes: half the last one) and its placement."""
  s = carried(kernel.codes if quant.is_quantized(kernel) else kernel)
  if s is None:
    return None
  return adapter_shardings(s, split, len(kernel.shape), replicate=replicate, where=where)


# ---------------------------------------------------------------------------
# What a leaf carries.


def carried(leaf) -> Sharding | None:
  """The sharding a leaf was given, or None when it was given none.

  ``leaf`` may be an array, an ``nnx.Variable``, a ``jax.ShapeDtypeStruct`` or a
  ``Sharding``. An uncommitted array (no placement asked for) gives None, and so
  does a traced value on Auto mesh axes, whose sharding is not visible in ``jit``.
  """
  x = tree_lib.value(leaf)
  if isinstance(x, Sharding):
    return x
  if isinstance(x, jax.core.Tracer):
    return explicit.typed(x)
  if isinstance(x, jax.Array):
    return x.sharding if x.committed else None
  s = getattr(x, "sharding", None)
  return s if isinstance(s, Sharding) else None


def _mesh(shardings: Iterable[Sharding]):
  """The mesh of the first ``NamedSharding`` on a concrete mesh, else the first mesh, or None."""
  meshes = [s.mesh for s in shardings if isinstance(s, NamedSharding)]
  for m in meshes:
    if isinstance(m, jax.sharding.Mesh):
      return m
  return meshes[0] if meshes else None


def _concrete(s: Sharding, mesh) -> Sharding:
  """``s`` on ``mesh`` when ``s`` names only the abstract shape of ``mesh`` (as
  ``jax.eval_shape`` gives on Explicit axes), so that ``jit`` can place by it
  outside a ``jax.set_mesh`` block."""
  if (isinstance(s, NamedSharding) and isinstance(mesh, jax.sharding.Mesh)
      and not isinstance(s.mesh, jax.sharding.Mesh) and s.mesh == mesh.abstract_mesh):
    return NamedSharding(mesh, s.spec, memory_kind=s.memory_kind)
  return s


def _concrete_mesh(mesh, shardings):
  """``mesh``, or the concrete mesh it abstracts when one is known (leaves or context)."""
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  for m in [s.mesh for s in shardings if isinstance(s, NamedSharding)] + [_context_mesh()]:
    if isinstance(m, jax.sharding.Mesh) and m.abstract_mesh == mesh:
      return m
  return mesh


def _context_mesh():
  """The concrete mesh of an enclosing ``jax.set_mesh``, or None (also inside ``jit``)."""
  get = getattr(jax.sharding, "get_mesh", None)  # not in jax 0.6
  try:
    mesh = get() if get is not None else None
  except ValueError:  # asked under a trace, where only the abstract mesh is known
    return None
  return mesh if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty else None


# ---------------------------------------------------------------------------
# The placement of a whole tree.


def _unplaced(path: Path, leaf, mesh) -> Sharding:
  """A leaf that was given no sharding: replicated on the tree's mesh (an
  uncommitted counter, say), on its own device without one, and refused when it
  is abstract: a kernel of unknown placement must not be replicated silently."""
  x = tree_lib.value(leaf)
  if isinstance(x, jax.core.Tracer) or (not isinstance(x, (jax.Array, np.ndarray, np.generic))
                                        and not np.isscalar(x)):
    raise ValueError(
        f"the leaf {path_str(path)!r} carries no sharding (an abstract leaf, or a traced"
        " one on Auto mesh axes). Pass its placement in `base=` (a tree of the base params'"
        " shardings), or build it as jax.ShapeDtypeStruct(shape, dtype, sharding=...);"
        " call jlora.shardings outside jit.")
  if mesh is not None:
    return NamedSharding(mesh, P())
  return x.sharding if isinstance(x, jax.Array) else jax.sharding.SingleDeviceSharding(
      jax.devices()[0])


def placement(params, *, base=None, replicate: Replicate = False) -> dict[Path, Sharding]:
  """``{path: sharding}`` of every leaf of ``params``; see ``shardings``."""
  flat = tree_lib.flatten(params)
  given = {p: carried(v) for p, v in tree_lib.flatten(base).items()} if base is not None else {}
  found = adapter_lib.find(flat)
  owned = tree_lib.owned(found)
  have = {p: given.get(p) or carried(v) for p, v in flat.items() if p not in owned}
  known = [s for s in have.values() if s is not None]
  mesh = _concrete_mesh(_mesh(known) or _context_mesh(), known)
  out = {p: _concrete(s, mesh) if s is not None else _unplaced(p, flat[p], mesh)
         for p, s in have.items()}
  for kp, roles in found.items():
    stacked = adapter_lib.is_stacked(roles)
    ad = (adapter_lib.read_stacked(flat, kp, roles).slot_shapes() if stacked
          else adapter_lib.read(flat, kp, roles))
    # ``kernel.shape``: a quantized kernel's is the float kernel's (4-bit codes pack the last axis)
    rule = adapter_shardings(out[kp], ad.split, len(ad.kernel.shape), replicate=replicate,
                             where=path_str(kp))
    if stacked:  # jlora.stack_adapters: a leading adapter axis, never sharded
      rule = {role: _adapter_axis(s) for role, s in rule.items()}
      rule[adapter_lib.STACKED_ROLE] = _adapter_axis(_replicated(out[kp]))
    out.update({p: rule[role] for role, p in roles.items()})
  return out


def _adapter_axis(s: Sharding) -> Sharding:
  """``s`` for an array with one more, unsharded, leading axis."""
  if isinstance(s, NamedSharding):
    return NamedSharding(s.mesh, P(None, *s.spec), memory_kind=s.memory_kind)
  return s  # one device, or fully replicated


def _replicated(s: Sharding) -> Sharding:
  return NamedSharding(s.mesh, P(), memory_kind=s.memory_kind) if isinstance(s, NamedSharding) \
      else s


def shardings(tree, *, params=None, base=None, replicate: Replicate = False):
  """The placement of a params tree, or of its optimizer state, as ``Sharding``s.

  ``shardings(params)``: every leaf but the adapters' keeps the sharding it carries,
  and every adapter leaf gets the module's rule from its kernel's. ``params`` may be
  concrete, or abstract: ``jax.eval_shape(lambda: jlora.init(key, base, cfg))``
  keeps its leaves' shardings on Explicit mesh axes; on Auto axes it drops them, so
  pass the base's placement as ``base=``, and no 70B base is ever materialised on
  one device::

    abstract = jax.eval_shape(lambda: jlora.init(key, model.init(k, x), cfg))
    s = jlora.shardings(abstract, base=base_shardings)
    params = jax.jit(lambda: jlora.init(key, model.init(k, x), cfg), out_shardings=s)()

  ``shardings(opt_state, params=params)``: each leaf of an optimizer state (concrete,
  or from ``jax.eval_shape(tx.init, params)``) that mirrors a param (the param's
  path ends its path, and the shapes agree, as Adam's ``mu`` and ``nu`` do) takes
  that param's sharding; every other leaf (step counts) is replicated.

  Args:
    tree: a params tree (linen, ``nnx.State``, nested dicts), or an optimizer state.
    params: given, ``tree`` is an optimizer state of these params.
    base: a tree of the base params' shardings (or of arrays or
      ``ShapeDtypeStruct``s carrying them), read before what the leaves carry.
    replicate: override the rule: ``True`` replicates the adapters, mesh axis
      names are removed from their specs. Pass what you passed to ``jlora.init``.

  Returns:
    A tree shaped like ``tree`` with a ``Sharding`` at every leaf (inside the
    ``nnx.Variable``s of an NNX state). A leaf given no placement (an uncommitted
    array) is replicated on the tree's mesh.

  Raises:
    ValueError: an abstract leaf carries no sharding and ``base`` gives none.
  """
  if params is not None:
    return _follow(tree, params, placement(params, base=base, replicate=replicate))
  where = placement(tree, base=base, replicate=replicate)
  return tree_lib.map_paths(lambda p, _: where[p], tree)


def _follow(state, params, where: dict[Path, Sharding]):
  """``state``'s leaves placed like the param each mirrors (path suffix + shape)."""
  shapes = {p: np.shape(tree_lib.value(v)) for p, v in tree_lib.flatten(params).items()}
  mesh = _mesh(where.values())
  rest = NamedSharding(mesh, P()) if mesh is not None else next(iter(where.values()), None)

  def pick(path, leaf):
    for k in range(len(path)):
      tail = path[k:]
      if tail in where and shapes[tail] == np.shape(leaf):
        return where[tail]
    return rest
  return tree_lib.map_paths(pick, state)


# ---------------------------------------------------------------------------
# Building placed arrays.


def build(make: Callable, args: tuple, out_shardings):
  """``make(*args)``, its outputs placed by ``out_shardings`` (a prefix tree of
  ``Sharding``s, None where any placement will do).

  Nothing to place: ``make`` runs as it is. On one device: it runs, then the result
  is moved there. On a mesh: ``jit(make, out_shardings=)``, which builds global
  arrays (each process computes only its own shards, so this works multi-host).
  Under a trace: ``make`` runs, and each output is resharded to its placement
  (these come from Explicit axis types, the only ones visible there).
  """
  is_sharding = lambda s: isinstance(s, Sharding) or s is None
  placed = [s for s in jax.tree.leaves(out_shardings, is_leaf=is_sharding) if s is not None]
  if not placed:
    return make(*args)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
    return jax.tree.map(lambda s, x: explicit.reshard(x, s), out_shardings, make(*args),
                        is_leaf=is_sharding)
  if all(len(s.device_set) == 1 for s in placed):
    return jax.tree.map(lambda s, x: x if s is None else jax.device_put(x, s), out_shardings,
                        make(*args), is_leaf=is_sharding)
  return jax.jit(make, out_shardings=out_shardings)(*args)


# ---------------------------------------------------------------------------
# A jitted step whose state keeps its placement.


def keep_placement(fn: Callable, n: int, donate_argnums: tuple = ()) -> "_KeptJit":
  """``jax.jit(fn)`` whose first ``n`` arguments come back placed as they went in.

  ``fn(*state, *rest) -> (*state, out)`` (a train step: ``state`` is params and
  optimizer state). On one device this is ``jax.jit(fn)``. On a mesh, the jit gets
  ``out_shardings`` equal to the input shardings, the very objects the inputs
  carry: left to itself the partitioner may return a state leaf sharded otherwise,
  or spelled otherwise (``P('model')`` is not ``P('model', None)`` to the jit
  cache), and the next call would compile again; and a donated buffer is used
  only when its output is placed like it. Leaves given no placement (uncommitted
  arrays) are replicated on the mesh before the first call.

  Returns:
    A callable with ``lower`` and ``_cache_size`` as a ``jax.jit`` has.
  """
  return _KeptJit(fn, n, donate_argnums)


class _KeptJit:
  """See ``keep_placement``: one ``jax.jit`` per placement of the state."""

  def __init__(self, fn: Callable, n: int, donate_argnums: tuple):
    self.fn, self.n, self.donate_argnums = fn, n, donate_argnums
    self.plain = jax.jit(fn, donate_argnums=donate_argnums)
    self.pinned: dict = {}

  def _for(self, args):
    if jax.device_count() == 1:  # the one-device path pays for no check
      return self.plain, args
    leaves, treedef = jax.tree.flatten(args[:self.n])
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return self.plain, args
    mesh = _mesh(x.sharding for x in leaves
                 if isinstance(x, jax.Array) and x.committed and len(x.sharding.device_set) > 1)
    if mesh is None:
      return self.plain, args
    kept = tuple(x.sharding if isinstance(x, jax.Array) and x.committed
                 else NamedSharding(mesh, P()) for x in leaves)
    key = (treedef, kept)
    if key not in self.pinned:
      state = jax.tree.unflatten(treedef, kept)
      self.pinned[key] = jax.jit(self.fn, out_shardings=(*state, None),
                                 donate_argnums=self.donate_argnums)
    leaves = [x if isinstance(x, jax.Array) and x.committed else jax.device_put(x, s)
              for x, s in zip(leaves, kept)]
    return self.pinned[key], (*jax.tree.unflatten(treedef, leaves), *args[self.n:])

  def __call__(self, *args):
    fn, args = self._for(args)
    return fn(*args)

  def trace(self, *args):
    fn, args = self._for(args)
    return fn.trace(*args)

  def lower(self, *args):
    fn, args = self._for(args)
    return fn.lower(*args)

  def _cache_size(self) -> int:
    return self.plain._cache_size() + sum(f._cache_size() for f in self.pinned.values())

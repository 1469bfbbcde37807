"""Path-keyed views of params trees: flatten, rebuild, map.

jlora accepts the params trees of three worlds and treats them alike:

* Flax linen variables: ``{"params": {...}}`` or the bare ``{...}``, as dicts or
  ``FrozenDict``s;
* Flax NNX ``nnx.State`` from ``nnx.split`` (its leaves are ``nnx.Variable``s,
  and ``nnx.List`` members have int keys);
* plain nested dicts, lists and tuples of arrays.

A leaf's *path* is the tuple of the original keys on the way to it (str, int or
any other hashable dict key), as in ``flax.traverse_util.flatten_dict``: the
tree is rebuilt from these paths, so int keys, keys containing ``/`` and lists
survive every transform. The ``/``-joined *name* of a path (``path_str``) exists
for matching regexes and for messages only; two leaves whose names collide are
refused (``flatten`` raises), because a regex or a message could not tell them
apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
from flax import nnx
from flax.core import FrozenDict

PyTree = Any
Path = tuple


#: Leaf names whose sibling leaves (adapter, quantization) carry no prefix.
BARE_NAMES = ("kernel", "embedding")


def sibling(name: str, role: str) -> str:
  """The name of the leaf that holds ``role`` beside the leaf ``name``: ``role`` itself
  beside a ``kernel`` or ``embedding`` (a Flax module's weight), else ``name_role``."""
  return role if name in BARE_NAMES else f"{name}_{role}"


def owned(found: Mapping[Path, Mapping[str, Path]]) -> set[Path]:
  """Every sibling leaf path of a ``{kernel path: {role: leaf path}}`` map (as
  ``adapter.find`` and ``quant.find`` return), the kernels themselves excluded."""
  return {p for roles in found.values() for p in roles.values()}


def path_str(path: Path) -> str:
  """``("params", "layers", 0, "kernel")`` -> ``"params/layers/0/kernel"``."""
  return "/".join(str(k) for k in path)


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _raw_key(entry):
  """The original key object of one ``jax.tree_util`` key-path entry."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(f"unsupported key-path entry {entry!r}")


def keypath(kp) -> Path:
  """A ``jax.tree_util`` key path as a jlora path.

  The ``value`` attribute of an ``nnx.Variable`` is not part of the path, so the
  gradient, update or mask tree of an NNX state has the same paths as the state.
  """
  out = []
  for entry in kp:
    if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
      continue
    out.append(_raw_key(entry))
  return tuple(out)


def flatten(tree: PyTree) -> dict[Path, Any]:
  """``{path: leaf}`` in ``jax.tree_util`` order; ``nnx.Variable``s are leaves.

  Raises:
    TypeError: ``tree`` is a bare leaf rather than a container of leaves.
    ValueError: two leaves have the same ``/``-joined name (e.g. the keys
      ``"a/b"`` and ``"a" -> "b"``), which no regex or message could tell apart.
  """
  if not isinstance(tree, (Mapping, list, tuple)):
    raise TypeError(
        f"jlora expects a params tree of dicts, FrozenDicts, nnx.State, lists or"
        f" tuples; got {type(tree).__name__}. For an NNX module, pass the state from"
        " `graphdef, state = nnx.split(model)`.")
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]
  flat = {keypath(kp): leaf for kp, leaf in leaves}
  names: dict[str, Path] = {}
  for p in flat:
    other = names.setdefault(path_str(p), p)
    if other != p:
      raise ValueError(
          f"the leaves at {other!r} and {p!r} have the same name {path_str(p)!r}."
          " jlora matches targets and writes messages by '/'-joined names; rename"
          " one of the keys.")
  return flat


def value(leaf):
  """The array inside a leaf (unwraps an ``nnx.Variable``)."""
  if not isinstance(leaf, nnx.Variable):
    return leaf
  # flax >= 0.12 has ``get_value`` and deprecates ``.value``; 0.11 has only ``.value``.
  return leaf.get_value() if hasattr(type(leaf), "get_value") else leaf.value


def rewrap(like, array):
  """``array`` stored the way ``like`` is: in a Variable of the same type for NNX."""
  if isinstance(like, nnx.Variable):
    return like.replace(array)
  return array


def unflatten(flat: Mapping[Path, Any], like: PyTree) -> PyTree:
  """Rebuild a tree from ``{path: leaf}`` with ``like``'s containers.

  Every container of ``like`` keeps its type (dict, FrozenDict, nnx.State, list,
  tuple) and its key order. Paths that ``like`` lacks are new leaves: they are
  added to the mapping at their parent path (new mappings are plain dicts, or
  ``nnx.State`` inside one). A container left with no leaves is dropped, except
  one that was empty in ``like`` too, and the positions of a list or tuple never
  shift: a missing element becomes ``None`` (an empty pytree).

  Raises:
    ValueError: a new path runs through a leaf or a sequence of ``like``.
  """
  nested: dict = {}
  for path, leaf in flat.items():
    node = nested
    for k in path[:-1]:
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise ValueError(f"the new leaf {path!r} would sit below the leaf at {path[:-1]!r}.")
    node[path[-1]] = leaf
  out = _build(nested, like, ())
  return _empty_like(like) if out is _MISSING else out


_MISSING = object()


def _build(node, like, at: Path):
  """The tree at ``at``: ``node`` holds what ``flat`` has below it, ``like`` the template."""
  if not isinstance(node, dict):
    return node  # a leaf
  if isinstance(like, (list, tuple)):
    extra = [k for k in node if not (isinstance(k, int) and 0 <= k < len(like))]
    if extra:
      raise ValueError(f"cannot add the keys {extra} to the sequence at {at!r}.")
    items = [_build(node[i], like[i], at + (i,)) if i in node else _MISSING
             for i in range(len(like))]
    if all(x is _MISSING for x in items) and len(like):
      return _MISSING
    items = [None if x is _MISSING else x for x in items]
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)
  template = _mapping_of(like)
  keys = [k for k in template if k in node or _is_empty(template[k])]
  keys += [k for k in node if k not in template]
  children = {}
  for k in keys:
    child = _build(node.get(k, {}), template.get(k, {}), at + (k,))
    if child is not _MISSING:
      children[k] = child
  if not children and template:
    return _MISSING
  return _container_like(like, children)


def _is_empty(x) -> bool:
  return isinstance(x, (Mapping, list, tuple)) and len(x) == 0


def _mapping_of(like) -> Mapping:
  if isinstance(like, nnx.State):
    return like.raw_mapping
  return like if isinstance(like, Mapping) else {}


def _container_like(template, children: dict):
  if isinstance(template, nnx.State):
    return nnx.State(children)
  if isinstance(template, FrozenDict):
    return FrozenDict(children)
  return dict(children)


def _empty_like(like):
  return _container_like(like, {}) if isinstance(like, Mapping) else type(like)()


def map_paths(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
  """``jax.tree.map`` with the leaf's path as the first argument.

  Works on any pytree with the params tree's structure (gradients, updates,
  masks): the ``value`` node of an ``nnx.Variable`` is not part of the path.
  """
  return jax.tree_util.tree_map_with_path(lambda kp, *xs: fn(keypath(kp), *xs), tree, *rest)

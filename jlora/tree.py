"""Path-keyed views of params trees, and the adapter leaf layout.

jlora accepts three kinds of params trees and treats them alike:

* Flax linen variables: ``{"params": {...}}`` or the bare ``{...}``, as dicts or
  ``FrozenDict``s;
* Flax NNX ``nnx.State`` from ``nnx.split``, whose leaves are ``nnx.Variable``s;
* plain nested dicts of arrays.

All of them are nested *mappings* with array leaves (NNX wraps each array in a
Variable). This module flattens such a tree to ``{path: leaf}`` with ``/``-joined
string paths, and rebuilds it with the original container types, so every other
module can do its surgery on flat dicts.

The adapter of a kernel lives in the same mapping as the kernel. For a leaf named
``kernel`` or ``embedding`` (the only weight of a Flax Dense, DenseGeneral, Conv,
Einsum or Embed module) the siblings are ``lora_a``, ``lora_b``, ``lora_scale``
and, where used, ``lora_m`` and ``lora_dropout``. For any other leaf name ``w``
they are ``w_lora_a``, ``w_lora_b`` and so on, so that a plain dict may hold
several adapted matrices side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np
from flax import nnx
from flax.core import FrozenDict

PyTree = Any

#: Adapter leaf roles, by the suffix of the leaf name.
TRAINABLE_ROLES = ("lora_a", "lora_b", "lora_m")
CONSTANT_ROLES = ("lora_scale", "lora_dropout")
ROLES = TRAINABLE_ROLES + CONSTANT_ROLES
#: Kernel leaf names whose adapter leaves carry no prefix.
BARE_KERNEL_NAMES = ("kernel", "embedding")


def join(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def split_leaf(path: str) -> tuple[str, str]:
  """``"a/b/kernel"`` -> ``("a/b", "kernel")``."""
  head, _, name = path.rpartition("/")
  return head, name


def adapter_name(kernel_name: str, role: str) -> str:
  """The sibling leaf name holding ``role`` for the kernel leaf ``kernel_name``."""
  return role if kernel_name in BARE_KERNEL_NAMES else f"{kernel_name}_{role}"


def role_of(name: str) -> str | None:
  """The adapter role of a leaf name (``"lora_a"``, ...), or None for base leaves."""
  for role in ROLES:
    if name == role or name.endswith("_" + role):
      return role
  return None


def is_adapter_path(path: str) -> bool:
  return role_of(split_leaf(path)[1]) is not None


def is_trainable_path(path: str) -> bool:
  return role_of(split_leaf(path)[1]) in TRAINABLE_ROLES


# ---------------------------------------------------------------------------
# Flattening and rebuilding nested mappings.


def _is_mapping(x) -> bool:
  return isinstance(x, Mapping)


def flatten(tree: PyTree) -> dict[str, Any]:
  """``{"/"-joined path: leaf}`` over a nested mapping, in sorted key order.

  Leaves are returned as stored: arrays, or ``nnx.Variable``s for NNX state.
  Empty sub-mappings are dropped.
  """
  if not _is_mapping(tree):
    raise TypeError(
        f"jlora expects a params tree of nested mappings (dict, FrozenDict or"
        f" nnx.State); got {type(tree).__name__}. For an NNX module, pass the"
        " state from `graphdef, state = nnx.split(model)`.")
  out: dict[str, Any] = {}

  def walk(node, prefix):
    for k in sorted(node.keys(), key=str):
      v = node[k]
      path = join(prefix, str(k))
      if _is_mapping(v):
        walk(v, path)
      else:
        out[path] = v
  walk(tree, "")
  return out


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


def new_leaf(kernel_leaf, array, role: str):
  """A fresh adapter leaf stored like ``kernel_leaf`` (an NNX Variable if it is one)."""
  if isinstance(kernel_leaf, nnx.Variable):
    return (nnx.LoRAParam if role in TRAINABLE_ROLES else nnx.Variable)(array)
  return array


def placed_like(reference, tree):
  """``tree`` put on ``reference``'s device when ``reference`` is committed to one.

  New leaves (adapters, optimizer state) are otherwise uncommitted; a jitted step
  that mixes committed and uncommitted inputs returns committed outputs, so its
  second call would compile again.
  """
  sharding = getattr(reference, "sharding", None)
  if (isinstance(reference, jax.core.Tracer) or not getattr(reference, "committed", False)
      or not isinstance(sharding, jax.sharding.SingleDeviceSharding)):
    return tree
  return jax.device_put(tree, sharding)


def _container_like(template, children: dict):
  if isinstance(template, nnx.State):
    return nnx.State(children)
  if isinstance(template, FrozenDict):
    return FrozenDict(children)
  return dict(children)


def unflatten(flat: Mapping[str, Any], like: PyTree) -> PyTree:
  """Rebuild a nested mapping from ``{path: leaf}``, with ``like``'s container types.

  Paths absent from ``like`` get plain-dict containers of ``like``'s top-level kind.
  """
  nested: dict = {}
  for path, leaf in flat.items():
    node = nested
    *heads, last = path.split("/")
    for h in heads:
      node = node.setdefault(h, {})
    node[last] = leaf

  def build(node, template):
    children = {}
    for k, v in node.items():
      sub = _child(template, k)
      children[k] = build(v, sub if sub is not None else {}) if isinstance(v, dict) else v
    return _container_like(template, children)
  return build(nested, like)


def _child(template, key):
  if not _is_mapping(template):
    return None
  # nnx.State wraps nested dicts in State on item access; its pytree holds dicts.
  raw = template.raw_mapping if isinstance(template, nnx.State) else template
  for k in raw.keys():
    if str(k) == key:
      v = raw[k]
      return v if _is_mapping(v) else None
  return None


def map_paths(fn, tree: PyTree, *rest: PyTree) -> PyTree:
  """``jax.tree.map`` with the ``/``-joined path as the first argument.

  Works on any pytree with the params tree's structure (gradients, updates,
  masks); the ``value`` node of an ``nnx.Variable`` is not part of the path.
  """
  return jax.tree_util.tree_map_with_path(
      lambda kp, *xs: fn(keypath_str(kp), *xs), tree, *rest)


def keypath_str(keypath) -> str:
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":  # the payload of an nnx.Variable
        parts.append(k.name)
    else:
      parts.append(str(k).strip(".[]'\""))
  return "/".join(parts)


# ---------------------------------------------------------------------------
# Reading adapters out of a flat view.


class Adapter(NamedTuple):
  """One adapted kernel, as read from the params tree (arrays unwrapped).

  With ``S`` the stack shape (leading axes of ``nn.scan``-stacked layers, often
  empty), ``I`` the input shape and ``O`` the output shape of the kernel:

  * ``kernel``: ``S + I + O``;
  * ``a``: ``S + I + (r,)``; ``b``: ``S + (r,) + O``;
  * ``scale``: ``S`` (float32);
  * ``m``: ``S + O`` or None (DoRA magnitude);
  * ``dropout``: ``S`` or None (LoRA-input dropout rate).
  """
  path: str          # path of the kernel leaf
  kernel: Any
  a: Any
  b: Any
  scale: Any
  m: Any = None
  dropout: Any = None

  @property
  def n_stack(self) -> int:
    return np.ndim(self.scale)

  @property
  def n_in(self) -> int:
    return np.ndim(self.a) - self.n_stack - 1

  @property
  def n_out(self) -> int:
    return np.ndim(self.b) - self.n_stack - 1

  @property
  def rank(self) -> int:
    return np.shape(self.a)[-1]


def adapter_paths(kernel_path: str) -> dict[str, str]:
  """``{role: path}`` of every possible adapter leaf of a kernel."""
  head, name = split_leaf(kernel_path)
  return {role: join(head, adapter_name(name, role)) for role in ROLES}


def kernel_path_of(adapter_path: str, flat: Mapping[str, Any]) -> str:
  """The kernel path an adapter leaf belongs to, checked against ``flat``."""
  head, name = split_leaf(adapter_path)
  role = role_of(name)
  if name == role:
    found = [join(head, k) for k in BARE_KERNEL_NAMES if join(head, k) in flat]
    if len(found) != 1:
      raise ValueError(
          f"adapter leaf {adapter_path!r} needs exactly one sibling named"
          f" {' or '.join(BARE_KERNEL_NAMES)}; found {len(found)}.")
    return found[0]
  kp = join(head, name[: -len(role) - 1])
  if kp not in flat:
    raise ValueError(f"adapter leaf {adapter_path!r} has no kernel {kp!r} beside it.")
  return kp


def iter_adapters(flat: Mapping[str, Any]) -> Iterator[Adapter]:
  """Every adapted kernel of a flat params view, in path order."""
  for path in sorted(p for p in flat if split_leaf(p)[1].endswith("lora_a")
                     and role_of(split_leaf(p)[1]) == "lora_a"):
    kp = kernel_path_of(path, flat)
    roles = adapter_paths(kp)
    missing = [r for r in ("lora_b", "lora_scale") if roles[r] not in flat]
    if missing:
      raise ValueError(f"adapter of {kp!r} lacks the leaves {missing}.")
    get = lambda r: value(flat[roles[r]]) if roles[r] in flat else None
    ad = Adapter(kp, value(flat[kp]), get("lora_a"), get("lora_b"), get("lora_scale"),
                 get("lora_m"), get("lora_dropout"))
    check_layout(ad)
    yield ad


def check_layout(ad: Adapter) -> None:
  """Raise ``ValueError`` if an adapter's shapes do not fit its kernel."""
  ks, as_, bs = np.shape(ad.kernel), np.shape(ad.a), np.shape(ad.b)
  ns = ad.n_stack
  stack, n_in = ks[:ns], ad.n_in
  ok = (ad.n_in >= 1 and ad.n_out >= 1 and ns + ad.n_in + ad.n_out == len(ks)
        and as_[:ns] == stack and bs[:ns] == stack and as_[-1] == bs[ns]
        and as_[ns:-1] == ks[ns:ns + n_in] and bs[ns + 1:] == ks[ns + n_in:])
  if ok and ad.m is not None:
    ok = np.shape(ad.m) == stack + ks[ns + n_in:]
  if not ok:
    raise ValueError(
        f"adapter of {ad.path!r} does not fit its kernel: kernel {ks}, lora_a {as_},"
        f" lora_b {bs}, lora_scale {np.shape(ad.scale)}"
        + (f", lora_m {np.shape(ad.m)}" if ad.m is not None else "")
        + ". Expected lora_a = stack + in + (r,), lora_b = stack + (r,) + out and"
        " lora_scale = stack, with kernel = stack + in + out.")


def adapters(params: PyTree) -> list[Adapter]:
  """All adapters of a params tree (see ``Adapter``)."""
  return list(iter_adapters(flatten(params)))

"""The adapter data model: leaf names, axis layouts, and reading adapters from a tree.

An adapter lives in the same mapping as its kernel. For a leaf named ``kernel``
or ``embedding`` (the weight of a Flax Dense, DenseGeneral, Conv, Einsum or Embed
module) its siblings are ``lora_a``, ``lora_b``, ``lora_scale`` and, where used,
``lora_m``, ``lora_dropout`` and ``lora_a0``/``lora_b0`` (residual inits). For any other leaf name ``w`` they are
``w_lora_a``, ``w_lora_b`` and so on, so a plain dict may hold several adapted
matrices side by side. Only a *complete* adapter counts: kernel, ``lora_a``,
``lora_b`` and ``lora_scale`` together. A user leaf that merely ends in
``_lora_m``, or the ``lora_a``/``lora_b`` params of Flax's own ``nnx.LoRA``
(which have no ``lora_scale``), are ordinary base leaves.

**Layout.** A kernel's axes are ``stack + in + out`` (stack axes index the layers
of an ``nn.scan``; inputs are the axes the model contracts), or ``stack + out +
in`` for kernels stored output-first, like a torch ``nn.Linear`` weight (``(out,
in)``, used as ``x @ kernel.T``; GPT-2's ``Conv1D`` weight is ``(in, out)``, used as
``x @ kernel``: input-first). The adapter follows the kernel:

* ``lora_a`` is the kernel with its output axes replaced by one rank axis:
  ``stack + in + (r,)``, or ``stack + (r,) + in`` output-first;
* ``lora_b`` is the kernel with its input axes replaced by one rank axis:
  ``stack + (r,) + out``, or ``stack + out + (r,)`` output-first;
* ``lora_scale`` is ``stack`` (float32) and ``lora_m`` (DoRA) ``stack + out``.

So the usual layout is DESIGN's ``A: in + (r,)``, ``B: (r,) + out``, and a torch-style
``(out, in)`` kernel gets PEFT's own ``A: (r, in)``, ``B: (out, r)``. The layout is
read back from the shapes alone; the one case the shapes cannot tell apart (a
full-rank adapter, where ``r`` equals the kernel's fan-in or fan-out on a layout
that also fits the other order) is read as input-first, and ``jlora.init``
refuses to build it output-first.

**Stacked adapters** (``jlora.stack_adapters``: several adapters of one kernel,
one per example of a batch) carry one more sibling, ``lora_ranks``: int32 ``(n,)``,
the rank of each of the ``n`` adapters before zero-padding. That leaf is the
marker: where it stands, every other adapter leaf of the kernel (``lora_a``,
``lora_b``, ``lora_scale``, ``lora_m``, ``lora_dropout``) leads with an *adapter
axis* of length ``n``, before any stack axis. A stacked adapter is never read as an
``nn.scan`` stack: ``read`` refuses it, so every function that needs one adapter per
kernel (``merge``, ``lora(fn)`` without ``adapter_ids``, ``map_adapters``) raises an
error that says how to use it; ``read_stacked`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora import quant
from jlora import tree as tree_lib
from jlora.tree import Path, path_str

#: Adapter leaf roles.
TRAINABLE_ROLES = ("lora_a", "lora_b", "lora_m")
#: PiSSA and OLoRA move part of the kernel into the adapter: the tree's kernel is
#: ``W - A0 @ B0`` (canonical matrices, scale folded into ``A0``), and ``lora_a0``/
#: ``lora_b0`` (float32, laid out like ``lora_a``/``lora_b``) keep that part, so the
#: original ``W`` can be rebuilt and a saved adapter put onto the original base.
RESIDUAL_ROLES = ("lora_a0", "lora_b0")
#: The marker of a stacked adapter (see the module docstring).
STACKED_ROLE = "lora_ranks"
CONSTANT_ROLES = ("lora_scale", "lora_dropout", STACKED_ROLE) + RESIDUAL_ROLES
ROLES = TRAINABLE_ROLES + CONSTANT_ROLES
#: The roles every adapter has.
REQUIRED_ROLES = ("lora_a", "lora_b", "lora_scale")
#: Kernel leaf names whose adapter leaves carry no prefix.
BARE_KERNEL_NAMES = tree_lib.BARE_NAMES


def leaf_name(kernel_name, role: str) -> str:
  """The sibling leaf name holding ``role`` for the kernel leaf ``kernel_name``."""
  if kernel_name not in BARE_KERNEL_NAMES and not isinstance(kernel_name, str):
    raise ValueError(
        f"a kernel under the key {kernel_name!r} cannot get adapter leaves: they are"
        f" named after the kernel (`<name>_lora_a`), which needs a string key.")
  return tree_lib.sibling(kernel_name, role)


def role_paths(kernel_path: Path) -> dict[str, Path]:
  """``{role: path}`` of every possible adapter leaf of a kernel."""
  head, name = kernel_path[:-1], kernel_path[-1]
  return {role: head + (leaf_name(name, role),) for role in ROLES}


# ---------------------------------------------------------------------------
# Layouts.


class Split(NamedTuple):
  """How a kernel's axes divide: ``stack + in + out``, or ``stack + out + in``.

  ``n_stack`` leading stack axes, ``n_in`` input axes (the ones the model
  contracts), and the rest output axes; ``out_first`` says the outputs come first.
  """
  n_stack: int
  n_in: int
  out_first: bool = False

  def n_out(self, ndim: int) -> int:
    return ndim - self.n_stack - self.n_in

  def in_axes(self, ndim: int) -> tuple[int, ...]:
    start = self.n_stack + (self.n_out(ndim) if self.out_first else 0)
    return tuple(range(start, start + self.n_in))

  def out_axes(self, ndim: int) -> tuple[int, ...]:
    ins = set(self.in_axes(ndim))
    return tuple(i for i in range(self.n_stack, ndim) if i not in ins)

  def shapes(self, shape) -> tuple[tuple, tuple, tuple]:
    """``(stack, in, out)`` shapes of a kernel of ``shape``."""
    shape = tuple(shape)
    return (shape[:self.n_stack], tuple(shape[i] for i in self.in_axes(len(shape))),
            tuple(shape[i] for i in self.out_axes(len(shape))))

  def a_shape(self, shape, r: int) -> tuple:
    stack, ins, _ = self.shapes(shape)
    return stack + ((r,) + ins if self.out_first else ins + (r,))

  def b_shape(self, shape, r: int) -> tuple:
    stack, _, outs = self.shapes(shape)
    return stack + (outs + (r,) if self.out_first else (r,) + outs)

  # -- canonical matrices: every layout as (stack..., fan_in, fan_out) products --

  def kernel_matrix(self, w):
    """A kernel ``stack + in + out`` (or output-first) as ``stack + (fan_in, fan_out)``."""
    stack, ins, outs = self.shapes(w.shape)
    nd = w.ndim
    perm = tuple(range(self.n_stack)) + self.in_axes(nd) + self.out_axes(nd)
    return jnp.reshape(jnp.transpose(w, perm), stack + (math.prod(ins), math.prod(outs)))

  def kernel_from_matrix(self, m2, shape):
    """The inverse of ``kernel_matrix``: ``stack + (fan_in, fan_out)`` -> ``shape``."""
    stack, ins, outs = self.shapes(shape)
    canon = jnp.reshape(m2, stack + ins + outs)
    if not self.out_first:
      return canon
    ns, ni = self.n_stack, self.n_in
    perm = tuple(range(ns)) + tuple(range(ns + ni, len(shape))) + tuple(range(ns, ns + ni))
    return jnp.transpose(canon, perm)

  def a_matrix(self, a):
    """``lora_a`` as ``stack + (fan_in, r)``."""
    if self.out_first:
      a = jnp.moveaxis(a, self.n_stack, -1)
    return jnp.reshape(a, a.shape[:self.n_stack] + (-1, a.shape[-1]))

  def b_matrix(self, b):
    """``lora_b`` as ``stack + (r, fan_out)``."""
    if self.out_first:
      b = jnp.moveaxis(b, -1, self.n_stack)
    return jnp.reshape(b, b.shape[:self.n_stack + 1] + (-1,))

  def a_from_matrix(self, a2, shape):
    """``stack + (fan_in, r)`` -> ``lora_a`` for a kernel of ``shape``."""
    stack, ins, _ = self.shapes(shape)
    a = jnp.reshape(a2, stack + ins + (a2.shape[-1],))
    return jnp.moveaxis(a, -1, self.n_stack) if self.out_first else a

  def b_from_matrix(self, b2, shape):
    """``stack + (r, fan_out)`` -> ``lora_b`` for a kernel of ``shape``."""
    stack, _, outs = self.shapes(shape)
    b = jnp.reshape(b2, stack + (b2.shape[-2],) + outs)
    return jnp.moveaxis(b, self.n_stack, -1) if self.out_first else b


def read_split(kernel_shape, a_shape, b_shape, n_stack: int) -> Split | None:
  """The layout whose adapter shapes these are, or None; input-first when both fit."""
  kernel_shape, a_shape, b_shape = tuple(kernel_shape), tuple(a_shape), tuple(b_shape)
  n_in = len(a_shape) - n_stack - 1
  if n_in < 1 or len(b_shape) - n_stack - 1 < 1 or n_in + len(b_shape) - 1 != len(kernel_shape):
    return None
  for split in (Split(n_stack, n_in, False), Split(n_stack, n_in, True)):
    r = a_shape[n_stack] if split.out_first else a_shape[-1]
    if split.a_shape(kernel_shape, r) == a_shape and split.b_shape(kernel_shape, r) == b_shape:
      return split
  return None


def is_ambiguous(split: Split, shape, r: int) -> bool:
  """Whether an output-first adapter's shapes would read back as input-first."""
  return split.out_first and read_split(shape, split.a_shape(shape, r), split.b_shape(shape, r),
                                        split.n_stack) != split


# ---------------------------------------------------------------------------
# Adapters read from a tree.


class Adapter(NamedTuple):
  """One adapted kernel, as read from the params tree (arrays unwrapped).

  With ``S``, ``I`` and ``O`` the stack, input and output shapes of the kernel
  (see ``Split``; ``S`` is often empty):

  * ``kernel``: ``S + I + O`` (or ``S + O + I``, output-first); on a quantized base a
    ``quant.Quantized``, which has the float kernel's shape and dtype;
  * ``a``: ``S + I + (r,)`` (``S + (r,) + I``); ``b``: ``S + (r,) + O`` (``S + O + (r,)``);
  * ``scale``: ``S`` (float32); ``m``: ``S + O`` or None (DoRA magnitude);
  * ``dropout``: ``S`` or None (the rate of dropout on the adapter's input).
  """
  path: Path         # path of the kernel leaf
  kernel: Any
  a: Any
  b: Any
  scale: Any
  m: Any = None
  dropout: Any = None

  @property
  def name(self) -> str:
    """The ``/``-joined kernel path, for messages and matching."""
    return path_str(self.path)

  @property
  def n_stack(self) -> int:
    return np.ndim(self.scale)

  @property
  def split(self) -> Split:
    split = read_split(np.shape(self.kernel), np.shape(self.a), np.shape(self.b), self.n_stack)
    if split is None:
      raise layout_error(self)
    return split

  @property
  def out_first(self) -> bool:
    return self.split.out_first

  @property
  def n_in(self) -> int:
    return np.ndim(self.a) - self.n_stack - 1

  @property
  def n_out(self) -> int:
    return np.ndim(self.b) - self.n_stack - 1

  @property
  def rank(self) -> int:
    return np.shape(self.b)[-1] if self.out_first else np.shape(self.a)[-1]

  @property
  def shapes(self) -> tuple[tuple, tuple, tuple]:
    """``(stack, in, out)`` shapes."""
    return self.split.shapes(np.shape(self.kernel))


def layout_error(ad: Adapter) -> ValueError:
  return ValueError(
      f"adapter of {ad.name!r} does not fit its kernel: kernel {np.shape(ad.kernel)},"
      f" lora_a {np.shape(ad.a)}, lora_b {np.shape(ad.b)}, lora_scale {np.shape(ad.scale)}"
      + (f", lora_m {np.shape(ad.m)}" if ad.m is not None else "")
      + ". Expected kernel = stack + in + out with lora_a = stack + in + (r,),"
      " lora_b = stack + (r,) + out (or kernel = stack + out + in with lora_a ="
      " stack + (r,) + in, lora_b = stack + out + (r,)), lora_scale = stack and"
      " lora_m = stack + out.")


def check_layout(ad: Adapter) -> None:
  """Raise ``ValueError`` if an adapter's shapes do not fit its kernel."""
  stack, _, outs = ad.shapes  # raises when no layout fits
  for leaf, want in ((ad.m, stack + outs), (ad.dropout, stack)):
    if leaf is not None and np.shape(leaf) != want:
      raise layout_error(ad)
  if quant.is_quantized(ad.kernel) and ad.kernel.whole_axes() < len(stack):
    raise ValueError(
        f"the quantized kernel {ad.name!r} {ad.kernel.shape} has an adapter with {len(stack)}"
        " stacked-layer axes, but its quantization leaves are not per layer along them:"
        f" {', '.join(f'{r} {np.shape(v)}' for r, v in ad.kernel.leaves().items())}."
        " Quantize it with the same split (jlora.quantize(..., stack_axes=...), or fn=/args=).")


def find(flat: Mapping[Path, Any]) -> dict[Path, dict[str, Path]]:
  """``{kernel path: {role: leaf path}}`` of every complete adapter in a flat view.

  A kernel has an adapter when the leaves ``lora_a``, ``lora_b`` and
  ``lora_scale`` of its name stand beside it (see the module docstring).

  Raises:
    ValueError: one leaf would belong to two adapters (a module with both a
      ``kernel`` and an ``embedding`` beside one ``lora_a``, say).
  """
  out: dict[Path, dict[str, Path]] = {}
  owner: dict[Path, Path] = {}
  for path in flat:
    if not path or (path[-1] not in BARE_KERNEL_NAMES and not isinstance(path[-1], str)):
      continue
    roles = {r: p for r, p in role_paths(path).items() if p in flat}
    if not all(r in roles for r in REQUIRED_ROLES):
      continue
    for p in roles.values():
      other = owner.setdefault(p, path)
      if other != path:
        raise ValueError(f"the leaf {path_str(p)!r} would be the adapter of both"
                         f" {path_str(other)!r} and {path_str(path)!r}.")
    out[path] = roles
  return out


def adapter_leaf_paths(flat: Mapping[Path, Any]) -> set[Path]:
  """The paths of every leaf that belongs to a complete adapter."""
  return tree_lib.owned(find(flat))


def _read_arrays(flat: Mapping[Path, Any], kernel_path: Path,
                 roles: Mapping[str, Path]) -> Adapter:
  get = lambda r: tree_lib.value(flat[roles[r]]) if r in roles else None
  return Adapter(kernel_path, quant.read_kernel(flat, kernel_path), get("lora_a"), get("lora_b"),
                 get("lora_scale"), get("lora_m"), get("lora_dropout"))


def read(flat: Mapping[Path, Any], kernel_path: Path, roles: Mapping[str, Path]) -> Adapter:
  """The adapter of one kernel, its layout checked.

  Raises:
    ValueError: the shapes fit no layout, or the adapter is stacked (see
      ``read_stacked``).
  """
  if is_stacked(roles):
    raise stacked_error(kernel_path)
  ad = _read_arrays(flat, kernel_path, roles)
  check_layout(ad)
  return ad


def iter_adapters(flat: Mapping[Path, Any]) -> Iterator[Adapter]:
  """Every adapted kernel of a flat params view, in tree order."""
  for kp, roles in find(flat).items():
    yield read(flat, kp, roles)


# ---------------------------------------------------------------------------
# Stacked adapters.


def is_stacked(roles: Mapping[str, Path]) -> bool:
  """Whether the adapter with these leaves is stacked (has ``lora_ranks``)."""
  return STACKED_ROLE in roles


def stacked_error(kernel_path: Path) -> ValueError:
  return ValueError(
      f"the adapter of {path_str(kernel_path)!r} is stacked: it holds several adapters"
      " along a leading adapter axis (jlora.stack_adapters), one per example, so it cannot"
      " be used as one adapter. Call the wrapped model with adapter_ids="
      " (jlora.lora(fn)(params, x, adapter_ids=ids), ids[b] the adapter of example b, -1"
      " the base model), or take the adapters apart with jlora.unstack_adapters.")


class StackedAdapter(NamedTuple):
  """``n`` adapters of one kernel along a leading adapter axis (``jlora.stack_adapters``).

  ``ad`` is an ``Adapter`` whose ``a``, ``b``, ``scale``, ``m`` and ``dropout`` lead
  with the adapter axis ``(n,)`` (its kernel has none), their rank zero-padded to the
  largest; ``ranks``: int32 ``(n,)``, each adapter's own rank (0 where an adapter does
  not adapt this kernel; its factors and scale are zero there).
  """
  ad: Adapter
  ranks: Any

  @property
  def n(self) -> int:
    return np.shape(self.ranks)[0]

  def slot_shapes(self) -> Adapter:
    """One adapter's shapes: the arrays as ``jax.ShapeDtypeStruct`` without the adapter axis."""
    one = lambda x: None if x is None else jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype)
    ad = self.ad
    return ad._replace(a=one(ad.a), b=one(ad.b), scale=one(ad.scale), m=one(ad.m),
                       dropout=one(ad.dropout))

  def take(self, i) -> Adapter:
    """Adapter ``i`` (an int, or a traced integer scalar), still zero-padded."""
    pick = lambda x: None if x is None else jnp.take(x, i, axis=0)
    ad = self.ad
    return ad._replace(a=pick(ad.a), b=pick(ad.b), scale=pick(ad.scale), m=pick(ad.m),
                       dropout=pick(ad.dropout))


def read_stacked(flat: Mapping[Path, Any], kernel_path: Path,
                 roles: Mapping[str, Path]) -> StackedAdapter:
  """The stacked adapter of one kernel, its layout checked (on one adapter's shapes).

  Raises:
    ValueError: the adapter is not stacked, ``lora_ranks`` is not an integer vector,
      a leaf lacks the adapter axis, or one adapter's shapes fit no layout.
  """
  if not is_stacked(roles):
    raise ValueError(f"the adapter of {path_str(kernel_path)!r} is not stacked.")
  ad = _read_arrays(flat, kernel_path, roles)
  ranks = tree_lib.value(flat[roles[STACKED_ROLE]])
  if np.ndim(ranks) != 1 or not jnp.issubdtype(ranks.dtype, jnp.integer):
    raise ValueError(f"lora_ranks of {ad.name!r} must be an integer vector (one rank per"
                     f" adapter); got shape {np.shape(ranks)}, dtype {ranks.dtype}.")
  n = np.shape(ranks)[0]
  fields = {f: getattr(ad, f) for f in ("a", "b", "scale", "m", "dropout")
            if getattr(ad, f) is not None}
  short = [f for f, x in fields.items() if np.ndim(x) < 1 or np.shape(x)[0] != n]
  if short:
    raise ValueError(
        f"the stacked adapter of {ad.name!r} has {n} adapters (lora_ranks {np.shape(ranks)}),"
        f" but its {', '.join(short)} do not lead with an axis of {n}: "
        + ", ".join(f"{f} {np.shape(fields[f])}" for f in short) + ".")
  st = StackedAdapter(ad, ranks)
  check_layout(st.slot_shapes())
  return st


def check_all(flat: Mapping[Path, Any]) -> None:
  """Raise ``ValueError`` if any adapter of a flat view, plain or stacked, does not fit."""
  for kp, roles in find(flat).items():
    (read_stacked if is_stacked(roles) else read)(flat, kp, roles)


def adapters(params) -> list[Adapter]:
  """All adapters of a params tree (see ``Adapter``)."""
  return list(iter_adapters(tree_lib.flatten(params)))


def new_leaf(kernel_leaf, array, role: str):
  """A fresh adapter leaf stored like ``kernel_leaf`` (an NNX Variable if it is one)."""
  if isinstance(kernel_leaf, nnx.Variable):
    return (nnx.LoRAParam if role in TRAINABLE_ROLES else nnx.Variable)(array)
  return array

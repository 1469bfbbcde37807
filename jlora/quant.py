"""Quantized kernels: the storage format, its arithmetic, and reading it from a tree.

``jlora.quantize`` replaces a float kernel by plain integer and float leaves. For a leaf
named ``kernel`` or ``embedding`` the siblings carry no prefix, as adapter leaves do; any
other leaf ``w`` gets ``w_quant_scale`` and so on:

=====================  ======================================  ===================================
leaf                   dtype and shape                         meaning
=====================  ======================================  ===================================
``kernel``             int8 ``K``                              8 bits: ``w ≈ code · scale``
                       uint8 ``K[:-1] + (K[-1] // 2,)``        4 bits: two codes per byte along
                                                               the last axis (element ``2j`` in
                                                               the low nibble, ``2j + 1`` high)
``quant_scale``        float, the rank of ``K``                one scale per block (below)
                       int8 (double quantization)              codes of ``scale - offset``
``quant_map``          float32 ``S + (16,)``                   4 bits only: the value of each
                                                               code (int4: -8..7, or NF4's)
``quant_dq_scale``     float, the rank of ``K``                double quantization: one scale per
                                                               block of scales
``quant_dq_offset``    float, the rank of ``K``                double quantization: the mean
                                                               scale of each stacked layer
=====================  ======================================  ===================================

``K = S + I + O`` is the float kernel's shape (stack, input and output axes, or ``S + O + I``
output-first; see ``adapter.Split``).

**Self-describing.** Dequantizing needs the leaves alone. Every scale array has the rank
of ``K`` and divides it axis by axis: ``K[k] // quant_scale.shape[k]`` is the extent of one
block along axis ``k`` (the *keepdims layout*). int8 per output channel of a Dense
``(C, N)`` kernel has ``quant_scale (1, N)``; groups of 64 inputs have ``(C // 64, N)``.
``quant_map`` present means packed 4-bit codes. The float dtype of the kernel (what
dequantizing returns) is the dtype of ``quant_scale``, or of ``quant_dq_scale`` with double
quantization. No config, in/out split or group size is needed, and the tree stays a plain
pytree of arrays: it jits, shards, saves and donates like any other.

**Stack axes.** Every leaf keeps the stacked-layer axes ``S`` whole in front (the scales and
the map are per layer), so ``lax.scan`` over ``nn.scan``'s stacked params slices every leaf
of a kernel alike.

**Why packed uint8 and not ``jnp.int4``** (measured on XLA:CPU, jax 0.10.2): both compile
and both count half a byte per element as jit arguments, but under ``lax.scan`` XLA:CPU
widens a whole stacked ``s4`` argument to ``s8`` before the loop, ``nbytes`` of an ``int4``
array reports one byte per element, and NumPy holds ``int4`` at one byte per element.
Packed uint8 is half a byte per element everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora import tree as tree_lib
from jlora.tree import Path, path_str

#: The sibling leaves of a quantized kernel (the kernel leaf itself holds the codes).
SCALE, MAP, DQ_SCALE, DQ_OFFSET = "quant_scale", "quant_map", "quant_dq_scale", "quant_dq_offset"
ROLES = (SCALE, MAP, DQ_SCALE, DQ_OFFSET)
#: Blocks of scales per double-quantization constant (QLoRA: 256).
DQ_BLOCK = 256


# ---------------------------------------------------------------------------
# Code books.


def nf4_values() -> np.ndarray:
  """The 16 NF4 values (QLoRA, Dettmers et al. 2023, Sec. 3 and App. E), ascending, float32.

  Quantiles of N(0, 1) normalised to [-1, 1] and made asymmetric so that 0 is exact: 8
  positive values at the quantiles ``linspace(1 - δ, 1/2, 9)[:-1]``, 7 negative ones at
  ``-quantile(linspace(1 - δ, 1/2, 8)[:-1])``, and 0, with ``δ = (1/30 + 1/32) / 2``
  keeping the outermost quantile finite. Both halves are divided by the largest quantile.
  """
  ppf = statistics.NormalDist().inv_cdf
  top = 1 - 0.5 * (1 / 30 + 1 / 32)
  pos = [ppf(p) for p in np.linspace(top, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(top, 0.5, 8)[:-1]]
  return (np.array(sorted(neg + [0.0] + pos)) / ppf(top)).astype(np.float32)


NF4 = nf4_values()
#: Signed int4 as a code book: code ``n`` stands for ``n`` below 8 and ``n - 16`` above.
INT4 = np.array([n if n < 8 else n - 16 for n in range(16)], np.float32)


# ---------------------------------------------------------------------------
# Packing and blocks.


def pack4(nibbles):
  """Two 4-bit codes per byte: uint8 ``K[:-1] + (K[-1] // 2,)`` from ``K`` codes in [0, 16)."""
  u = jnp.asarray(nibbles).astype(jnp.uint8) & 0xF
  return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack4(packed):
  """The inverse of ``pack4``: uint8 nibbles ``P[:-1] + (2 · P[-1],)``."""
  both = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
  return jnp.reshape(both, packed.shape[:-1] + (2 * packed.shape[-1],))


def block_shape(shape, axes, size: int) -> tuple[int, ...] | None:
  """Per-axis extent of a block of ``size`` consecutive row-major elements over ``axes``.

  Walks ``axes`` from the last: an axis is covered whole while ``size`` is a multiple of it,
  and the first one it does not cover must be divisible by what is left. Axes outside
  ``axes`` get extent 1. None when no such box exists.
  """
  block = [1] * len(shape)
  left = size
  for k in reversed(tuple(axes)):
    if left == 1:
      break
    if left % shape[k] == 0:
      block[k], left = shape[k], left // shape[k]
    elif shape[k] % left == 0:
      block[k], left = left, 1
    else:
      break
  return tuple(block) if left == 1 else None


def _blocked(x, block):
  """``x`` as ``(n0, b0, n1, b1, ...)``, with ``n_k = x.shape[k] // block[k]``."""
  return jnp.reshape(x, [d for s, b in zip(x.shape, block) for d in (s // b, b)])


def _block_absmax(x, block):
  """Max of ``|x|`` over each block, in the keepdims layout."""
  return jnp.max(jnp.abs(_blocked(x, block)), axis=tuple(range(1, 2 * x.ndim, 2)))


def expand(values, scale, divide: bool = False):
  """``values · scale`` (or ``values / scale``), ``scale`` in the keepdims layout of ``values``.

  Under ``jit`` the reshapes are bitcasts, and the product fuses with what makes ``values``.
  """
  block = tuple(v // s for v, s in zip(values.shape, scale.shape))
  wide = jnp.expand_dims(scale, tuple(range(1, 2 * scale.ndim, 2)))
  out = _blocked(values, block) / wide if divide else _blocked(values, block) * wide
  return jnp.reshape(out, values.shape)


# ---------------------------------------------------------------------------
# A quantized kernel.


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "scale", "table", "dq_scale", "dq_offset"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Quantized:
  """The stored leaves of one quantized kernel (see the module docstring), as a pytree.

  It stands in for the float kernel where only its shape and values matter: ``shape``,
  ``dtype``, ``ndim`` and ``size`` are the float kernel's, and ``astype(dtype)``
  dequantizes. ``jlora.adapters`` gives it as the ``kernel`` of an adapter on a quantized
  base, and ``jlora.merge`` folds it with ``dequantize``.
  """
  codes: Any
  scale: Any
  table: Any = None
  dq_scale: Any = None
  dq_offset: Any = None

  @property
  def shape(self) -> tuple[int, ...]:
    s = tuple(np.shape(self.codes))
    return s if self.table is None else s[:-1] + (2 * s[-1],)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def dtype(self):
    return jnp.dtype((self.scale if self.dq_scale is None else self.dq_scale).dtype)

  @property
  def bits(self) -> int:
    return 8 if self.table is None else 4

  def leaves(self) -> dict[str, Any]:
    """``{role: array}`` of the sibling leaves (the codes are the kernel leaf itself)."""
    return {r: v for r, v in zip(ROLES, (self.scale, self.table, self.dq_scale, self.dq_offset))
            if v is not None}

  def whole_axes(self) -> int:
    """How many leading axes every leaf holds whole (the stacked-layer axes, at least), so
    that slicing one of them slices each leaf alike. At most ``ndim - 1``."""
    shape = self.shape
    arrays = [a for a in (self.codes, self.scale, self.dq_scale, self.dq_offset) if a is not None]
    n = 0
    while n < len(shape) - 1 and all(np.shape(a)[n] == shape[n] for a in arrays) and (
        self.table is None or (n < np.ndim(self.table) - 1 and np.shape(self.table)[n] == shape[n])):
      n += 1
    return n

  def float_scale(self):
    """The float32 block scales (keepdims layout), undoing double quantization."""
    if self.dq_scale is None:
      return self.scale.astype(jnp.float32)
    return (expand(self.scale.astype(jnp.float32), self.dq_scale.astype(jnp.float32))
            + self.dq_offset.astype(jnp.float32))

  def values(self):
    """The code values as float32 ``K``: the integers, or the 4-bit codes looked up in the map."""
    if self.table is None:
      return self.codes.astype(jnp.float32)
    nib = unpack4(self.codes).astype(jnp.int32)
    table = self.table.astype(jnp.float32)
    if table.ndim == 1:
      return jnp.take(table, nib, axis=0)
    lead = table.shape[:-1]  # one map per stacked layer
    flat = jnp.take_along_axis(jnp.reshape(table, (-1, 16)),
                               jnp.reshape(nib, (math.prod(lead), -1)), axis=1)
    return jnp.reshape(flat, nib.shape)

  def dequantize(self, dtype=None):
    """The float kernel ``K``: computed in float32, returned in ``dtype`` (default: its own)."""
    return expand(self.values(), self.float_scale()).astype(dtype or self.dtype)

  def astype(self, dtype):
    return self.dequantize(dtype)

  def tied(self, anchor) -> "Quantized":
    """The same leaves with an exact zero computed from ``anchor`` added to the codes.

    ``0 · nan_to_num(v)`` is 0 for every float ``v``, and XLA does not fold a float product
    with 0 (IEEE), so the codes now depend on ``anchor``: the dequantization cannot run
    before ``anchor`` exists, and two dequantizations tied to different anchors are not one
    expression. ``v`` is a small *reduction* of ``anchor``: a scalar slice instead was fused
    into the unpacking of the codes and recomputed once per code (measured: a 4-bit step
    2.8x slower).
    """
    v = jnp.max(jnp.reshape(anchor, (-1,))[:128])
    zero = (0.0 * jnp.nan_to_num(v.astype(jnp.float32))).astype(self.codes.dtype)
    return dataclasses.replace(self, codes=self.codes + zero)


def is_quantized(x) -> bool:
  return isinstance(x, Quantized)


# ---------------------------------------------------------------------------
# Quantizing one array.


def quantize_array(w, in_axes, *, n_stack: int, bits: int, kind: str,
                   group_size: int | None, double_quant: bool) -> Quantized:
  """Symmetric absmax quantization of one float kernel (arguments already validated).

  Args:
    w: float ``K``.
    in_axes: the input axes of ``K``; each block lies within them, so every output
      channel of every layer has its own scales.
    n_stack: the number of leading stack axes (each layer gets its own map and offsets).
    bits: 8 (codes in [-127, 127]) or 4 (int4 codes in [-7, 7], or NF4).
    kind: ``"int"`` or ``"nf4"``.
    group_size: ``None`` for one scale per output channel, else one per ``group_size``
      consecutive elements of the flattened input axes.
    double_quant: quantize the scales too (``_double_quantize``).

  Returns:
    The ``Quantized`` leaves. Each element's error is at most half a step: ``scale / 2``
    for int, and half the widest NF4 gap (0.152) times the scale for NF4. Scales are
    ``absmax · (1/qmax)`` written as a product: XLA:CPU turns a division by a constant into
    that product anyway (1 ulp from IEEE division on ~4% of values), so writing it out keeps
    NumPy references exact. The codes divide by the stored scale, rounded to the kernel's dtype.
  """
  dtype = w.dtype
  x = jnp.asarray(w, jnp.float32)
  shape = x.shape
  if group_size is None:
    block = tuple(shape[k] if k in in_axes else 1 for k in range(x.ndim))
  else:
    block = block_shape(shape, in_axes, group_size)
  top = 1.0 if kind == "nf4" else float(2 ** (bits - 1) - 1)
  scale = (_block_absmax(x, block) * np.float32(1.0 / top)).astype(dtype)
  wide = scale.astype(jnp.float32)
  y = expand(x, jnp.where(wide == 0, 1.0, wide), divide=True)
  if kind == "nf4":
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    codes = jnp.searchsorted(mids, y, side="left").astype(jnp.uint8)  # the nearest NF4 value
  else:
    codes = jnp.clip(jnp.round(y), -top, top).astype(jnp.int8)
  table = None
  if bits == 4:
    codes = pack4(codes.astype(jnp.uint8) & 0xF)   # int4 as two's-complement nibbles
    values = NF4 if kind == "nf4" else INT4
    table = jnp.broadcast_to(jnp.asarray(values), shape[:n_stack] + (16,))
  q = Quantized(codes, scale, table)
  return _double_quantize(q, n_stack) if double_quant else q


def _double_quantize(q: Quantized, n_stack: int) -> Quantized:
  """QLoRA's double quantization: int8 codes of ``scale - mean`` (per stacked layer) in
  blocks of ``DQ_BLOCK`` scales, each block with a float scale of its own."""
  dtype = q.scale.dtype
  scale = q.scale.astype(jnp.float32)
  rest = tuple(range(n_stack, scale.ndim))
  offset = jnp.mean(scale, axis=rest, keepdims=True)
  centered = scale - offset
  n = math.prod(scale.shape[k] for k in rest)
  block = block_shape(scale.shape, rest, min(DQ_BLOCK, n)) or block_shape(scale.shape, rest, n)
  s2 = (_block_absmax(centered, block) * np.float32(1 / 127)).astype(dtype)
  wide = s2.astype(jnp.float32)
  codes = jnp.round(expand(centered, jnp.where(wide == 0, 1.0, wide), divide=True))
  return dataclasses.replace(q, scale=jnp.clip(codes, -127, 127).astype(jnp.int8),
                             dq_scale=s2, dq_offset=offset.astype(dtype))


# ---------------------------------------------------------------------------
# Quantized kernels in a tree.


def role_paths(kernel_path: Path) -> dict[str, Path]:
  """``{role: path}`` of every possible sibling leaf of a quantized kernel."""
  if not isinstance(kernel_path[-1], str):
    return {}
  return {r: kernel_path[:-1] + (tree_lib.sibling(kernel_path[-1], r),) for r in ROLES}


def find(flat: Mapping[Path, Any]) -> dict[Path, dict[str, Path]]:
  """``{kernel path: {role: leaf path}}`` of every quantized kernel in a flat view.

  A kernel is quantized when its leaf holds integers and a ``quant_scale`` sibling stands
  beside it; the other roles are taken where present.

  Raises:
    ValueError: one leaf would belong to two kernels.
  """
  out: dict[Path, dict[str, Path]] = {}
  owner: dict[Path, Path] = {}
  for path, leaf in flat.items():
    if not path:
      continue
    roles = {r: p for r, p in role_paths(path).items() if p in flat}
    if SCALE not in roles or not jnp.issubdtype(_dtype(leaf), jnp.integer):
      continue
    for p in roles.values():
      other = owner.setdefault(p, path)
      if other != path:
        raise ValueError(f"the leaf {path_str(p)!r} would be the quantization leaf of both"
                         f" {path_str(other)!r} and {path_str(path)!r}.")
    out[path] = roles
  return out


def _dtype(leaf):
  return getattr(tree_lib.value(leaf), "dtype", np.dtype(np.float64))


def read(flat: Mapping[Path, Any], kernel_path: Path, roles: Mapping[str, Path]) -> Quantized:
  """The ``Quantized`` kernel at ``kernel_path`` (arrays unwrapped), its layout checked.

  Raises:
    ValueError: the leaves do not fit together, naming the path and the shapes.
  """
  get = lambda r: tree_lib.value(flat[roles[r]]) if r in roles else None
  q = Quantized(tree_lib.value(flat[kernel_path]), get(SCALE), get(MAP), get(DQ_SCALE),
                get(DQ_OFFSET))
  check(q, path_str(kernel_path))
  return q


def check(q: Quantized, name: str) -> None:
  """Raise ``ValueError`` unless the leaves of ``q`` form one quantized kernel."""
  shape = q.shape
  what = ", ".join(f"{r} {np.shape(v)}" for r, v in q.leaves().items())

  def fits(arr, of):
    return np.ndim(arr) == len(of) and all(s and d % s == 0 for d, s in zip(of, np.shape(arr)))
  packed_ok = q.table is None or np.dtype(q.codes.dtype) == np.uint8
  table_ok = q.table is None or (np.shape(q.table)[-1:] == (16,)
                                 and tuple(np.shape(q.table)[:-1]) == shape[:np.ndim(q.table) - 1])
  dq = (q.dq_scale is None) == (q.dq_offset is None)
  scale_ok = fits(q.scale, shape) and (q.dq_scale is None or (
      fits(q.dq_scale, np.shape(q.scale)) and fits(q.dq_offset, np.shape(q.scale))))
  float_ok = jnp.issubdtype(q.dtype, jnp.floating) and (
      q.dq_scale is not None or jnp.issubdtype(q.scale.dtype, jnp.floating))
  if not (packed_ok and table_ok and dq and scale_ok and float_ok):
    raise ValueError(
        f"the quantized kernel {name!r} has leaves that do not fit together: codes"
        f" {np.shape(q.codes)} {np.dtype(q.codes.dtype)}, {what}. Expected int8 codes K (or"
        " uint8 codes K[:-1] + (K[-1] // 2,) with a quant_map S + (16,)), and float scales of"
        " K's rank whose sizes divide K's (int8 quant_scale with quant_dq_scale and"
        " quant_dq_offset under double quantization); jlora.quantize writes this layout.")


def read_kernel(flat: Mapping[Path, Any], path: Path):
  """The kernel at ``path``: a ``Quantized`` when it is quantized, else its array."""
  roles = {r: p for r, p in role_paths(path).items() if p in flat} if path else {}
  if SCALE in roles and jnp.issubdtype(_dtype(flat[path]), jnp.integer):
    return read(flat, path, roles)
  return tree_lib.value(flat[path])


def to_leaves(kernel_path: Path, like, kernel) -> dict[Path, Any]:
  """``{path: leaf}`` storing ``kernel`` (a ``Quantized`` or an array) at ``kernel_path``:
  the codes in place, stored the way ``like`` is (in its ``nnx.Variable`` for NNX), and the
  sibling leaves beside them (plain ``nnx.Variable``s for NNX)."""
  if not is_quantized(kernel):
    return {kernel_path: tree_lib.rewrap(like, kernel)}
  wrap = (lambda a: nnx.Variable(a)) if tree_lib.is_variable(like) else (lambda a: a)
  paths = role_paths(kernel_path)
  return {kernel_path: tree_lib.rewrap(like, kernel.codes),
          **{paths[r]: wrap(a) for r, a in kernel.leaves().items()}}


def float_view(flat: Mapping[Path, Any]) -> dict[Path, Any]:
  """``flat`` as the float model sees it: each quantized kernel a ``jax.ShapeDtypeStruct``
  of its float shape and dtype (in its ``nnx.Variable`` where it had one), and its sibling
  leaves dropped. Target selection, split reading and tracing run on this view."""
  found = find(flat)
  gone = tree_lib.owned(found)
  out = {}
  for p, leaf in flat.items():
    if p in gone:
      continue
    if p in found:
      q = read(flat, p, found[p])
      leaf = tree_lib.rewrap(leaf, jax.ShapeDtypeStruct(q.shape, q.dtype))
    out[p] = leaf
  return out


# ---------------------------------------------------------------------------
# The frozen product.


def frozen_product(op, view, x, q: Quantized):
  """``op(x, view(dequantize(q)))`` for an ``op`` linear in ``x``, with no weight gradient.

  Args:
    op: ``(x, w) -> y``, linear in ``x`` (a ``dot_general`` or a convolution).
    view: ``K``-shaped float32 array -> the ``w`` that ``op`` takes (a reshape or a
      transpose, and the program's dtype).
    x: the activation.
    q: the stored leaves, exactly as they came in.

  Plain autodiff of ``op(x, dequantize(q))`` keeps the dequantized float kernel as the
  residual of ``op``'s transpose. Under ``lax.scan`` that stacks every layer's float kernel
  for the backward pass, more memory than a float32 base (measured: 3421 KiB against
  2901 KiB on a toy); in unrolled code XLA:CPU hoists every layer's dequantization to the
  start. Here the only residuals are ``q``'s own leaves; the backward pass dequantizes
  again for ``dx``. ``q`` must come in as stored, every reshape inside: under ``lax.scan`` a
  residual that is a body input (a slice of the stacked leaves) is forwarded without a
  copy, and anything computed from it outside would be a new residual, stacked over
  layers. Both dequantizations are tied (``Quantized.tied``) to the data they meet, ``x``
  forward and the cotangent backward, so each runs right before its use.
  """
  return _frozen(op, view, jax.ShapeDtypeStruct(np.shape(x), x.dtype), x, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _frozen(op, view, x_aval, x, q):
  return op(x, view(q.tied(x).dequantize(jnp.float32)))


def _frozen_fwd(op, view, x_aval, x, q):
  return _frozen(op, view, x_aval, x, q), q


def _frozen_bwd(op, view, x_aval, q, g):
  w = view(q.tied(g).dequantize(jnp.float32))
  (dx,) = jax.linear_transpose(lambda x: op(x, w), x_aval)(g)
  return dx, None


_frozen.defvjp(_frozen_fwd, _frozen_bwd)

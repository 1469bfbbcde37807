"""``jlora.quantize``: a QLoRA base, with targeted float kernels stored as integers.

The storage format, and why it is what it is, is in ``jlora.quant``. Every function
of jlora accepts the result: ``init`` adds adapters to quantized kernels as it does to
float ones, ``lora`` dequantizes inside each product, one layer at a time (and runs a
quantized model with no adapters too), ``merge`` returns the float model, and
``partition`` leaves the quantization leaves in the base, so the adapter tree that is
saved and shipped holds no base weights.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jlora import adapter as adapter_lib
from jlora import quant
from jlora import sharding as sharding_lib
from jlora import split as split_lib
from jlora import targets as targets_lib
from jlora import tree as tree_lib
from jlora.config import LoraConfig, Selector
from jlora.tree import path_str


def quantize(params, targets: Selector = r"kernel$", *, bits: int = 8,
             group_size: int | None = None, kind: str = "int", double_quant: bool = False,
             exclude: Selector | None = None, in_axes=None, stack_axes=None, fn=None, args=(),
             kwargs=None):
  """Returns ``params`` with the targeted float kernels quantized (QLoRA's frozen base).

  Each kernel is replaced in place by its integer codes, with its scales (and, for 4
  bits, its code book) as sibling leaves (``jlora.quant``). Scales are symmetric absmax
  over blocks of the kernel's input axes, so every output channel of every stacked layer
  has its own.

  Args:
    params: a linen variables dict, an ``nnx.State`` or a nested dict of arrays; it is
      not modified. It may hold adapters: an adapted kernel keeps its adapter and is
      split as the adapter says.
    targets, exclude: which kernels, in any ``LoraConfig`` selector form (a regex searched
      in the ``/``-joined path, module names, or a predicate).
    bits: 8 (int8 codes, one scale per output channel by default) or 4 (two codes per
      byte, groups of ``group_size`` inputs).
    group_size: one scale per this many consecutive elements of a kernel's flattened input
      axes; ``None`` means one per output channel for 8 bits and 64 for 4 bits.
    kind: ``"int"`` (symmetric integers) or ``"nf4"`` (QLoRA's 4-bit NormalFloat; needs
      ``bits=4``).
    double_quant: quantize the scales too (QLoRA's double quantization: int8 scales in
      blocks of 256 with one float scale each, about 0.13 instead of 0.5 bits per weight
      at groups of 64).
    in_axes, stack_axes: ``{regex: n}`` split overrides, as in ``LoraConfig``.
    fn, args, kwargs: optionally the model function and example inputs, to read each
      kernel's in/out split from the model, as ``jlora.init`` does. Pass the same split
      ``init`` will use: a kernel's stacked-layer axes (``nn.scan``) must be per-layer
      here too.

  Returns:
    A new tree. Pass it to ``jlora.init`` and then train with ``jlora.lora(fn)`` inside
    a jitted step (``jlora.train_step``), with the params as an *argument* of the jitted
    function. Closed over, they are constants of the compiled program: the executable
    holds the weights and is rebuilt for every new base, and XLA folds the dequantization
    of constants back into float kernels (measured: plain ``x @ dequantize(q)`` over four
    closed-over 256 x 256 int8 kernels compiles to 1 MiB of float32 constants; under
    ``jlora.lora``, whose dequantization waits for the activations, they stay int8).

  Raises:
    ValueError: ``bits``, ``kind``, ``group_size`` or ``double_quant`` out of range; no
      kernel matched; a kernel that is already quantized; a group size that does not
      tile a kernel's input axes; an odd last axis with 4 bits; a sibling leaf name that
      is taken. Every message names the path.
    TypeError: a non-float kernel.
  """
  if bits not in (4, 8) or isinstance(bits, bool):
    raise ValueError(f"bits must be 4 or 8; got {bits!r}.")
  if kind not in ("int", "nf4"):
    raise ValueError(f"kind must be 'int' or 'nf4'; got {kind!r}.")
  if kind == "nf4" and bits != 4:
    raise ValueError("kind='nf4' is a 4-bit format; pass bits=4.")
  if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                 or group_size < 1):
    raise ValueError(f"group_size must be an int >= 1 or None; got {group_size!r}.")
  if not isinstance(double_quant, bool):
    raise ValueError(f"double_quant must be True or False; got {double_quant!r}.")
  group = 64 if bits == 4 and group_size is None else group_size
  sel = LoraConfig(rank=1, targets=targets, exclude=exclude, in_axes=in_axes,
                   stack_axes=stack_axes)  # validates the selectors and patterns
  flat = tree_lib.flatten(params)
  # Already-quantized kernels appear as the float kernels they stand for, to be refused.
  view = quant.float_view(flat)
  adapted = {ad.path: ad for ad in adapter_lib.iter_adapters(flat)}
  seen = {}
  if fn is not None:
    owned = adapter_lib.adapter_leaf_paths(flat)
    seen = split_lib.read(fn, tree_lib.unflatten(
        {p: v for p, v in view.items() if p not in owned}, params), args, kwargs)
  qfound = quant.find(flat)
  plan = []
  for p in targets_lib.match(view, sel, ("in_axes", "stack_axes")):
    plan.append((p, _split(p, flat, view, sel, seen, adapted, qfound, bits, group)))
  out = dict(flat)
  for p, split in plan:
    w = tree_lib.value(flat[p])
    q = quant.quantize_array(w, split.in_axes(np.ndim(w)), n_stack=split.n_stack, bits=bits,
                             kind=kind, group_size=group, double_quant=double_quant)
    q = _placed_like(w, q)
    out.update(quant.to_leaves(p, flat[p], q))
  return tree_lib.unflatten(out, params)


def _placed_like(w, q: quant.Quantized) -> quant.Quantized:
  """``q``'s arrays placed like the kernel ``w`` they came from, where ``w`` is a committed
  array (``sharding.kept_axes``: codes and scales keep the kernel's spec entries)."""
  s = sharding_lib.carried(w)
  if s is None or isinstance(w, jax.core.Tracer):
    return q
  put = lambda x: jax.device_put(x, sharding_lib.kept_axes(s, np.shape(w), np.shape(x)))
  return jax.tree.map(put, q)


def _split(p, flat, view, sel, seen, adapted, qfound, bits: int, group: int | None):
  """The split of one targeted kernel, after every check on it (nothing is built yet)."""
  name = path_str(p)
  arr = tree_lib.value(view[p])
  shape, dtype = tuple(np.shape(arr)), arr.dtype
  if p in qfound:
    raise ValueError(
        f"kernel {name!r} is already quantized (it holds {np.dtype(_dtype(flat[p]))} codes"
        f" with a {path_str(qfound[p][quant.SCALE])!r} beside it). Quantize the float tree,"
        " or exclude it with `exclude=`; jlora.merge(params) gives the float tree back.")
  if not targets_lib.is_float(dtype):
    raise TypeError(f"kernel {name!r} has dtype {dtype}; only float kernels can be quantized."
                    " Exclude it with `exclude=`.")
  if len(shape) < 2:
    raise ValueError(f"leaf {name!r} has shape {shape}; only kernels with at least 2 axes are"
                     " quantized. Narrow `targets` so it selects kernels only.")
  taken = [path_str(r) for r in quant.role_paths(p).values() if r in flat]
  if not isinstance(p[-1], str) or taken:
    raise ValueError(
        f"kernel {name!r} cannot be quantized: its scales go in sibling leaves named after"
        f" it (`quant_scale` beside `kernel`, else `<name>_quant_scale`), and "
        + (f"the tree already has {taken}." if taken else f"its key {p[-1]!r} is not a string.")
        + " Rename them, or exclude this kernel.")
  split = adapted[p].split if p in adapted else targets_lib.split_for(p, shape, sel, seen.get(p))[0]
  ins = split.in_axes(len(shape))
  if group is not None and quant.block_shape(shape, ins, group) is None:
    sizes = tuple(shape[k] for k in ins)
    raise ValueError(
        f"kernel {name!r} of shape {shape}: group_size {group} does not tile its input axes"
        f" {sizes} (flattened {math.prod(sizes)}). A group is a run of consecutive inputs,"
        f" so it must divide the last input axis ({sizes[-1]}) or be a multiple of it that"
        " divides the flattened size. Pass such a group_size"
        + (", or group_size=None for one scale per output channel." if bits == 8 else "."))
  if bits == 4 and shape[-1] % 2:
    raise ValueError(
        f"kernel {name!r} of shape {shape}: 4-bit codes are packed in pairs along the last"
        f" axis, which has odd size {shape[-1]}. Use bits=8, or exclude this kernel.")
  return split


def _dtype(leaf):
  return tree_lib.value(leaf).dtype

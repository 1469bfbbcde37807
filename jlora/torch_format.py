"""The PyTorch side of adapter files: layouts, module names and safetensors.

PEFT (``lora_A``/``lora_B``) and kohya (``lora_down``/``lora_up``) files store the
adapter of one torch module in the same layouts (checked against peft 0.21.2 and
diffusers 0.39.0):

=============  ======================  ====================  ==========================
kind           A                       B                     torch module (weight)
=============  ======================  ====================  ==========================
``linear``     ``(r, fan_in)``         ``(fan_out, r)``      ``nn.Linear`` (out, in);
                                                             GPT-2 ``Conv1D`` (in, out)
``conv``       ``(r, c_in, *window)``  ``(c_out, r, 1...)``  ``nn.ConvNd`` (out, c_in, *window)
``embedding``  ``(r, num)``            ``(dim, r)``          ``nn.Embedding`` (num, dim)
=============  ======================  ====================  ==========================

with ``delta = scale · B @ A`` (A flattened over its trailing axes in this order).
The file does not depend on how the base weight is stored: GPT-2's ``Conv1D``
keeps its weight ``(in, out)`` and PEFT transposes the delta when it merges
(``fan_in_fan_out``, which PEFT re-decides per module from the base layer).

jlora lays A and B out like the kernel (``adapter.Split``); on the canonical
matrices ``A₂ (fan_in, r)`` and ``B₂ (r, fan_out)`` a linear or embedding file
holds ``A = A₂ᵀ`` and ``B = B₂ᵀ``, for an input-first kernel ``(in, out)`` (a Flax
Dense, or a GPT-2 ``Conv1D`` weight used as is: PEFT's ``fan_in_fan_out=True``)
and an output-first one ``(out, in)`` (a torch ``Linear`` weight used as
``x @ W.T``: ``fan_in_fan_out=False``) alike. Convolutions order the input axes
differently: a Flax kernel is ``(*window, c_in, c_out)`` (input-first, channels
last among the inputs) and a torch weight used as is ``(c_out, c_in, *window)``
(output-first, channels first); the file always has torch's ``(c_in, *window)``.

Module names: an adapter of the kernel at ``("params", "attn", "query",
"kernel")`` belongs to the module ``"params/attn/query"`` (the path without its
leaf name), and a ``key_map`` (a dict or a callable) maps that name to the file's
name. A stacked adapter (``nn.scan``) is one module per layer, named
``"<module>/<i>"`` (``"<module>/<i>/<j>"`` for two stack axes), which a
``key_map`` must place, e.g. ``lambda m: re.sub(r"^params/layers/(.*)/(\\d+)$",
r"layers.\\2.\\1", m).replace("/", ".")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jlora import adapter as adapter_lib
from jlora import quant
from jlora import tree as tree_lib
from jlora.adapter import Adapter, Split
from jlora.attach import Loaded
from jlora.targets import _first_match  # kinds work like LoraConfig's patterns
from jlora.tree import Path, path_str

KINDS = ("linear", "conv", "embedding")
#: ``{module name: file name}``, or a callable ``module name -> file name or None``.
KeyMap = Mapping[str, str] | Callable[[str], str | None] | None


class TorchAdapter(NamedTuple):
  """The adapter of one torch module, in the file's layouts (see the module docstring).

  ``a``: ``(r, fan_in)`` or ``(r, c_in, *window)``; ``b``: ``(fan_out, r)`` or
  ``(c_out, r, 1, ...)``; ``scale``: the factor of ``B @ A``; ``m``: the DoRA
  magnitude ``(fan_out,)`` or None.
  """
  kind: str
  a: Any
  b: Any
  scale: float
  m: Any = None

  @property
  def rank(self) -> int:
    return int(np.shape(self.a)[0])

  @property
  def fan_out(self) -> int:
    return int(np.shape(self.b)[0])

  def describe(self) -> str:
    return f"A {tuple(np.shape(self.a))}, B {tuple(np.shape(self.b))}"


def check_tensors(name: str, t: TorchAdapter) -> None:
  """Raises ``ValueError`` naming the module when A, B and m do not fit together."""
  a, b = np.shape(t.a), np.shape(t.b)
  if t.kind == "conv":
    ok = len(a) >= 3 and len(b) == len(a) and all(s == 1 for s in b[2:])
  else:
    ok = len(a) == 2 and len(b) == 2
  if not ok or b[1] != a[0]:
    raise ValueError(f"module {name!r}: the {t.kind} adapter has {t.describe()}, which do not"
                     " fit together (expected A (r, in) and B (out, r), or for a conv"
                     " A (r, c_in, *window) and B (out, r, 1, ...)).")
  if t.m is not None and np.shape(t.m) != (b[0],):
    raise ValueError(f"module {name!r}: the DoRA magnitude has shape {np.shape(t.m)}, not"
                     f" ({b[0]},).")


# ---------------------------------------------------------------------------
# One layer: jlora's canonical matrices <-> the file's layouts.


def to_torch(kind: str, split: Split, shape, a2, b2, scale: float, m=None) -> TorchAdapter:
  """The file's tensors from one (unstacked) layer's canonical ``A₂ (fan_in, r)``,
  ``B₂ (r, fan_out)`` for a kernel of ``shape`` with ``split`` (``n_stack`` 0)."""
  a2, b2 = np.asarray(a2), np.asarray(b2)
  r = a2.shape[-1]
  if kind != "conv":
    return TorchAdapter(kind, a2.T, b2.T, scale, m)
  _, ins, _ = split.shapes(shape)
  a = a2.reshape(ins + (r,))
  # torch wants (r, c_in, *window): channels first among the inputs, as in an
  # output-first (torch-layout) kernel; a Flax kernel has them last.
  a = np.moveaxis(a, -1, 0) if split.out_first else np.moveaxis(a, (-1, -2), (0, 1))
  return TorchAdapter(kind, a, b2.T.reshape((b2.shape[1], r) + (1,) * (len(ins) - 1)), scale, m)


def from_torch(t: TorchAdapter, split: Split, shape):
  """``(lora_a, lora_b, lora_m or None)`` laid out for one (unstacked) kernel of
  ``shape`` with ``split``; raises ``ValueError`` where the tensors do not fit."""
  a, b = np.asarray(t.a), np.asarray(t.b)
  r = t.rank
  _, ins, outs = split.shapes(shape)
  if t.kind == "conv":
    a = np.moveaxis(a, 0, -1) if split.out_first else np.moveaxis(a, (0, 1), (-1, -2))
    if a.shape[:-1] != ins:
      raise ValueError(f"its conv input axes {a.shape[:-1]} are not the kernel's {ins}")
  elif math.prod(a.shape[1:]) != math.prod(ins):
    raise ValueError(f"its fan-in {math.prod(a.shape[1:])} is not the kernel's {math.prod(ins)}")
  if t.fan_out != math.prod(outs):
    raise ValueError(f"its fan-out {t.fan_out} is not the kernel's {math.prod(outs)}")
  a2 = a.reshape(-1, r) if t.kind == "conv" else a.reshape(r, -1).T
  b2 = b.reshape(t.fan_out, r).T
  m = None if t.m is None else np.asarray(t.m).reshape(outs)
  return split.a_from_matrix(jnp.asarray(a2), shape), split.b_from_matrix(jnp.asarray(b2), shape), m


def split_from_shapes(shape, t: TorchAdapter) -> Split | None:
  """The split of an unstacked kernel that the file's tensors fit, input-first when
  both do (as ``adapter.read_split``); None when none fits."""
  shape = tuple(shape)
  nd = len(shape)
  if t.kind == "conv":
    c_in, window = np.shape(t.a)[1], tuple(np.shape(t.a)[2:])
    for split, want in ((Split(0, nd - 1, False), window + (c_in, t.fan_out)),
                        (Split(0, nd - 1, True), (t.fan_out, c_in) + window)):
      if shape == want:
        return split
    return None
  fan_in = math.prod(np.shape(t.a)[1:])
  for out_first in (False, True):
    for n_in in range(1, nd):
      split = Split(0, n_in, out_first)
      _, ins, outs = split.shapes(shape)
      if math.prod(ins) == fan_in and math.prod(outs) == t.fan_out:
        return split
  return None


# ---------------------------------------------------------------------------
# Module names.


def module_name(kernel_path: Path) -> str:
  """The ``/``-joined module path of a kernel: its path without the leaf name."""
  return path_str(kernel_path[:-1])


def layer_name(module: str, index: tuple) -> str:
  """``"<module>/<i>/<j>"`` for the layer ``index`` of a stacked adapter."""
  return module + "".join(f"/{i}" for i in index)


def dotted(module: str) -> str:
  """PEFT's default name: a leading ``params`` dropped, ``/`` turned into ``.``."""
  parts = module.split("/")
  return ".".join(parts[1:] if parts[0] == "params" and len(parts) > 1 else parts)


def mapper(key_map: KeyMap, default: Callable[[str], str]) -> Callable[[str], str | None]:
  """``key_map`` as a function; a dict falls back to ``default`` for names it lacks."""
  if key_map is None:
    return default
  if isinstance(key_map, Mapping):
    return lambda n: key_map[n] if n in key_map else default(n)
  if callable(key_map):
    return key_map
  raise TypeError(f"key_map must be a dict, a callable or None; got {type(key_map).__name__}.")


def kind_of(ad: Adapter, kinds: Mapping[str, str] | None = None) -> str:
  """The torch module an adapted kernel stands for.

  ``kinds`` (``{regex: kind}``, searched in the kernel path, first match wins)
  decides; otherwise a kernel named ``embedding`` is an ``nn.Embedding``, one
  with several input axes and one output axis a convolution (a Flax Conv kernel
  ``(*window, c_in, c_out)`` or a torch one ``(c_out, c_in, *window)``), and every
  other kernel a ``nn.Linear`` over its flattened axes. A Flax attention
  out-projection ``(heads, head_dim, d)`` is a Linear in torch: say so with
  ``kinds={"out/kernel$": "linear"}``.
  """
  kind = _first_match(kinds, ad.name)
  if kind is None:
    kind = ("embedding" if ad.path[-1] == "embedding" else
            "conv" if ad.n_in >= 2 and ad.n_out == 1 else "linear")
  if kind not in KINDS:
    raise ValueError(f"kinds gives {kind!r} for {ad.name!r}; it must be one of {KINDS}.")
  if (kind == "conv" and not (ad.n_in >= 2 and ad.n_out == 1)) or (
      kind == "embedding" and ad.n_in != 1):
    _, ins, outs = ad.shapes
    raise ValueError(f"the kernel {ad.name!r} (inputs {ins}, outputs {outs}) cannot be a torch"
                     f" {kind}: a conv has a window and c_in as inputs and one output axis,"
                     " an embedding one input axis.")
  return kind


# ---------------------------------------------------------------------------
# Whole trees.


def export(params, key_map: KeyMap, default: Callable[[str], str],
           kinds: Mapping[str, str] | None = None) -> dict[str, TorchAdapter]:
  """``{file module name: TorchAdapter}`` for every adapter (every layer) of ``params``.

  A residual adapter (PiSSA, OLoRA; see ``jlora.init``) becomes a plain one of rank
  ``2r`` and scale 1 for the original base, as PEFT converts them:
  ``s·A@B - A0@B0 = [s·A | -A0] @ [B ; B0]``.

  Raises:
    ValueError: no adapters; a stacked adapter without a ``key_map`` entry for
      its layers; two adapters mapped to one name; a kernel that fits no torch
      module (see ``kind_of``).
  """
  to = mapper(key_map, default)
  flat = tree_lib.flatten(params)
  found = adapter_lib.find(flat)
  if not found:
    raise ValueError("params has no adapters to export; call jlora.init(key, params, cfg) first.")
  out: dict[str, TorchAdapter] = {}
  source: dict[str, str] = {}
  for kp, roles in found.items():
    ad = adapter_lib.read(flat, kp, roles)
    kind = kind_of(ad, kinds)
    residual = [tree_lib.value(flat[roles[r]]) for r in adapter_lib.RESIDUAL_ROLES if r in roles]
    stack = ad.shapes[0]
    for index in np.ndindex(stack):
      name = layer_name(module_name(kp), index)
      if stack and (key_map is None or (isinstance(key_map, Mapping) and name not in key_map)):
        raise ValueError(
            f"the adapter of {ad.name!r} is stacked ({stack} layers, nn.scan); its layers are"
            f" the modules {name!r} ... and need a key_map that places the layer index in"
            " the torch name, e.g. key_map=lambda m: re.sub(r'^params/layers/(.*)/(\\d+)$',"
            " r'layers.\\2.\\1', m).replace('/', '.').")
      target = to(name)
      if not isinstance(target, str) or not target:
        raise ValueError(f"key_map gives {target!r} for the module {name!r}; it needs a name.")
      if target in out:
        raise ValueError(f"the modules {source[target]!r} and {name!r} both map to {target!r};"
                         " fix the key_map.")
      out[target], source[target] = _layer_to_torch(ad, residual, index, kind), name
  return out


def _layer_to_torch(ad: Adapter, residual: list, index: tuple, kind: str) -> TorchAdapter:
  split = ad.split
  a2 = np.asarray(split.a_matrix(jnp.asarray(ad.a)))[index]
  b2 = np.asarray(split.b_matrix(jnp.asarray(ad.b)))[index]
  s = float(np.asarray(ad.scale)[index])
  if residual:
    dt = np.promote_types(a2.dtype, np.float32)
    a0 = np.asarray(split.a_matrix(jnp.asarray(residual[0])))[index]
    b0 = np.asarray(split.b_matrix(jnp.asarray(residual[1])))[index]
    a2 = np.concatenate([s * a2.astype(dt), -a0.astype(dt)], axis=-1)
    b2 = np.concatenate([b2.astype(dt), b0.astype(dt)], axis=-2)
    s = 1.0
  m = None if ad.m is None else np.asarray(ad.m)[index].reshape(-1)
  single = Split(0, split.n_in, split.out_first)
  return to_torch(kind, single, np.shape(ad.kernel)[split.n_stack:], a2, b2, s, m)


def _candidates(flat, found) -> dict[str, Path | None]:
  """``{module name: kernel path}`` of the leaves a file may adapt: adapted
  kernels, and float (or quantized) leaves with 2+ axes (a module's ``kernel``/``embedding``
  before others; None where a module has several other such leaves)."""
  owned = tree_lib.owned(found)
  out: dict[str, Path | None] = {module_name(kp): kp for kp in found}
  fixed = set(out)
  # a quantized kernel counts as the float kernel it stands for; its scales do not count
  for p, leaf in quant.float_view(flat).items():
    arr = tree_lib.value(leaf)
    if (p in owned or p in found or len(getattr(arr, "shape", np.shape(arr))) < 2
        or not jnp.issubdtype(arr.dtype, jnp.floating)):
      continue
    name = module_name(p)
    if name in fixed:
      continue
    bare = p[-1] in adapter_lib.BARE_KERNEL_NAMES
    if name not in out:
      out[name] = p
    elif bare:
      out[name], fixed = p, fixed | {name}
    elif out[name] is not None and out[name][-1] not in adapter_lib.BARE_KERNEL_NAMES:
      out[name] = None
  return out


def import_(params, modules: Mapping[str, TorchAdapter], lookup: Callable[[str], list],
            what: str) -> tuple[list[Loaded], list[str]]:
  """Matches file modules to the kernels of ``params`` and converts them.

  Args:
    params: the base, or an adapted tree (its adapters give the layouts, stack
      axes included; see ``jlora.attach``).
    modules: ``{file module name: TorchAdapter}``.
    lookup: a jlora module name (or layer name ``"<module>/<i>"``) -> the file
      module names it matches.
    what: the file, for messages.

  Returns:
    ``(loaded, unmatched)``: one ``Loaded`` per adapted kernel, and the file
    modules that matched no kernel. Without an adapted template a kernel is
    stacked when its layer names ``"<module>/0"``... match (one stack axis, all
    layers present).

  Raises:
    ValueError: a file module matches two kernels, a kernel matches two file
      modules, a stacked kernel misses layers, or the tensors do not fit the
      kernel (the message names both shapes).
  """
  flat = tree_lib.flatten(params)
  found = adapter_lib.find(flat)
  used: dict[str, str] = {}
  loaded = []
  for module, kp in _candidates(flat, found).items():
    layers = _layers(module, kp, flat, found, modules, lookup, what)
    if not layers:
      continue
    if kp is None:
      raise ValueError(f"{what}: the module {module!r} has several 2-D leaves, and the file"
                       f" adapts {sorted(layers.values())[0]!r}; load onto an adapted tree"
                       " (jlora.init with the kernel as target) to say which leaf it is.")
    for f in layers.values():
      if f in used:
        raise ValueError(f"{what}: the file module {f!r} matches both {used[f]!r} and"
                         f" {module!r}; pass a key_map that tells them apart.")
      used[f] = module
    loaded.append(_from_file(kp, flat, found, layers, modules, what))
  return loaded, [f for f in modules if f not in used]


def _one(hits: list, name: str, what: str):
  if len(hits) > 1:
    raise ValueError(f"{what}: the module {name!r} matches the file modules {sorted(hits)};"
                     " pass a key_map that tells them apart.")
  return hits[0] if hits else None


def _layers(module, kp, flat, found, modules, lookup, what) -> dict | None:
  """``{layer index: file module}`` of one candidate kernel, or None."""
  def find(name):
    return _one([h for h in lookup(name) if h in modules], name, what)

  stack = adapter_lib.read(flat, kp, found[kp]).shapes[0] if kp in found else ()
  if not stack:
    hit = find(module)
    if hit is not None:
      return {(): hit}
    shape = quant.read_kernel(flat, kp).shape if kp is not None and kp not in found else ()
    if len(shape) < 3 or find(layer_name(module, (0,))) is None:
      return None
    stack = shape[:1]  # a base kernel whose layers the file names: one stack axis
  hits = {i: find(layer_name(module, i)) for i in np.ndindex(stack)}
  missing = [layer_name(module, i) for i, h in hits.items() if h is None]
  if len(missing) == len(hits):
    return None
  if missing:
    raise ValueError(f"{what} adapts some layers of the stacked kernel {module!r} but not"
                     f" {missing[:3]}; every layer of a stack needs its adapter.")
  return hits


def _from_file(kp: Path, flat, found, layers: dict, modules, what: str) -> Loaded:
  w = quant.read_kernel(flat, kp)  # a quantized kernel as the float kernel it stands for
  tmpl = adapter_lib.read(flat, kp, found[kp]) if kp in found else None
  n_stack = len(next(iter(layers)))
  shape = tuple(np.shape(w))[n_stack:]
  per_layer = []
  for index, f in layers.items():
    t = modules[f]
    split = (Split(0, tmpl.split.n_in, tmpl.split.out_first) if tmpl is not None
             else split_from_shapes(shape, t))
    try:
      if split is None:
        raise ValueError("no in/out split of the kernel fits it")
      per_layer.append((from_torch(t, split, shape), t))
    except ValueError as e:
      raise ValueError(
          f"{what}: the {t.kind} adapter of {f!r} ({t.describe()}) does not fit the kernel"
          f" {path_str(kp)!r} of shape {tuple(np.shape(w))}: {e}. Pass the base it was made"
          " for, a key_map, or an adapted tree that shows the kernel's layout.") from None
  first = per_layer[0]
  for (arrays, t), f in zip(per_layer, layers.values()):
    if t.rank != first[1].rank or (t.m is None) != (first[1].m is None):
      raise ValueError(f"{what}: the layers of the stacked kernel {path_str(kp)!r} differ in"
                       f" rank or DoRA ({f!r} has rank {t.rank}); a stack needs one of each.")
  stack = tuple(np.shape(w))[:n_stack]
  join = lambda xs: jnp.stack(xs).reshape(stack + jnp.shape(xs[0])) if n_stack else xs[0]
  leaves = {"lora_a": join([x[0][0] for x in per_layer]),
            "lora_b": join([x[0][1] for x in per_layer]),
            "lora_scale": jnp.asarray(np.reshape([t.scale for _, t in per_layer], stack),
                                      jnp.float32)}
  if first[1].m is not None:
    leaves["lora_m"] = join([jnp.asarray(x[0][2]) for x in per_layer])
  return Loaded(kp, leaves)


# ---------------------------------------------------------------------------
# safetensors.


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``({key: array}, header metadata)`` of a ``.safetensors`` file, bfloat16 included."""
  from safetensors import safe_open
  with safe_open(str(path), framework="flax") as f:  # the numpy reader of older safetensors lacks bf16
    return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}, dict(f.metadata() or {})


def write_safetensors(path, tensors: Mapping[str, Any], header: Mapping[str, str]) -> None:
  """Writes ``tensors`` (contiguous copies) with the ``header`` metadata."""
  from safetensors.flax import save_file
  save_file({k: jnp.asarray(np.array(v, order="C")) for k, v in tensors.items()}, str(path),
            metadata=dict(header))

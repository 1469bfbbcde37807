"""Target selection and per-kernel settings: pure path and shape logic.

``select`` turns a ``LoraConfig`` and a flat params view into one ``Target`` per
kernel to adapt: its path, rank, scale and in/out split. Everything that can be
wrong with the request is checked here, before any array is built, so that
``jlora.init`` never returns a partial tree. Paths are tuples of the original
keys; selectors see their ``/``-joined names.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jlora import adapter as adapter_lib
from jlora import tree as tree_lib
from jlora.adapter import Split
from jlora.config import LoraConfig, Selector
from jlora.tree import Path, path_str

#: Flax MultiHeadDotProductAttention projections whose (d, heads, head_dim) kernel
#: has one input axis; every other kernel's default is "all axes but the last".
_MHA_QKV = re.compile(r"(^|/)(query|key|value)/kernel$")


class Target(NamedTuple):
  path: Path
  shape: tuple[int, ...]
  dtype: Any
  split: Split
  rank: int
  alpha: float | None
  scale: float
  kind: str  # "dense", "general", "conv", "einsum" or "embed"; embed changes the init

  @property
  def name(self) -> str:
    return path_str(self.path)


class Read(NamedTuple):
  """What the model showed about one kernel (``split.read``): its split, or, when
  the axes it contracts fit no adapter layout, ``split=None`` and a description."""
  split: Split | None
  kind: str
  why: str = ""


def matcher(sel: Selector) -> Callable[[str, Any], bool]:
  """A predicate ``(leaf name, leaf) -> bool`` for any selector form."""
  if callable(sel):
    return lambda p, leaf: bool(sel(p, leaf))
  if isinstance(sel, str):
    rx = re.compile(sel)
    return lambda p, leaf: rx.search(p) is not None
  names = [tuple(n.strip("/").split("/")) for n in sel]

  def by_name(p, leaf):
    # A name matches a module whose path ends with it (as in PEFT), and so every
    # leaf inside that module: ["attn"] reaches attn/query/kernel. A name may
    # also spell out the leaf itself: ["attn/query/kernel"].
    parts = tuple(p.split("/"))
    return any(_ends_within(parts[:-1], n) or parts[-len(n):] == n for n in names)
  return by_name


def _ends_within(parts: tuple, name: tuple) -> bool:
  return any(parts[k - len(name):k] == name for k in range(len(name), len(parts) + 1))


def _module_weights(flat, paths: list[Path]) -> list[Path]:
  """For module-name targets: a module's ``kernel``/``embedding``, or, in modules
  that have neither (plain dicts), every leaf. Attention biases are 2-D too."""
  modules = {p[:-1] for p in flat if p and p[-1] in adapter_lib.BARE_KERNEL_NAMES}
  return [p for p in paths if p[:-1] not in modules or p[-1] in adapter_lib.BARE_KERNEL_NAMES]


def _first_match(pattern: Mapping[str, Any] | None, name: str):
  for key, v in (pattern or {}).items():
    if re.search(key, name):
      return v
  return None


def is_float(dtype) -> bool:
  dt = np.dtype(dtype)
  return np.issubdtype(dt, np.floating) or dt.name == "bfloat16"


def _no_match_error(cfg: LoraConfig, flat) -> ValueError:
  cands = [path_str(p) for p, leaf in flat.items() if np.ndim(tree_lib.value(leaf)) >= 2]
  probe = cfg.targets if isinstance(cfg.targets, str) else (
      " ".join(cfg.targets) if not callable(cfg.targets) else "")
  near = difflib.get_close_matches(probe, cands, n=5, cutoff=0.0) if probe else cands[:5]
  return ValueError(
      f"targets={cfg.targets!r} matched no kernel"
      + (f" (after exclude={cfg.exclude!r})" if cfg.exclude is not None else "")
      + f". Kernels in this tree include: {near}. A regex is searched in the"
      " '/'-joined leaf path (e.g. r'attn/(query|value)/kernel$'); a list of names"
      " matches the module path exactly or as a suffix (e.g. ['query', 'value']).")


def override_split(name: str, ndim: int, cfg: LoraConfig, n_stack: int | None = None):
  """``cfg.stack_axes`` and ``cfg.in_axes`` for one kernel, or None where unset.

  Returns ``(n_stack, n_in, out_first)``; ``in_axes`` of ``-n`` means the last n axes.
  """
  stack = _first_match(cfg.stack_axes, name)
  n_in = _first_match(cfg.in_axes, name)
  if n_in is None:
    return stack, None, None
  return stack, abs(n_in), n_in < 0


def default_split(name: str, shape: tuple[int, ...], cfg: LoraConfig) -> Split:
  """The in/out split without a model to read it from.

  ``stack_axes`` and ``in_axes`` overrides first; otherwise Flax attention's q/k/v
  kernels ``(d, heads, head_dim)`` have one input axis and every other kernel has
  all axes but the last as inputs.
  """
  n_stack, n_in, out_first = override_split(name, len(shape), cfg)
  n_stack = n_stack or 0
  if n_in is None:
    body = len(shape) - n_stack
    n_in, out_first = (1 if (_MHA_QKV.search(name) and body == 3) else body - 1), False
  return Split(n_stack, n_in, out_first)


def match(flat: Mapping[Path, Any], cfg: LoraConfig, patterns=()) -> list[Path]:
  """The paths ``cfg.targets`` selects in ``flat`` (``cfg.exclude`` checked first).

  A regex or a list of module names skips leaves with fewer than 2 axes (biases, norm
  scales); module names pick a module's ``kernel``/``embedding``. ``patterns`` names
  ``cfg`` fields (``{regex: value}``) each of whose keys must match a selected path.

  Raises:
    ValueError: nothing matched (the message lists close candidates), or a pattern
      key matches no selected path.
  """
  want, drop = matcher(cfg.targets), (matcher(cfg.exclude) if cfg.exclude is not None else None)
  paths = []
  for p, leaf in flat.items():
    arr, name = tree_lib.value(leaf), path_str(p)
    if drop is not None and drop(name, arr):
      continue
    if not want(name, arr):
      continue
    if not callable(cfg.targets) and np.ndim(arr) < 2:
      continue  # a regex or a module name also reaches biases and norm scales
    paths.append(p)
  if not callable(cfg.targets) and not isinstance(cfg.targets, str):
    paths = _module_weights(flat, paths)
  if not paths:
    raise _no_match_error(cfg, flat)
  names = [path_str(p) for p in paths]
  for what in patterns:
    for key in getattr(cfg, what) or {}:
      if not any(re.search(key, n) for n in names):
        raise ValueError(
            f"{what} key {key!r} matches none of the targeted kernels {names[:8]}"
            f"{' ...' if len(names) > 8 else ''}; fix the regex or drop the key.")
  return paths


def select(flat: Mapping[Path, Any], cfg: LoraConfig,
           found: Mapping[Path, Read] | None = None) -> list[Target]:
  """The kernels ``cfg`` adapts, with their settings, validated.

  Args:
    flat: ``tree.flatten(params)``.
    cfg: the config.
    found: optional ``{path: Read}`` from the model (``split.read``);
      ``cfg.in_axes``/``cfg.stack_axes`` still override it.

  Raises:
    ValueError: for every request that cannot be honoured (see ``jlora.init``).
    TypeError: for non-float kernels.
  """
  already = adapter_lib.find(flat)
  if already:
    raise ValueError(
        f"this params tree already has adapters (e.g. on {path_str(next(iter(already)))!r})."
        " Pass the base tree to jlora.init: `adapter, base = jlora.partition(params)`,"
        " or `jlora.merge(params)` to fold the adapter in first.")
  paths = match(flat, cfg, ("rank_pattern", "alpha_pattern", "in_axes", "stack_axes"))
  names = [path_str(p) for p in paths]

  found = found or {}
  out = []
  for p, name in zip(paths, names):
    arr = tree_lib.value(flat[p])
    shape, dtype = tuple(np.shape(arr)), arr.dtype
    if not is_float(dtype):
      raise TypeError(f"kernel {name!r} has dtype {dtype}; LoRA needs a float kernel."
                      " Exclude it with `exclude=`.")
    if len(shape) < 2:
      raise ValueError(f"leaf {name!r} has shape {shape}; LoRA needs a kernel with at"
                       " least 2 axes. Narrow `targets` so it selects kernels only.")
    _check_free_names(p, flat)
    split, kind = split_for(p, shape, cfg, found.get(p))
    stack, ins, outs = split.shapes(shape)
    rank = _first_match(cfg.rank_pattern, name) or cfg.rank
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if rank > min(fan_in, fan_out):
      raise ValueError(
          f"rank {rank} for kernel {name!r} exceeds min(in, out) = min({fan_in}, {fan_out})"
          f" (in shape {ins}, out shape {outs}). Lower the rank, or give this path"
          " its own with `rank_pattern`.")
    if adapter_lib.is_ambiguous(split, shape, rank):
      raise ValueError(
          f"kernel {name!r} of shape {shape} is stored output-first, and a rank-{rank}"
          " adapter of it would have the shapes of an input-first one (rank equals"
          f" the fan-in or fan-out), so the tree could not say which it is. Use a"
          " rank below min(in, out); a full-rank adapter is a full fine-tune anyway.")
    alpha = _first_match(cfg.alpha_pattern, name)
    alpha = cfg.alpha if alpha is None else alpha
    out.append(Target(p, shape, dtype, split, rank, alpha, cfg.scale(rank, alpha), kind))
  return out


def _check_free_names(p: Path, flat) -> None:
  """The adapter leaves of ``p`` must not overwrite leaves the tree already has."""
  if p[-1] not in adapter_lib.BARE_KERNEL_NAMES and not isinstance(p[-1], str):
    raise ValueError(
        f"kernel {path_str(p)!r} sits under the key {p[-1]!r} (a list position, or a"
        " non-string dict key). Its adapter leaves are named after it"
        " (`<name>_lora_a`), so it needs a string key in a mapping; exclude it, or keep"
        " it in a dict.")
  taken = [path_str(q) for q in adapter_lib.role_paths(p).values() if q in flat]
  if taken:
    raise ValueError(
        f"kernel {path_str(p)!r} cannot get an adapter: the tree already has leaves at"
        f" {taken}, where its adapter leaves would go. Rename them, or exclude this kernel.")


def split_for(p: Path, shape, cfg: LoraConfig, seen: Read | None) -> tuple[Split, str]:
  """The in/out split of the kernel at ``p`` and a label of its kind: ``cfg.in_axes`` and
  ``cfg.stack_axes`` first, then what the model showed (``seen``), then the default rule.

  Raises:
    ValueError: the model's use fits no layout, or the split leaves no input or no
      output axis.
  """
  name = path_str(p)
  n_stack, n_in, out_first = override_split(name, len(shape), cfg)
  if seen is None:
    split = default_split(name, shape, cfg)  # applies the overrides itself
  elif seen.split is None and n_in is None:
    raise ValueError(
        f"kernel {name!r} of shape {shape}: {seen.why}, which no adapter layout can"
        " express (the input axes must be one block, right after the stack axes or at"
        f" the end). Set `in_axes={{{name!r}: n}}` (n < 0: the last -n axes) to choose"
        " a split anyway, or exclude this kernel.")
  else:  # the overrides still win over what the model showed
    base = seen.split or Split(0, 1)
    split = Split(base.n_stack if n_stack is None else n_stack,
                  base.n_in if n_in is None else n_in,
                  base.out_first if out_first is None else out_first)
  kind = seen.kind if seen is not None else None
  if kind is None:  # a label only; the model trace (``fn``) gives the real kind
    kind = ("embed" if p[-1] == "embedding" else
            "dense" if len(shape) - split.n_stack == 2 else "general")
  if split.n_in < 1 or len(split.shapes(shape)[2]) < 1:
    raise ValueError(
        f"kernel {name!r} of shape {tuple(shape)} has no valid in/out split (stack axes"
        f" {split.n_stack}, input axes {split.n_in}). Set"
        f" `in_axes={{{name!r}: n}}` (and `stack_axes` for nn.scan stacks).")
  return split, kind

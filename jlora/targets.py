"""Target selection and per-kernel settings: pure path and shape logic.

``select`` turns a ``LoraConfig`` and a flat params view into one ``Target`` per
kernel to adapt: its path, rank, scale and in/out split. Everything that can be
wrong with the request is checked here, before any array is built, so that
``jlora.init`` never returns a partial tree.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jlora import tree as tree_lib
from jlora.config import LoraConfig, Selector

#: Flax MultiHeadDotProductAttention projections whose (d, heads, head_dim) kernel
#: has one input axis; every other kernel's default is "all axes but the last".
_MHA_QKV = re.compile(r"(^|/)(query|key|value)/kernel$")


class Split(NamedTuple):
  """How a kernel's axes divide: ``shape = stack + in + out``."""
  n_stack: int
  n_in: int

  def shapes(self, shape: tuple[int, ...]):
    s, i = self.n_stack, self.n_stack + self.n_in
    return shape[:s], shape[s:i], shape[i:]


class Target(NamedTuple):
  path: str
  shape: tuple[int, ...]
  dtype: Any
  split: Split
  rank: int
  alpha: float | None
  scale: float
  kind: str  # "dense", "general", "conv", "einsum" or "embed"; embed changes the init

  @property
  def stack_shape(self):
    return self.split.shapes(self.shape)[0]

  @property
  def in_shape(self):
    return self.split.shapes(self.shape)[1]

  @property
  def out_shape(self):
    return self.split.shapes(self.shape)[2]


def matcher(sel: Selector) -> Callable[[str, Any], bool]:
  """A predicate ``(leaf_path, leaf) -> bool`` for any selector form."""
  if callable(sel):
    return lambda p, leaf: bool(sel(p, leaf))
  if isinstance(sel, str):
    rx = re.compile(sel)
    return lambda p, leaf: rx.search(p) is not None
  names = [tuple(n.strip("/").split("/")) for n in sel]

  def by_module(p, leaf):
    # A name matches a module whose path ends with it (as in PEFT), and so every
    # leaf inside that module: ["attn"] reaches attn/query/kernel.
    parts = tuple(p.split("/")[:-1])
    return any(parts[k - len(n):k] == n for n in names for k in range(len(n), len(parts) + 1))
  return by_module


def _module_weights(paths: list[str]) -> list[str]:
  """For module-name targets: a module's ``kernel``/``embedding``, or, in modules
  that have neither (plain dicts), every leaf. Attention biases are 2-D too."""
  modules = {tree_lib.split_leaf(p)[0] for p in paths
             if tree_lib.split_leaf(p)[1] in tree_lib.BARE_KERNEL_NAMES}
  return [p for p in paths if tree_lib.split_leaf(p)[0] not in modules
          or tree_lib.split_leaf(p)[1] in tree_lib.BARE_KERNEL_NAMES]


def _first_match(pattern: Mapping[str, Any] | None, path: str):
  for key, v in (pattern or {}).items():
    if re.search(key, path):
      return v
  return None


def _is_float(dtype) -> bool:
  dt = np.dtype(dtype)
  return np.issubdtype(dt, np.floating) or dt.name == "bfloat16"


def _candidates(flat) -> list[str]:
  return [p for p, leaf in flat.items()
          if not tree_lib.is_adapter_path(p) and np.ndim(tree_lib.value(leaf)) >= 2]


def _no_match_error(cfg: LoraConfig, flat) -> ValueError:
  cands = _candidates(flat)
  probe = cfg.targets if isinstance(cfg.targets, str) else (
      " ".join(cfg.targets) if not callable(cfg.targets) else "")
  near = difflib.get_close_matches(probe, cands, n=5, cutoff=0.0) if probe else cands[:5]
  return ValueError(
      f"targets={cfg.targets!r} matched no kernel"
      + (f" (after exclude={cfg.exclude!r})" if cfg.exclude is not None else "")
      + f". Kernels in this tree include: {near}. A regex is searched in the"
      " '/'-joined leaf path (e.g. r'attn/(query|value)/kernel$'); a list of names"
      " matches the module path exactly or as a suffix (e.g. ['query', 'value']).")


def default_split(path: str, shape: tuple[int, ...], cfg: LoraConfig) -> Split:
  """The in/out split without a model to read it from.

  ``stack_axes`` and ``in_axes`` overrides first; otherwise Flax attention's q/k/v
  kernels ``(d, heads, head_dim)`` have one input axis and every other kernel has
  all axes but the last as inputs.
  """
  n_stack = _first_match(cfg.stack_axes, path) or 0
  n_in = _first_match(cfg.in_axes, path)
  if n_in is None:
    body = len(shape) - n_stack
    n_in = 1 if (_MHA_QKV.search(path) and body == 3) else body - 1
  return Split(n_stack, n_in)


def select(flat: Mapping[str, Any], cfg: LoraConfig,
           found: Mapping[str, tuple[Split, str]] | None = None) -> list[Target]:
  """The kernels ``cfg`` adapts, with their settings, validated.

  Args:
    flat: ``tree.flatten(params)``.
    cfg: the config.
    found: optional ``{path: (Split, kind)}`` read from the model (``split.read``);
      ``cfg.in_axes``/``cfg.stack_axes`` still override it.

  Raises:
    ValueError: for every request that cannot be honoured (see ``jlora.init``).
    TypeError: for non-float kernels.
  """
  adapted = [p for p in flat if tree_lib.is_adapter_path(p)]
  if adapted:
    raise ValueError(
        f"this params tree already has adapter leaves (e.g. {adapted[0]!r}). Pass"
        " the base tree to jlora.init: `adapter, base = jlora.partition(params)`,"
        " or `jlora.merge(params)` to fold the adapter in first.")
  want, drop = matcher(cfg.targets), (matcher(cfg.exclude) if cfg.exclude is not None else None)
  paths = []
  for p, leaf in flat.items():
    arr = tree_lib.value(leaf)
    if drop is not None and drop(p, arr):
      continue
    if not want(p, arr):
      continue
    if not callable(cfg.targets) and np.ndim(arr) < 2:
      continue  # a regex or a module name also reaches biases and norm scales
    paths.append(p)
  if not callable(cfg.targets) and not isinstance(cfg.targets, str):
    paths = _module_weights(paths)
  if not paths:
    raise _no_match_error(cfg, flat)

  for name in ("rank_pattern", "alpha_pattern", "in_axes", "stack_axes"):
    for key in getattr(cfg, name) or {}:
      if not any(re.search(key, p) for p in paths):
        raise ValueError(
            f"{name} key {key!r} matches none of the targeted kernels {paths[:8]}"
            f"{' ...' if len(paths) > 8 else ''}; fix the regex or drop the key.")

  found = found or {}
  out = []
  for p in paths:
    arr = tree_lib.value(flat[p])
    shape, dtype = tuple(np.shape(arr)), arr.dtype
    if not _is_float(dtype):
      raise TypeError(f"kernel {p!r} has dtype {dtype}; LoRA needs a float kernel."
                      " Exclude it with `exclude=`.")
    if len(shape) < 2:
      raise ValueError(f"leaf {p!r} has shape {shape}; LoRA needs a kernel with at"
                       " least 2 axes. Narrow `targets` so it selects kernels only.")
    split, kind = _split_for(p, shape, cfg, found)
    stack, ins, outs = split.shapes(shape)
    if split.n_in < 1 or len(outs) < 1:
      raise ValueError(
          f"kernel {p!r} of shape {shape} has no valid in/out split (stack axes"
          f" {split.n_stack}, input axes {split.n_in}). Set"
          f" `in_axes={{{p!r}: n}}` (and `stack_axes` for nn.scan stacks).")
    rank = _first_match(cfg.rank_pattern, p) or cfg.rank
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if rank > min(fan_in, fan_out):
      raise ValueError(
          f"rank {rank} for kernel {p!r} exceeds min(in, out) = min({fan_in}, {fan_out})"
          f" (in shape {ins}, out shape {outs}). Lower the rank, or give this path"
          " its own with `rank_pattern`.")
    alpha = _first_match(cfg.alpha_pattern, p)
    alpha = cfg.alpha if alpha is None else alpha
    out.append(Target(p, shape, dtype, split, rank, alpha, cfg.scale(rank, alpha), kind))
  return out


def _split_for(path, shape, cfg: LoraConfig, found) -> tuple[Split, str]:
  name = tree_lib.split_leaf(path)[1]
  seen, kind = found.get(path, (None, None))
  if seen is None:
    split = default_split(path, shape, cfg)  # applies the overrides itself
  else:  # the overrides still win over what the model showed
    n_stack, n_in = _first_match(cfg.stack_axes, path), _first_match(cfg.in_axes, path)
    split = Split(seen.n_stack if n_stack is None else n_stack,
                  seen.n_in if n_in is None else n_in)
  if kind is None:  # a label only; the model trace (``fn``) gives the real kind
    kind = ("embed" if name == "embedding" else
            "dense" if len(shape) - split.n_stack == 2 else "general")
  return split, kind

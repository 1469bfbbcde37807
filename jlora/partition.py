"""``partition`` and ``combine``: the adapter as a small tree of its own.

Laws (tested): ``combine(*partition(p)) == p``; ``partition(p)[1]`` has exactly
the structure of the params before ``jlora.init``.
"""

from __future__ import annotations

from jlora import adapter as adapter_lib
from jlora import tree as tree_lib
from jlora.tree import path_str


def partition(params):
  """Split off the adapters: ``(adapter, base)``.

  Returns:
    adapter: every leaf of a complete adapter (``lora_a``, ``lora_b``,
      ``lora_scale`` and, where present, ``lora_m``, ``lora_dropout`` and a stacked
      adapter's ``lora_ranks``) at its path, nothing else. This is what you save
      and ship.
    base: every other leaf: the model's own params, which ``fn`` accepts.
  """
  flat = tree_lib.flatten(params)
  owned = adapter_lib.adapter_leaf_paths(flat)
  adapter_lib.check_all(flat)  # validates every layout before anything is split
  adapter = {p: v for p, v in flat.items() if p in owned}
  base = {p: v for p, v in flat.items() if p not in owned}
  return tree_lib.unflatten(adapter, params), tree_lib.unflatten(base, params)


def combine(adapter, base):
  """Put an adapter tree back beside its base kernels: the inverse of ``partition``.

  Raises:
    ValueError: the base already has adapters, an adapter leaf lands where the
      base has a leaf, a leaf of ``adapter`` belongs to no complete adapter (its
      kernel is missing from the base, or a required leaf is missing), or an
      adapter's shapes do not fit its kernel. The message names the path.
  """
  fa, fb = tree_lib.flatten(adapter), tree_lib.flatten(base)
  already = adapter_lib.find(fb)
  if already:
    raise ValueError(
        f"the base already has adapters (e.g. at {path_str(next(iter(already)))!r});"
        " pass `jlora.partition(params)[1]` as the base.")
  clash = [path_str(p) for p in fa if p in fb]
  if clash:
    raise ValueError(f"the adapter tree and the base both have leaves at {clash[:4]}.")
  flat = {**fb, **fa}
  owned = adapter_lib.adapter_leaf_paths(flat)
  stray = [path_str(p) for p in fa if p not in owned]
  if stray:
    raise ValueError(
        f"the adapter leaves {stray[:4]} belong to no complete adapter: each needs its"
        " kernel in the base and lora_a, lora_b and lora_scale beside it.")
  adapter_lib.check_all(flat)  # raises on a shape mismatch, naming the path
  return tree_lib.unflatten(flat, base)

"""``partition`` and ``combine``: the adapter as a small tree of its own.

Laws (tested): ``combine(*partition(p)) == p``; ``partition(p)[1]`` has exactly
the structure of the params before ``jlora.init``.
"""

from __future__ import annotations

from jlora import tree as tree_lib


def partition(params):
  """Split off the adapters: ``(adapter, base)``.

  Returns:
    adapter: every adapter leaf (``lora_a``, ``lora_b``, ``lora_scale`` and, where
      present, ``lora_m`` and ``lora_dropout``) at its path, nothing else. This is
      what you save and ship.
    base: every other leaf: the model's own params, which ``fn`` accepts.
  """
  flat = tree_lib.flatten(params)
  list(tree_lib.iter_adapters(flat))  # validates the layout before splitting
  adapter = {p: v for p, v in flat.items() if tree_lib.is_adapter_path(p)}
  base = {p: v for p, v in flat.items() if not tree_lib.is_adapter_path(p)}
  return tree_lib.unflatten(adapter, params), tree_lib.unflatten(base, params)


def combine(adapter, base):
  """Put an adapter tree back beside its base kernels: the inverse of ``partition``.

  Raises:
    ValueError: an adapter leaf lands where the base has a leaf already, an
      adapter has no kernel beside it, or its shapes do not fit the kernel; the
      message names the path.
  """
  fa, fb = tree_lib.flatten(adapter), tree_lib.flatten(base)
  stray = [p for p in fa if not tree_lib.is_adapter_path(p)]
  if stray:
    raise ValueError(f"combine's first argument must hold adapter leaves only; it has {stray[:4]}.")
  clash = [p for p in fa if p in fb]
  if clash:
    raise ValueError(f"the base already has adapter leaves at {clash[:4]}; pass"
                     " `jlora.partition(params)[1]` as the base.")
  flat = {**fb, **fa}
  for p in fa:
    tree_lib.kernel_path_of(p, flat)  # raises if the kernel is missing
  list(tree_lib.iter_adapters(flat))  # raises on shape mismatch, naming the path
  return tree_lib.unflatten(flat, base)

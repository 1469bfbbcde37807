"""Editing the adapters of a params tree: a path-aware map, and strength."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from jlora import adapter as adapter_lib
from jlora import quant
from jlora import tree as tree_lib
from jlora.adapter import Adapter

_ROLE_OF_FIELD = {"a": "lora_a", "b": "lora_b", "scale": "lora_scale", "m": "lora_m",
                  "dropout": "lora_dropout"}


def map_adapters(fn: Callable[[Adapter], Adapter], params):
  """``params`` with every adapter replaced by ``fn(adapter)``.

  ``fn`` sees one ``jlora.Adapter`` at a time (its ``path`` and ``name`` say
  which kernel) and returns it with any of ``kernel``, ``a``, ``b``, ``scale``,
  ``m`` and ``dropout`` replaced; ``m`` or ``dropout`` set to None removes that
  leaf. Arrays are stored back the way the old leaves were (NNX Variables stay
  Variables).

  Raises:
    ValueError: ``fn`` changed the path, or returned shapes that fit no layout.
  """
  flat = tree_lib.flatten(params)
  out = dict(flat)
  quantized = quant.find(flat)
  for kp, roles in adapter_lib.find(flat).items():
    old = adapter_lib.read(flat, kp, roles)
    new = fn(old)
    if new.path != old.path:
      raise ValueError(f"map_adapters: fn changed the path {old.name!r} to {new.name!r}.")
    adapter_lib.check_layout(new)
    if new.kernel is not old.kernel:  # a quantized kernel is rewritten leaf by leaf
      for p in quantized.get(kp, {}).values():
        out.pop(p)
      out.update(quant.to_leaves(kp, flat[kp], new.kernel))
    where = adapter_lib.role_paths(kp)
    for field, role in _ROLE_OF_FIELD.items():
      arr = getattr(new, field)
      if arr is None:
        out.pop(where[role], None)
      elif where[role] in flat:
        out[where[role]] = tree_lib.rewrap(flat[where[role]], arr)
      else:
        out[where[role]] = adapter_lib.new_leaf(flat[kp], arr, role)
  return tree_lib.unflatten(out, params)


def scale(params, s):
  """Every adapter's strength times ``s``: ``lora_scale ← s · lora_scale``.

  ``merge(scale(p, 0))`` is the base model and ``scale(p, 1)`` is ``p``; ``s``
  may be a traced array, so a jitted function of it compiles once.
  """
  return map_adapters(lambda ad: ad._replace(scale=jnp.asarray(s, jnp.float32) * ad.scale),
                      params)

"""Where adapter leaves and optimizer state live: beside their kernels."""

from __future__ import annotations

import jax


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

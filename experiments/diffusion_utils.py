"""DDPM training loss and a deterministic DDIM sampler (epsilon prediction).

``apply_fn(params, x_t, t, labels) -> eps`` is any noise model with shapes
``x_t (B, *shape)``, ``t (B,)`` int32, ``labels (B,)`` int32. For a flax
module: ``lambda p, x, t, y: model.apply({"params": p}, x, t, y)``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_STEPS = 200


class Schedule(NamedTuple):
  """Noise schedule, float32 numpy arrays of shape ``(T,)``.

  ``alpha_bars[t] = prod(1 - betas[:t + 1])``: the signal fraction of
  ``x_t = sqrt(alpha_bars[t]) x0 + sqrt(1 - alpha_bars[t]) eps``.
  """

  betas: np.ndarray
  alpha_bars: np.ndarray


def _from_betas(betas: np.ndarray) -> Schedule:
  betas = np.asarray(betas, np.float64)
  return Schedule(betas.astype(np.float32), np.cumprod(1.0 - betas).astype(np.float32))


def linear_schedule(steps: int = DEFAULT_STEPS) -> Schedule:
  """DDPM's linear betas (1e-4..0.02 at T=1000), rescaled by ``1000 / steps``.

  Rescaling keeps the total noise about the same, so the last step is still
  almost pure noise with 200 steps (unscaled, alpha_bar_T would be ~0.13).
  """
  scale = 1000.0 / steps
  return _from_betas(np.linspace(scale * 1e-4, scale * 0.02, steps))


def cosine_schedule(steps: int = DEFAULT_STEPS, s: float = 0.008) -> Schedule:
  """Nichol & Dhariwal's cosine schedule; betas capped at 0.999."""
  x = np.arange(steps + 1, dtype=np.float64) / steps
  f = np.cos((x + s) / (1 + s) * math.pi / 2) ** 2
  betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
  return _from_betas(betas)


@functools.lru_cache(maxsize=None)
def default_schedule() -> Schedule:
  """The schedule used when none is passed: cosine, T = 200."""
  return cosine_schedule(DEFAULT_STEPS)


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array,
             schedule: Optional[Schedule] = None) -> jax.Array:
  """Diffuse clean ``x0 (B, ...)`` to step ``t (B,)`` with ``noise`` (same shape as x0)."""
  ab = jnp.asarray((schedule or default_schedule()).alpha_bars)[t]
  ab = ab.reshape(ab.shape + (1,) * (x0.ndim - ab.ndim))
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def ddpm_loss(apply_fn: Callable, params, x0: jax.Array, labels: jax.Array, key: jax.Array,
              schedule: Optional[Schedule] = None) -> jax.Array:
  """Scalar epsilon-prediction MSE at uniformly drawn timesteps.

  ``x0 (B, ...)`` clean data, ``labels (B,)``; ``key`` draws ``t`` and the noise.
  """
  schedule = schedule or default_schedule()
  k_t, k_noise = jax.random.split(key)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, len(schedule.alpha_bars))
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  eps = apply_fn(params, q_sample(x0, t, noise, schedule), t, labels)
  return jnp.mean((eps - noise) ** 2)


def ddim_sample(apply_fn: Callable, params, labels: jax.Array, key: jax.Array, steps: int = 20,
                schedule: Optional[Schedule] = None, shape: tuple[int, ...] = (8, 8, 1),
                clip: bool = True) -> jax.Array:
  """Deterministic DDIM (eta = 0) samples ``(B, *shape)``, ``B = len(labels)``.

  ``key`` only draws the starting noise, so a fixed key gives fixed samples.
  ``steps`` timesteps are spread evenly from ``T - 1`` down to 0; with
  ``clip`` the predicted ``x0`` is kept in the data range [-1, 1] at every
  step. Written as one ``lax.scan``, so it can be jitted whole (with
  ``steps``, ``shape`` and ``clip`` static).
  """
  schedule = schedule or default_schedule()
  n_t = len(schedule.alpha_bars)
  if not 1 <= steps <= n_t:
    raise ValueError(f"steps must be in [1, {n_t}]")
  ab = jnp.asarray(schedule.alpha_bars)
  ts = np.linspace(n_t - 1, 0, steps).round().astype(np.int32)
  # -1 marks "after the last step", where the signal fraction is exactly 1.
  ts_prev = np.append(ts[1:], -1).astype(np.int32)
  b = labels.shape[0]

  def step(x, t_pair):
    t, t_prev = t_pair
    a = ab[t]
    a_prev = jnp.where(t_prev >= 0, ab[jnp.maximum(t_prev, 0)], 1.0)
    eps = apply_fn(params, x, jnp.full((b,), t, jnp.int32), labels)
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None

  x = jax.random.normal(key, (b, *shape), jnp.float32)
  x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), jnp.asarray(ts_prev)))
  return x

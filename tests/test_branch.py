"""``jlora/branch.py``: the hand-written backward passes against autodiff of the plain formula."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import branch


def _check_vjp(f, ref, args, argnums):
  """Outputs and cotangents of ``f`` equal those of ``ref`` (autodiff), for a random cotangent."""
  out, vjp = jax.vjp(f, *args)
  out_ref, vjp_ref = jax.vjp(ref, *args)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.key(9), out.shape)
  for i, (a, b) in enumerate(zip(vjp(g), vjp_ref(g))):
    if i in argnums:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"argument {i}")


def _mats(t, c, n, r, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (t, c)), jax.random.normal(k[1], (c, n)) / np.sqrt(c),
          jax.random.normal(k[2], (c, r)) / np.sqrt(c), jax.random.normal(k[3], (r, n)))


@pytest.mark.parametrize("c,n,r,t", [
    (20, 64, 17, 48),   # C + r < min(N, T): forward as [x | t]·[W ; sB]
    (64, 20, 17, 48),   # N + r < min(C, T): backward dx as [g | gb]·[W | A]ᵀ
    (20, 64, 17, 11),   # as the first, but fewer tokens than C + r: no kernel-sized copy
    (40, 40, 24, 11),   # neither: two products each way
])
def test_lora_matmul_matches_autodiff(c, n, r, t):
  x, w, a, b = _mats(t, c, n, r)
  s = jnp.float32(0.7)
  f = lambda x, w, a, b: branch.lora_matmul(x, w, a, b, s)
  ref = lambda x, w, a, b: x @ w + (x @ a) @ (s * b)
  _check_vjp(f, ref, (x, w, a, b), argnums=(0, 2, 3))
  # The frozen kernel gets an exact zero, never a computed weight gradient.
  _, vjp = jax.vjp(f, x, w, a, b)
  assert not np.any(vjp(jnp.ones((t, n)))[1])


@pytest.mark.parametrize("c,n,t,wanted", [
    (20, 64, 11, False), (20, 64, 48, True),   # forward: [W ; sB], (C + r) x N
    (64, 20, 11, False), (64, 20, 48, True),   # backward: [W | A], C x (N + r)
])
def test_kernel_sized_copy_only_with_more_tokens_than_its_rows(c, n, t, wanted):
  """``[W ; sB]`` and ``[W | A]`` are kernel-sized copies built from parameters alone,
  which XLA:CPU makes for every layer at the start of the step; each is worth it only
  when it replaces a larger tokens-sized array."""
  r = 17
  x, w, a, b = _mats(t, c, n, r)
  f = lambda x, a, b: jnp.sum(branch.lora_matmul(x, w, a, b, jnp.float32(0.7)) ** 2)
  text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, a, b).as_text()
  shape = f"{c + r}x{n}" if c + r < n else f"{c}x{n + r}"
  copies = re.findall(rf"concatenate.*-> tensor<{shape}xf32>", text)
  assert bool(copies) == wanted, copies


@pytest.mark.parametrize("r", [1, 8, 19])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("unroll", [False, True])
def test_lora_branch_matches_autodiff(r, batched, unroll):
  x, _, a, b = _mats(13, 24, 20, r, seed=r)
  s = jnp.float32(1.3)
  if batched:  # two stacked layers, as under vmap over nn.scan's kernels
    x, a, b, s = (jnp.stack([v, 2 * v]) for v in (x, a, b, s))
    ref = lambda x, a, b: jnp.einsum("ltc,lcr,lrn->ltn", x, a, s[:, None, None] * b)
  else:
    ref = lambda x, a, b: (x @ a) @ (s * b)
  f = lambda x, a, b: branch.lora_branch(x, a, b, s, batched, None, unroll)
  _check_vjp(f, ref, (x, a, b), argnums=(0, 1, 2))


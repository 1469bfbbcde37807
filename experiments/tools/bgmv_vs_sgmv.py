"""BGMV (gather each example's factors, batched product) against SGMV (sort the tokens by
adapter, jax.lax.ragged_dot over the groups, unsort) for the per-example rank-r branch
y = s·(x·A[id])·B[id], forward and forward+backward (grads wrt x, A, B), on this CPU.
Interleaved rounds, medians of per-round ratios, one process.

  python experiments/tools/bgmv_vs_sgmv.py
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

B, T, C, N, R, NA = 64, 128, 512, 2048, 8, 8
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
a = jnp.asarray(rng.normal(size=(NA, C, R)) / np.sqrt(C), jnp.float32)
b = jnp.asarray(rng.normal(size=(NA, R, N)) * 0.01, jnp.float32)
ids = jnp.asarray(np.arange(B) % NA, jnp.int32)


def bgmv(x, a, b, ids):
  t = jnp.einsum("btc,bcr->btr", x, a[ids])
  return jnp.einsum("btr,brn->btn", t, b[ids])


def sgmv(x, a, b, ids):
  tok = jnp.repeat(ids, T)                            # adapter of every token
  order = jnp.argsort(tok)
  rows = x.reshape(B * T, C)[order]
  sizes = jnp.bincount(tok, length=NA).astype(jnp.int32)
  t = jax.lax.ragged_dot(rows, a, sizes)
  y = jax.lax.ragged_dot(t, b, sizes)
  return jnp.zeros_like(y).at[order].set(y).reshape(B, T, N)


def fwd_bwd(f):
  return jax.jit(jax.grad(lambda x, a, b, ids: jnp.sum(jnp.sin(f(x, a, b, ids))), argnums=(0, 1, 2)))


np.testing.assert_allclose(bgmv(x, a, b, ids), sgmv(x, a, b, ids), rtol=1e-4, atol=1e-5)
fns = {"bgmv_fwd": jax.jit(bgmv), "sgmv_fwd": jax.jit(sgmv),
       "bgmv_fwd_bwd": fwd_bwd(bgmv), "sgmv_fwd_bwd": fwd_bwd(sgmv)}
for f in fns.values():
  jax.block_until_ready(f(x, a, b, ids))
times = {k: [] for k in fns}
names = list(fns)
for rnd in range(9):
  for k in names[rnd % 4:] + names[:rnd % 4]:
    t0 = time.perf_counter()
    jax.block_until_ready(fns[k](x, a, b, ids))
    times[k].append(time.perf_counter() - t0)
ratio = lambda p, q: statistics.median(u / v for u, v in zip(times[p], times[q]))
for k in names:
  print(f"{k:14s} median {1e3 * statistics.median(times[k]):8.1f} ms")
print(f"sgmv/bgmv forward {ratio('sgmv_fwd', 'bgmv_fwd'):.2f}, fwd+bwd "
      f"{ratio('sgmv_fwd_bwd', 'bgmv_fwd_bwd'):.2f}")

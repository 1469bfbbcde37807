"""Trace and compile time of the jitted train step, as a ratio to full fine-tuning.

transformers' Flax models are unrolled (a Python loop over layers, no scan), so every
layer is traced, lowered and compiled on its own and the step's set-up time grows with
depth. This measures it on an unrolled pre-LN transformer (``experiments.bench``'s
``Transformer``, d=256, all six projections adapted at rank 8) at two depths.

Run::

    python -m experiments.compile_time --smoke   # depths 1 and 2, 1 round (the tests use it)
    python -m experiments.compile_time --quick   # depths 12 and 24, 3 rounds

For each depth and round, every variant builds a fresh jitted step (so no cache is
shared), then ``.trace()`` + ``.lower()`` and ``.compile()`` are timed; the variants'
order rotates each round and the ratios are medians over rounds of the per-round ratio
to full fine-tuning. ``jlora.init(fn=)`` reads the splits with one more trace; its time
is reported beside them. Variants:

* ``full``: ``jax.value_and_grad`` over every parameter, Adam on all of them;
* ``jlora``: ``jlora.train_step`` with ``jlora.lora(model.apply)`` (factored, defaults);
* ``jlora_unrolled``: the same with ``unroll_max_rank=16`` (rank-8 products as multiply-adds);
* ``jlora_merged``: the same with ``mode="merged"``.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import bench, common

NAME = "compile_time"
SIZES = {"smoke": dict(depths=(1, 2), rounds=1, d=32, batch=2, seq=8),
         "quick": dict(depths=(12, 24), rounds=3, d=256, batch=4, seq=32),
         "full": dict(depths=(6, 12, 24), rounds=5, d=256, batch=4, seq=32)}
TARGETS = ["query", "key", "value", "out", "fc1", "fc2"]
TARGET_RATIO = 1.25  # jlora (trace + compile) / full fine-tuning, at any depth


def _mse(out, y):
  return jnp.mean((out - y) ** 2)


def make_full(model, params, x, y):
  adam = optax.adam(1e-3)

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(lambda p: _mse(model.apply(p, x), y))(p)
    u, s = adam.update(g, s, p)
    return optax.apply_updates(p, u), s, loss
  return jax.jit(step, donate_argnums=(0, 1)), (params, adam.init(params), x, y)


def make_jlora(model, params, x, y, **lora_kw):
  tx = jlora.optimizer(optax.adam(1e-3), params)
  apply = jlora.lora(model.apply, **lora_kw)
  step = jlora.train_step(lambda p, x, y: _mse(apply(p, x), y), tx)
  return step, (params, tx.init(params), x, y)


def time_setup(make) -> tuple[float, float]:
  """Seconds to trace + lower, and to compile, a freshly built step."""
  step, args = make()
  t0 = time.perf_counter()
  lowered = step.trace(*args).lower()
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def run_depth(depth: int, size: dict, seed: int) -> list[dict]:
  d = size["d"]
  model = bench.Transformer(d, 4 * d, 4, depth)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(size["batch"], size["seq"], d)), jnp.float32)
  y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  base = bench._random_params(model, x, seed=seed)
  cfg = jlora.LoraConfig(rank=8, targets=TARGETS)
  t0 = time.perf_counter()
  params = jlora.init(jax.random.key(seed), base, cfg, fn=model.apply, args=(x,))
  init_s = time.perf_counter() - t0
  variants = {
      "full": lambda: make_full(model, base, x, y),
      "jlora": lambda: make_jlora(model, params, x, y),
      "jlora_unrolled": lambda: make_jlora(model, params, x, y, unroll_max_rank=16),
      "jlora_merged": lambda: make_jlora(model, params, x, y, mode="merged"),
  }
  names = list(variants)
  times = {n: [] for n in names}
  for rnd in range(size["rounds"]):
    order = names[rnd % len(names):] + names[:rnd % len(names)]
    for n in order:
      times[n].append(time_setup(variants[n]))
  rows = []
  for n in names:
    total = [a + b for a, b in times[n]]
    full = [a + b for a, b in times["full"]]
    rows.append({
        "depth": depth, "variant": n,
        "trace_s": statistics.median(a for a, _ in times[n]),
        "compile_s": statistics.median(b for _, b in times[n]),
        "total/full": statistics.median(t / f for t, f in zip(total, full)),
        "trace/full": statistics.median(a / f[0] for (a, _), f in zip(times[n], times["full"])),
        "compile/full": statistics.median(b / f[1] for (_, b), f in zip(times[n], times["full"])),
        "init_fn_s": init_s if n.startswith("jlora") else 0.0,
    })
  return rows


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  size = SIZES[args.size]
  results = common.Results(NAME, args)
  rows = []
  for depth in size["depths"]:
    rows += run_depth(depth, size, args.seed)
    print(f"depth {depth} done", flush=True)
  results.table(rows, ["depth", "variant", "trace_s", "compile_s", "trace/full", "compile/full",
                       "total/full", "init_fn_s"],
                title="Trace + compile time of the jitted train step (ratios: medians over "
                "rounds of per-round ratios to full fine-tuning)", stem="results")
  worst = max(r["total/full"] for r in rows if r["variant"] == "jlora")
  print(f"jlora trace+compile / full FT, worst depth: {worst:.2f} (target <= {TARGET_RATIO})")
  results.save_json({"rows": rows, "sizes": size, "target": TARGET_RATIO,
                     "argv": sys.argv[1:] if argv is None else list(argv)})
  return rows


if __name__ == "__main__":
  main()

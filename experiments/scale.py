"""LoRA against full fine-tuning on a data x model mesh: step time and bytes communicated.

Run::

    python -m experiments.scale            # (2, 4) mesh of 8 simulated CPU devices, ~5 minutes
    python -m experiments.scale --smoke    # tiny shapes, plumbing only

The character GPT of ``experiments/models/gpt.py`` runs on a (2, 4) ``('data',
'model')`` mesh with Auto axes and Megatron sharding: q/k/v and fc1 column-parallel,
the attention out-projection and fc2 row-parallel, everything else replicated; the
batch is sharded over 'data'. On one machine the 8 devices are simulated by XLA:CPU
(``--xla_force_host_platform_device_count=8``, set here before jax starts), so the
collectives are real but run through memory.

* **jlora**: adapters on q, k, v, out, fc1 and fc2, placed by ``jlora.init`` beside
  their kernels; ``jlora.train_step`` (Adam).
* **full**: every parameter trained by Adam, in a step jitted with the params' own
  shardings in and out (``jlora.shardings`` for the optimizer state too).

Step times are measured in one process, the two steps interleaved round by round
(the order alternating), each call ended by ``block_until_ready``; reported are the
medians and the median of the per-round ratios. Bytes are per device per step: the
operand bytes of every collective in the compiled step (``experiments/collectives.py``),
split by mesh axis, and on 'model' into the base's sums (tokens x d) and the
branch's partial sums (tokens x r), which LoRA adds.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax starts
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402
from experiments import collectives, common  # noqa: E402
from experiments.models import gpt  # noqa: E402

NAME = "scale"
SIZES = {
    "smoke": dict(d=64, heads=4, mlp=256, layers=1, batch=8, seq=16, rank=4, rounds=2),
    "quick": dict(d=256, heads=8, mlp=1024, layers=2, batch=8, seq=64, rank=8, rounds=15),
    "full": dict(d=512, heads=8, mlp=2048, layers=4, batch=16, seq=128, rank=8, rounds=30),
}
TARGETS = r"(query|key|value|out|fc1|fc2)/kernel$"
MEGATRON = ((r"(query|key|value)/kernel$", P(None, "model", None)),
            (r"(query|key|value)/bias$", P("model", None)),
            (r"attn/out/kernel$", P("model", None, None)),
            (r"fc1/kernel$", P(None, "model")),
            (r"fc1/bias$", P("model")),
            (r"fc2/kernel$", P("model", None)))


def placed_base(model, tokens, mesh):
  """The GPT's params, each leaf a global array placed by the first matching rule."""
  base = model.init(jax.random.key(0), tokens)

  def put(path, v):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    spec = next((s for rx, s in MEGATRON if re.search(rx, name)), P())
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, NamedSharding(mesh, spec), lambda i: v[i])
  return jax.tree_util.tree_map_with_path(put, base)


def comm_bytes(step, args, mesh, rank: int) -> dict:
  """Per-device bytes per step by mesh axis; 'model' split into the branch's tokens x r
  partial sums and the rest (the base's)."""
  found = collectives.collectives(step.lower(*args).compile().as_text(), mesh)
  out = {"collectives": sum(c["runs"] for c in found)}
  for c in found:
    axis = "+".join(c["axes"] or ("?",))
    for dt, dims in c["operands"]:
      n = c["runs"] * collectives.nbytes(dt, dims)
      part = "branch" if axis == "model" and dims and dims[-1] == rank else "base"
      out[f"{axis}/{part}"] = out.get(f"{axis}/{part}", 0) + n
  return out


def main(argv=None):
  args = common.parse_args("LoRA vs full fine-tuning on a DP x TP mesh", argv)
  size = SIZES[args.size]
  out = common.Results(NAME, args)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  cfg = gpt.GPTConfig(vocab=128, d_model=size["d"], n_heads=size["heads"], n_layers=size["layers"],
                      mlp=size["mlp"], max_len=size["seq"])
  model = gpt.GPT(cfg)
  batch = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(args.seed)
  data = rng.integers(0, cfg.vocab, (size["batch"], size["seq"] + 1)).astype(np.int32)
  tokens, targets = (jax.make_array_from_callback(v.shape, batch, lambda i, v=v: v[i])
                     for v in (data[:, :-1], data[:, 1:]))

  def loss_full(p, tokens, targets):
    return gpt.lm_loss(model.apply(p, tokens), targets)

  with jax.set_mesh(mesh):
    base = placed_base(model, data[:, :-1], mesh)
    full_params = jax.tree.map(jnp.copy, base)   # jlora's step donates the base it holds
    params = jlora.init(jax.random.key(1), base, jlora.LoraConfig(rank=size["rank"],
                        targets=TARGETS), fn=model.apply, args=(tokens,))
    tx = jlora.optimizer(optax.adam(1e-3), params)
    lora_apply = jlora.lora(model.apply)
    lora_step = jlora.train_step(
        lambda p, tokens, targets: gpt.lm_loss(lora_apply(p, tokens), targets), tx)
    states = {"jlora": [params, tx.init(params)]}

    adam = optax.adam(1e-3)
    where = jlora.shardings(full_params)
    opt_where = jlora.shardings(jax.eval_shape(adam.init, full_params), params=full_params)

    def full(p, s, tokens, targets):
      loss, g = jax.value_and_grad(loss_full)(p, tokens, targets)
      u, s = adam.update(g, s, p)
      return optax.apply_updates(p, u), s, loss
    full_step = jax.jit(full, out_shardings=(where, opt_where, None), donate_argnums=(0, 1))
    states["full"] = [full_params, jax.jit(adam.init, out_shardings=opt_where)(full_params)]
    steps = {"jlora": lora_step, "full": full_step}

    rows, times = [], {k: [] for k in steps}
    for k, step in steps.items():
      b = comm_bytes(step, (*states[k], tokens, targets), mesh, size["rank"])
      rows.append({"variant": k, **b})
    for i in range(size["rounds"] + 2):          # two warm-up rounds
      for k in (("jlora", "full") if i % 2 else ("full", "jlora")):
        t0 = time.perf_counter()
        p, s, loss = steps[k](*states[k], tokens, targets)
        jax.block_until_ready(loss)
        if i >= 2:
          times[k].append(time.perf_counter() - t0)
        states[k] = [p, s]
    compiled = {k: step._cache_size() for k, step in steps.items()}

  ratios = [a / b for a, b in zip(times["jlora"], times["full"])]
  for r in rows:
    r["step_ms"] = 1e3 * statistics.median(times[r["variant"]])
    r["compiles"] = compiled[r["variant"]]
  lora, full_row = rows
  summary = {
      "time_ratio_median_of_rounds": statistics.median(ratios),
      "time_ratio_of_medians": lora["step_ms"] / full_row["step_ms"],
      "branch_share_of_model_axis": lora.get("model/branch", 0) / lora.get("model/base", 1),
      "rank_over_d": size["rank"] / size["d"],
      "data_axis_lora_over_full": lora.get("data/base", 0) / full_row.get("data/base", 1),
      "adapter_params": jlora.count_params(states["jlora"][0]).trainable,
      "base_params": sum(int(np.prod(v.shape)) for v in jax.tree.leaves(full_params)),
  }
  columns = ["variant", "step_ms", "compiles", "collectives", "model/base", "model/branch",
             "data/base"]
  out.table(rows, columns, title=f"(2, 4) mesh, {args.size}: per device per step, bytes")
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
  out.save_json({"size": size, "rows": rows, "summary": summary,
                 "times_s": times, "mesh": "(2, 4) data x model, Auto axes"})


if __name__ == "__main__":
  main()

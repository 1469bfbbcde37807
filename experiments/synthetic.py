"""E0: one LoRA layer fitting a planted low-rank update (seconds).

A frozen random ``W0`` (d x d) and a target ``y = x (W0 + dW*)`` with a planted
``dW*`` of known rank. One adapted matrix, the plain function ``x @ W``, is
trained by regression with ``jlora.init`` + ``jlora.lora`` + ``jlora.train_step``.
Two published claims are checked on it:

* Hu et al. 2021 (LoRA, Sec. 7.2, Figure 3): the top direction of A is shared
  between an r=8 and an r=64 adapter (phi(1, 1) > 0.5), while lower directions
  sit near the random baseline ``max(i, j) / d``. The control is phi between
  the two runs' *initial* A matrices, drawn from independent keys, which must sit
  at the baseline (papers.md Sec. 6: a shared PRNG prefix would fake overlap).
* Kalajdzievski 2023 (rsLoRA): under the scale ``alpha / r`` the adapter's
  gradient norm collapses like ``1 / sqrt(r)``; under ``alpha / sqrt(r)`` it
  stays flat in r.

Run: ``python -m experiments.synthetic [--smoke | --quick | --full]``.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import common

NAME = "synthetic"

# Sizes. "quick" takes seconds on 2 CPU cores, so it also runs in the test suite.
SIZES = {
    "smoke": dict(d=64, batch=256, sub_steps=200, sub_seeds=1, grad_seeds=2, loss_steps=40,
                  loss_ranks=(1, 8, 64)),
    "quick": dict(d=128, batch=256, sub_steps=600, sub_seeds=1, grad_seeds=4, loss_steps=150,
                  loss_ranks=(1, 4, 16, 64)),
    "full": dict(d=128, batch=256, sub_steps=1500, sub_seeds=3, grad_seeds=16, loss_steps=150,
                 loss_ranks=(1, 2, 4, 8, 16, 32, 64)),
}
GRAD_RANKS = (1, 2, 4, 8, 16, 32, 64)
SUB_RANKS = (8, 64)          # the pair of Figure 3
PLANTED_RANK = 4             # dW* for the subspace test: spectrum 4, 3, 2, 1 (top direction unique)
RS_RANK = 64                 # dW* for the rsLoRA loss sweep: many directions, decaying spectrum
ALPHA = 8.0                  # alpha for the rsLoRA comparison (pilot value; scale 1 at r=8 or r=64)
LR = 1e-3                    # Adam, subspace runs
LOSS_LR = 5e-4               # Adam, short rsLoRA loss sweep (the regime where the scale matters)
PHI_POINTS = ((1, 1), (2, 2), (4, 4), (8, 8), (8, 64))


# ---------------------------------------------------------------------------
# The regression task.


def random_orthonormal(key, d: int, k: int) -> jax.Array:
  """A Haar-random ``(d, k)`` frame (QR of a Gaussian)."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (d, k)))
  return q * jnp.sign(jnp.diag(r))  # sign fix makes the distribution exactly Haar


def make_task(key, d: int, spectrum) -> dict:
  """Frozen ``W0``, planted ``dW* = U diag(spectrum) V^T`` and an anisotropic input map.

  Inputs are ``x = z @ input_map`` with ``z ~ N(0, I)``; the input covariance has
  eigenvalues spread geometrically over one decade in a random basis, so no
  direction of ``dW*`` is favoured by the data alone.
  """
  k_w, k_u, k_v, k_x = jax.random.split(key, 4)
  spectrum = jnp.asarray(spectrum, jnp.float32)
  k = spectrum.shape[0]
  w0 = jax.random.normal(k_w, (d, d)) / math.sqrt(d)
  u, v = random_orthonormal(k_u, d, k), random_orthonormal(k_v, d, k)
  delta = (u * spectrum) @ v.T
  stds = jnp.geomspace(1.0, 0.3, d)
  input_map = stds[:, None] * random_orthonormal(k_x, d, d).T
  return {"w0": w0, "delta": delta, "input_map": input_map}


def layer(params, x):
  """The adapted function: a plain ``x @ W`` (jlora.lora sees the dot_general)."""
  return x @ params["kernel"]


def make_loss(task: dict, batch: int):
  """``loss(params, key)``: MSE to ``x (W0 + dW*)`` on a fresh Gaussian batch."""
  target_w = task["w0"] + task["delta"]
  apply = jlora.lora(layer)

  def loss(params, key):
    x = jax.random.normal(key, (batch, target_w.shape[0])) @ task["input_map"]
    return jnp.mean((apply(params, x) - x @ target_w) ** 2)

  return loss


def lora_config(rank: int, rslora: bool | None) -> jlora.LoraConfig:
  """``rslora=None``: scale 1 (alpha = r); else alpha=ALPHA with alpha/r or alpha/sqrt(r)."""
  if rslora is None:
    return jlora.LoraConfig(rank=rank, targets=r"kernel$")
  return jlora.LoraConfig(rank=rank, alpha=ALPHA, rslora=rslora, targets=r"kernel$")


def adapter_grad_norm(loss, params, key) -> float:
  """Global L2 norm of the loss gradient over the trainable adapter leaves only."""
  _, grads = jlora.value_and_grad(loss)(params, key)
  return float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))


def train(loss, params, steps: int, lr: float, key, grad_at=()) -> tuple[dict, list, dict]:
  """Adam on the adapter leaves; returns (params, losses, {step: adapter grad norm}).

  ``params`` is copied first: ``jlora.train_step`` donates its input buffers, and
  ``jlora.init`` shares the frozen kernel's buffer with the caller's base tree,
  so without the copy the next run would find its base kernel deleted.
  """
  params = jax.tree.map(jnp.copy, params)
  tx = jlora.optimizer(optax.adam(lr), params)
  opt_state = tx.init(params)
  step = jlora.train_step(loss, tx)
  losses, norms = [], {}
  for i in range(steps):
    k = jax.random.fold_in(key, i)
    if i in grad_at:  # the norm of the gradient this step is about to apply
      norms[i + 1] = adapter_grad_norm(loss, params, k)
    params, opt_state, value = step(params, opt_state, k)
    losses.append(value)
  return params, [float(v) for v in losses], norms


# ---------------------------------------------------------------------------
# Part 1: subspace similarity between an r=8 and an r=64 adapter (Figure 3).


def subspace_run(size: dict, seed: int) -> dict:
  """Train r=8 and r=64 adapters from independent keys and compare their A's."""
  d = size["d"]
  keys = jax.random.split(jax.random.key(1000 + seed), 4)
  task = make_task(keys[0], d, [4.0, 3.0, 2.0, 1.0][:PLANTED_RANK])
  loss = make_loss(task, size["batch"])
  base = {"kernel": task["w0"]}
  runs = {}
  # keys[1] and keys[2]: one independent key per rank, never a shared one.
  for r, k in zip(SUB_RANKS, keys[1:3]):
    params0 = jlora.init(k, base, lora_config(r, None))
    a0 = np.asarray(params0["lora_a"])
    params, losses, _ = train(loss, params0, size["sub_steps"], LR, jax.random.fold_in(keys[3], r))
    a, b = np.asarray(params["lora_a"]), np.asarray(params["lora_b"])
    runs[r] = {"a0": a0, "a": a, "b": b, "delta": float(params["lora_scale"]) * a @ b,
               "final_loss": float(np.mean(losses[-20:])), "first_loss": losses[0],
               "drift": float(np.linalg.norm(a - a0) / np.linalg.norm(a0))}
  lo, hi = runs[SUB_RANKS[0]], runs[SUB_RANKS[1]]
  sim = jlora.analysis.subspace_similarity
  grid = lambda x, y, side: jlora.analysis.subspace_similarity_grid(x, y, side=side)
  out = {
      "grid_A": grid(lo["a"], hi["a"], "in"),
      "grid_A_init": grid(lo["a0"], hi["a0"], "in"),
      "grid_B": grid(lo["b"], hi["b"], "out"),
      "grid_dW": jlora.analysis.subspace_similarity_grid(lo["delta"], hi["delta"], side="in",
                                                          max_i=8, max_j=64),
      # how well each adapter's top direction found the planted one (input side).
      # Compare with dW* itself, not its frame U: U's singular values are all 1,
      # so its "top" direction would be arbitrary.
      "phi_top_vs_planted": {r: sim(runs[r]["a"], np.asarray(task["delta"]), 1, 1)
                             for r in SUB_RANKS},
      "drift": {r: runs[r]["drift"] for r in SUB_RANKS},
      "final_loss": {r: runs[r]["final_loss"] for r in SUB_RANKS},
      "first_loss": {r: runs[r]["first_loss"] for r in SUB_RANKS},
  }
  return out


def phi_points(grid: np.ndarray) -> dict:
  """Selected (i, j) entries of a phi grid, keyed "phi(i,j)"."""
  return {f"phi({i},{j})": float(grid[i - 1, j - 1]) for i, j in PHI_POINTS}


# ---------------------------------------------------------------------------
# Part 2: the step-1 gradient norm against r (rsLoRA).
#
# Expected slope, derived. Write the layer as Y = X (W0 + s A B), A = (d, r),
# B = (r, d), with s the scale. At init B = 0, so the adapter changes nothing
# and G = dL/dY is the same for every r. Then
#   dL/dA = s X^T G B^T = 0          (B = 0: A gets no gradient at step 1)
#   dL/dB = s (X A)^T G,  ||dL/dB||_F^2 = s^2 sum_{k=1..r} ||G^T X a_k||^2.
# The columns a_k of A are iid with a variance that does not depend on r
# (kaiming: U(+-1/sqrt(d)), fan_in = d), so the sum has r iid terms and
#   ||grad||_F = ||dL/dB||_F ~ s * sqrt(r) * const.
# s = alpha/r       ->  ||grad|| ~ alpha r^(-1/2):  log-log slope -1/2;
# s = alpha/sqrt(r) ->  ||grad|| ~ alpha:          slope 0.
# This is rsLoRA's argument in miniature: with B = 0 at init the gradient
# reaching the adapter is r terms of s * (something r-independent), and only
# s ~ 1/sqrt(r) keeps their sum Theta(1). rsLoRA plots the *average parameter
# gradient norm* over training; at step 1 the adapter gradient is exactly B's,
# so the whole adapter's norm is the quantity above. (The gradient with respect
# to the effective update dW = s A B, X^T G, does not depend on r at all, so it
# cannot show the effect; the step-1 B gradient is the first place r enters.)


def grad_norm_sweep(size: dict, seed: int) -> dict:
  """Mean step-1 adapter gradient norm per rank, for alpha/r and alpha/sqrt(r)."""
  keys = jax.random.split(jax.random.key(2000 + seed), 2)
  task = make_task(keys[0], size["d"], rs_spectrum(size["d"]))
  loss = make_loss(task, size["batch"])
  base = {"kernel": task["w0"]}
  out = {}
  for name, rslora in (("alpha/r", False), ("alpha/sqrt(r)", True)):
    means, stds = [], []
    for r in GRAD_RANKS:
      # an independent init key and batch per (rank, seed): no shared prefixes
      vals = [adapter_grad_norm(loss, jlora.init(jax.random.fold_in(keys[1], 100 * r + s), base,
                                                 lora_config(r, rslora)),
                                jax.random.fold_in(keys[1], 10_000 + s))
              for s in range(size["grad_seeds"])]
      means.append(float(np.mean(vals)))
      stds.append(float(np.std(vals)))
    slope = float(np.polyfit(np.log(GRAD_RANKS), np.log(means), 1)[0])
    out[name] = {"ranks": list(GRAD_RANKS), "grad_norm": means, "grad_norm_std": stds,
                 "slope": slope}
  return out


def rs_spectrum(d: int) -> np.ndarray:
  """A rank-``min(RS_RANK, d)`` spectrum decaying from 1 to 0.1 (the rsLoRA loss task)."""
  return np.geomspace(1.0, 0.1, min(RS_RANK, d)).astype(np.float32)


# ---------------------------------------------------------------------------
# Part 3: final loss and training-time gradient norm against r (rsLoRA, soft).


def loss_sweep(size: dict, seed: int) -> list[dict]:
  """Short Adam runs per (scaling, rank); final loss and gradient norms during training."""
  keys = jax.random.split(jax.random.key(3000 + seed), 3)
  task = make_task(keys[0], size["d"], rs_spectrum(size["d"]))
  loss = make_loss(task, size["batch"])
  base = {"kernel": task["w0"]}
  steps = size["loss_steps"]
  probe = tuple(sorted({0, steps // 4, steps // 2, steps - 1}))
  rows = []
  for name, rslora in (("alpha/r", False), ("alpha/sqrt(r)", True)):
    for r in size["loss_ranks"]:
      params = jlora.init(jax.random.fold_in(keys[1], r), base, lora_config(r, rslora))
      scale = float(params["lora_scale"])
      _, losses, norms = train(loss, params, steps, LOSS_LR, keys[2], grad_at=probe)
      rows.append({"scaling": name, "rank": r, "scale": scale, "base_loss": losses[0],
                   "final_loss": float(np.mean(losses[-10:])),
                   "mean_train_grad_norm": float(np.mean(list(norms.values()))),
                   "grad_norms": norms})
  return rows


# ---------------------------------------------------------------------------
# Reporting.


def plot(results: common.Results, grads: dict, grids: dict, d: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 4))
  for name, g in grads.items():
    ax.errorbar(g["ranks"], g["grad_norm"], yerr=g["grad_norm_std"], marker="o", capsize=3,
                label=f"{name}  (slope {g['slope']:+.2f})")
  g1 = grads["alpha/r"]["grad_norm"][0]
  ax.plot(GRAD_RANKS, [g1 / math.sqrt(r) for r in GRAD_RANKS], "k:", label="expected r^(-1/2)")
  ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="step-1 adapter gradient norm",
         title="rsLoRA: gradient norm vs rank")
  ax.set_xticks(GRAD_RANKS, [str(r) for r in GRAD_RANKS])
  ax.legend()
  results.figure(fig, "grad_norm_vs_rank.png")

  fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.2))
  for ax, (title, g) in zip(axes, grids.items()):
    im = ax.imshow(g, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower",
                   extent=(0.5, g.shape[1] + 0.5, 0.5, g.shape[0] + 0.5))
    ax.set(title=title, xlabel="j (r=64 directions)", ylabel="i (r=8 directions)")
  fig.colorbar(im, ax=axes, label=f"phi(i, j); random baseline max(i,j)/{d}")
  results.figure(fig, "phi_grid.png")


def main(argv=None) -> None:
  args = common.parse_args(__doc__.splitlines()[0], argv)
  size = SIZES[args.size]
  d = size["d"]
  results = common.Results(NAME, args)
  t0 = time.time()

  subs = [subspace_run(size, args.seed + s) for s in range(size["sub_seeds"])]
  mean_grid = lambda k: np.mean([s[k] for s in subs], axis=0)
  grids = {k: mean_grid(k) for k in ("grid_A", "grid_A_init", "grid_B", "grid_dW")}
  baseline = {f"phi({i},{j})": jlora.analysis.random_subspace_baseline(i, j, d)
              for i, j in PHI_POINTS}
  grads = grad_norm_sweep(size, args.seed)
  sweep = loss_sweep(size, args.seed)
  elapsed = time.time() - t0

  phi_rows = [{"matrices": name, **phi_points(grids[key])} for name, key in (
      ("A (r=8 vs r=64)", "grid_A"), ("B^T", "grid_B"), ("dW", "grid_dW"),
      ("A at init (control)", "grid_A_init"))] + [{"matrices": "random baseline", **baseline}]
  results.table(phi_rows, title=f"Subspace similarity, d={d}, planted rank {PLANTED_RANK}",
                stem="phi")
  grad_rows = [{"scaling": name, **{f"r={r}": v for r, v in zip(g["ranks"], g["grad_norm"])},
                "slope": g["slope"]} for name, g in grads.items()]
  results.table(grad_rows, title="Step-1 adapter gradient norm", stem="grad_norm")
  loss_rows = [{k: v for k, v in row.items() if k != "grad_norms"} for row in sweep]
  results.table(loss_rows, title=f"Final loss after {size['loss_steps']} Adam steps",
                stem="results")

  checks = common.Checks(strict=args.size != "smoke")
  phi_a = grids["grid_A"][0, 0]
  checks.hard("top direction shared: phi_A(1,1) >= 0.5", phi_a >= 0.5, f"{phi_a:.3f}")
  checks.hard("phi_A(1,1) >= 20x random baseline", phi_a >= 20 * baseline["phi(1,1)"],
              f"{phi_a:.3f} vs 20 x {baseline['phi(1,1)']:.4f}")
  init_pts = phi_points(grids["grid_A_init"])
  for (i, j) in ((1, 1), (8, 8), (8, 64)):
    k = f"phi({i},{j})"
    checks.hard(f"initial-A control {k} at baseline +- 0.1",
                abs(init_pts[k] - baseline[k]) <= 0.1, f"{init_pts[k]:.3f} vs {baseline[k]:.3f}")
  checks.hard("phi_A(1,1) > phi_A(8,8)", phi_a > grids["grid_A"][7, 7],
              f"{phi_a:.3f} > {grids['grid_A'][7, 7]:.3f}")
  s_r, s_rs = grads["alpha/r"]["slope"], grads["alpha/sqrt(r)"]["slope"]
  checks.hard("alpha/r: grad-norm slope = -0.5 +- 0.15", abs(s_r + 0.5) <= 0.15, f"{s_r:+.3f}")
  checks.hard("alpha/sqrt(r): grad-norm slope = 0 +- 0.15", abs(s_rs) <= 0.15, f"{s_rs:+.3f}")
  final = {(row["scaling"], row["rank"]): row for row in sweep}
  r_max = max(size["loss_ranks"])
  loss_rs = final[("alpha/sqrt(r)", r_max)]["final_loss"]
  loss_r = final[("alpha/r", r_max)]["final_loss"]
  checks.soft(f"loss(r={r_max}, alpha/sqrt(r)) < loss(r={r_max}, alpha/r)", loss_rs < loss_r,
              f"{loss_rs:.4f} vs {loss_r:.4f}")
  r_min = min(size["loss_ranks"])
  train_norm = lambda name, r: final[(name, r)]["mean_train_grad_norm"]
  ratio = {name: train_norm(name, r_max) / train_norm(name, r_min)
           for name in ("alpha/r", "alpha/sqrt(r)")}
  checks.soft(f"training-average grad norm r={r_max}/r={r_min}: < 0.5 (alpha/r), "
              "in [0.7, 1.4] (alpha/sqrt(r))",
              ratio["alpha/r"] < 0.5 and 0.7 <= ratio["alpha/sqrt(r)"] <= 1.4,
              f"{ratio['alpha/r']:.3f}, {ratio['alpha/sqrt(r)']:.3f}")
  checks.soft("top direction found the planted one: phi(A_8, dW*)(1,1) >= 0.9",
              subs[0]["phi_top_vs_planted"][8] >= 0.9, f"{subs[0]['phi_top_vs_planted'][8]:.3f}")

  results.save_json({
      "config": {**size, "grad_ranks": GRAD_RANKS, "sub_ranks": SUB_RANKS,
                 "planted_rank": PLANTED_RANK, "rs_rank": RS_RANK, "alpha": ALPHA, "lr": LR,
                 "loss_lr": LOSS_LR, "init": "kaiming", "subspace_scale": 1.0},
      "subspace": {"phi_A": phi_points(grids["grid_A"]), "phi_B": phi_points(grids["grid_B"]),
                   "phi_dW": phi_points(grids["grid_dW"]),
                   "phi_A_init": init_pts, "baseline": baseline,
                   "grid_A": grids["grid_A"], "grid_A_init": grids["grid_A_init"],
                   "phi_top_vs_planted": [s["phi_top_vs_planted"] for s in subs],
                   "drift": [s["drift"] for s in subs],
                   "final_loss": [s["final_loss"] for s in subs],
                   "first_loss": [s["first_loss"] for s in subs]},
      "grad_norm": grads,
      "loss_sweep": sweep,
      "checks": checks.rows,
      "compute_seconds": round(elapsed, 1),
  })
  plot(results, grads, {"A, r=8 vs r=64": grids["grid_A"][:, :64],
                        "B^T, r=8 vs r=64": grids["grid_B"],
                        "initial A (control)": grids["grid_A_init"]}, d)
  checks.finish(results)


if __name__ == "__main__":
  main()

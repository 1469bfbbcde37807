"""E2: what LoRA learns, seen through its subspaces (LoRA Figures 3 and 4, Table 7; intruder dimensions).

The {q,v} adapters of E1 (``experiments.rank_ablation``: the code-pretrained char GPT adapted to
prose) are trained at r=8 and at r=64 (two independent seeds), plus r=4 for Table 7 and a full
fine-tuning run, all on the same cached base. Then:

* Figure 3 analog: φ(i, j) between the top-i directions of the r=8 run and the top-j of the r=64
  run, for A (input side, paper-faithful), B (output side, the paper's footnote 8) and the merged
  ΔW, next to two controls that must sit at the random baseline max(i, j)/d: the *initial* A
  matrices of the same two runs (PRNG-prefix artifact guard, papers.md Sec. 6) and two random
  Gaussian matrices.
* Figure 4 analog: the same between two r=64 runs with different seeds.
* Table 7 analog: ||Uᵀ W V||_F of the pretrained W on ΔW's top-r directions, on W's own and on
  random ones, and the amplification factor ||ΔW||_F / ||Uᵀ W V||_F at r=4 and r=64.
* Intruder dimensions (Shuttleworth et al. 2024) of the merged LoRA kernels and of full FT.

jlora's layout: ``lora_a`` is ``(d_in, r)``, so the paper's "right singular vectors of A" are
``side="in"`` here; ``lora_b`` is ``(r, heads, head_dim)``, whose output-space directions are
``side="out"`` (see ``jlora.analysis``).

Run ``python -m experiments.subspace`` (``--quick``; reuses E1's cached base), ``--smoke`` or
``--full``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

import jlora
from experiments import common
from experiments import rank_ablation as ra

MODULES = ("query", "value")
#: Grid corners printed in the tables; (8, 64) is where the random baseline is already 0.5 at d=128.
CORNERS = ((1, 1), (2, 2), (4, 4), (8, 8), (8, 64))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The ranks compared. ``small``/``large`` are the paper's r=8 and r=64; ``table7`` its r=4."""
  small: int = 8
  large: int = 64
  table7: int = 4


PLANS = {"smoke": Plan(small=2, large=4, table7=1), "quick": Plan(), "full": Plan()}


# ---------------------------------------------------------------------------------------------
# Training: four LoRA runs and full fine-tuning on E1's base
# ---------------------------------------------------------------------------------------------


def train_runs(ctx: ra.Context, plan: Plan, seed: int) -> dict:
  """The {q,v} runs (α/r as in E1) and full FT. Every run has its own PRNG key (ra.run_key)."""
  specs = {"small": ra.Spec("q,v", plan.small, seed=seed),
           "large": ra.Spec("q,v", plan.large, seed=seed),
           "large_seed2": ra.Spec("q,v", plan.large, seed=seed + 1),
           "table7": ra.Spec("q,v", plan.table7, seed=seed)}
  runs = {}
  for name, spec in specs.items():
    runs[name] = ra.train_lora(ctx, spec)
    row = runs[name].row
    print(f"  {spec.name:28s} prose {row['prose_bpc']:.4f}  code {row['code_bpc']:.4f}  "
          f"{row['seconds']:.1f}s", flush=True)
  full_row, full_params = ra.train_full(ctx, seed)
  print(f"  full FT                      prose {full_row['prose_bpc']:.4f}  "
        f"code {full_row['code_bpc']:.4f}", flush=True)
  return {"lora": runs, "full": (full_row, full_params)}


# ---------------------------------------------------------------------------------------------
# Factors as NumPy arrays
# ---------------------------------------------------------------------------------------------


def kernel_path(layer: int, module: str) -> str:
  return f"params/block_{layer}/attn/{module}/kernel"


def factors(run: ra.LoraRun) -> dict[str, dict[str, np.ndarray]]:
  """{kernel path: {"a", "b", "delta", "kernel", "a_init"}} in float64 NumPy.

  ``delta`` is ``scale · tensordot(A, B, 1)`` in the kernel's own shape (d, heads, head_dim).
  """
  out = {}
  for ad in jlora.adapters(run.params):
    a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
    scale = float(np.asarray(ad.scale))
    out[ad.name] = {"a": a, "b": b, "delta": scale * np.tensordot(a, b, axes=1),
                    "kernel": np.asarray(ad.kernel, np.float64),
                    "a_init": np.asarray(run.init_adapters[ad.name]["a"], np.float64)}
  return out


def drift(f: dict) -> float:
  """||A - A_init||_F / ||A_init||_F: how far A moved (a φ on A that barely moved reads its init)."""
  return float(np.linalg.norm(f["a"] - f["a_init"]) / np.linalg.norm(f["a_init"]))


# ---------------------------------------------------------------------------------------------
# Subspace similarity grids
# ---------------------------------------------------------------------------------------------


def grids(f1: dict, f2: dict, max_i: int, max_j: int, seed: int) -> dict[str, np.ndarray]:
  """φ grids (max_i × max_j) between two runs' adapters of one kernel, plus the controls.

  ΔW has shape (d, heads, head_dim): one input axis, so ``n_in=1`` for both of its sides.
  The Gaussian control draws two (d, max_j) matrices, the Figure 4 (right) control.
  """
  sim = jlora.analysis.subspace_similarity_grid
  d = f1["a"].shape[0]
  rng = np.random.default_rng(seed)
  g1, g2 = rng.standard_normal((d, max_i)), rng.standard_normal((d, max_j))
  return {
      "A": sim(f1["a"], f2["a"], side="in", max_i=max_i, max_j=max_j),
      "B": sim(f1["b"], f2["b"], side="out", max_i=max_i, max_j=max_j),
      "dW_in": sim(f1["delta"], f2["delta"], side="in", max_i=max_i, max_j=max_j, n_in=1),
      "dW_out": sim(f1["delta"], f2["delta"], side="out", max_i=max_i, max_j=max_j, n_in=1),
      "A_init": sim(f1["a_init"], f2["a_init"], side="in", max_i=max_i, max_j=max_j),
      "gaussian": sim(g1, g2, side="in", max_i=max_i, max_j=max_j),
  }


def shared_excess(by_kernel: dict, d: int, n: int = 16) -> dict[str, float]:
  """Mean over i ≤ n of φ_ΔW(i, i) − i/d: how much of the top-n subspace two runs share beyond
  chance (a one-number reading of Figure 4's "common directions")."""
  out = {}
  for path, gs in by_kernel.items():
    g = gs["dW_in"]
    k = min(n, *g.shape)
    out[short(path)] = float(np.mean(np.diag(g)[:k] - np.arange(1, k + 1) / d))
  return out


def baseline_grid(max_i: int, max_j: int, d: int) -> np.ndarray:
  return jlora.analysis.random_subspace_baseline(
      np.arange(1, max_i + 1)[:, None], np.arange(1, max_j + 1)[None, :], d)


def corner_rows(label: str, by_kernel: dict, d: int, corners) -> list[dict]:
  """One table row per (kernel, factor): φ at the given (i, j) corners, and the baseline row."""
  shape = next(iter(next(iter(by_kernel.values())).values())).shape
  corners = [c for c in dict.fromkeys(corners) if c[0] <= shape[0] and c[1] <= shape[1]]
  rows = []
  for path, gs in by_kernel.items():
    for factor, g in gs.items():
      row = {"pair": label, "kernel": short(path), "factor": factor}
      for i, j in corners:
        row[f"φ({i},{j})"] = float(g[i - 1, j - 1])
      rows.append(row)
  base = {"pair": label, "kernel": "", "factor": "random baseline max(i,j)/d"}
  for i, j in corners:
    base[f"φ({i},{j})"] = jlora.analysis.random_subspace_baseline(i, j, d)
  return rows + [base]


def short(path: str) -> str:
  """params/block_1/attn/query/kernel -> L1 q."""
  parts = path.split("/")
  return f"L{parts[1].split('_')[1]} {parts[3][0]}"


# ---------------------------------------------------------------------------------------------
# Table 7 and intruder dimensions
# ---------------------------------------------------------------------------------------------


def table7_rows(runs: dict, plan: Plan, seed: int) -> list[dict]:
  """||Uᵀ W V||_F for ΔW's, W's and random top-r frames, and the amplification factor."""
  rows = []
  for name, r in (("table7", plan.table7), ("large", plan.large)):
    for path, f in factors(runs[name]).items():
      p = jlora.analysis.projection_norms(f["kernel"], f["delta"], r, seed, n_in=1)
      rows.append({"r": r, "kernel": short(path), "||UᵀWV|| ΔW": p["proj_delta_w"],
                   "||UᵀWV|| W": p["proj_w"], "||UᵀWV|| random": p["proj_random"],
                   "||W||_F": p["norm_w"], "||ΔW||_F": p["norm_delta_w"],
                   "amplification": p["amplification"]})
  return rows


def intruder_rows(ctx: ra.Context, runs: dict) -> list[dict]:
  """Intruder dimensions (top 10, ε=0.5, output side) of merged LoRA kernels and of full FT."""
  base = flat_params(ctx.base)
  tuned = {f"LoRA r{runs['lora'][k].row['rank']}":
           flat_params(jlora.merge(runs["lora"][k].params)) for k in ("table7", "small", "large")}
  tuned["full FT"] = flat_params(runs["full"][1])
  rows = []
  for label, flat in tuned.items():
    for layer in range(ctx.cfg.n_layers):
      for module in MODULES:
        path = kernel_path(layer, module)
        res = jlora.analysis.intruder_dimensions(base[path], flat[path], n_in=1)
        rows.append({"model": label, "kernel": short(path), "intruders": res.count,
                     "min max|cos|": float(res.max_cos.min())})
  return rows


def flat_params(params) -> dict[str, np.ndarray]:
  """{"/"-joined path: float64 array} of a base-structured params tree."""
  out = {}
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(params):
    out["/".join(str(getattr(k, "key", k)) for k in keypath)] = np.asarray(leaf, np.float64)
  return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def heatmaps(by_kernel: dict, d: int, title: str):
  """Rows: A, B, ΔW (in), A at init, Gaussian; columns: kernels. Colour = φ ∈ [0, 1]."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  factors_shown = ("A", "B", "dW_in", "A_init", "gaussian")
  paths = list(by_kernel)
  fig, axes = plt.subplots(len(factors_shown), len(paths), layout="constrained",
                           figsize=(3.2 * len(paths) + 1, 1.9 * len(factors_shown) + 0.8),
                           squeeze=False)
  for c, path in enumerate(paths):
    for r, factor in enumerate(factors_shown):
      g = by_kernel[path][factor]
      ax = axes[r, c]
      im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower",
                     extent=(0.5, g.shape[1] + 0.5, 0.5, g.shape[0] + 0.5))
      ax.set_title(f"{short(path)} {factor}: φ(1,1)={g[0, 0]:.2f}", fontsize=8)
      ax.tick_params(labelsize=6)
      if c == 0:
        ax.set_ylabel("i", fontsize=7)
      if r == len(factors_shown) - 1:
        ax.set_xlabel("j", fontsize=7)
  fig.colorbar(im, ax=axes, shrink=0.5, label="φ(i, j)")
  fig.suptitle(f"{title}; random baseline max(i,j)/{d}: φ(1,1)≈{1 / d:.3f}", fontsize=10)
  return fig


def diagonal_plot(pairs: dict, d: int):
  """φ(i, i) against i for each factor and pair, with the analytic baseline i/d."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
  for ax, (label, by_kernel) in zip(axes[0], pairs.items()):
    # Colour = kernel, line style = factor, so each kernel's four curves read as one group.
    for colour, (path, gs) in zip(plt.cm.tab10.colors, by_kernel.items()):
      for factor, ls in (("A", "-"), ("B", "--"), ("dW_in", ":"), ("A_init", "-.")):
        g = gs[factor]
        n = min(g.shape)
        ax.plot(np.arange(1, n + 1), np.diag(g)[:n], ls=ls, color=colour, marker=".", ms=3,
                lw=0.8 if factor == "A_init" else 1.5, label=f"{short(path)} {factor}")
    n = max(min(gs["A"].shape) for gs in by_kernel.values())
    ax.plot(np.arange(1, n + 1), np.arange(1, n + 1) / d, color="k", lw=2, label="baseline i/d")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("i (top-i directions of both runs)")
    ax.set_ylabel("φ(i, i)")
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=6, ncol=2)
  return fig


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def run_checks(cross: dict, seeds: dict, t7: list[dict], intr: list[dict], plan: Plan, d: int,
               strict: bool) -> common.Checks:
  checks = common.Checks(strict=strict)
  base = jlora.analysis.random_subspace_baseline

  deviations = {(i, j): abs(gs["A_init"][i - 1, j - 1] - base(i, j, d))
                for gs in list(cross.values()) + list(seeds.values())
                for i, j in CORNERS if i <= gs["A_init"].shape[0] and j <= gs["A_init"].shape[1]}
  worst = max(deviations, key=deviations.get)
  checks.hard("initial-A control within ±0.1 of max(i,j)/d", deviations[worst] <= 0.1,
              f"largest deviation {deviations[worst]:.3f} at φ{worst}, over every kernel and "
              f"corner {sorted(deviations)}")

  # Hard: the top direction of the merged update ΔW (input side; it weighs A's directions by B)
  # is shared, in every kernel and at paper level on average. φ on A alone is the paper's
  # measurement but is soft: when ΔW's top two singular values nearly tie, which of them comes
  # first flips between runs and φ_A(1,1) drops while φ_A(1,2) and φ_A(2,2) stay high.
  top = {short(p): gs["dW_in"][0, 0] for p, gs in cross.items()}
  bar = 20 / d
  mean_top = float(np.mean(list(top.values())))
  checks.hard(f"top ΔW direction shared r={plan.small} vs r={plan.large}: φ(1,1) ≥ 20× baseline "
              f"({bar:.3f}) in every kernel and ≥ 0.5 on average",
              min(top.values()) >= bar and mean_top >= 0.5,
              ", ".join(f"{k} {v:.2f}" for k, v in top.items()) + f"; mean {mean_top:.2f}")
  a11 = {short(p): gs["A"][0, 0] for p, gs in cross.items()}
  checks.soft("paper level: φ_A(1,1) > 0.5 for every kernel", min(a11.values()) > 0.5,
              ", ".join(f"{k} {v:.2f}" for k, v in a11.items()))
  b11 = {short(p): gs["B"][0, 0] for p, gs in cross.items()}
  checks.soft("output side: φ_B(1,1) > 0.5 for every kernel", min(b11.values()) > 0.5,
              ", ".join(f"{k} {v:.2f}" for k, v in b11.items()))

  if plan.small >= 8:
    # Not a hard check: in this toy the adapted ΔW has a higher intrinsic rank than GPT-3's
    # (E1's loss still falls up to r=16), so directions 5..8 are shared too, just less.
    lows = {short(p): float(np.mean(np.diag(gs["dW_in"])[4:8])) for p, gs in cross.items()}
    checks.soft("φ(1,1) > mean φ(i,i) for i=5..8 (the top direction is the most shared)",
                all(top[k] > lows[k] for k in top),
                ", ".join(f"{k} {top[k]:.2f} vs {lows[k]:.2f}" for k in top))

  small = [r for r in t7 if r["r"] == plan.table7]
  ordered = all(r["||UᵀWV|| W"] > 3 * r["||UᵀWV|| ΔW"] and r["||UᵀWV|| ΔW"] > r["||UᵀWV|| random"]
                for r in small)
  checks.soft(f"Table 7 order at r={plan.table7}: W-top ≫ (3×) ΔW > random, every kernel", ordered,
              "; ".join(f"{r['kernel']} {r['||UᵀWV|| W']:.2f} / {r['||UᵀWV|| ΔW']:.3f} / "
                        f"{r['||UᵀWV|| random']:.3f}" for r in small))
  amp = {}
  for r in t7:
    amp.setdefault(r["kernel"], {})[r["r"]] = r["amplification"]
  checks.soft(f"amplification larger at r={plan.table7} than at r={plan.large}",
              all(v[plan.table7] > v[plan.large] for v in amp.values()),
              ", ".join(f"{k} {v[plan.table7]:.1f} vs {v[plan.large]:.1f}" for k, v in amp.items()))

  seed11 = {short(p): gs["dW_in"][0, 0] for p, gs in seeds.items()}
  checks.soft("seeds share the top ΔW direction (φ(1,1) ≥ 20× baseline)",
              min(seed11.values()) >= bar, ", ".join(f"{k} {v:.2f}" for k, v in seed11.items()))
  excess = shared_excess(seeds, d)
  by_module = {m: np.mean([v for k, v in excess.items() if k.endswith(m[0])]) for m in MODULES}
  checks.soft("Figure 4: ΔWq shares more directions across seeds than ΔWv (report-only)",
              by_module["query"] > by_module["value"],
              "mean excess φ(i,i) - i/d over i ≤ 16: "
              + ", ".join(f"{k} {v:.2f}" for k, v in excess.items()))

  lora_n = sum(r["intruders"] for r in intr if r["model"].startswith("LoRA"))
  ft_n = sum(r["intruders"] for r in intr if r["model"] == "full FT")
  checks.soft("intruder dimensions: LoRA ≥ full FT (report-only)", lora_n >= ft_n,
              f"LoRA total {lora_n}, FT total {ft_n}")
  return checks


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  t_start = time.time()
  out = common.Results("subspace", args)
  plan = PLANS[args.size]
  ctx = ra.setup(args)
  d = ctx.cfg.d_model
  print(f"base: prose {ctx.base_bpc['prose']:.4f} bpc, code {ctx.base_bpc['code']:.4f} bpc "
        f"(pretrain/load {ctx.pretrain_seconds:.1f}s)", flush=True)
  runs = train_runs(ctx, plan, args.seed)
  lora = runs["lora"]
  f = {k: factors(v) for k, v in lora.items()}

  # Figure 3: r=small vs r=large; Figure 4: two seeds at r=large (top 8 x 64 and 64 x 64 corners).
  cross = {p: grids(f["small"][p], f["large"][p], plan.small, plan.large, 100 * args.seed + n)
           for n, p in enumerate(f["small"])}
  seeds = {p: grids(f["large"][p], f["large_seed2"][p], plan.large, plan.large,
                    100 * args.seed + 50 + n) for n, p in enumerate(f["large"])}
  phi_rows = (corner_rows(f"r={plan.small} vs r={plan.large}", cross, d, CORNERS)
              + corner_rows(f"r={plan.large} seed 1 vs 2", seeds, d,
                            ((1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (plan.large, plan.large))))
  drift_rows = [{"run": f"r={lora[k].row['rank']} seed {lora[k].row['seed']}", "kernel": short(p),
                 "||A - A0|| / ||A0||": drift(fk)} for k in ("small", "large", "large_seed2")
                for p, fk in f[k].items()]
  t7 = table7_rows(lora, plan, args.seed)
  intr = intruder_rows(ctx, runs)

  out.table(phi_rows, title="Subspace similarity φ(i, j) (Figures 3 and 4 analog)", stem="phi")
  out.table(drift_rows, title="How far A moved from its initialization", stem="drift")
  out.table(t7, title="Table 7 analog: W projected on ΔW's, W's and random top-r subspaces",
            stem="table7")
  out.table(intr, title="Intruder dimensions (top 10 output directions, ε = 0.5)",
            stem="intruders")
  out.figure(heatmaps(cross, d, f"φ between {{q,v}} adapters at r={plan.small} and r={plan.large}"),
             "phi_r8_vs_r64.png")
  seed_view = {p: {k: g[:min(16, g.shape[0]), :] for k, g in gs.items()} for p, gs in seeds.items()}
  out.figure(heatmaps(seed_view, d, f"φ between two r={plan.large} seeds (top 16 × {plan.large})"),
             "phi_seeds.png")
  out.figure(diagonal_plot({f"r={plan.small} vs r={plan.large}": cross,
                            f"r={plan.large} seed 1 vs 2": seeds}, d), "phi_diagonal.png")
  checks = run_checks(cross, seeds, t7, intr, plan, d, strict=args.size != "smoke")
  out.save_json({
      "plan": dataclasses.asdict(plan), "config": dataclasses.asdict(ctx.size),
      "model": dataclasses.asdict(ctx.cfg), "corpus_sha256": ctx.data.sha256,
      "base": ctx.base_bpc,
      "runs": [r.row for r in lora.values()] + [runs["full"][0]],
      "phi": phi_rows, "drift": drift_rows, "table7": t7, "intruders": intr,
      "grids": {"r_small_vs_large": {short(p): gs for p, gs in cross.items()},
                "seeds": {short(p): {k: g[:16, :16] for k, g in gs.items()}
                          for p, gs in seeds.items()}},
      "checks": checks.rows, "timing": {"total_seconds": time.time() - t_start},
  })
  print(f"total wall time {time.time() - t_start:.1f}s", flush=True)
  checks.finish(out)


if __name__ == "__main__":
  main()

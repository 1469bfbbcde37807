"""E1: which matrices to adapt, and at what rank (LoRA Tables 5, 6 and 18; rsLoRA; Biderman et al.).

A small character-level GPT is pretrained on Python standard-library *code* (comments and
docstrings stripped) and then adapted with LoRA to the stdlib's *prose* (those docstrings and
comments). We sweep

* the rank r ∈ {1, 2, 4, 8, 16, 64} × target sets {q}, {q,v}, {q,k,v,o}, {all incl. MLP}, under the
  paper's α/r scaling with α fixed (Table 6; Table 18 is the small-model anchor);
* the same {q,v} sweep under α/√r (rsLoRA, Kalajdzievski 2023);
* a fixed budget of 4,096 trainable parameters spread over different matrix types (Table 5);
* full fine-tuning and no adaptation as baselines,

and report held-out bits/char on the target (prose), the source-domain (code) bits/char after
adaptation (forgetting, "LoRA learns less and forgets less"), exact trainable counts and wall time.

Run ``python -m experiments.rank_ablation`` (``--quick``, the default: 34 adaptation runs, 8.5 min
measured from a clean cache on 2 busy shared cores, of which 2 min pretraining; the base is then
cached), ``--smoke`` (plumbing only) or ``--full``.
The functions here are reused by ``experiments.subspace``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import common, data
from experiments.models import gpt

# ---------------------------------------------------------------------------------------------
# What to adapt
# ---------------------------------------------------------------------------------------------

#: Target sets by their paper name -> the GPT modules whose kernels get adapters.
TARGET_SETS = {
    "q": ("query",),
    "k": ("key",),
    "v": ("value",),
    "o": ("out",),
    "q,k": ("query", "key"),
    "q,v": ("query", "value"),
    "q,k,v,o": ("query", "key", "value", "out"),
    "all": ("query", "key", "value", "out", "fc1", "fc2"),
}


def target_regex(target_set: str) -> str:
  """The ``LoraConfig.targets`` regex for a named target set (kernels only, never biases)."""
  return rf"/({'|'.join(TARGET_SETS[target_set])})/kernel$"


def module_dims(cfg: gpt.GPTConfig) -> dict[str, tuple[int, int]]:
  """(fan_in, fan_out) of each adaptable module, from the architecture alone.

  Written out by hand rather than read from the params so that the trainable-count check
  compares jlora against an independent statement of the LoRA formula r·(d_in + d_out).
  """
  d, m = cfg.d_model, cfg.mlp_dim
  return {"query": (d, d), "key": (d, d), "value": (d, d), "out": (d, d),
          "fc1": (d, m), "fc2": (m, d)}


def expected_trainable(cfg: gpt.GPTConfig, target_set: str, rank: int) -> int:
  """Σ over adapted matrices of r·(d_in + d_out): the LoRA paper's count."""
  dims = module_dims(cfg)
  per_layer = sum(rank * sum(dims[m]) for m in TARGET_SETS[target_set])
  return cfg.n_layers * per_layer


# ---------------------------------------------------------------------------------------------
# Run sizes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Size:
  """Everything that differs between --smoke, --quick and --full.

  Learning rates: LoRA gets a larger peak lr than full fine-tuning (the usual practice: the
  adapter starts at zero and only ΔW moves, so it tolerates and needs bigger steps, whereas full
  FT at that lr would wreck the pretrained weights). Both use Adam with a short warmup and a
  cosine decay to zero, so the final evaluation is at a settled point and no best-of-N selection
  over evaluations is needed.
  """
  d_model: int = 128
  n_heads: int = 4
  n_layers: int = 2
  seq: int = 64
  batch: int = 16
  pretrain_steps: int = 1500
  pretrain_lr: float = 2e-3
  adapt_steps: int = 150
  lora_lr: float = 5e-3
  full_lr: float = 1e-3
  alpha: float = 8.0
  ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
  sweep_sets: tuple[str, ...] = ("q", "q,v", "q,k,v,o", "all")
  budget: tuple[tuple[str, int], ...] = (
      ("q", 8), ("k", 8), ("v", 8), ("o", 8), ("q,k", 4), ("q,v", 4), ("q,k,v,o", 2))
  rslora_set: str = "q,v"
  seeds: tuple[int, ...] = (0,)
  eval_batch: int = 16
  eval_batches: int = 32
  max_chars: int | None = None

  def model_config(self, vocab: int) -> gpt.GPTConfig:
    return gpt.GPTConfig(vocab=vocab, d_model=self.d_model, n_heads=self.n_heads,
                         n_layers=self.n_layers, max_len=self.seq)


SIZES = {
    # Plumbing only: a 1-layer d=32 model, a handful of steps, three LoRA cells.
    "smoke": Size(d_model=32, n_heads=2, n_layers=1, seq=32, batch=8, pretrain_steps=30,
                  adapt_steps=8, ranks=(1, 2), sweep_sets=("q,v",), budget=(("q", 2), ("q,v", 1)),
                  eval_batch=8, eval_batches=4, max_chars=200_000),
    "quick": Size(),
    # Twice the depth, longer sequences and training, two seeds for every cell.
    "full": Size(n_layers=4, seq=128, pretrain_steps=6000, adapt_steps=600, seeds=(0, 1),
                 eval_batches=128),
}


# ---------------------------------------------------------------------------------------------
# Data, model, evaluation
# ---------------------------------------------------------------------------------------------


class Data(NamedTuple):
  """Encoded corpus: training streams and fixed evaluation batches ``(n, B, T)`` per domain."""
  code_train: np.ndarray
  prose_train: np.ndarray
  code_eval: tuple[np.ndarray, np.ndarray]
  prose_eval: tuple[np.ndarray, np.ndarray]
  sha256: str
  chars: dict


def load_data(size: Size) -> Data:
  """Build the stdlib corpus and encode it with the fixed ASCII vocabulary."""
  corpus = data.stdlib_corpus(max_chars=size.max_chars)
  vocab = data.CharVocab.ascii()

  def fixed_eval(text):
    # eval_windows spreads the windows evenly over the whole held-out text, so every run is
    # scored on exactly the same characters.
    batches = data.eval_windows(vocab.encode(text), size.eval_batch, size.seq, size.eval_batches)
    return np.stack([x for x, _ in batches]), np.stack([y for _, y in batches])

  return Data(
      code_train=vocab.encode(corpus.code_train), prose_train=vocab.encode(corpus.prose_train),
      code_eval=fixed_eval(corpus.code_heldout), prose_eval=fixed_eval(corpus.prose_heldout),
      sha256=corpus.sha256,
      chars={k: len(getattr(corpus, k)) for k in
             ("code_train", "code_heldout", "prose_train", "prose_heldout")})


def make_evaluator(model: gpt.GPT):
  """A jitted ``(params, xs, ys) -> bits/char`` over stacked eval batches, for base-structured
  params. LoRA runs are scored through ``jlora.merge``, so one compiled function serves every run
  (a factored forward would recompile for each target set and rank)."""

  @jax.jit
  def bpc(params, xs, ys):
    losses = jax.lax.map(lambda xy: gpt.lm_loss(model.apply(params, xy[0]), xy[1]), (xs, ys))
    return gpt.bits_per_char(jnp.mean(losses))

  return bpc


def warmup_cosine(lr: float, steps: int) -> optax.Schedule:
  """Linear warmup over the first 10% of steps, then cosine decay to zero."""
  warm = max(1, steps // 10)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1), 0.0)


def pretrain(model: gpt.GPT, size: Size, stream: np.ndarray, seed: int):
  """Train the GPT from scratch on ``stream`` (the code corpus) with AdamW."""
  x0 = jnp.zeros((size.batch, size.seq), jnp.int32)
  params = model.init(jax.random.key(seed), x0)
  tx = optax.adamw(warmup_cosine(size.pretrain_lr, size.pretrain_steps), weight_decay=0.01)
  step = full_step(model, tx)
  opt_state = tx.init(params)
  batches = data.char_batches(stream, size.batch, size.seq, seed)
  for _ in common.progress(range(size.pretrain_steps), desc="pretrain on code"):
    params, opt_state, _ = step(params, opt_state, *next(batches))
  return params


def full_step(model: gpt.GPT, tx: optax.GradientTransformation):
  """A jitted full-parameter step: the pretraining step and the full fine-tuning baseline."""

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: gpt.lm_loss(model.apply(p, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


# ---------------------------------------------------------------------------------------------
# One experiment context: the model, the data and the cached base
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What every adaptation run shares. Build it once with :func:`setup`."""
  size: Size
  cfg: gpt.GPTConfig
  model: gpt.GPT
  data: Data
  base: dict
  evaluate: object
  base_bpc: dict
  pretrain_seconds: float
  lora_step: object = None  # one jitted step for every LoRA run (see lora_train_step)
  lora_tx: object = None

  def bpc(self, params) -> dict[str, float]:
    """Held-out bits/char on both domains for base-structured params."""
    return {"prose": float(self.evaluate(params, *self.data.prose_eval)),
            "code": float(self.evaluate(params, *self.data.code_eval))}


def setup(args, size: Size | None = None) -> Context:
  """Load the corpus and the pretrained base (from the cache when it is there)."""
  size = size or SIZES[args.size]
  corpus = load_data(size)
  cfg = size.model_config(data.CharVocab.ascii().size)
  model = gpt.GPT(cfg)
  x0 = jnp.zeros((size.batch, size.seq), jnp.int32)
  # The key names everything that changes the pretrained weights, including the corpus bytes
  # (the stdlib differs between Python versions).
  key = common.fingerprint("gpt-code", dataclasses.asdict(cfg), corpus.sha256, size.max_chars,
                           size.batch, size.seq, size.pretrain_steps, size.pretrain_lr, args.seed)
  t0 = time.time()
  base = common.cached(
      "rank_ablation_base", key, lambda: pretrain(model, size, corpus.code_train, args.seed),
      like=lambda: jax.eval_shape(model.init, jax.random.key(0), x0), refresh=args.no_cache)
  seconds = time.time() - t0
  ctx = Context(size, cfg, model, corpus, base, make_evaluator(model), {}, seconds)
  ctx.base_bpc = ctx.bpc(base)
  return ctx


# ---------------------------------------------------------------------------------------------
# Adaptation runs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
  """One LoRA cell of the sweep."""
  target_set: str
  rank: int
  rslora: bool = False
  seed: int = 0

  @property
  def scaling(self) -> str:
    return "a/sqrt(r)" if self.rslora else "a/r"

  @property
  def name(self) -> str:
    return f"{{{self.target_set}}} r{self.rank} {self.scaling} s{self.seed}"


def run_key(spec: Spec):
  """An independent PRNG key per (target set, rank, seed).

  Runs of different rank must never share a key: with partitionable threefry a smaller draw can
  equal a prefix of a larger one, which fakes subspace overlap between r=8 and r=64 (papers.md
  Sec. 6). The scaling is left out on purpose, so α/r and α/√r runs of one cell start from the
  same A and differ in the scale alone.
  """
  tag = f"{spec.target_set}|{spec.rank}|{spec.seed}"
  return jax.random.fold_in(jax.random.key(spec.seed), zlib.crc32(tag.encode()))


def lora_train_step(ctx: Context):
  """The jlora train step, built once and shared by every LoRA run.

  ``jax.jit`` caches one executable per params structure, so every run with the same target set
  and rank (α/r and α/√r alike: the scale is a leaf, not a constant) reuses a compiled step.
  """
  if ctx.lora_step is None:
    model = ctx.model

    def loss_fn(params, x, y):
      return gpt.lm_loss(jlora.lora(model.apply)(params, x), y)

    size = ctx.size
    tx = optax.adam(warmup_cosine(size.lora_lr, size.adapt_steps))
    # jlora.optimizer only reads which leaves are adapters, by path, so one masked optimizer
    # serves every target set; params here just proves adapters exist.
    probe = jlora.init(jax.random.key(0), ctx.base,
                       jlora.LoraConfig(rank=1, targets=target_regex("q")))
    ctx.lora_tx = jlora.optimizer(tx, probe)
    ctx.lora_step = jlora.train_step(loss_fn, ctx.lora_tx)
  return ctx.lora_step, ctx.lora_tx


def fresh_copy(tree):
  """A copy of ``tree`` with its own buffers.

  ``jlora.train_step`` donates ``params``, and a tree from ``jlora.init`` shares its unadapted
  leaves with the base, so without a copy the first run would delete the base's arrays.
  """
  return jax.tree.map(jnp.copy, tree)


def adapt_stream(ctx: Context, seed: int):
  """Target-domain training batches; every run of a seed sees the same batches in order."""
  return data.char_batches(ctx.data.prose_train, ctx.size.batch, ctx.size.seq, 1000 + seed)


class LoraRun(NamedTuple):
  """A finished LoRA run: its table row, the trained tree and the adapters at initialization."""
  row: dict
  params: dict
  init_adapters: dict


def train_lora(ctx: Context, spec: Spec, alpha: float | None = None) -> LoraRun:
  """Adapt the base to prose with LoRA as described by ``spec``; evaluate through merge."""
  size = ctx.size
  alpha = size.alpha if alpha is None else alpha
  cfg = jlora.LoraConfig(rank=spec.rank, alpha=alpha, targets=target_regex(spec.target_set),
                         rslora=spec.rslora)
  x0 = jnp.zeros((size.batch, size.seq), jnp.int32)
  t0 = time.time()
  # fn=model.apply: the in/out split of every kernel (e.g. q/k/v's (d, heads, head_dim)) is read
  # from the computation itself rather than guessed from the shape.
  params = jlora.init(run_key(spec), fresh_copy(ctx.base), cfg, fn=ctx.model.apply, args=(x0,))
  init_adapters = {ad.name: {"a": np.asarray(ad.a), "b": np.asarray(ad.b)}
                   for ad in jlora.adapters(params)}
  count = jlora.count_params(params)
  step, tx = lora_train_step(ctx)
  opt_state = tx.init(params)
  batches = adapt_stream(ctx, spec.seed)
  for _ in range(size.adapt_steps):
    params, opt_state, loss = step(params, opt_state, *next(batches))
  scores = ctx.bpc(jlora.merge(params))
  seconds = time.time() - t0
  row = {
      "run": spec.name, "kind": "lora", "targets": spec.target_set, "rank": spec.rank,
      "scaling": spec.scaling, "alpha": alpha, "scale": cfg.scale(spec.rank, alpha),
      "seed": spec.seed, "trainable": count.trainable,
      "formula": expected_trainable(ctx.cfg, spec.target_set, spec.rank),
      "prose_bpc": scores["prose"], "code_bpc": scores["code"],
      "forgetting": scores["code"] - ctx.base_bpc["code"],
      "train_loss": float(loss), "seconds": seconds,
  }
  return LoraRun(row, params, init_adapters)


def train_full(ctx: Context, seed: int = 0):
  """The full fine-tuning baseline (every parameter, smaller lr). Returns ``(row, params)``."""
  size = ctx.size
  tx = optax.adam(warmup_cosine(size.full_lr, size.adapt_steps))
  step = full_step(ctx.model, tx)
  t0 = time.time()
  params = fresh_copy(ctx.base)
  opt_state = tx.init(params)
  batches = adapt_stream(ctx, seed)
  for _ in range(size.adapt_steps):
    params, opt_state, loss = step(params, opt_state, *next(batches))
  scores = ctx.bpc(params)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  row = {"run": f"full FT s{seed}", "kind": "full", "targets": "everything", "rank": "",
         "scaling": "", "alpha": "", "scale": "", "seed": seed, "trainable": n, "formula": n,
         "prose_bpc": scores["prose"], "code_bpc": scores["code"],
         "forgetting": scores["code"] - ctx.base_bpc["code"], "train_loss": float(loss),
         "seconds": time.time() - t0}
  return row, params


def no_adaptation_row(ctx: Context) -> dict:
  """The zero-shot baseline: the code-pretrained base scored on prose."""
  return {"run": "no adaptation", "kind": "none", "targets": "", "rank": "", "scaling": "",
          "alpha": "", "scale": "", "seed": "", "trainable": 0, "formula": 0,
          "prose_bpc": ctx.base_bpc["prose"], "code_bpc": ctx.base_bpc["code"],
          "forgetting": 0.0, "train_loss": "", "seconds": 0.0}


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def sweep_specs(size: Size) -> list[Spec]:
  """Every distinct LoRA cell: rank sweep, rsLoRA sweep and fixed budget, for every seed.

  Cells shared by several tables (e.g. {q} r8 is in the rank sweep and in the budget table) are
  trained once. rsLoRA at r=1 equals α/r at r=1 (α/√1 = α/1, same key), so it is not rerun.
  """
  cells = [(t, r, False) for t in size.sweep_sets for r in size.ranks]
  cells += [(size.rslora_set, r, True) for r in size.ranks if r > 1]
  cells += [(t, r, False) for t, r in size.budget]
  unique = list(dict.fromkeys(cells))
  return [Spec(t, r, rs, seed) for seed in size.seeds for t, r, rs in unique]


def merge_error(ctx: Context, params) -> float:
  """Max |logit| difference between the factored forward and the merged model on one batch.

  Every score in this experiment is computed through ``jlora.merge``; this ties those scores to
  the factored computation that was actually trained.
  """
  x = jnp.asarray(ctx.data.prose_eval[0][0])
  factored = jlora.lora(ctx.model.apply)(params, x)
  merged = ctx.model.apply(jlora.merge(params), x)
  return float(jnp.max(jnp.abs(factored - merged)))


def run_sweep(ctx: Context) -> tuple[list[dict], dict, float]:
  """Train every cell plus full fine-tuning; returns (rows, {spec: row}, merge error)."""
  rows, by_spec, err = [no_adaptation_row(ctx)], {}, float("nan")
  specs = sweep_specs(ctx.size)
  for i, spec in enumerate(specs):
    run = train_lora(ctx, spec)
    if i == 0:
      err = merge_error(ctx, run.params)
    row = run.row
    rows.append(row)
    by_spec[spec] = row
    print(f"  {spec.name:32s} prose {row['prose_bpc']:.4f}  code {row['code_bpc']:.4f}  "
          f"{row['trainable']:>7d} params  {row['seconds']:.1f}s", flush=True)
  for seed in ctx.size.seeds:
    row, _ = train_full(ctx, seed)
    rows.append(row)
    print(f"  {row['run']:32s} prose {row['prose_bpc']:.4f}  code {row['code_bpc']:.4f}",
          flush=True)
  return rows, by_spec, err


def cell(by_spec: dict, size: Size, target_set: str, rank: int, rslora: bool = False,
         key: str = "prose_bpc") -> tuple[float, float]:
  """Mean and standard deviation over seeds of one cell's metric."""
  if rslora and rank == 1:
    rslora = False  # identical run, trained once
  vals = [by_spec[Spec(target_set, rank, rslora, s)][key] for s in size.seeds]
  return float(np.mean(vals)), float(np.std(vals))


def full_mean(rows: list[dict], key: str) -> float:
  return float(np.mean([r[key] for r in rows if r["kind"] == "full"]))


# ---------------------------------------------------------------------------------------------
# Tables, plot, checks
# ---------------------------------------------------------------------------------------------


def rank_table(by_spec: dict, size: Size) -> list[dict]:
  """Table 6 analog: target bits/char by target set (rows) and rank (columns)."""
  out = []
  for label, t, rs in ([(f"{{{t}}} a/r", t, False) for t in size.sweep_sets]
                       + [(f"{{{size.rslora_set}}} a/sqrt(r)", size.rslora_set, True)]):
    row = {"targets": label}
    for r in size.ranks:
      m, s = cell(by_spec, size, t, r, rs)
      row[f"r={r}"] = f"{m:.4f}" + (f" ± {s:.4f}" if len(size.seeds) > 1 else "")
    out.append(row)
  return out


def budget_table(by_spec: dict, size: Size) -> list[dict]:
  """Table 5 analog: one fixed parameter budget spread over different matrix types."""
  out = []
  for t, r in size.budget:
    m, s = cell(by_spec, size, t, r)
    fm, _ = cell(by_spec, size, t, r, key="forgetting")
    out.append({"targets": f"{{{t}}}", "rank": r,
                "trainable": by_spec[Spec(t, r, False, size.seeds[0])]["trainable"],
                "prose_bpc": m, "std": s, "forgetting": fm})
  return out


def plot(ctx: Context, by_spec: dict, rows: list[dict]):
  """Target bits/char and source forgetting vs rank, one line per target set (log-x)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  size = ctx.size
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  series = [(f"{{{t}}} α/r", t, False, "-") for t in size.sweep_sets]
  series.append((f"{{{size.rslora_set}}} α/√r", size.rslora_set, True, "--"))
  for ax, key, title in ((axes[0], "prose_bpc", "target (prose) held-out bits/char"),
                         (axes[1], "forgetting", "source (code) bits/char increase")):
    for label, t, rs, ls in series:
      stats = [cell(by_spec, size, t, r, rs, key) for r in size.ranks]
      ax.errorbar(size.ranks, [m for m, _ in stats], yerr=[s for _, s in stats], ls=ls,
                  marker="o", ms=4, capsize=2, label=label)
    ax.axhline(full_mean(rows, key), color="k", ls=":", label="full fine-tuning")
    if key == "prose_bpc":
      ax.axhline(ctx.base_bpc["prose"], color="grey", ls="-.", label="no adaptation")
    ax.set_xscale("log", base=2)
    ax.set_xticks(size.ranks, [str(r) for r in size.ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"LoRA on a code-pretrained char GPT (d={ctx.cfg.d_model}, L={ctx.cfg.n_layers}),"
               f" adapted to prose; α={size.alpha}")
  return fig


def run_checks(ctx: Context, by_spec: dict, rows: list[dict], merge_err: float,
               strict: bool) -> common.Checks:
  """The pass checks of E1: hard ones the literature makes near-certain, soft ones reported."""
  size, checks = ctx.size, common.Checks(strict=strict)
  lora_rows = [r for r in rows if r["kind"] == "lora"]
  none = ctx.base_bpc["prose"]

  checks.hard("factored forward = merged forward (scores are taken merged)", merge_err < 1e-4,
              f"max |Δlogit| {merge_err:.2e}")

  bad = [r["run"] for r in lora_rows if r["trainable"] != r["formula"]]
  checks.hard("trainable count = Σ r(d_in+d_out) for every run", not bad, f"mismatch: {bad}" if bad
              else f"{len(lora_rows)} runs exact")

  worst = max(lora_rows, key=lambda r: r["prose_bpc"])
  checks.hard("every LoRA run beats no adaptation by > 0.05 bpc", worst["prose_bpc"] < none - 0.05,
              f"worst {worst['run']} {worst['prose_bpc']:.4f} vs none {none:.4f}")

  lo, hi = min(size.ranks), 8 if 8 in size.ranks else max(size.ranks)
  q1, q8 = cell(by_spec, size, "q,v", lo)[0], cell(by_spec, size, "q,v", hi)[0]
  checks.hard(f"{{q,v}} r{hi} beats {{q,v}} r{lo}", q8 < q1, f"{q8:.4f} vs {q1:.4f}")

  budget = {(t, r): cell(by_spec, size, t, r) for t, r in size.budget}
  spread = [k for k in budget if k[0] in ("q,v", "q,k,v,o")]
  piled = [k for k in budget if k[0] in ("q", "k")]
  if spread and piled:
    best = min(spread, key=lambda k: budget[k][0])
    worst_piled = max(budget[k][0] for k in piled)
    best_piled = min(budget[k][0] for k in piled)
    sd = max(budget[best][1], *(budget[k][1] for k in piled))
    checks.hard("fixed budget: best of spread configs beats every single-q/k config",
                budget[best][0] + sd < best_piled,
                f"{{{best[0]}}} r{best[1]} {budget[best][0]:.4f} vs best of q/k "
                f"{best_piled:.4f} (worst {worst_piled:.4f}); seed std {sd:.4f}")

  ft_forget = full_mean(rows, "forgetting")
  qv8_forget = cell(by_spec, size, "q,v", hi, key="forgetting")[0]
  max_lora_forget = max(r["forgetting"] for r in lora_rows)
  checks.hard(f"full FT forgets more than {{q,v}} r{hi}", ft_forget > qv8_forget,
              f"code bpc +{ft_forget:.4f} vs +{qv8_forget:.4f}")
  checks.soft("full FT forgets more than every LoRA run", ft_forget > max_lora_forget,
              f"+{ft_forget:.4f} vs max LoRA +{max_lora_forget:.4f}")

  if {1, 16, 64} <= set(size.ranks):
    for t in size.sweep_sets:
      l1, l16, l64 = (cell(by_spec, size, t, r)[0] for r in (1, 16, 64))
      checks.soft(f"plateau {{{t}}} α/r: |gain 16→64| small vs gain 1→16",
                  abs(l16 - l64) < 0.25 * max(l1 - l16, 1e-9),
                  f"1→16: {l1 - l16:+.4f}, 16→64: {l16 - l64:+.4f}")
    rs64 = cell(by_spec, size, size.rslora_set, 64, True)[0]
    pl64 = cell(by_spec, size, size.rslora_set, 64)[0]
    checks.soft("rsLoRA ahead at r=64", rs64 < pl64, f"α/√r {rs64:.4f} vs α/r {pl64:.4f}")
    rs16 = cell(by_spec, size, size.rslora_set, 16, True)[0]
    checks.soft("rsLoRA keeps improving from r=16 to r=64", rs64 < rs16,
                f"{rs16:.4f} → {rs64:.4f}")
  if 8 in size.ranks and "all" in size.sweep_sets:
    at8 = {t: cell(by_spec, size, t, 8)[0] for t in size.sweep_sets}
    checks.soft("{all} best at r=8 (Biderman: all > attention)", min(at8, key=at8.get) == "all",
                ", ".join(f"{{{t}}} {v:.4f}" for t, v in at8.items()))
  if "q" in size.sweep_sets and 8 in size.ranks:
    q8, qv8 = cell(by_spec, size, "q", 8)[0], cell(by_spec, size, "q,v", 8)[0]
    checks.soft("{q} alone worse than {q,v} at r=8 (Table 6)", q8 > qv8, f"{q8:.4f} vs {qv8:.4f}")
  ft = full_mean(rows, "prose_bpc")
  best_lora = min(r["prose_bpc"] for r in lora_rows)
  checks.soft("full FT has the lowest target loss", ft < best_lora,
              f"FT {ft:.4f} vs best LoRA {best_lora:.4f}")
  return checks


COLUMNS = ["run", "targets", "rank", "scaling", "scale", "trainable", "prose_bpc", "code_bpc",
           "forgetting", "seconds"]


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  t_start = time.time()
  out = common.Results("rank_ablation", args)
  # --seed shifts every seed: the base, the adapter keys and the batch order.
  preset = SIZES[args.size]
  size = dataclasses.replace(preset, seeds=tuple(args.seed + s for s in preset.seeds))
  ctx = setup(args, size)
  print(f"base: prose {ctx.base_bpc['prose']:.4f} bpc, code {ctx.base_bpc['code']:.4f} bpc "
        f"(pretrain/load {ctx.pretrain_seconds:.1f}s)", flush=True)
  t_sweep = time.time()
  rows, by_spec, merge_err = run_sweep(ctx)
  sweep_seconds = time.time() - t_sweep

  out.table(rows, COLUMNS, title="All runs (held-out bits/char; forgetting = code bpc increase)")
  out.table(rank_table(by_spec, size), title=f"Target bits/char vs rank (α={size.alpha})",
            stem="rank_table")
  out.table(budget_table(by_spec, size), title="Fixed budget (Table 5 analog)", stem="budget_table")
  out.figure(plot(ctx, by_spec, rows), "loss_vs_rank.png")
  checks = run_checks(ctx, by_spec, rows, merge_err, strict=args.size != "smoke")
  total = time.time() - t_start
  out.save_json({
      "config": dataclasses.asdict(size), "model": dataclasses.asdict(ctx.cfg),
      "corpus_sha256": ctx.data.sha256, "corpus_chars": ctx.data.chars,
      "lr": {"lora": size.lora_lr, "full": size.full_lr, "pretrain": size.pretrain_lr,
             "schedule": "Adam, 10% linear warmup, cosine decay to 0"},
      "base": ctx.base_bpc, "merge_error": merge_err, "rows": rows,
      "rank_table": rank_table(by_spec, size),
      "budget_table": budget_table(by_spec, size), "checks": checks.rows,
      "timing": {"total_seconds": total, "pretrain_or_load_seconds": ctx.pretrain_seconds,
                 "sweep_seconds": sweep_seconds, "n_runs": len(rows) - 1},
  })
  print(f"total wall time {total:.1f}s (pretrain/load {ctx.pretrain_seconds:.1f}s, "
        f"{len(rows) - 1} adaptation runs {sweep_seconds:.1f}s)", flush=True)
  checks.finish(out)


if __name__ == "__main__":
  main()

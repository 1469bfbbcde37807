"""E5: learned mixing of LoRA adapters (LoRAHub, Huang et al. 2023, arXiv 2307.13269).

LoRAHub trains one LoRA per upstream task, then learns a weight per adapter on a few examples of
an unseen task and runs the weighted combination. Here, on the code-pretrained character GPT of
``experiments.rank_ablation`` (its cached base):

* upstream tasks: the prose (docstrings and comments) of six groups of stdlib packages
  (concurrency, mail, GUI, markup, testing, numbers); one LoRA each (rank 8, all attention and
  MLP matrices);
* the new task: the prose of the web packages (http, urllib, xmlrpc, wsgiref, ...). A few
  windows of it (``shots`` x 64 characters, from half of its files) are all that is learned
  from; it is scored on the other half of its files;
* the mix is ``jlora.mix(adapters, w)`` (``cat``, exact) with ``w`` a traced argument of one
  jitted step: ``jax.grad`` of the loss through ``jlora.lora`` (factored) with respect to ``w``,
  plus LoRAHub's L1 penalty; Adam on the weights alone.

Compared on the new task's held-out bits/char: the base, each adapter alone (weight 1), each
adapter alone with its one weight learned the same way, the uniform average, the learned mix, a
LoRA trained from scratch on the same few windows, and (an upper bound, not few-shot) a LoRA
trained on all of the task's training prose. The learned weights are also mixed with ``svd``
(rank 8) and with PEFT's ``linear`` to show what those approximations cost.

Run ``python -m experiments.lorahub`` (``--quick``, the default), ``--smoke`` (plumbing only,
on a random base) or ``--full``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import common, data, rank_ablation
from experiments.models import gpt

NAME = "lorahub"

#: Upstream tasks: the prose of these stdlib top-level packages and modules.
UPSTREAM = {
    "concurrency": ("asyncio", "concurrent", "multiprocessing", "threading", "queue", "selectors"),
    "mail": ("email", "mailbox", "smtplib", "imaplib", "poplib", "mimetypes"),
    "gui": ("tkinter", "turtle", "turtledemo"),
    "markup": ("xml", "html"),
    "testing": ("unittest", "doctest"),
    "numbers": ("_pydecimal", "fractions", "statistics", "numbers", "random"),
}
#: The new task.
TARGET = ("http", "urllib", "xmlrpc", "wsgiref", "socketserver", "ftplib", "webbrowser",
          "cgi")


@dataclasses.dataclass(frozen=True)
class Size:
  base: str = "quick"          # the rank_ablation size whose (cached) base is adapted
  rank: int = 8
  alpha: float = 8.0
  targets: str = "all"         # rank_ablation.TARGET_SETS
  upstream_steps: int = 300
  lora_lr: float = 5e-3
  shots: int = 32              # few-shot windows of the new task (x seq characters)
  mix_steps: int = 200
  mix_lr: float = 0.05
  l1: float = 1e-3             # LoRAHub's penalty on Σ|w| (per nat of loss)
  eval_batches: int = 32
  max_chars: int | None = None
  n_upstream: int = len(UPSTREAM)
  pretrained: bool = True      # False (smoke): a random base, no corpus and no pretraining


SIZES = {
    "smoke": Size(base="smoke", rank=2, upstream_steps=5, shots=8, mix_steps=5, eval_batches=2,
                  max_chars=50_000, n_upstream=3, pretrained=False),
    "quick": Size(),
    "full": Size(upstream_steps=1000, mix_steps=400, eval_batches=128),
}


def group_texts(groups: dict, max_chars: int | None) -> dict[str, tuple[str, str]]:
  """``{group: (first half, second half)}``: each group's prose, split by alternate files
  (in path order). One pass over the stdlib."""
  parsed = data.stdlib_modules(sorted({n for names in groups.values() for n in names}))
  out = {}
  for group, names in groups.items():
    files = sorted((f for n in names for f in parsed[n]), key=lambda f: f[0])
    halves = ["\n\n".join(p for _, _, p in files[k::2] if p) for k in (0, 1)]
    out[group] = tuple(h if max_chars is None else h[:max_chars] for h in halves)
  return out


def key_for(name: str, seed: int):
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def lora_config(size: Size) -> jlora.LoraConfig:
  return jlora.LoraConfig(rank=size.rank, alpha=size.alpha,
                          targets=rank_ablation.target_regex(size.targets))


_STEPS: dict = {}


def lora_step(ctx, size: Size, steps: int):
  """One jitted LoRA train step per schedule length, shared by every adapter trained with it
  (they all have the same structure, so it compiles once)."""
  if steps not in _STEPS:
    x0 = jnp.zeros((ctx.size.batch, ctx.size.seq), jnp.int32)
    probe = jlora.init(jax.random.key(0), ctx.base, lora_config(size), fn=ctx.model.apply,
                       args=(x0,))
    tx = jlora.optimizer(optax.adam(rank_ablation.warmup_cosine(size.lora_lr, steps)), probe)
    loss_fn = lambda p, x, y: gpt.lm_loss(jlora.lora(ctx.model.apply)(p, x), y)
    _STEPS[steps] = (jlora.train_step(loss_fn, tx), tx)
  return _STEPS[steps]


def train_adapter(ctx, name: str, stream: np.ndarray, size: Size, steps: int, seed: int,
                  batches=None):
  """A LoRA trained on ``stream`` (or on the fixed ``batches``); returns its adapter tree."""
  x0 = jnp.zeros((ctx.size.batch, ctx.size.seq), jnp.int32)
  params = jlora.init(key_for(name, seed), rank_ablation.fresh_copy(ctx.base), lora_config(size),
                      fn=ctx.model.apply, args=(x0,))
  step, tx = lora_step(ctx, size, steps)
  opt_state = tx.init(params)
  if batches is None:
    batches = data.char_batches(stream, ctx.size.batch, ctx.size.seq, 1000 + seed)
  for _ in range(steps):
    params, opt_state, _ = step(params, opt_state, *next(batches))
  return jlora.partition(params)[0]


class MixLearner:
  """Learns mixing weights on a few examples: one jitted step, ``w`` a traced argument.

  The adapters are arguments too, so every mix of the same number of adapters of the same
  shapes reuses one executable; ``traces`` counts how often the step was traced.
  """

  def __init__(self, ctx, size: Size):
    self.ctx, self.size, self.traces = ctx, size, 0
    self.tx = optax.adam(size.mix_lr)
    apply = jlora.lora(ctx.model.apply)

    def loss(w, adapters, x, y):
      params = jlora.combine(jlora.mix(adapters, w), ctx.base)
      return gpt.lm_loss(apply(params, x), y)

    def step(w, opt_state, adapters, x, y):
      self.traces += 1
      objective = lambda w: loss(w, adapters, x, y) + size.l1 * jnp.sum(jnp.abs(w))
      value, g = jax.value_and_grad(objective)(w)
      updates, opt_state = self.tx.update(g, opt_state, w)
      return optax.apply_updates(w, updates), opt_state, value

    self.loss = loss
    self.step = jax.jit(step)

  def fit(self, adapters: dict, x, y, w0) -> tuple[jax.Array, list[float]]:
    w = jnp.asarray(w0, jnp.float32)
    opt_state = self.tx.init(w)
    curve = []
    for _ in range(self.size.mix_steps):
      w, opt_state, value = self.step(w, opt_state, adapters, x, y)
      curve.append(float(value))
    return w, curve


@functools.lru_cache
def _merged_mix(method: str, rank):
  """``merge(combine(mix(adapters, w), base))``, jitted: one compile per mix shape."""
  return jax.jit(lambda adapters, w, base: jlora.merge(jlora.combine(
      jlora.mix(adapters, w, method=method, rank=rank), base)))


def score(ctx, target_eval, adapters: dict | None, w=None, method: str = "cat", rank=None):
  """Held-out bits/char of the new task for a mix (None: the base), through ``jlora.merge``."""
  params = ctx.base
  if adapters:
    params = _merged_mix(method, rank)(adapters, jnp.asarray(w, jnp.float32), ctx.base)
  return float(ctx.evaluate(params, *target_eval))


def check_exactness(ctx, adapters: dict, w, x) -> dict:
  """The mix against independent references on the trained adapters."""
  params = jlora.combine(jlora.mix(adapters, w), ctx.base)
  # cat: its delta is Σ wᵢ·Δᵢ, with Δᵢ each adapter's own delta (jlora.deltas: s·A@B).
  want = {}
  for (name, tree), wi in zip(adapters.items(), w):
    for path, d in jlora.deltas(jlora.combine(tree, ctx.base)).items():
      want[path] = want.get(path, 0.0) + float(wi) * np.asarray(d)
  got = jlora.deltas(params)
  cat_err = max(float(np.max(np.abs(np.asarray(got[p]) - d))) for p, d in want.items())
  # the gradient wrt the weights: factored (what was trained) against merged
  y = jnp.roll(x, -1, axis=1)
  learner_loss = lambda mode: lambda w: gpt.lm_loss(
      jlora.lora(ctx.model.apply, mode=mode)(jlora.combine(jlora.mix(adapters, w), ctx.base), x), y)
  g_f = np.asarray(jax.jit(jax.grad(learner_loss("factored")))(w))
  g_m = np.asarray(jax.jit(jax.grad(learner_loss("merged")))(w))
  return {"cat_max_abs_error": cat_err,
          "grad_w_factored": g_f.tolist(), "grad_w_merged": g_m.tolist(),
          "grad_w_rel_error": float(np.max(np.abs(g_f - g_m)) / max(np.max(np.abs(g_m)), 1e-12))}


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  size = SIZES[args.size]
  out = common.Results(NAME, args)
  t0 = time.time()
  base_size = dataclasses.replace(rank_ablation.SIZES[size.base], eval_batches=size.eval_batches)
  if size.pretrained:
    ctx = rank_ablation.setup(argparse_like(args, size.base), base_size)
  else:
    ctx = random_base(base_size, args.seed)
  vocab = data.CharVocab.ascii()
  seq = ctx.size.seq
  print(f"base loaded in {ctx.pretrain_seconds:.1f}s; code {ctx.base_bpc['code']:.4f} bpc", flush=True)

  # -- data ------------------------------------------------------------------------------------
  groups = {name: UPSTREAM[name] for name in list(UPSTREAM)[:size.n_upstream]}
  texts = group_texts({**groups, "target": TARGET}, None)
  upstream_text = {k: "\n\n".join(texts[k]) for k in groups}
  if size.max_chars:
    upstream_text = {k: v[:size.max_chars] for k, v in upstream_text.items()}
  few_text, held_text = (t if size.max_chars is None else t[:size.max_chars]
                         for t in texts["target"])
  few_ids, held_ids = vocab.encode(few_text), vocab.encode(held_text)
  shots = data.eval_windows(few_ids, size.shots, seq, 1)[0]           # (shots, seq) x and y
  held = data.eval_windows(held_ids, ctx.size.eval_batch, seq, size.eval_batches)
  target_eval = (np.stack([x for x, _ in held]), np.stack([y for _, y in held]))
  chars = {"upstream": {k: len(v) for k, v in upstream_text.items()},
           "target_few_shot_source": len(few_text), "target_heldout": len(held_text),
           "shots_chars": size.shots * seq}

  # -- upstream adapters -----------------------------------------------------------------------
  adapters, upstream_rows = {}, []
  for name, text in upstream_text.items():
    t = time.time()
    adapters[name] = train_adapter(ctx, name, vocab.encode(text), size, size.upstream_steps,
                                   args.seed)
    upstream_rows.append({"adapter": name, "chars": len(text), "seconds": time.time() - t})
    print(f"  upstream {name:12s} {len(text):>8d} chars  {time.time() - t:.1f}s", flush=True)

  # -- mixing ----------------------------------------------------------------------------------
  learner = MixLearner(ctx, size)
  x, y = (jnp.asarray(a) for a in shots)
  n = len(adapters)
  rows = [{"run": "base (no adapter)", "kind": "base", "weights": "",
           "target_bpc": score(ctx, target_eval, None)}]
  singles, tuned = {}, {}
  for name, tree in adapters.items():
    # one key for every single adapter: the same tree structure, so one compile
    singles[name] = score(ctx, target_eval, {"adapter": tree}, [1.0])
    rows.append({"run": f"{name} alone", "kind": "single", "weights": "1",
                 "target_bpc": singles[name]})
  for name, tree in adapters.items():
    w1, _ = learner.fit({"adapter": tree}, x, y, [1.0])
    tuned[name] = score(ctx, target_eval, {"adapter": tree}, w1)
    rows.append({"run": f"{name} alone, weight learned", "kind": "single_tuned",
                 "weights": f"{float(w1[0]):.3f}", "target_bpc": tuned[name]})
  uniform = jnp.full((n,), 1.0 / n)
  rows.append({"run": "uniform average (1/n)", "kind": "uniform",
               "weights": fmt(uniform), "target_bpc": score(ctx, target_eval, adapters, uniform)})
  t = time.time()
  w, curve = learner.fit(adapters, x, y, uniform)
  learn_seconds = time.time() - t
  mixed = score(ctx, target_eval, adapters, w)
  rows.append({"run": "learned mix (cat, exact)", "kind": "learned", "weights": fmt(w),
               "target_bpc": mixed})
  svd = score(ctx, target_eval, adapters, w, method="svd", rank=size.rank)
  rows.append({"run": f"learned weights, svd to rank {size.rank}", "kind": "learned_svd",
               "weights": fmt(w), "target_bpc": svd})
  linear = score(ctx, target_eval, adapters, w, method="linear")
  rows.append({"run": "learned weights, PEFT linear", "kind": "learned_linear",
               "weights": fmt(w), "target_bpc": linear})
  batches = iter(lambda: shots, None)  # the same few windows every step
  few_lora = train_adapter(ctx, "few-shot", few_ids, size, size.mix_steps, args.seed,
                           batches=batches)
  rows.append({"run": f"LoRA r{size.rank} trained on the few windows", "kind": "few_shot_lora",
               "weights": "", "target_bpc": score(ctx, target_eval, {"adapter": few_lora}, [1.0])})
  full_lora = train_adapter(ctx, "all-target", few_ids, size, size.upstream_steps, args.seed)
  rows.append({"run": f"LoRA r{size.rank} on all training prose of the task (not few-shot)",
               "kind": "upper_bound", "weights": "",
               "target_bpc": score(ctx, target_eval, {"adapter": full_lora}, [1.0])})

  exact = check_exactness(ctx, adapters, w, x[:4])
  best_single = min(singles, key=singles.get)
  best_tuned = min(tuned, key=tuned.get)
  few = next(r["target_bpc"] for r in rows if r["kind"] == "few_shot_lora")

  out.table(rows, ["run", "weights", "target_bpc"],
            title="New task (web-package prose): held-out bits/char", stem="results")
  checks = common.Checks(strict=args.size != "smoke")
  checks.hard("learned mix beats the best single adapter", mixed < singles[best_single],
              f"{mixed:.4f} vs {best_single} {singles[best_single]:.4f}")
  checks.hard("learned mix beats the best single adapter with its weight learned",
              mixed < tuned[best_tuned], f"{mixed:.4f} vs {best_tuned} {tuned[best_tuned]:.4f}")
  checks.hard("the weight step compiled twice only (one mix of 1, one of n adapters)",
              learner.traces == 2, f"{learner.traces} traces over "
              f"{(n + 1) * size.mix_steps} steps with changing weights")
  checks.hard("cat mix = W + Σ wᵢ·Δᵢ", exact["cat_max_abs_error"] < 1e-5,
              f"max |error| {exact['cat_max_abs_error']:.2e}")
  checks.hard("grad wrt the weights: factored = merged", exact["grad_w_rel_error"] < 1e-4,
              f"max relative error {exact['grad_w_rel_error']:.2e}")
  checks.soft("learned mix beats a LoRA trained on the few windows", mixed < few,
              f"{mixed:.4f} vs {few:.4f}")
  checks.soft("PEFT linear at the learned weights is worse than cat", linear > mixed,
              f"{linear:.4f} vs {mixed:.4f}")
  total = time.time() - t0
  out.save_json({
      "config": dataclasses.asdict(size), "model": dataclasses.asdict(ctx.cfg),
      "upstream": {k: list(v) for k, v in UPSTREAM.items()}, "target": list(TARGET),
      "chars": chars, "rows": rows, "upstream_runs": upstream_rows,
      "weights": dict(zip(adapters, np.asarray(w).tolist())), "mix_curve": curve,
      "exactness": exact, "traces": learner.traces, "checks": checks.rows,
      "timing": {"total_seconds": total, "learn_weights_seconds": learn_seconds,
                 "base_seconds": ctx.pretrain_seconds},
  })
  print(f"total {total:.1f}s", flush=True)
  checks.finish(out)


def random_base(size, seed: int):
  """A randomly initialized GPT in a ``rank_ablation.Context`` (``--smoke``: plumbing only)."""
  cfg = size.model_config(data.CharVocab.ascii().size)
  model = gpt.GPT(cfg)
  base = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((size.batch, size.seq), jnp.int32))
  return rank_ablation.Context(size, cfg, model, None, base, rank_ablation.make_evaluator(model),
                               {"code": float("nan")}, 0.0)


def fmt(w) -> str:
  return " ".join(f"{float(v):.3f}" for v in np.asarray(w))


def argparse_like(args, base: str):
  """``args`` with the size of the rank_ablation run whose base is loaded."""
  import argparse
  return argparse.Namespace(**{**vars(args), "size": base})


if __name__ == "__main__":
  main()

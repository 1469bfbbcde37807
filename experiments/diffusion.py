"""E3: LoRA concept adaptation of a tiny class-conditional diffusion model (8x8 digits).

A DDPM noise model (the cross-attention UNet of ``experiments.models.unet``)
is pretrained on digits 0-7; the class enters as a "prompt" token through
cross-attention, as text does in Stable Diffusion. Tokens 8 and 9 exist but
are never trained. The base is then adapted to digits 8 and 9 with LoRA on

* ``attn``: ``to_q/to_k/to_v/to_out``, the diffusers default target set;
* ``attn+conv``: those plus every ResBlock/down/up convolution (LoCon / Kohya
  C3Lier style),

over ranks r in {1, 2, 4, 8, 16} at scale 1 (alpha = r, the diffusers
convention), plus DoRA (attn, r = 1 and 4) and full fine-tuning. A
strength sweep (the diffusers ``scale``) reuses the attn r=4 adapter.

Metrics: held-out denoising loss on a fixed timestep x noise grid (8/9 and
0-7), an SVC (trained on real digits) scoring DDIM samples for the prompted
class (learning on 8/9, forgetting on 0-7), and sample diversity relative to
real digits. Every evaluation runs on ``jlora.merge(params)``, so one compiled
sampler and one compiled loss serve every model.

Run: ``python -m experiments.diffusion [--smoke | --quick | --full]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import common, data
from experiments import diffusion_utils as du
from experiments.models.unet import UNet, UNetConfig

NAME = "diffusion"
SOURCE_CLASSES = tuple(range(8))
TARGET_CLASSES = (8, 9)
GRID_PROMPTS = (8, 9, 0, 3, 5)       # rows of each model's sample grid

# "quick" is sized for <= 10 min on 2 busy CPU cores including pretraining:
# ~0.06 s per full step at c=(24, 48), B=64, and ~8 s to compile each
# adapter's train step (one per rank/target/DoRA configuration).
SIZES = {
    "smoke": dict(channels=(8, 16), groups=4, batch=16, pretrain_steps=20, pretrain_lr=2e-3,
                  adapt_steps=4, lora_lr=4e-3, ft_lr=5e-4, ranks=(1,), conv_ranks=(1,),
                  dora_ranks=(1,), strength_rank=1, strengths=(0.0, 1.0), n_per_class=4,
                  ddim_steps=4, eval_ts=2, eval_noise=1),
    "quick": dict(channels=(24, 48), groups=8, batch=64, pretrain_steps=1500, pretrain_lr=2e-3,
                  adapt_steps=300, lora_lr=4e-3, ft_lr=5e-4, ranks=(1, 2, 4, 8, 16),
                  conv_ranks=(1, 2, 4, 8, 16), dora_ranks=(1, 4), strength_rank=4,
                  strengths=(0.0, 0.5, 1.0, 1.5),
                  n_per_class=50, ddim_steps=20, eval_ts=10, eval_noise=2),
    "full": dict(channels=(32, 64), groups=8, batch=128, pretrain_steps=6000, pretrain_lr=2e-3,
                 adapt_steps=800, lora_lr=4e-3, ft_lr=5e-4, ranks=(1, 2, 4, 8, 16),
                 conv_ranks=(1, 2, 4, 8, 16), dora_ranks=(1, 2, 4, 8), strength_rank=4,
                 strengths=(0.0, 0.5, 1.0, 1.5),
                 n_per_class=200, ddim_steps=50, eval_ts=20, eval_noise=4),
}

# Target sets. A regex (not a module-name list) so the conv set also reaches
# down_i/up_i without matching up_res_i; every kernel here has (in..., out) axes.
TARGETS = {
    "attn": r"/(to_q|to_k|to_v|to_out)/kernel$",
    "attn+conv": r"/(to_q|to_k|to_v|to_out|conv_1|conv_2|skip|down_\d+|up_\d+)/kernel$",
}
WARMUP = 100                 # pretraining warmup steps (cosine decay after)
EMA_DECAY = 0.995            # pretraining EMA; the cached base is the EMA weights
EVAL_CHUNK = 600             # images per compiled forward in the loss grid

# Hard-check thresholds, calibrated once on a --quick pilot and then frozen
# (see experiments/README.md, "diffusion").
BASE_SOURCE_ACC_MIN = 0.70
BASE_TARGET_ACC_MAX = 0.30
LORA_R4_TARGET_ACC_MIN = 0.60
LORA_R4_GAIN_MIN = 0.30


class Run(NamedTuple):
  """One adaptation: ``kind`` in {"lora", "dora", "ft"}."""
  name: str
  kind: str
  targets: str | None = None
  rank: int | None = None


# ---------------------------------------------------------------------------
# Data and the real-digit classifier.


@dataclasses.dataclass
class Data:
  train_x: np.ndarray
  train_y: np.ndarray
  held_x: np.ndarray
  held_y: np.ndarray
  sha256: str

  def where(self, classes, split="train"):
    """Images and labels of ``classes`` in the train or held-out split."""
    x, y = (self.train_x, self.train_y) if split == "train" else (self.held_x, self.held_y)
    keep = np.isin(y, classes)
    return x[keep], y[keep]


def load_data() -> Data:
  images, labels = data.digits()
  (tx, ty), (hx, hy) = data.split_digits(images, labels, heldout_fraction=0.2, seed=0)
  sha = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
  return Data(tx, ty, hx, hy, sha)


def fit_classifier(d: Data):
  """SVC(gamma='scale') on the real training digits (all 10 classes); with its held-out accuracy."""
  from sklearn.svm import SVC
  svc = SVC(gamma="scale").fit(d.train_x.reshape(len(d.train_x), -1), d.train_y)
  acc = float(svc.score(d.held_x.reshape(len(d.held_x), -1), d.held_y))
  return svc, acc


# ---------------------------------------------------------------------------
# The model, full-parameter training, and the cached base.


def make_model(size: dict):
  model = UNet(UNetConfig(channels=tuple(size["channels"]), groups=size["groups"]))

  def apply(params, x, t, y):
    return model.apply({"params": params}, x, t, y)

  return model, apply


def example_inputs(n: int = 2):
  return (jnp.zeros((n, 8, 8, 1)), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32))


def make_full_step(apply):
  """One jitted full-parameter Adam step with an EMA, shared by pretraining and full FT.

  ``lr`` and ``ema`` decay are arguments rather than constants, so the one
  compiled step serves both (same shapes); the optimizer is ``scale_by_adam``
  and the step subtracts ``lr * update`` itself.
  """
  adam = optax.scale_by_adam()

  @jax.jit
  def step(params, ema, opt_state, x0, labels, key, lr, decay):
    loss, grads = jax.value_and_grad(lambda p: du.ddpm_loss(apply, p, x0, labels, key))(params)
    updates, opt_state = adam.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    return params, ema, opt_state, loss

  return step, adam


def batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int):
  """Infinite random mini-batches (with replacement across batches)."""
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(x), batch)
    yield x[idx], y[idx]


def pretrain(size: dict, d: Data, model, full_step, seed: int):
  """Train on classes 0-7 from scratch; returns the EMA params."""
  step, adam = full_step
  params = jax.jit(model.init)(jax.random.key(seed), *example_inputs())["params"]
  params, ema, opt_state = committed((params, jax.tree.map(jnp.copy, params), adam.init(params)))
  n = size["pretrain_steps"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, size["pretrain_lr"], min(WARMUP, n // 5), n,
                                                size["pretrain_lr"] * 0.05)
  lrs = np.asarray(schedule(np.arange(n)), np.float32)  # evaluated once, not per step
  x, y = d.where(SOURCE_CLASSES)
  data_iter = batches(x, y, size["batch"], seed)
  key = jax.random.key(10_000 + seed)
  losses = []
  for i in common.progress(range(size["pretrain_steps"]), size["pretrain_steps"], "pretrain"):
    xb, yb = next(data_iter)
    params, ema, opt_state, loss = step(params, ema, opt_state, xb, yb, jax.random.fold_in(key, i),
                                        lrs[i], np.float32(EMA_DECAY))
    losses.append(loss)
  print(f"[pretrain] final loss {float(np.mean(losses[-100:])):.4f}", flush=True)
  return ema


def base_model(size: dict, d: Data, model, full_step, args):
  """The pretrained base, cached by (model config, training config, data hash, seed)."""
  keep = ("channels", "groups", "batch", "pretrain_steps", "pretrain_lr")
  key = common.fingerprint({k: size[k] for k in keep}, dataclasses.asdict(model.config),
                           d.sha256, args.seed, WARMUP, EMA_DECAY, SOURCE_CLASSES)
  like = lambda: jax.eval_shape(model.init, jax.random.key(0), *example_inputs())["params"]
  return common.cached(NAME + "-base", key, lambda: pretrain(size, d, model, full_step, args.seed),
                       like=like, refresh=args.no_cache), key


# ---------------------------------------------------------------------------
# Adaptation runs.


def lora_config(run: Run) -> jlora.LoraConfig:
  # alpha=None: scale 1 at every rank (diffusers' lora_alpha = rank).
  return jlora.LoraConfig(rank=run.rank, targets=run.targets, dora=run.kind == "dora")


def expected_trainable(base, run: Run) -> int:
  """Exact count from the formula: sum r (fan_in + fan_out), plus fan_out per DoRA magnitude."""
  total = 0
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
    if re.search(run.targets, jax.tree_util.keystr(keypath, simple=True, separator="/")):
      shape = np.shape(leaf)
      fan_in, fan_out = int(np.prod(shape[:-1])), int(shape[-1])
      total += run.rank * (fan_in + fan_out) + (fan_out if run.kind == "dora" else 0)
  return total


def adapt_lora(run: Run, size: dict, base, apply, d: Data, seed: int):
  """Train one LoRA/DoRA adapter on classes 8 and 9; returns (adapted params, info)."""
  # A copy: train_step donates its inputs, and init shares the base kernels' buffers.
  fresh = jax.tree.map(jnp.copy, base)
  key = jax.random.fold_in(jax.random.key(20_000 + seed), zlib_hash(run.name))
  params = jlora.init(key, fresh, lora_config(run), fn=apply, args=example_inputs())
  tx = jlora.optimizer(optax.adam(size["lora_lr"]), params)
  opt_state = tx.init(params)
  lora_apply = jlora.lora(apply)
  step = jlora.train_step(lambda p, x0, y, k: du.ddpm_loss(lora_apply, p, x0, y, k), tx)
  out = train_loop(step, params, opt_state, size, d, seed)
  params = out.pop("params")
  count = jlora.count_params(params)
  return params, {"trainable": count.trainable, "expected_trainable": expected_trainable(base, run),
                  **out}


def adapt_full(size: dict, base, full_step, d: Data, seed: int):
  """Full fine-tuning of every parameter (the label embeddings included) on 8 and 9."""
  step, adam = full_step
  params = jax.tree.map(jnp.copy, base)
  lr, no_ema = jnp.float32(size["ft_lr"]), jnp.float32(0.0)

  def ft_step(p, o, xb, yb, k):
    p, _, o, loss = step(p, p, o, xb, yb, k, lr, no_ema)
    return p, o, loss

  out = train_loop(ft_step, params, adam.init(params), size, d, seed)
  params = out.pop("params")
  n = sum(int(np.size(v)) for v in jax.tree.leaves(params))
  return params, {"trainable": n, "expected_trainable": n, **out}


def train_loop(step, params, opt_state, size: dict, d: Data, seed: int) -> dict:
  """``size['adapt_steps']`` steps on the 8/9 training images, the same batches for every run."""
  params, opt_state = committed((params, opt_state))
  x, y = d.where(TARGET_CLASSES)
  data_iter = batches(x, y, size["batch"], 30_000 + seed)
  key = jax.random.key(40_000 + seed)
  t0 = time.time()
  losses, first_step = [], 0.0
  for i in range(size["adapt_steps"]):
    xb, yb = next(data_iter)
    params, opt_state, loss = step(params, opt_state, xb, yb, jax.random.fold_in(key, i))
    losses.append(loss)
    if i == 0:  # the first call compiles the step: report it apart from training proper
      first_step = time.time() - t0
  losses = [float(v) for v in losses]
  return {"params": params, "train_seconds": round(time.time() - t0, 1),
          "compile_seconds": round(first_step, 1),
          "first_train_loss": losses[0], "final_train_loss": float(np.mean(losses[-20:]))}


def committed(tree):
  """``tree`` with every array committed to the default device.

  The jitted steps' outputs are committed arrays. If the first call's inputs mix
  committed leaves (the cached base, restored by orbax) with uncommitted ones
  (adapter leaves from ``jlora.init``, optimizer state from ``tx.init``), the
  second call sees different argument placements and compiles the whole step
  again; committing everything up front keeps it to one compile.
  """
  return jax.device_put(tree, jax.devices()[0])


def zlib_hash(text: str) -> int:
  """A stable (unlike ``hash``) integer of a run name, to fold into its PRNG key."""
  return zlib.crc32(text.encode())


def with_strength(params, strength: float):
  """The diffusers ``scale``: multiply every ``lora_scale`` leaf by ``strength``."""
  return jlora.scale(params, strength)


# ---------------------------------------------------------------------------
# Evaluation (always on base-structured, merged params: one compile for all).


class Evaluator:
  """Held-out denoising loss, SVC accuracy of DDIM samples, and sample diversity."""

  def __init__(self, size: dict, d: Data, apply, svc, seed: int):
    self.d, self.svc = d, svc
    n_t = len(du.default_schedule().alpha_bars)
    # Midpoints of eval_ts equal bins: avoids t=0, where the noise is almost
    # invisible and the eps-loss is large and erratic.
    ts = ((np.arange(size["eval_ts"]) + 0.5) * n_t / size["eval_ts"]).astype(np.int32)
    rng = np.random.default_rng(50_000 + seed)
    n_img, k = len(d.held_x), size["eval_noise"]
    reps = len(ts) * k
    self.img_index = np.repeat(np.arange(n_img), reps)
    x0 = d.held_x[self.img_index]
    t = np.tile(np.repeat(ts, k), n_img)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    self.inputs = (np.asarray(du.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))), t,
                   d.held_y[self.img_index], noise)
    self.ts = ts
    self.forward = jax.jit(apply)
    labels = np.repeat(np.arange(10), size["n_per_class"]).astype(np.int32)
    self.sample_labels = labels
    sampler = jax.jit(lambda p, key: du.ddim_sample(apply, p, jnp.asarray(labels), key,
                                                    steps=size["ddim_steps"]))
    self.sample = lambda p: np.asarray(sampler(p, jax.random.key(60_000 + seed)))
    self.real_spread = {c: mean_pairwise(d.train_x[d.train_y == c]) for c in range(10)}

  def denoise_loss(self, params) -> dict:
    """Mean eps-MSE per image over the fixed (t, noise) grid, averaged over 8/9 and 0-7."""
    xt, t, y, noise = self.inputs
    n = len(t)
    per = []
    for s in range(0, n, EVAL_CHUNK):
      e = min(s + EVAL_CHUNK, n)
      pad = EVAL_CHUNK - (e - s)  # pad the last chunk: one compiled shape
      sl = lambda a: np.concatenate([np.asarray(a[s:e]), np.repeat(np.asarray(a[e - 1:e]), pad, 0)])
      eps = np.asarray(self.forward(params, sl(xt), sl(t), sl(y)))[: e - s]
      per.append(np.mean((eps - noise[s:e]) ** 2, axis=(1, 2, 3)))
    per = np.concatenate(per)
    held_y = self.inputs[2]
    return {"loss_target": float(per[np.isin(held_y, TARGET_CLASSES)].mean()),
            "loss_source": float(per[np.isin(held_y, SOURCE_CLASSES)].mean())}

  def samples(self, params) -> tuple[np.ndarray, dict]:
    """DDIM samples for every class prompt, and their scores."""
    x = self.sample(params)
    pred = self.svc.predict(x.reshape(len(x), -1))
    hit = pred == self.sample_labels
    acc = {c: float(hit[self.sample_labels == c].mean()) for c in range(10)}
    div = {c: mean_pairwise(x[self.sample_labels == c]) / self.real_spread[c] for c in range(10)}
    return x, {"acc_target": float(np.mean([acc[c] for c in TARGET_CLASSES])),
               "acc_source": float(np.mean([acc[c] for c in SOURCE_CLASSES])),
               "acc_8": acc[8], "acc_9": acc[9],
               "div_target": float(np.mean([div[c] for c in TARGET_CLASSES])),
               "div_source": float(np.mean([div[c] for c in SOURCE_CLASSES])),
               "acc_per_class": acc}

  def __call__(self, merged) -> tuple[np.ndarray, dict]:
    x, scores = self.samples(merged)
    return x, {**self.denoise_loss(merged), **scores}


def mean_pairwise(x: np.ndarray) -> float:
  """Mean L2 distance over distinct pairs of images."""
  f = x.reshape(len(x), -1).astype(np.float64)
  sq = np.sum(f * f, 1)
  dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0))
  n = len(f)
  return float(dist.sum() / (n * (n - 1))) if n > 1 else 0.0


# ---------------------------------------------------------------------------
# Figures.


def plt_module():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def sample_grid(results, x: np.ndarray, labels: np.ndarray, title: str, filename: str,
                prompts=GRID_PROMPTS, per_row: int = 10) -> None:
  """Rows = prompts, columns = the first ``per_row`` samples of each prompt."""
  plt = plt_module()
  per_row = min(per_row, int(np.sum(labels == prompts[0])))
  figsize = (0.6 * per_row, 0.65 * len(prompts) + 0.4)
  fig, axes = plt.subplots(len(prompts), per_row, figsize=figsize, squeeze=False)
  for i, c in enumerate(prompts):
    imgs = x[labels == c][:per_row]
    for j in range(per_row):
      ax = axes[i, j]
      ax.imshow(imgs[j, ..., 0], cmap="gray_r", vmin=-1, vmax=1)
      ax.set_xticks([]), ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(str(c), rotation=0, labelpad=8)
  fig.suptitle(title, fontsize=9)
  results.figure(fig, filename)


def overview_grid(results, named: list[tuple[str, np.ndarray]], labels: np.ndarray,
                  filename: str, per_class: int = 6) -> None:
  """One row per model: ``per_class`` samples prompted 8, then ``per_class`` prompted 9."""
  plt = plt_module()
  per_class = min(per_class, int(np.sum(labels == 8)))
  cols = 2 * per_class
  fig, axes = plt.subplots(len(named), cols, figsize=(0.5 * cols + 1.6, 0.55 * len(named) + 0.4),
                           squeeze=False)
  for i, (name, x) in enumerate(named):
    imgs = np.concatenate([x[labels == 8][:per_class], x[labels == 9][:per_class]])
    for j in range(cols):
      ax = axes[i, j]
      ax.imshow(imgs[j, ..., 0], cmap="gray_r", vmin=-1, vmax=1)
      ax.set_xticks([]), ax.set_yticks([])
    axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
  fig.suptitle("prompted 8 (left) and 9 (right)", fontsize=9, y=1.0)
  fig.subplots_adjust(top=1.0 - 0.3 / fig.get_figheight())  # keep the title close to the grid
  results.figure(fig, filename)


def summary_plot(results, rows: list[dict]) -> None:
  plt = plt_module()
  base = next(r for r in rows if r["name"] == "base")
  ft = next((r for r in rows if r["name"] == "full FT"), None)
  metrics = (("loss_target", "held-out denoising loss, 8/9"),
             ("acc_target", "SVC acc. of samples, 8/9"),
             ("acc_source", "SVC acc. of samples, 0-7 (forgetting)"),
             ("div_target", "diversity 8/9 (rel. real)"))
  series = (("lora", "attn", "o-"), ("lora", "attn+conv", "s-"), ("dora", "attn", "^--"))
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
  for ax, (m, label) in zip(axes, metrics):
    for kind, targets, style in series:
      pts = [(r["rank"], r[m]) for r in rows if r["kind"] == kind and r["targets"] == targets]
      if pts:
        ax.plot(*zip(*pts), style, label=f"{'DoRA' if kind == 'dora' else 'LoRA'} {targets}")
    ax.axhline(base[m], color="gray", ls=":", label="base")
    if ft is not None:
      ax.axhline(ft[m], color="k", ls="--", label="full FT")
    ax.set(xscale="log", xlabel="rank r", title=label)
    ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
  axes[0].legend(fontsize=7)
  results.figure(fig, "summary.png")


# ---------------------------------------------------------------------------
# Main.


def plan(size: dict) -> list[Run]:
  runs = [Run(f"LoRA attn r={r}", "lora", TARGETS["attn"], r) for r in size["ranks"]]
  runs += [Run(f"LoRA attn+conv r={r}", "lora", TARGETS["attn+conv"], r)
           for r in size["conv_ranks"]]
  runs += [Run(f"DoRA attn r={r}", "dora", TARGETS["attn"], r) for r in size["dora_ranks"]]
  return runs + [Run("full FT", "ft")]


def target_label(run: Run) -> str:
  return next((k for k, v in TARGETS.items() if v == run.targets), "all")


def main(argv=None) -> None:
  args = common.parse_args(__doc__.splitlines()[0], argv)
  size = SIZES[args.size]
  results = common.Results(NAME, args)
  timings = {}
  t0 = time.time()

  d = load_data()
  svc, svc_acc = fit_classifier(d)
  print(f"[svc] held-out accuracy on real digits: {svc_acc:.4f}", flush=True)
  model, apply = make_model(size)
  full_step = make_full_step(apply)
  t = time.time()
  base, base_key = base_model(size, d, model, full_step, args)
  timings["base (pretrain or cache load)"] = round(time.time() - t, 1)
  evaluator = Evaluator(size, d, apply, svc, args.seed)

  rows, grids = [], []
  t = time.time()
  x, m = evaluator(base)
  rows.append({"name": "base", "kind": "base", "targets": "-", "rank": 0, "trainable": 0,
               "expected_trainable": 0, "train_seconds": 0.0, **m})
  grids.append(("base", x))
  sample_grid(results, x, evaluator.sample_labels, "base (pretrained on 0-7)", "samples_base.png")
  timings["base evaluation (incl. compile)"] = round(time.time() - t, 1)

  strength_source = None
  for run in plan(size):
    t = time.time()
    if run.kind == "ft":
      params, info = adapt_full(size, base, full_step, d, args.seed)
      merged = params
    else:
      params, info = adapt_lora(run, size, base, apply, d, args.seed)
      merged = jlora.merge(params)
      if (run.kind, run.targets, run.rank) == ("lora", TARGETS["attn"], size["strength_rank"]):
        strength_source = params
    x, m = evaluator(merged)
    row = {"name": run.name, "kind": run.kind, "targets": target_label(run), "rank": run.rank or 0,
           **info, **m, "wall_seconds": round(time.time() - t, 1)}
    rows.append(row)
    grids.append((run.name, x))
    slug = re.sub(r"[^a-z0-9]+", "_", run.name.lower()).strip("_")
    sample_grid(results, x, evaluator.sample_labels, run.name, f"samples_{slug}.png")
    print(f"[{run.name}] loss 8/9 {m['loss_target']:.4f}  0-7 {m['loss_source']:.4f}  "
          f"acc 8/9 {m['acc_target']:.2f}  0-7 {m['acc_source']:.2f}  ({row['wall_seconds']} s)",
          flush=True)

  strength_rows, strength_grids = [], []
  if strength_source is not None:
    for s in size["strengths"]:
      x, m = evaluator(jlora.merge(with_strength(strength_source, s)))
      keep = ("loss_target", "loss_source", "acc_target", "acc_source", "acc_8", "acc_9",
              "div_target")
      strength_rows.append({"strength": s, **{k: m[k] for k in keep}})
      strength_grids.append((f"scale {s:g}", x))
  timings["total"] = round(time.time() - t0, 1)

  cols = ["name", "trainable", "loss_target", "loss_source", "acc_target", "acc_source",
          "div_target", "div_source", "train_seconds"]
  results.table(rows, cols, title="Adapting to digits 8/9 (held-out loss; SVC accuracy of samples)")
  if strength_rows:
    results.table(strength_rows, title=f"Strength control: LoRA attn r={size['strength_rank']},"
                  " lora_scale x s",
                  stem="strength")
    overview_grid(results, strength_grids, evaluator.sample_labels, "samples_strength.png")
  overview_grid(results, grids, evaluator.sample_labels, "samples_overview_89.png")
  summary_plot(results, rows)

  checks = run_checks(args, rows, strength_rows)
  results.save_json({
      "config": {**size, "source_classes": SOURCE_CLASSES, "target_classes": TARGET_CLASSES,
                 "targets": TARGETS, "scale_convention": "alpha = r (scale 1), diffusers",
                 "lora_init": "kaiming A, B = 0", "ema_decay": EMA_DECAY, "warmup": WARMUP,
                 "base_cache_key": base_key, "eval_timesteps": evaluator.ts,
                 "thresholds": {"base_source_acc_min": BASE_SOURCE_ACC_MIN,
                                "base_target_acc_max": BASE_TARGET_ACC_MAX,
                                "lora_r4_target_acc_min": LORA_R4_TARGET_ACC_MIN,
                                "lora_r4_gain_min": LORA_R4_GAIN_MIN}},
      "data_sha256": d.sha256, "svc_heldout_accuracy": svc_acc,
      "runs": rows, "strength": strength_rows, "timings": timings, "checks": checks.rows,
  })
  checks.finish(results)


def run_checks(args, rows: list[dict], strength_rows: list[dict]) -> common.Checks:
  checks = common.Checks(strict=args.size != "smoke")
  by = {r["name"]: r for r in rows}
  base = by["base"]
  checks.hard(f"base samples 0-7: SVC acc >= {BASE_SOURCE_ACC_MIN}",
              base["acc_source"] >= BASE_SOURCE_ACC_MIN, f"{base['acc_source']:.3f}")
  checks.hard(f"base prompted 8/9: SVC acc <= {BASE_TARGET_ACC_MAX}",
              base["acc_target"] <= BASE_TARGET_ACC_MAX, f"{base['acc_target']:.3f}")
  r4 = by.get("LoRA attn r=4")
  if r4 is not None:
    need = max(LORA_R4_TARGET_ACC_MIN, base["acc_target"] + LORA_R4_GAIN_MIN)
    checks.hard(f"LoRA attn r=4 learns 8/9: acc >= {LORA_R4_TARGET_ACC_MIN} and >= base + "
                f"{LORA_R4_GAIN_MIN}", r4["acc_target"] >= need,
                f"{r4['acc_target']:.3f} (base {base['acc_target']:.3f})")
  adapters = [r for r in rows if r["kind"] in ("lora", "dora")]
  worst = max(adapters, key=lambda r: r["loss_target"])
  checks.hard("every LoRA/DoRA beats the base on held-out 8/9 denoising loss",
              all(r["loss_target"] < base["loss_target"] for r in adapters),
              f"worst {worst['name']} {worst['loss_target']:.4f} vs base {base['loss_target']:.4f}")
  bad = [r["name"] for r in rows if r["trainable"] != r["expected_trainable"]]
  checks.hard("trainable counts equal sum r(fan_in + fan_out) (+ fan_out for DoRA m)", not bad,
              ", ".join(bad) or "all exact")
  if strength_rows and strength_rows[0]["strength"] == 0.0:
    s0 = strength_rows[0]
    checks.hard("strength 0 reproduces the base exactly (loss)",
                abs(s0["loss_target"] - base["loss_target"]) < 1e-5,
                f"{s0['loss_target']:.6f} vs {base['loss_target']:.6f}")

  attn = sorted((r["rank"], r) for r in rows if r["kind"] == "lora" and r["targets"] == "attn")
  if len(attn) >= 2:
    lo, hi = attn[0][1], attn[-1][1]
    checks.soft(f"loss 8/9: attn r={hi['rank']} < r={lo['rank']}",
                hi["loss_target"] < lo["loss_target"],
                f"{hi['loss_target']:.4f} vs {lo['loss_target']:.4f}")
    checks.soft(f"diversity 8/9 falls with rank (r={hi['rank']} < r={lo['rank']})",
                hi["div_target"] < lo["div_target"],
                f"{hi['div_target']:.3f} vs {lo['div_target']:.3f}")
  ft = by.get("full FT")
  if ft is not None and r4 is not None:
    checks.soft("full FT has the lowest 8/9 loss",
                ft["loss_target"] <= min(r["loss_target"] for r in adapters),
                f"{ft['loss_target']:.4f}")
    checks.soft("LoRA forgets less: acc 0-7 (attn r=4) >= full FT - 0.05",
                r4["acc_source"] >= ft["acc_source"] - 0.05,
                f"{r4['acc_source']:.3f} vs {ft['acc_source']:.3f}")
    checks.soft("LoRA forgets less: loss 0-7 (attn r=4) <= full FT",
                r4["loss_source"] <= ft["loss_source"],
                f"{r4['loss_source']:.4f} vs {ft['loss_source']:.4f}")
  for rank in (1, 4):
    dora, lora = by.get(f"DoRA attn r={rank}"), by.get(f"LoRA attn r={rank}")
    if dora and lora:
      checks.soft(f"DoRA r={rank} loss 8/9 <= LoRA r={rank}",
                  dora["loss_target"] <= lora["loss_target"],
                  f"{dora['loss_target']:.4f} vs {lora['loss_target']:.4f}")
  if len(strength_rows) >= 3:
    accs = [s["acc_target"] for s in strength_rows]
    checks.soft("strength: 8/9 accuracy rises from scale 0 to 1",
                all(b >= a - 0.05 for a, b in zip(accs, accs[1:3])),
                ", ".join(f"{a:.2f}" for a in accs))
  return checks


if __name__ == "__main__":
  main()

"""jlora.save / jlora.load on real orbax-checkpoint: round trips, wrong bases,
corrupted steps, SIGKILLed saves and exact resume, the last two in subprocesses."""

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import checkpoint as ckpt_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def base_params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {"params": {
      "fc": {"kernel": normal(6, 5), "bias": jnp.zeros((5,))},
      "conv": {"kernel": normal(3, 3, 2, 4).astype(jnp.bfloat16)},
      "emb": {"embedding": normal(10, 4)},
      "layers": [{"w": jnp.ones((4, 4))}]}}


def adapt(params, ranks, seed=0):
  """``params`` with random DoRA adapters of ``{module: rank}`` (input-first, scale
  rank / 2, dropout 0.1), built with NumPy: eager ``jlora.init`` compiles every
  random op per shape, which costs seconds on 2 busy cores."""
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda x: x, params)
  for module, r in ranks.items():
    node = out["params"][module]
    name = "embedding" if "embedding" in node else "kernel"
    k = node[name]
    dt = k.dtype
    node.update(lora_a=jnp.asarray(rng.standard_normal(k.shape[:-1] + (r,)), dt),
                lora_b=jnp.asarray(rng.standard_normal((r, k.shape[-1])), dt),
                lora_scale=jnp.asarray(r / 2, jnp.float32), lora_dropout=jnp.asarray(0.1, jnp.float32),
                lora_m=jnp.asarray(rng.uniform(0.5, 2.0, k.shape[-1:]), dt))
  return out


RANKS = {"fc": 2, "conv": 2, "emb": 3}


@pytest.fixture(scope="module")
def adapted():
  return adapt(base_params(), RANKS)


def _tx(params):
  return jlora.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), params)


def _bitwise(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(np.asarray(x).dtype == np.asarray(y).dtype
                          and np.asarray(x).tobytes() == np.asarray(y).tobytes()
                          for x, y in zip(la, lb))


@jax.jit
def _state(params):
  """A non-trivial optimizer state: two updates with all-ones gradients."""
  tx = _tx(params)
  st = tx.init(params)
  g = jax.tree.map(jnp.ones_like, jlora.split_trainable(params)[0])
  for _ in range(2):
    _, st = tx.update(g, st, params)
  return st


def test_round_trip_onto_base_and_template(tmp_path, adapted):
  tx = _tx(adapted)
  st = _state(adapted)
  saved = jlora.save(tmp_path, adapted, step=7, opt_state=st, metadata={"note": "x", "lr": 0.1})
  assert saved.path == tmp_path / "7" and saved.wait() == saved.path
  for onto in (base_params(), adapted):  # a base, or an adapted tree whose adapters are replaced
    ck = jlora.load(tmp_path, onto, opt_state=tx.init(adapted))
    assert isinstance(ck, jlora.Checkpoint) and ck.step == 7
    assert _bitwise(ck.params, adapted) and _bitwise(ck.opt_state, st)
    assert ck.metadata["user"] == {"note": "x", "lr": 0.1}
  assert type(ck.opt_state[1][0]).__name__ == "ScaleByAdamState"
  recs = {r["name"]: r for r in ck.metadata["adapters"]}
  assert ck.metadata["jlora_version"] == jlora.__version__
  assert recs["params/emb/embedding"]["rank"] == 3 and recs["params/fc/kernel"]["rank"] == 2
  assert recs["params/fc/kernel"]["scale"] == 1.0 and recs["params/emb/embedding"]["scale"] == 1.5
  assert recs["params/conv/kernel"]["split"] == {"n_stack": 0, "n_in": 3, "out_first": False}
  assert all(r["dora"] and r["init"] == "additive" for r in recs.values())
  assert recs["params/conv/kernel"]["leaves"]["lora_a"]["dtype"] == "bfloat16"
  assert jlora.load(tmp_path, adapted).opt_state is None
  # only the adapter is on disk: not the 10x4 embedding or the bias
  (manifest,) = (tmp_path / "7" / "meta").glob("metadata")
  assert '"bias"' not in manifest.read_text()


def test_nnx_state_round_trip(tmp_path):
  from flax import nnx
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  _, state = nnx.split(model)
  params = jlora.init(jax.random.key(0), state, jlora.LoraConfig(rank=2))
  params = jlora.map_adapters(lambda ad: ad._replace(b=ad.b + 1.0), params)
  jlora.save(tmp_path, params, step=0)
  _, fresh = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  got = jlora.load(tmp_path, fresh).params
  assert isinstance(got["lora_a"], nnx.LoRAParam) and _bitwise(got, params)


def test_steps_latest_given_and_keep_last(tmp_path, adapted):
  for s in (1, 2, 3, 4):
    jlora.save(tmp_path, jlora.scale(adapted, float(s)), step=s, metadata={"s": s}, max_to_keep=2)
  assert ckpt_lib.steps(tmp_path) == [3, 4]
  assert jlora.load(tmp_path, adapted).metadata["user"] == {"s": 4}
  ck = jlora.load(tmp_path, adapted, step=3)
  assert ck.step == 3 and float(jlora.adapters(ck.params)[0].scale) == 3.0
  with pytest.raises(FileNotFoundError, match=r"step 1 not found.*\[3, 4\]"):
    jlora.load(tmp_path, adapted, step=1)
  with pytest.raises(FileNotFoundError, match="no finished checkpoint step"):
    jlora.load(tmp_path / "none", adapted)


def test_save_refuses_old_steps_bad_metadata_and_no_adapters(tmp_path, adapted, monkeypatch):
  jlora.save(tmp_path, adapted, step=5)
  for s in (5, 3):  # orbax itself would skip the save and say nothing
    with pytest.raises(ValueError, match="steps must increase"):
      jlora.save(tmp_path, adapted, step=s)
  for s in (-1, True, 2.0):
    with pytest.raises(ValueError, match="step must be an int >= 0"):
      jlora.save(tmp_path, adapted, step=s)
  with pytest.raises(TypeError, match="JSON-serialisable"):
    jlora.save(tmp_path, adapted, step=6, metadata={"x": np.float32(1)})
  with pytest.raises(TypeError, match="metadata must be a dict"):
    jlora.save(tmp_path, adapted, step=6, metadata=[1])
  with pytest.raises(ValueError, match="no adapters"):
    jlora.save(tmp_path, base_params(), step=6)
  odd_key = {2.5: adapted["params"]["fc"]}
  with pytest.raises(TypeError, match="its key 2.5 is neither a str nor an int"):
    jlora.save(tmp_path, odd_key, step=6)
  monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", lambda *a, **k: False)
  with pytest.raises(ValueError, match="orbax declined to save step 6"):
    jlora.save(tmp_path, adapted, step=6)
  assert sorted(os.listdir(tmp_path)) == ["5"]


def test_async_save(tmp_path, adapted):
  saved = jlora.save(tmp_path, adapted, step=1, async_save=True)
  assert saved.wait() == tmp_path / "1"
  assert _bitwise(jlora.load(tmp_path, base_params()).params, adapted)


def test_loaded_leaves_are_placed_like_their_kernels(tmp_path, adapted):
  jlora.save(tmp_path, adapted, step=1)
  dev = jax.devices()[-1]
  onto = jax.tree.map(lambda x: jax.device_put(x, dev), base_params())  # committed kernels
  got = jlora.load(tmp_path, onto).params
  for ad in jlora.adapters(got):
    for leaf in (ad.a, ad.b, ad.scale, ad.m):
      assert leaf.committed and leaf.sharding == ad.kernel.sharding, ad.name


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "rank", "extra_adapter",
                                  "missing_adapter", "opt", "opt_shape"])
def test_wrong_base_names_the_path_and_both_shapes(tmp_path, adapted, case):
  jlora.save(tmp_path, adapted, step=1, opt_state=_tx(adapted).init(adapted))
  onto, opt = base_params(), None
  if case == "missing":
    del onto["params"]["fc"]
    msg = r"adapter on a kernel 'params/fc/kernel' of shape \(6, 5\) float32, but params has no leaf"
  elif case == "shape":
    onto["params"]["fc"]["kernel"] = jnp.zeros((6, 7))
    msg = r"'params/fc/kernel' was \(6, 5\) float32 when saved, but params has \(6, 7\) float32"
  elif case == "dtype":
    onto["params"]["conv"]["kernel"] = onto["params"]["conv"]["kernel"].astype(jnp.float32)
    msg = r"'params/conv/kernel' was \(3, 3, 2, 4\) bfloat16 .* \(3, 3, 2, 4\) float32"
  elif case == "rank":
    onto = adapt(base_params(), {**RANKS, "conv": 1})
    msg = (r"'params/conv/kernel' has lora_a \(3, 3, 2, 2\), lora_b \(2, 4\), lora_m \(4,\), but"
           r" the adapted params have lora_a \(3, 3, 2, 1\), lora_b \(1, 4\), lora_m \(4,\)")
  elif case == "extra_adapter":
    onto = adapt(base_params(), {"fc": 2, "emb": 3})
    msg = r"adapter at 'params/conv/kernel' \(lora_a \(3, 3, 2, 2\).*but the adapted params have none"
  elif case == "missing_adapter":
    onto = adapt(base_params(), RANKS)
    onto["params"]["layers"][0].update(w_lora_a=jnp.ones((4, 1)), w_lora_b=jnp.ones((1, 4)),
                                       w_lora_scale=jnp.ones(()))
    msg = r"adapted params have an adapter at 'params/layers/0/w' that checkpoint step 1 .* lacks"
  elif case == "opt":
    onto, opt = adapted, jlora.optimizer(optax.sgd(0.1, momentum=0.9), adapted).init(adapted)
    msg = r"optimizer state of \d+ leaves; the opt_state template has \d+"
  else:
    other = adapt(base_params(), {**RANKS, "conv": 1})
    onto, opt = adapted, _tx(other).init(other)
    msg = (r"optimizer state leaf \[1\]\[0\]\.mu\['params'\]\['conv'\]\['lora_a'\] is"
           r" \(3, 3, 2, 2\) bfloat16 on disk .* but \(3, 3, 2, 1\) bfloat16 in the template")
  with pytest.raises(ValueError, match=msg):
    jlora.load(tmp_path, onto, opt_state=opt)


def test_opt_state_asked_for_but_not_saved(tmp_path, adapted):
  jlora.save(tmp_path, adapted, step=1)
  with pytest.raises(ValueError, match="saved without an optimizer state"):
    jlora.load(tmp_path, adapted, opt_state=_tx(adapted).init(adapted))


# ---------------------------------------------------------------------------
# PiSSA / OLoRA: the saved adapter on the original base.


def _mlp(params, x):
  p = params["params"]
  return jnp.tanh(x @ p["fc"]["kernel"] + p["fc"]["bias"])


@pytest.mark.parametrize("how", ["pissa", "olora"])
def test_residual_adapter_loads_onto_the_original_base(tmp_path, how):
  base = base_params()
  cfg = jlora.LoraConfig(rank=2, alpha=4.0, init=how, targets=["fc"])
  trained = jlora.map_adapters(lambda ad: ad._replace(a=ad.a * 1.5, b=ad.b - 0.1),
                               jlora.init(jax.random.key(0), base, cfg))
  jlora.save(tmp_path, trained, step=1)
  rec = jlora.load(tmp_path, base).metadata["adapters"][0]
  assert rec["init"] == "residual"
  got = jlora.load(tmp_path, base).params  # the original base: the residual is rebuilt
  assert _bitwise(got, trained)  # same W -> the same residual kernel, bit for bit
  x = jnp.ones((3, 6))
  np.testing.assert_array_equal(jlora.lora(_mlp)(got, x), jlora.lora(_mlp)(trained, x))
  # onto the residual tree of the same init the kernel is kept; onto a plain adapted
  # tree its adapter is replaced and the kernel becomes the residual
  assert _bitwise(jlora.load(tmp_path, trained).params, trained)
  plain = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["fc"]))
  np.testing.assert_array_equal(jlora.load(tmp_path, plain).params["params"]["fc"]["kernel"],
                                trained["params"]["fc"]["kernel"])


# ---------------------------------------------------------------------------
# Corrupted steps.


@contextlib.contextmanager
def _deadline(seconds):
  def boom(*_):
    raise TimeoutError(f"hung for more than {seconds} s")
  old = signal.signal(signal.SIGALRM, boom)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _data_files(step_dir):
  return sorted(f for f in (step_dir / "adapters").rglob("*") if f.is_file() and f.parent.name == "d")


def _corrupt(step_dir, how):
  if how == "truncate_data":
    for f in _data_files(step_dir):
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif how == "flip_byte":  # orbax alone restores this without a word
    f = max(_data_files(step_dir), key=lambda f: f.stat().st_size)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x10
    f.write_bytes(bytes(b))
  elif how == "delete_data":
    for f in _data_files(step_dir):
      f.unlink()
  elif how == "delete_manifest":
    for f in (step_dir / "adapters").rglob("manifest.ocdbt"):
      f.unlink()
  elif how == "garbage_meta":
    (step_dir / "meta" / "metadata").write_text("{not json")
  elif how == "foreign_meta":
    (step_dir / "meta" / "metadata").write_text('{"format": "something-else"}')
  elif how == "delete_adapters":
    shutil.rmtree(step_dir / "adapters")
  elif how == "empty_dir":
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop at exit
@pytest.mark.parametrize("how", ["truncate_data", "flip_byte", "delete_data", "delete_manifest",
                                 "garbage_meta", "foreign_meta", "delete_adapters", "empty_dir"])
def test_corrupted_step_raises_naming_the_step(tmp_path, adapted, how):
  first = jlora.scale(adapted, 2.0)
  jlora.save(tmp_path, first, step=1)
  jlora.save(tmp_path, adapted, step=2)
  _corrupt(tmp_path / "2", how)
  with _deadline(60):
    with pytest.raises(jlora.CorruptCheckpointError,
                       match=r"checkpoint step 2 in .* is corrupted or incomplete.* Other steps: \[1\]"):
      jlora.load(tmp_path, base_params())
    assert _bitwise(jlora.load(tmp_path, base_params(), step=1).params, first)


def test_optimizer_state_checksum_names_its_leaf(tmp_path, adapted):
  """The state's tiny arrays share a file with orbax's own structures, where a
  flipped byte makes orbax fail (DATA_LOSS); here the recorded digest disagrees."""
  jlora.save(tmp_path, adapted, step=1, opt_state=_state(adapted))
  meta_file = tmp_path / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["opt_state"][2]["sha256"] = "0" * 64
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(jlora.CorruptCheckpointError,
                     match=r"step 1 .*: optimizer state leaf \[1\]\[0\]\.mu.* fails its SHA-256 check"):
    jlora.load(tmp_path, adapted, opt_state=_tx(adapted).init(adapted))


# ---------------------------------------------------------------------------
# Subprocesses: a SIGKILLed save, and exact resume.


def _run(code, *args, check=True):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                     text=True, env=env, timeout=300)
  if check and r.returncode != 0:
    raise AssertionError(f"child failed with {r.returncode}:\n{r.stderr[-3000:]}")
  return r


def _tree_digest(d):
  h = hashlib.sha256()
  for p in sorted(pathlib.Path(d).rglob("*")):
    h.update(str(p.relative_to(d)).encode())
    if p.is_file():
      h.update(p.read_bytes())
  return h.hexdigest()


_KILLED_SAVE = """
import os, signal, sys, jax, jax.numpy as jnp, jlora
d, mode = sys.argv[1], sys.argv[2]
base = {"fc": {"kernel": jnp.ones((512, 2048))}}
params = jlora.init(jax.random.key(0), base, jlora.LoraConfig(rank=512))   # 8 MiB of adapter
if mode == "rename":  # killed at the last moment: everything written, not yet renamed
  real = os.rename
  def rename(src, dst, *a, **k):
    if os.path.basename(os.fspath(dst)) == "2":
      os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
  os.rename = rename
  jlora.save(d, params, step=2, max_to_keep=1)
else:  # killed while the background thread writes
  jlora.save(d, params, step=2, max_to_keep=1, async_save=True)
  os.kill(os.getpid(), signal.SIGKILL)
print("NOT KILLED")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rename", "async"])
def test_killed_save_keeps_the_previous_step(tmp_path, adapted, mode):
  jlora.save(tmp_path, adapted, step=1, metadata={"s": 1})
  before = _tree_digest(tmp_path / "1")
  r = _run(_KILLED_SAVE, str(tmp_path), mode, check=False)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  names = sorted(os.listdir(tmp_path))
  assert names[0] == "1" and len(names) == 2 and names[1].startswith("2.orbax-checkpoint-tmp"), names
  assert ckpt_lib.steps(tmp_path) == [1]
  assert _tree_digest(tmp_path / "1") == before  # bitwise intact on disk; max_to_keep never ran
  ck = jlora.load(tmp_path, base_params())
  assert ck.step == 1 and ck.metadata["user"] == {"s": 1} and _bitwise(ck.params, adapted)
  jlora.save(tmp_path, adapted, step=2)  # a new save of that step clears the stale tmp dir
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


_TRAIN = """
import hashlib
import jax, jax.numpy as jnp, numpy as np, optax, jlora
rng = np.random.default_rng(0)  # NumPy and one jit: eager jax ops compile one by one
base = {"fc1": {"kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
                "bias": jnp.zeros(16)},
        "fc2": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}}
cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=["fc1", "fc2"])
target = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)

def model(p, x):
  return jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"]

def loss_fn(p, step):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(3), step), (16, 8))
  return jnp.mean((jlora.lora(model)(p, x) - x @ target) ** 2)

params0 = jax.jit(lambda b: jlora.init(jax.random.key(2), b, cfg))(base)
tx = jlora.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
    optax.warmup_cosine_decay_schedule(0.0, 3e-2, 2, 2 * n), weight_decay=1e-2)), params0)
step = jlora.train_step(loss_fn, tx)

def fresh():  # the step donates its params, frozen kernels included: a copy of the init
  params = jax.tree.map(jnp.copy, params0)
  return params, tx.init(params)

def run(params, st, start, stop):
  losses = []
  for s in range(start, stop):
    params, st, loss = step(params, st, jnp.int32(s))
    losses.append(float(loss).hex())
  return params, st, losses

def digest(tree):
  return [hashlib.sha256(np.asarray(x).tobytes()).hexdigest() for x in jax.tree.leaves(tree)]
"""

_FIRST_HALF = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", sys.argv[3])  # as in the test process
d, n = sys.argv[1], int(sys.argv[2])
exec(TRAIN)
params, st, losses = run(*fresh(), 0, n)
jlora.save(d, params, step=n, opt_state=st, metadata={"next_step": n})
print(json.dumps(losses))
"""


@pytest.mark.slow
def test_exact_resume_across_processes(tmp_path):
  """A child process trains n steps, saves and exits; this process trains 2n steps
  in one go, then loads the child's step onto a fresh init and trains n more."""
  n = 5
  child = f"TRAIN = {_TRAIN!r}\n" + _FIRST_HALF
  precision = str(jax.config.jax_default_matmul_precision)
  first = json.loads(_run(child, str(tmp_path), str(n), precision).stdout.strip().splitlines()[-1])
  scope = {"n": n}
  exec(_TRAIN, scope)
  params, st, full = scope["run"](*scope["fresh"](), 0, 2 * n)
  want = scope["digest"]((params, st))
  ck = jlora.load(tmp_path, scope["fresh"]()[0], opt_state=scope["fresh"]()[1])
  assert ck.step == n and ck.metadata["user"]["next_step"] == n
  params, st, second = scope["run"](ck.params, ck.opt_state, n, 2 * n)
  assert len(full) == 2 * n and len(set(full)) == 2 * n
  assert first + second == full  # every loss, bit for bit
  assert scope["digest"]((params, st)) == want  # final params and optimizer state, bit for bit

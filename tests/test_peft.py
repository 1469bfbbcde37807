"""PEFT both ways, against real PEFT (torch CPU): jlora.load_peft and jlora.save_peft.

The torch model has one module of each kind PEFT adapts (Linear, Conv2d, Conv1d,
Embedding, GPT-2's Conv1D); its JAX twin is a plain function of a params dict
that holds the same weights in three layouts: Flax's (Dense ``(in, out)``, Conv
``(*window, c_in, c_out)``), torch's as is (``(out, in)`` used as ``x @ W.T``,
``(out, c_in, *window)`` convs: output-first in jlora), and GPT-2 Conv1D's
``(in, out)``. Import: PEFT's adapted and merged outputs come out of
``jlora.lora(fn)`` and ``fn(jlora.merge(...))``. Export: PEFT's
``from_pretrained`` of ``save_peft``'s directory gives ``jlora.lora(fn)``'s outputs.
"""

import copy
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add overhead here
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import jlora  # noqa: E402
from jlora import torch_format as tf  # noqa: E402
from jlora.peft import UnsupportedPeftError  # noqa: E402

nn = torch.nn
MODULES = ["fc", "fc_t", "conv", "conv_t", "pw", "emb", "gpt2", "c1d", "block.0", "sub.fc"]


class Net(nn.Module):
  def __init__(self):
    super().__init__()
    self.fc = nn.Linear(6, 5)
    self.fc_t = nn.Linear(6, 4)
    self.sq_t = nn.Linear(6, 6)
    self.conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1)
    self.conv_t = nn.Conv2d(3, 4, 3, padding=1)
    self.pw = nn.Conv2d(3, 2, 1)
    self.emb = nn.Embedding(10, 6)
    self.gpt2 = Conv1D(5, 6)  # weight (in=6, out=5), y = x @ W
    self.c1d = nn.Conv1d(3, 4, 3, padding=1)
    self.block = nn.Sequential(nn.Linear(6, 7))
    self.sub = nn.ModuleDict({"fc": nn.Linear(6, 3)})

  def forward(self, x, img, ids, seq):
    return {"fc": self.fc(x), "fc_t": self.fc_t(x), "sq_t": self.sq_t(x), "conv": self.conv(img),
            "conv_t": self.conv_t(img), "pw": self.pw(img), "emb": self.emb(ids),
            "gpt2": self.gpt2(x), "c1d": self.c1d(seq), "block.0": self.block(x),
            "sub.fc": self.sub["fc"](x)}


def _conv(x, w, spec, stride=1, pad=1):
  """A torch-style (channels-first) conv with the kernel laid out as ``spec`` says."""
  nd = x.ndim - 2
  io = "NCHW" if nd == 2 else "NCH"
  stride = (stride,) * nd if isinstance(stride, int) else stride
  return jax.lax.conv_general_dilated(x, w, stride, [(pad, pad)] * nd,
                                      dimension_numbers=(io, spec, io))


def jax_forward(params, x, img, ids, seq):
  """The JAX twin of ``Net``; every layout is read by ``jlora.init(fn=...)``."""
  p = params["params"]
  dense = lambda q, h: h @ q["kernel"] + q["bias"]
  bias2 = lambda q: q["bias"][:, None, None]
  return {
      "fc": dense(p["fc"], x),
      "fc_t": x @ p["fc_t"]["weight"].T + p["fc_t"]["bias"],
      "sq_t": x @ p["sq_t"]["weight"].T + p["sq_t"]["bias"],
      "conv": _conv(img, p["conv"]["kernel"], "HWIO", (2, 1)) + bias2(p["conv"]),
      "conv_t": _conv(img, p["conv_t"]["weight"], "OIHW") + bias2(p["conv_t"]),
      "pw": _conv(img, p["pw"]["kernel"], "HWIO", 1, 0) + bias2(p["pw"]),
      "emb": p["emb"]["embedding"][ids],
      "gpt2": x @ p["gpt2"]["weight"] + p["gpt2"]["bias"],
      "c1d": _conv(seq, p["c1d"]["kernel"], "HIO") + p["c1d"]["bias"][:, None],
      "block.0": dense(p["block"][0], x),
      "sub.fc": dense(p["sub"]["fc"], x),
  }


FORWARD = jax.jit(jlora.lora(jax_forward))  # one compile per adapter structure, shared by tests
MERGED = jax.jit(lambda params, *x: jax_forward(jlora.merge(params), *x))


def to_jax(net):
  """``Net``'s weights in the twin's layouts (plus a leading ``params``; ``block`` a list)."""
  t = {n: m.weight.detach().numpy() for n, m in net.named_modules() if hasattr(m, "weight")}
  b = {n: m.bias.detach().numpy() for n, m in net.named_modules()
       if getattr(m, "bias", None) is not None}
  flax_dense = lambda n: {"kernel": t[n].T, "bias": b[n]}
  p = {"fc": flax_dense("fc"), "fc_t": {"weight": t["fc_t"], "bias": b["fc_t"]},
       "sq_t": {"weight": t["sq_t"], "bias": b["sq_t"]},
       "conv": {"kernel": t["conv"].transpose(2, 3, 1, 0), "bias": b["conv"]},
       "conv_t": {"weight": t["conv_t"], "bias": b["conv_t"]},
       "pw": {"kernel": t["pw"].transpose(2, 3, 1, 0), "bias": b["pw"]},
       "emb": {"embedding": t["emb"]}, "gpt2": {"weight": t["gpt2"], "bias": b["gpt2"]},
       "c1d": {"kernel": t["c1d"].transpose(2, 1, 0), "bias": b["c1d"]},
       "block": [flax_dense("block.0")], "sub": {"fc": flax_dense("sub.fc")}}
  return jax.tree.map(jnp.asarray, {"params": p})


def _inputs(seed=1):
  g = torch.Generator().manual_seed(seed)
  return dict(x=torch.randn(4, 6, generator=g), img=torch.randn(2, 3, 7, 5, generator=g),
              ids=torch.tensor([[0, 3, 9], [5, 5, 1]]), seq=torch.randn(2, 3, 8, generator=g))


def _jax_inputs(inputs):
  return [jnp.asarray(v.numpy()) for v in inputs.values()]


@pytest.fixture(scope="module")
def base():
  torch.manual_seed(0)
  net = Net()
  with torch.no_grad():
    for n, p in net.named_parameters():
      if n.endswith("bias"):
        p.uniform_(-0.5, 0.5)
  return net.eval()


def _close(got, want, what, names=MODULES):
  for n in names:
    g = np.asarray(got[n].detach() if hasattr(got[n], "detach") else got[n], np.float64)
    w = np.asarray(want[n].detach() if hasattr(want[n], "detach") else want[n], np.float64)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(),
                               err_msg=f"{what}: module {n}")


def randomize(params, seed, scale=0.5):
  """Random A, B (and DoRA m) drawn with NumPy: eager jax.random would compile once
  per leaf shape, which dominates these tests on 2 cores."""
  rng = np.random.default_rng(seed)
  draw = lambda x, f: jnp.asarray(f(np.shape(x)), x.dtype)
  return jlora.map_adapters(lambda ad: ad._replace(
      a=draw(ad.a, lambda s: scale * rng.standard_normal(s)),
      b=draw(ad.b, lambda s: scale * rng.standard_normal(s)),
      m=None if ad.m is None else draw(ad.m, lambda s: np.asarray(ad.m) * rng.uniform(0.7, 1.3, s))),
      params)


def init(params, cfg, fn, *args):
  """``jlora.init`` under one jit (eager, it compiles every random op per shape)."""
  return jax.jit(lambda p, *a: jlora.init(jax.random.key(0), p, cfg, fn=fn, args=a))(params, *args)


def _by_module(params):
  """``{torch module name: Adapter}`` under the default key map."""
  return {tf.dotted(tf.module_name(ad.path)): ad for ad in jlora.adapters(params)}


def _torch_out(model, inputs):
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return model(**inputs)


CASES = {
    "plain": dict(r=4, lora_alpha=8),
    # PEFT's pattern keys match whole trailing names, (.*\.)?(key)$: "fc" reaches
    # "fc" and "sub.fc" but not "fc_t"; "0" reaches "block.0".
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True,
                            rank_pattern={"conv": 2, "gpt2": 3, "block.0": 5, "sub.fc": 1},
                            alpha_pattern={"fc": 3.0, "emb": 5, "0": 7}),
    "dora_rslora_patterns": dict(r=3, lora_alpha=5, use_rslora=True, use_dora=True,
                                 rank_pattern={"pw": 2, "emb": 6}, alpha_pattern={"c1d": 2.5}),
}


def _peft_model(base, case, targets=MODULES, seed=3):
  cfg = LoraConfig(target_modules=list(targets), init_lora_weights=False, **CASES[case])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # GPT-2 Conv1D: "fan_in_fan_out ... set to True"
    pm = get_peft_model(copy.deepcopy(base), cfg)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_magnitude_vector" in n:  # DoRA's init makes m = ||W + dW||: move it off
        p.mul_(torch.rand(p.shape, generator=g) + 0.5)
      elif "lora_" in n:
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
  return pm.eval()


@pytest.mark.parametrize("case", ["rslora_patterns", "dora_rslora_patterns"])
def test_load_peft_reproduces_adapted_and_merged_outputs(tmp_path, base, case):
  """PEFT -> jlora, every module kind and layout; rsLoRA with rank and alpha
  patterns, without and with DoRA (each compile of the twin costs seconds here)."""
  inputs = _inputs()
  pm = _peft_model(base, case)
  adapted = _torch_out(pm, inputs)
  plain = _torch_out(base, inputs)
  assert all(float((adapted[n] - plain[n]).abs().max()) > 0.1 for n in MODULES)
  pm.save_pretrained(tmp_path)
  params = jlora.load_peft(tmp_path, to_jax(base))
  ads = _by_module(params)
  assert sorted(ads) == sorted(MODULES)
  assert ads["fc_t"].out_first and ads["conv_t"].out_first  # torch layouts, read from shapes
  assert not ads["gpt2"].out_first and not ads["conv"].out_first
  for n, ad in ads.items():  # PEFT's own per-module scale and rank
    layer = pm.base_model.model.get_submodule(n)
    assert float(ad.scale) == pytest.approx(layer.scaling["default"], rel=1e-6), n
    assert ad.rank == layer.r["default"], n
  merged = _torch_out(pm.merge_and_unload(), inputs)
  x = _jax_inputs(inputs)
  _close(FORWARD(params, *x), adapted, "factored vs PEFT adapted")
  _close(MERGED(params, *x), merged, "jlora.merge vs PEFT merge_and_unload")


def test_save_peft_loads_in_peft(tmp_path, base):
  """jlora -> PEFT: every module kind and layout, DoRA, ranks from 2 to 6 and a
  different scale on every module (alpha_pattern entries), from an adapted tree
  with new random factors."""
  inputs = _inputs()
  x = _jax_inputs(inputs)
  jbase = to_jax(base)
  _peft_model(base, "dora_rslora_patterns").save_pretrained(tmp_path / "src")
  factors = iter(np.linspace(0.5, 1.7, len(MODULES)))
  params = jlora.map_adapters(lambda ad: ad._replace(scale=ad.scale * next(factors)),
                              randomize(jlora.load_peft(tmp_path / "src", jbase), 1))
  config = jlora.save_peft(tmp_path, params, base_model_name_or_path="tiny-net")
  assert config["fan_in_fan_out"] is False and config["base_model_name_or_path"] == "tiny-net"
  assert len(config["alpha_pattern"]) >= len(MODULES) - 1 and config["use_dora"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
  _close(_torch_out(loaded, inputs), FORWARD(params, *x), "PEFT from_pretrained vs jlora.lora")
  # PEFT adapted exactly these modules (a list target_modules would also take "fc" for "sub.fc")
  assert sorted(n for n, m in loaded.named_modules() if hasattr(m, "lora_A")) == sorted(
      "base_model.model." + m for m in MODULES)
  for n, ad in _by_module(params).items():  # PEFT's own scale per module equals jlora's
    assert loaded.base_model.model.get_submodule(n).scaling["default"] == pytest.approx(
        float(ad.scale), rel=1e-6), n
  again = jlora.load_peft(tmp_path, jbase)  # and back: the same leaves
  for a, b in zip(jlora.adapters(again), jlora.adapters(params)):
    assert a.name == b.name and float(a.scale) == pytest.approx(float(b.scale), rel=1e-6)
    for f in ("a", "b", "m"):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=a.name)


def test_template_fixes_the_layout_of_a_square_torch_kernel(tmp_path, base):
  """``sq_t`` is a (6, 6) torch-layout weight: its shapes fit both layouts, so a
  base tree reads it input-first (as ``jlora.init`` without ``fn`` would); an
  adapted tree from ``jlora.init(fn=...)`` says output-first, and then it is right."""
  inputs = _inputs()
  x = _jax_inputs(inputs)
  pm = _peft_model(base, "plain", targets=["sq_t"])
  pm.save_pretrained(tmp_path)
  jbase = to_jax(base)
  template = init(jbase, jlora.LoraConfig(rank=4, targets=["sq_t"]), jax_forward, *x)
  params = jlora.load_peft(tmp_path, template)
  assert jlora.adapters(params)[0].out_first
  _close(FORWARD(params, *x), _torch_out(pm, inputs), "template", ["sq_t"])
  on_base = jlora.load_peft(tmp_path, jbase)
  assert not jlora.adapters(on_base)[0].out_first  # documented: the shapes cannot tell


class Stack(nn.Module):
  def __init__(self):
    super().__init__()
    self.layers = nn.ModuleList([nn.ModuleDict({"fc": nn.Linear(6, 6)}) for _ in range(3)])

  def forward(self, x):
    for layer in self.layers:
      x = torch.tanh(layer["fc"](x))
    return x


def scan_forward(params, x):
  def body(h, layer):
    return jnp.tanh(h @ layer["fc"]["kernel"] + layer["fc"]["bias"]), None
  return jax.lax.scan(body, x, params["params"]["layers"])[0]


STACK_MAP = lambda m: re.sub(r"^params/layers/(.*)/(\d+)$", r"layers.\2.\1", m).replace("/", ".")


def test_stacked_adapters_per_layer_with_a_key_map(tmp_path):
  torch.manual_seed(0)
  net = Stack().eval()
  w = [net.layers[i]["fc"] for i in range(3)]
  jbase = {"params": {"layers": {"fc": {
      "kernel": jnp.stack([jnp.asarray(l.weight.detach().numpy().T) for l in w]),
      "bias": jnp.stack([jnp.asarray(l.bias.detach().numpy()) for l in w])}}}}
  x = torch.randn(2, 6)
  params = init(jbase, jlora.LoraConfig(rank=2, alpha=3.0, targets=["fc"]), scan_forward,
                jnp.asarray(x.numpy()))
  assert jlora.adapters(params)[0].n_stack == 1
  params = randomize(params, 1)
  with pytest.raises(ValueError, match=r"stacked .*key_map that places the layer index"):
    jlora.save_peft(tmp_path / "no", params)
  cfg = jlora.save_peft(tmp_path, params, key_map=STACK_MAP)
  assert re.fullmatch(cfg["target_modules"], "layers.2.fc")
  loaded = PeftModel.from_pretrained(copy.deepcopy(net), tmp_path).eval()
  ours = jlora.lora(scan_forward)(params, jnp.asarray(x.numpy()))
  with torch.no_grad():
    np.testing.assert_allclose(loaded(x).numpy(), ours, rtol=1e-5, atol=1e-6)
  again = jlora.load_peft(tmp_path, jbase, key_map=STACK_MAP)  # a base kernel found stacked
  (ad,) = jlora.adapters(again)
  assert ad.n_stack == 1 and ad.a.shape == (3, 6, 2)
  np.testing.assert_allclose(jlora.lora(scan_forward)(again, jnp.asarray(x.numpy())), ours,
                             rtol=1e-5, atol=1e-6)


def test_pissa_exports_a_plain_rank_2r_adapter_for_the_original_base(tmp_path, base):
  inputs = _inputs()
  x = _jax_inputs(inputs)
  cfg = jlora.LoraConfig(rank=2, alpha=4.0, init="pissa", targets=["fc", "conv", "gpt2"])
  params = randomize(init(to_jax(base), cfg, jax_forward, *x), 1, scale=0.2)
  config = jlora.save_peft(tmp_path, params)
  assert config["r"] == 4 and config["lora_alpha"] == 4  # rank 2r, scale 1
  loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # the original base
  _close(_torch_out(loaded, inputs), FORWARD(params, *x), "PiSSA export",
         ["fc", "conv", "gpt2"])


# ---------------------------------------------------------------------------
# Names, key maps, refusals.


def test_key_map_dict_and_callable_and_unmatched_modules(tmp_path, base):
  pm = _peft_model(base, "plain", targets=["fc", "sub.fc"])
  pm.save_pretrained(tmp_path)
  # the model's modules under other names: a dict for one, the default for the rest
  jbase = to_jax(base)
  renamed = {"params": {**jbase["params"], "head": jbase["params"]["fc"]}}
  del renamed["params"]["fc"]
  with pytest.raises(ValueError, match=r"match no kernel of params: \['fc'\]"):
    jlora.load_peft(tmp_path, renamed)
  by_dict = jlora.load_peft(tmp_path, renamed, key_map={"params/head": "fc"})
  by_call = jlora.load_peft(tmp_path, renamed,
                            key_map=lambda m: "fc" if m == "params/head" else tf.dotted(m))
  for p in (by_dict, by_call):
    assert sorted(ad.name for ad in jlora.adapters(p)) == ["params/head/kernel", "params/sub/fc/kernel"]
  out = jlora.save_peft(tmp_path / "back", by_dict, key_map={"params/head": "fc"})
  assert re.fullmatch(out["target_modules"], "fc") and re.fullmatch(out["target_modules"], "sub.fc")


def test_wrong_base_names_the_module_and_both_shapes(tmp_path, base):
  pm = _peft_model(base, "plain", targets=["fc"])
  pm.save_pretrained(tmp_path)
  jbase = to_jax(base)
  jbase["params"]["fc"]["kernel"] = jnp.zeros((6, 9))
  with pytest.raises(ValueError, match=r"'fc' \(A \(4, 6\), B \(5, 4\)\) does not fit the kernel"
                     r" 'params/fc/kernel' of shape \(6, 9\)"):
    jlora.load_peft(tmp_path, jbase)
  other_rank = jlora.init(jax.random.key(0), to_jax(base), jlora.LoraConfig(rank=2, targets=["fc"]))
  with pytest.raises(ValueError, match=r"lora_a \(6, 4\).*adapted params have lora_a \(6, 2\)"):
    jlora.load_peft(tmp_path, other_rank)


@pytest.mark.parametrize("kw,field", [
    (dict(lora_bias=True), "lora_bias"),
    (dict(modules_to_save=["pw"]), "modules_to_save"),
    (dict(bias="all"), "bias"),
])
def test_real_peft_unsupported_configs_refused(tmp_path, base, kw, field):
  get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["fc"], **kw)).save_pretrained(tmp_path)
  with pytest.raises(UnsupportedPeftError, match=field):
    jlora.load_peft(tmp_path, to_jax(base))


def test_real_peft_layers_to_transform_and_target_parameters_refused(tmp_path, base):
  get_peft_model(Stack(), LoraConfig(r=2, target_modules=["fc"], layers_to_transform=[0],
                                     layers_pattern="layers")).save_pretrained(tmp_path / "a")
  with pytest.raises(UnsupportedPeftError, match="layers_to_transform"):
    jlora.load_peft(tmp_path / "a", to_jax(base))
  get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=[],
                                                 target_parameters=["fc.weight"])).save_pretrained(tmp_path / "b")
  with pytest.raises(UnsupportedPeftError, match="target_parameters"):
    jlora.load_peft(tmp_path / "b", to_jax(base))


@pytest.mark.parametrize("patch,field", [
    ({"peft_type": "LOHA"}, "peft_type"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"use_qalora": True}, "use_qalora"),
    ({"some_future_field": {"x": 1}}, "some_future_field"),
])
def test_config_refusals_by_name(tmp_path, base, patch, field):
  pm = _peft_model(base, "plain", targets=["fc"])
  pm.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **patch}))
  with pytest.raises(UnsupportedPeftError, match=field):
    jlora.load_peft(tmp_path, to_jax(base))

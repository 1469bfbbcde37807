"""Stable Diffusion LoRA files against real diffusers (torch CPU).

The reference is diffusers' own loading path (kohya conversion, alphas, PEFT
layers) on a torch UNet; jlora loads the same file into the matching Flax UNet
(``sd_twin``) and must give the same outputs. A real ``UNet2DConditionModel``
checks the names of every module kind an SD UNet has, by comparing merged weights.
"""

import copy
import json
import logging
import re
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add overhead here
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SD  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import jlora  # noqa: E402
import sd_twin as tw  # noqa: E402
from jlora import torch_format as tf  # noqa: E402
from jlora.peft import UnsupportedPeftError  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
T = "down_blocks.0.attentions.0.transformer_blocks.0."
#: The pinned diffusers (the interop extra), whose alpha and fuse bugs the tests show.
PINNED = diffusers.__version__ == "0.39.0"


def kohya_tensors(model, spec, seed, alpha=True):
  """A kohya file's tensors for ``{torch module: (rank, alpha or None)}``."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, (r, a) in spec.items():
    w = model.get_submodule(name).weight
    key = "lora_unet_" + name.replace(".", "_")
    up_shape = (w.shape[0], r) + (1,) * (w.ndim - 2)
    out[key + ".lora_down.weight"] = (0.3 * rng.standard_normal((r,) + tuple(w.shape[1:]))).astype(np.float32)
    out[key + ".lora_up.weight"] = (0.3 * rng.standard_normal(up_shape)).astype(np.float32)
    if alpha and a is not None:
      out[key + ".alpha"] = np.asarray(a, np.float32)
  return out


def save(path, tensors, header=None):
  tf.write_safetensors(path, tensors, header or {"format": "pt"})
  return path


def diffusers_load(model, path):
  """diffusers' own loader, onto a copy of ``model``."""
  m = copy.deepcopy(model)
  sd, alphas, meta = SD.lora_state_dict(str(path), return_lora_metadata=True)
  SD.load_lora_into_unet(sd, alphas, m, adapter_name="x", metadata=meta)
  return m


def scalings(model):
  return {n: m.scaling["x"] for n, m in model.named_modules() if "x" in getattr(m, "scaling", {})}


def close(a, b, what=""):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                             atol=1e-5 * np.abs(np.asarray(b)).max(), err_msg=what)


class Twin(NamedTuple):
  torch: Any            # the torch twin (no adapter)
  params: Any           # its Flax params
  run_flax: Any         # jitted jlora.lora(apply) on fixed inputs: one compile per adapter structure
  run_torch: Any
  kohya: Any            # a kohya file adapting every Linear and Conv2d (twin_spec)
  reference: Any        # diffusers' own load of it into the torch twin


def twin_spec(m):
  """Every Linear and Conv2d of the twin: LoCon 3x3 and 1x1 convs, attention,
  GEGLU; mixed ranks and alphas (none that diffusers gets wrong: see below)."""
  names = [n for n, mod in m.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
  spec = {n: (4, 2.0) for n in names}
  spec.update({"conv_in": (2, 3.0), T + "ff.net.2": (2, 2.0), "down_blocks.0.resnets.0.conv1": (4, 8.0)})
  return spec


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
  torch.manual_seed(0)
  m = tw.TorchTinySD().eval()
  with torch.no_grad():
    for n, p in m.named_parameters():
      if n.endswith("bias") or "norm" in n:
        p.add_(0.1 * torch.randn(p.shape))
  g = torch.Generator().manual_seed(1)
  inputs = (torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, tw.TEMB, generator=g),
            torch.randn(1, 5, tw.CTX, generator=g))
  fm = tw.FTinySD()
  jx = [jnp.asarray(a.numpy()) for a in inputs]
  run_flax = jax.jit(lambda p: jlora.lora(lambda q, *a: fm.apply({"params": q}, *a))(p, *jx))

  def run_torch(model):
    with torch.no_grad():
      return model(*inputs).numpy()
  kohya = save(tmp_path_factory.mktemp("twin") / "kohya.safetensors", kohya_tensors(m, twin_spec(m), 0))
  return Twin(m, tw.torch_to_flax(m.state_dict()), run_flax, run_torch, kohya, diffusers_load(m, kohya))


def test_kohya_and_diffusers_files_load_into_the_flax_unet(tmp_path, twin):
  m, params, run_flax, run_torch, kohya, ref = twin
  np.testing.assert_allclose(run_flax(params), run_torch(m), rtol=1e-5, atol=1e-5)  # the twins agree
  y_ref = run_torch(ref)
  assert np.abs(y_ref - run_torch(m)).max() > 0.1
  got = jlora.load_sd_lora(kohya, params)
  scales = {tf.module_name(ad.path): float(ad.scale) for ad in jlora.adapters(got)}
  assert len(scales) == len(twin_spec(m))
  assert scales["conv_in"] == 1.5 and scales["down_blocks_0/resnets_0/conv1"] == 2.0
  for n, s in scalings(ref).items():  # diffusers' per-module scale is jlora's
    assert scales[tw_name(n)] == pytest.approx(s), n
  close(run_flax(got), y_ref, "kohya file")
  # diffusers' own writer: PEFT keys under unet., the config in the header
  SD.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref, adapter_name="x"),
                       unet_lora_adapter_metadata=ref.peft_config["x"].to_dict())
  diff = tmp_path / "pytorch_lora_weights.safetensors"
  keys = tf.read_safetensors(diff)[0]
  assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)
  close(run_flax(jlora.load_sd_lora(diff, params)), y_ref, "diffusers file")


def tw_name(torch_name):
  """The twin's Flax module path of a torch module name."""
  return re.sub(r"\.(\d+)", r"_\1", torch_name).replace(".", "/")


def retrained(twin, seed=1):
  """The twin's adapters with new random B, and a scale of its own on every module
  outside the attention blocks. (diffusers 0.39 gives an attention projection whose
  alpha is not the file's most common one the common alpha: its alpha_pattern key
  names the old attention processor, which no module has.)"""
  rng = np.random.default_rng(seed)
  factors = iter(np.linspace(0.5, 2.0, len(twin_spec(twin.torch))))
  return jlora.map_adapters(lambda ad: ad._replace(
      b=jnp.asarray(0.3 * rng.standard_normal(ad.b.shape), jnp.float32),
      scale=ad.scale * (next(factors) if "/attn" not in ad.name else 1.0)),
      jlora.load_sd_lora(twin.kohya, twin.params))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_save_sd_lora_loads_in_diffusers(tmp_path, twin, fmt):
  """jlora -> file -> diffusers: mixed ranks, scales that are not 1 (kohya: the
  true alpha, not diffusers' alpha = rank), LoCon convs."""
  adapted = retrained(twin)
  path = tmp_path / "out.safetensors"
  jlora.save_sd_lora(path, adapted, format=fmt)
  tensors, header = tf.read_safetensors(path)
  scale = {tf.module_name(ad.path): float(ad.scale) for ad in jlora.adapters(adapted)}
  if fmt == "kohya":
    alpha = lambda m: tensors[f"lora_unet_{m.replace('.', '_')}.alpha"]
    assert alpha("conv_in").shape == ()
    assert float(alpha("conv_in")) == pytest.approx(2 * scale["conv_in"])  # not 2 (the rank)
  else:
    assert json.loads(header["lora_adapter_metadata"])["unet.r"] == 4
  close(twin.run_torch(diffusers_load(twin.torch, path)), twin.run_flax(adapted),
        f"diffusers loading jlora's {fmt} file")
  back = jlora.load_sd_lora(path, twin.params)  # and back into jlora
  for a, b in zip(jlora.adapters(back), jlora.adapters(adapted)):
    assert a.name == b.name and float(a.scale) == pytest.approx(float(b.scale), rel=1e-6)
    np.testing.assert_array_equal(a.b, b.b)


# ---------------------------------------------------------------------------
# Every module kind of a real diffusers UNet, by name.


UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
            norm_num_groups=32)
SPEC = {
    T + "attn1.to_q": (4, 8.0), T + "attn1.to_k": (4, 8.0), T + "attn1.to_v": (4, 8.0),
    T + "attn1.to_out.0": (4, 8.0), T + "attn2.to_k": (4, 8.0), T + "ff.net.0.proj": (4, 8.0),
    T + "ff.net.2": (2, 2.0), "down_blocks.0.attentions.0.proj_in": (4, 2.0),
    "down_blocks.0.resnets.0.conv1": (4, 8.0), "down_blocks.0.downsamplers.0.conv": (2, 4.0),
    "down_blocks.1.resnets.0.conv_shortcut": (4, 8.0),
    "up_blocks.1.resnets.0.time_emb_proj": (4, 8.0),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (4, 8.0), "conv_in": (4, 6.0),
}


@pytest.fixture(scope="module")
def unet():
  torch.manual_seed(0)
  return UNet2DConditionModel(**UNET).eval()


def _merged_weights(model, names):
  """diffusers' fused weights, in Flax layouts."""
  m = copy.deepcopy(model)
  m.fuse_lora(adapter_names=["x"])
  out = {}
  for n in names:
    w = m.get_submodule(n).base_layer.weight.detach().numpy()
    out[n] = w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)
  return out


@pytest.mark.parametrize("style", ["kohya", "old"])
def test_unet_module_names_and_scales_match_diffusers(tmp_path, unet, style):
  spec = SPEC if style == "kohya" else {n: (4, None) for n in SPEC}  # diffusers: mixed ranks need alphas
  tensors = kohya_tensors(unet, spec, 2, alpha=style == "kohya")
  if style == "old":  # attention processors (to_out_lora is to_out.0) and .lora.down keys
    old = {}
    for n in SPEC:
      key = "lora_unet_" + n.replace(".", "_")
      stem = n + ".lora"
      for proj in ("to_q", "to_k", "to_v"):
        if n.endswith("." + proj):
          stem = n[: -len(proj)] + f"processor.{proj}_lora"
      if n.endswith(".to_out.0"):
        stem = n[: -len("to_out.0")] + "processor.to_out_lora"
      old[f"unet.{stem}.down.weight"] = tensors[key + ".lora_down.weight"]
      old[f"unet.{stem}.up.weight"] = tensors[key + ".lora_up.weight"]
    tensors = old
  path = save(tmp_path / "lora.safetensors", tensors)
  ref = diffusers_load(unet, path)
  params = tw.torch_to_flax(unet.state_dict())
  got = jlora.load_sd_lora(path, params)
  ads = {tf.module_name(ad.path): ad for ad in jlora.adapters(got)}
  assert sorted(ads) == sorted(tw_name(n) for n in SPEC)
  for n, s in scalings(ref).items():
    assert float(ads[tw_name(n)].scale) == pytest.approx(s), n
  merged = tf_flat(jax.jit(jlora.merge)(got))
  for n, w in _merged_weights(ref, SPEC).items():
    close(merged[tw_name(n) + "/kernel"], w, n)


def tf_flat(tree):
  return {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------
# diffusers' known alpha/scale bugs, and jlora without them.


def test_alpha_over_rank_per_module_where_diffusers_differs(tmp_path, unet):
  """kohya's scale is each module's own alpha / rank, and alpha = rank where a
  module has none. diffusers 0.39 gets three cases wrong: (a) no alpha anywhere and
  mixed ranks: every module gets the first module's rank as alpha (fixed upstream
  by PR #14409); (b) one module without alpha among others gets the most common
  alpha; (c) an attention projection with an alpha other than the most common one
  gets the common one (its alpha_pattern key names the old attention processor)."""
  cases = [({T + "attn1.to_v": (2, None), T + "attn1.to_q": (4, None), T + "attn1.to_k": (4, None)}, 2.0),
           ({T + "attn1.to_q": (4, 8.0), T + "attn1.to_k": (4, 8.0), T + "attn1.to_v": (2, None)}, 4.0),
           ({T + "attn1.to_q": (4, 8.0), T + "attn1.to_k": (4, 8.0), T + "attn1.to_v": (2, 1.0)}, 4.0)]
  params = tw.torch_to_flax(unet.state_dict())
  for i, (spec, wrong) in enumerate(cases):
    path = save(tmp_path / f"m{i}.safetensors", kohya_tensors(unet, spec, 4))
    got = {tf.module_name(ad.path): float(ad.scale)
           for ad in jlora.adapters(jlora.load_sd_lora(path, params))}
    assert got == {tw_name(n): (a or r) / r for n, (r, a) in spec.items()}
    if PINNED:
      assert scalings(diffusers_load(unet, path))[T + "attn1.to_v"] == wrong, i


def test_kohya_export_keeps_the_scale_that_diffusers_loses(tmp_path, twin):
  """diffusers' convert_state_dict_to_kohya writes alpha = rank, so an adapter with
  alpha != rank comes back at another scale; save_sd_lora writes the true alpha."""
  ours = jlora.load_sd_lora(twin.kohya, twin.params)
  jlora.save_sd_lora(tmp_path / "ours.safetensors", ours)
  exported = convert_state_dict_to_kohya(
      {"unet." + k: v for k, v in get_peft_model_state_dict(twin.reference, adapter_name="x").items()})
  theirs = save(tmp_path / "theirs.safetensors", {k: v.numpy() for k, v in exported.items()})
  scales = lambda f: [float(ad.scale) for ad in jlora.adapters(jlora.load_sd_lora(f, twin.params))]
  want = [float(ad.scale) for ad in jlora.adapters(ours)]
  assert scales(tmp_path / "ours.safetensors") == want and set(want) == {0.5, 1.0, 1.5, 2.0}
  if PINNED:
    assert set(scales(theirs)) == {1.0}  # every scale is gone
  close(twin.run_flax(jlora.load_sd_lora(tmp_path / "ours.safetensors", twin.params)),
        twin.run_torch(twin.reference))


def test_fuse_with_a_scale_then_unfuse_leaves_nothing_behind(twin):
  """diffusers: fuse_lora(lora_scale=0.5) + unfuse_lora() leaves the adapter at half
  strength. jlora's merge and unmerge are functions: the adapted tree is unchanged."""
  adapted = jlora.load_sd_lora(twin.kohya, twin.params)
  half = jlora.scale(adapted, 0.5)
  ref = copy.deepcopy(twin.reference)
  ref.fuse_lora(lora_scale=0.5)
  ref.unfuse_lora()
  if PINNED:  # diffusers 0.39.0 now runs the adapter at half strength
    close(twin.run_torch(ref), twin.run_flax(half), "diffusers after fuse(0.5) + unfuse")
  unfused = jax.jit(lambda p: jlora.unmerge(jlora.merge(p), p))(half)
  close(twin.run_flax(unfused), twin.run_flax(half))
  close(twin.run_flax(adapted), twin.run_torch(twin.reference))  # nothing was left behind


# ---------------------------------------------------------------------------
# Names, partial loads, refusals.


def test_unmatched_keys_strict_and_partial(tmp_path, twin):
  m, params = twin.torch, twin.params
  tensors = kohya_tensors(m, {"conv_in": (2, 2.0)}, 7)
  linear = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"  # a (32, 32) Linear's tensors
  tensors.update({k.replace(linear, "lora_te_text_model_encoder_layers_0_self_attn_q_proj"): v
                  for k, v in kohya_tensors(m, {"down_blocks.0.resnets.0.time_emb_proj": (2, 1.0)},
                                            8).items()})
  path = save(tmp_path / "both.safetensors", tensors)
  with pytest.raises(ValueError, match=r"1 module\(s\) of .* match no kernel of params:"
                     r" \['text_model_encoder_layers_0_self_attn_q_proj'\]"):
    jlora.load_sd_lora(path, params)
  got, skipped = jlora.load_sd_lora(path, params, strict=False)
  assert [tf.module_name(ad.path) for ad in jlora.adapters(got)] == ["conv_in"]
  assert skipped == sorted(k for k in tensors if k.startswith("lora_te_"))  # all three keys
  # a tree with both components takes both; the text encoder by its component prefix
  both = {"unet": params, "text_encoder": {"text_model": {"encoder": {"layers_0": {"self_attn": {
      "q_proj": {"kernel": jnp.zeros((32, 32))}}}}}}}
  both_got = jlora.load_sd_lora(path, both)
  assert sorted(tf.module_name(ad.path) for ad in jlora.adapters(both_got)) == [
      "text_encoder/text_model/encoder/layers_0/self_attn/q_proj", "unet/conv_in"]
  # a key_map for names the default does not reach
  renamed = {"first_conv" if k == "conv_in" else k: v for k, v in params.items()}
  got = jlora.load_sd_lora(path, renamed, key_map={"first_conv": "conv_in"}, strict=False)[0]
  assert [tf.module_name(ad.path) for ad in jlora.adapters(got)] == ["first_conv"]


@pytest.mark.parametrize("key,what", [
    ("lora_unet_x.hada_w1_a", "LoHa"), ("lora_unet_x.lokr_w1", "LoKr"),
    ("lora_unet_x.lora_mid.weight", "Tucker"), ("lora_unet_x.dora_scale", "dora_scale"),
    ("unet.x.weight", "not a LoRA tensor"),
])
def test_foreign_keys_refused_by_name(tmp_path, twin, key, what):
  path = save(tmp_path / "f.safetensors", {key: np.ones((2, 2), np.float32)})
  with pytest.raises(UnsupportedPeftError, match=what):
    jlora.load_sd_lora(path, twin.params)


def test_kohya_refuses_dora(tmp_path, twin):
  adapted = jlora.map_adapters(lambda ad: ad._replace(m=jnp.ones(ad.shapes[2])),
                               jlora.load_sd_lora(twin.kohya, twin.params))
  with pytest.raises(UnsupportedPeftError, match="DoRA"):
    jlora.save_sd_lora(tmp_path / "d.safetensors", adapted)
  with pytest.raises(ValueError, match="format must be"):
    jlora.save_sd_lora(tmp_path / "d.safetensors", adapted, format="a1111")

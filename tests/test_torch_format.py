"""PEFT and SD files written by hand (no torch needed): layouts, names and every
refusal of jlora.torch_format, jlora.peft and jlora.sd_lora. The files of real
PEFT and diffusers are checked in test_peft.py and test_sd_lora.py."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import torch_format as tf
from jlora.adapter import Split
from jlora.peft import UnsupportedPeftError

RNG = np.random.default_rng(0)


def f32(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def peft_dir(path, tensors, **config):
  path.mkdir(parents=True, exist_ok=True)
  tf.write_safetensors(path / "adapter_model.safetensors",
                       {"base_model.model." + k: v for k, v in tensors.items()}, {"format": "pt"})
  (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                        **config}))
  return path


def base():
  return {"params": {"fc": {"kernel": jnp.asarray(f32(6, 5))},
                     "conv": {"kernel": jnp.asarray(f32(3, 2, 4, 3))},
                     "w": {"a": jnp.asarray(f32(4, 4)), "b": jnp.asarray(f32(4, 4))}}}


FC = {"fc.lora_A.weight": f32(2, 6), "fc.lora_B.weight": f32(5, 2)}


# ---------------------------------------------------------------------------
# One layer, both ways.


@pytest.mark.parametrize("shape,split,kind", [
    ((6, 5), Split(0, 1, False), "linear"),          # Flax Dense (in, out)
    ((5, 6), Split(0, 1, True), "linear"),           # torch Linear (out, in) used as x @ W.T
    ((6, 2, 5), Split(0, 1, False), "linear"),       # q/k/v (d, heads, head_dim)
    ((2, 3, 5), Split(0, 2, False), "linear"),       # out-projection (heads, head_dim, d) as a Linear
    ((3, 2, 4, 5), Split(0, 3, False), "conv"),      # Flax conv (kh, kw, c_in, c_out)
    ((5, 4, 3, 2), Split(0, 3, True), "conv"),       # torch conv (c_out, c_in, kh, kw)
])
def test_layer_round_trip_and_delta(shape, split, kind):
  """to_torch then from_torch is the identity, and the file's B @ A is the kernel's
  delta in torch's own layout."""
  _, ins, outs = split.shapes(shape)
  a2, b2 = f32(int(np.prod(ins)), 2), f32(2, int(np.prod(outs)))
  t = tf.to_torch(kind, split, shape, a2, b2, 0.5)
  a, b, _ = tf.from_torch(t, split, shape)
  np.testing.assert_array_equal(split.a_matrix(a), a2)
  np.testing.assert_array_equal(split.b_matrix(b), b2)
  delta = np.asarray(split.kernel_from_matrix(0.5 * a2 @ b2, shape))  # kernel layout
  torch_delta = 0.5 * (t.b.reshape(t.fan_out, 2) @ t.a.reshape(2, -1))  # (out, c_in * window)
  if kind == "conv":
    torch_w = delta if split.out_first else np.moveaxis(delta, (-1, -2), (0, 1))  # (out, c_in, kh, kw)
  else:
    torch_w = delta.reshape(-1, int(np.prod(outs))).T if not split.out_first else delta
  np.testing.assert_allclose(torch_w.reshape(t.fan_out, -1), torch_delta, rtol=1e-5, atol=1e-6)
  assert tf.split_from_shapes(shape, t) == split  # read back from the shapes alone


def test_kinds_default_and_override():
  params = jlora.init(jax_key(), {"fc": {"kernel": jnp.ones((6, 5))},
                                  "out": {"kernel": jnp.ones((2, 3, 5))},
                                  "e": {"embedding": jnp.ones((9, 4))}},
                      jlora.LoraConfig(rank=2, targets=r"(kernel|embedding)$"))
  ads = {ad.name: ad for ad in jlora.adapters(params)}
  assert [tf.kind_of(ads[n]) for n in ("fc/kernel", "out/kernel", "e/embedding")] == [
      "linear", "conv", "embedding"]
  assert tf.kind_of(ads["out/kernel"], {"out/kernel$": "linear"}) == "linear"
  with pytest.raises(ValueError, match="must be one of"):
    tf.kind_of(ads["fc/kernel"], {"fc": "lstm"})
  with pytest.raises(ValueError, match=r"'fc/kernel' \(inputs \(6,\), outputs \(5,\)\) cannot be a torch conv"):
    tf.kind_of(ads["fc/kernel"], {"fc": "conv"})


def jax_key():
  import jax
  return jax.random.key(0)


# ---------------------------------------------------------------------------
# PEFT files: names and refusals.


def test_key_maps(tmp_path):
  d = peft_dir(tmp_path, FC)
  with pytest.raises(TypeError, match="key_map must be a dict, a callable or None"):
    jlora.load_peft(d, base(), key_map=["fc"])
  assert [ad.name for ad in jlora.adapters(jlora.load_peft(d, base()))] == ["params/fc/kernel"]
  moved = {"model": base()["params"]}
  with pytest.raises(ValueError, match=r"match no kernel of params: \['fc'\]"):
    jlora.load_peft(d, moved)
  assert len(jlora.adapters(jlora.load_peft(d, moved, key_map=lambda m: m.split("/", 1)[1]))) == 1
  params = jlora.load_peft(d, base())
  with pytest.raises(ValueError, match="key_map gives None for the module 'params/fc'"):
    jlora.save_peft(tmp_path / "x", params, key_map=lambda m: None)
  both = jlora.init(jax_key(), base(), jlora.LoraConfig(rank=2, targets=["fc", "conv"]))
  with pytest.raises(ValueError, match="'params/conv' and 'params/fc' both map to 'm'"):
    jlora.save_peft(tmp_path / "y", both, key_map=lambda m: "m")


def test_one_file_module_two_kernels_and_one_module_two_leaves(tmp_path):
  d = peft_dir(tmp_path / "a", FC)
  two = {"x": {"kernel": jnp.ones((6, 5))}, "y": {"kernel": jnp.ones((6, 5))}}
  with pytest.raises(ValueError, match="matches both 'x' and 'y'"):
    jlora.load_peft(d, two, key_map=lambda m: "fc")
  d = peft_dir(tmp_path / "b", {"w.lora_A.weight": f32(2, 4), "w.lora_B.weight": f32(4, 2)})
  with pytest.raises(ValueError, match="module 'params/w' has several 2-D leaves"):
    jlora.load_peft(d, base(), key_map=lambda m: m.split("/", 1)[1])
  template = jlora.init(jax_key(), base(), jlora.LoraConfig(rank=2, targets=r"w/a$"))
  got = jlora.load_peft(d, template, key_map=lambda m: m.split("/", 1)[1])
  assert [ad.name for ad in jlora.adapters(got)] == ["params/w/a"]


@pytest.mark.parametrize("tensors,config,match", [
    ({"fc.lora_A.weight": f32(2, 6), "fc.lora_B.weight": f32(5, 3)}, {}, r"module 'fc'.*do not fit together"),
    (FC, {"r": 3}, r"rank 2, but the config gives r=3"),
    (FC, {"use_dora": True}, "use_dora=True"),
    ({**FC, "fc.lora_magnitude_vector": f32(5)}, {}, "use_dora=None"),
    ({"fc.lora_A.weight": f32(2, 6)}, {}, r"module 'fc' needs lora_A and lora_B"),
    ({**FC, "fc.lora_embedding_A": f32(2, 6)}, {}, "lora_embedding_A and lora_embedding_B alone"),
])
def test_inconsistent_files(tmp_path, tensors, config, match):
  with pytest.raises(ValueError, match=match):
    jlora.load_peft(peft_dir(tmp_path, tensors, **config), base())


@pytest.mark.parametrize("tensors,config,field", [
    ({**FC, "fc.lora_B.bias": f32(5)}, {}, "lora_bias is not supported"),
    ({**FC, "head.weight": f32(3, 3)}, {}, "'base_model.model.head.weight' is not a LoRA"),
    (FC, {"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    (FC, {"layer_replication": [[0, 1]]}, "layer_replication"),
])
def test_refused_by_name(tmp_path, tensors, config, field):
  with pytest.raises(UnsupportedPeftError, match=field):
    jlora.load_peft(peft_dir(tmp_path, tensors, **config), base())


def test_peft_files_and_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
    jlora.load_peft(tmp_path, base())
  (tmp_path / "adapter_config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="adapter_model.bin"):
    jlora.load_peft(tmp_path, base())
  dora = jlora.map_adapters(lambda ad: ad._replace(m=jnp.ones(5)) if "fc" in ad.name else ad,
                            jlora.init(jax_key(), base(), jlora.LoraConfig(rank=2, targets=["fc", "conv"])))
  with pytest.raises(UnsupportedPeftError, match="DoRA on some modules only"):
    jlora.save_peft(tmp_path / "d", dora)
  with pytest.raises(ValueError, match="no adapters to export"):
    jlora.save_peft(tmp_path / "e", base())


def test_stacked_layers_all_or_none(tmp_path):
  d = peft_dir(tmp_path, {"layers.0.fc.lora_A.weight": f32(2, 4), "layers.0.fc.lora_B.weight": f32(4, 2)})
  stacked = {"layers": {"fc": {"kernel": jnp.ones((3, 4, 4))}}}
  key_map = lambda m: __import__("re").sub(r"^layers/fc/(\d+)$", r"layers.\1.fc", m)
  with pytest.raises(ValueError, match=r"some layers of the stacked kernel 'layers/fc' but not"
                     r" \['layers/fc/1', 'layers/fc/2'\]"):
    jlora.load_peft(d, stacked, key_map=key_map)


# ---------------------------------------------------------------------------
# SD files.


@pytest.mark.parametrize("tensors,match", [
    ({"lora_unet_fc.lora_down.weight": f32(2, 6), "lora_unet_fc.weird": f32(1)}, "unknown part 'weird'"),
    ({"lora_unet_fc.lora_down.weight": f32(2, 6)}, r"kohya module 'fc' needs lora_down and lora_up"),
    ({"unet.fc.lora.down.weight": f32(2, 6)}, r"old-style module 'fc' needs its down and up"),
])
def test_sd_incomplete_or_unknown_keys(tmp_path, tensors, match):
  tf.write_safetensors(tmp_path / "f.safetensors", tensors, {})
  with pytest.raises(ValueError, match=match):
    jlora.load_sd_lora(tmp_path / "f.safetensors", base())


def test_sd_alpha_from_the_header_and_names(tmp_path):
  """Old keys take alpha from kohya's ss_network_alpha; diffusers keys without a
  header get alpha = rank; a kohya module named with '_' finds a Flax path."""
  down, up = f32(2, 6), f32(5, 2)
  tf.write_safetensors(tmp_path / "old.safetensors",
                       {"unet.fc.lora.down.weight": down, "unet.fc.lora.up.weight": up},
                       {"ss_network_alpha": "1.0"})
  (ad,) = jlora.adapters(jlora.load_sd_lora(tmp_path / "old.safetensors", base()))
  assert float(ad.scale) == 0.5
  tf.write_safetensors(tmp_path / "d.safetensors",
                       {"unet.fc.lora_A.weight": down, "unet.fc.lora_B.weight": up}, {})
  assert float(jlora.adapters(jlora.load_sd_lora(tmp_path / "d.safetensors", base()))[0].scale) == 1.0
  tf.write_safetensors(tmp_path / "k.safetensors",
                       {"lora_unet_down_blocks_0_to_out_0.lora_down.weight": down,
                        "lora_unet_down_blocks_0_to_out_0.lora_up.weight": up,
                        "lora_unet_down_blocks_0_to_out_0.alpha": np.float32(3.0)}, {})
  flax = {"down_blocks_0": {"to_out_0": {"kernel": jnp.ones((6, 5))}}}
  (ad,) = jlora.adapters(jlora.load_sd_lora(tmp_path / "k.safetensors", flax))
  assert ad.name == "down_blocks_0/to_out_0/kernel" and float(ad.scale) == 1.5


def test_sd_refuses_embeddings_in_kohya(tmp_path):
  params = jlora.init(jax_key(), {"e": {"embedding": jnp.ones((9, 4))}},
                      jlora.LoraConfig(rank=2, targets=r"(kernel|embedding)$"))
  with pytest.raises(UnsupportedPeftError, match="an embedding"):
    jlora.save_sd_lora(tmp_path / "e.safetensors", params)
  jlora.save_sd_lora(tmp_path / "e.safetensors", params, format="diffusers")
  assert "unet.e.lora_embedding_A" in tf.read_safetensors(tmp_path / "e.safetensors")[0]

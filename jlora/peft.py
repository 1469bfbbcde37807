"""PEFT's on-disk LoRA format, both ways: ``jlora.save_peft`` and ``jlora.load_peft``.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``,
``.lora_B.weight``, ``.lora_embedding_A``/``_B`` and, for DoRA,
``.lora_magnitude_vector``; layouts in ``torch_format``). Facts checked against
peft 0.21.2:

* the scale of a module is ``lora_alpha / r`` (``/ sqrt(r)`` with
  ``use_rslora``), where ``rank_pattern`` and ``alpha_pattern`` override ``r`` and
  ``lora_alpha`` per module: the first key ``k`` with
  ``re.match(rf"(.*\\.)?({k})$", module)`` wins;
* the DoRA magnitude is ``(out,)`` for Linear and Embedding and
  ``(1, out, 1, ...)`` for convolutions;
* the adapter name ``default`` is not in the saved keys (in-memory state dicts
  have ``lora_A.default.weight``; both are read);
* ``fan_in_fan_out`` is re-decided by PEFT per module from the base layer
  (GPT-2's ``Conv1D`` gets True with a warning), so the files are the same either
  way; ``save_peft`` writes False, PEFT's default.

Features whose tensors jlora cannot apply are refused by name, never ignored
(``UNSUPPORTED``), and so are fields this reader does not know with a value
other than their default.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re

import numpy as np

from jlora import adapter as adapter_lib
from jlora import attach as attach_lib
from jlora import torch_format as tf
from jlora.torch_format import KeyMap, TorchAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: Key suffixes of a module's tensors -> their part (A, B, embedding A/B, magnitude).
_SUFFIXES = {
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "EA",
    "lora_embedding_B": "EB", "lora_magnitude_vector": "M",
    "lora_A.default.weight": "A", "lora_B.default.weight": "B",
    "lora_embedding_A.default": "EA", "lora_embedding_B.default": "EB",
    "lora_magnitude_vector.default.weight": "M", "lora_magnitude_vector.default": "M",
}
#: Config fields that add tensors or change what they mean; any value but their
#: default is refused, by name.
UNSUPPORTED = {
    "lora_bias": "lora_B has a bias (lora_B.bias tensors)",
    "target_parameters": "LoRA on bare nn.Parameters (ParamWrapper)",
    "layers_to_transform": "adapters on some layer indices only",
    "modules_to_save": "fully trained extra modules, stored as plain tensors",
    "trainable_token_indices": "trainable embedding rows",
    "layer_replication": "replicated base layers",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "alora_invocation_tokens": "activated LoRA (a token-gated forward)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron tensor-parallel LoRA",
}
#: Fields read here, or harmless for the weights.
_KNOWN = {
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "rank_pattern",
    "alpha_pattern", "use_dora", "fan_in_fan_out", "target_modules", "exclude_modules",
    "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights",
    "lora_dropout", "bias", "peft_version", "auto_mapping", "layers_pattern",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "qalora_group_size", "ensure_weight_tying", "runtime_config",
}
#: ``init_lora_weights`` values that rewrite the base weight: such a file only works
#: on that rewritten base. PEFT turns them into plain LoRAs when saved with
#: ``path_initial_model_for_weight_conversion``.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class UnsupportedPeftError(ValueError):
  """The file uses a PEFT feature that jlora cannot apply; the message names it."""


# ---------------------------------------------------------------------------
# Reading.


def pattern_key(patterns, module: str):
  """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
  for k in patterns or {}:
    if re.match(rf"(.*\.)?({k})$", module):
      return k
  return None


def check_config(cfg: dict) -> None:
  """Raises ``UnsupportedPeftError`` naming the first field jlora cannot honour."""
  if cfg.get("peft_type", "LORA") != "LORA":
    raise UnsupportedPeftError(f"peft_type={cfg['peft_type']!r}: jlora reads LoRA adapters only.")
  for k, why in UNSUPPORTED.items():
    if cfg.get(k):
      raise UnsupportedPeftError(f"adapter_config.json sets {k}={cfg[k]!r} ({why}), which"
                                 " jlora does not support.")
  if cfg.get("bias", "none") != "none":
    raise UnsupportedPeftError(f"adapter_config.json sets bias={cfg['bias']!r}: the file then"
                               " holds trained base-model biases, which jlora does not load.")
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise UnsupportedPeftError(
        f"init_lora_weights={init!r} rewrote the base weight, so this adapter only works on"
        " that rewritten base. Save it again with PEFT's save_pretrained("
        "path_initial_model_for_weight_conversion=...) to get a plain LoRA.")
  for k, v in cfg.items():
    if k not in _KNOWN and k not in UNSUPPORTED and v not in (None, False, {}, [], "", 0):
      raise UnsupportedPeftError(f"adapter_config.json field {k}={v!r} is unknown to jlora;"
                                 " refusing rather than ignoring it.")


def group_tensors(tensors: dict) -> dict[str, dict[str, np.ndarray]]:
  """``{module: {part: tensor}}`` from PEFT keys (with or without the
  ``base_model.model.`` prefix and the ``default`` adapter name)."""
  keys = list(tensors)
  strip = PREFIX if keys and all(k.startswith(PREFIX) for k in keys) else ""
  out: dict = collections.defaultdict(dict)
  for key in keys:
    k = key[len(strip):]
    for suffix, part in _SUFFIXES.items():
      if k.endswith("." + suffix):
        out[k[:-len(suffix) - 1]][part] = np.asarray(tensors[key])
        break
    else:
      if re.search(r"lora_B(\.default)?\.bias$", k):
        raise UnsupportedPeftError(f"tensor {key!r}: lora_bias is not supported.")
      raise UnsupportedPeftError(
          f"tensor {key!r} is not a LoRA A/B/magnitude tensor (modules_to_save or base-model"
          " weights?); jlora does not load it.")
  return dict(out)


def torch_adapter(name: str, parts: dict, rank: int, scale: float) -> TorchAdapter:
  """One module's tensors as a ``TorchAdapter``; checks the rank against ``rank``."""
  if "EA" in parts or "EB" in parts:
    if not ("EA" in parts and "EB" in parts) or "A" in parts or "B" in parts:
      raise ValueError(f"module {name!r}: an embedding adapter needs lora_embedding_A and"
                       f" lora_embedding_B alone; found {sorted(parts)}.")
    kind, a, b = "embedding", parts["EA"], parts["EB"]
  elif "A" in parts and "B" in parts:
    a, b = parts["A"], parts["B"]
    kind = "conv" if a.ndim > 2 else "linear"
  else:
    raise ValueError(f"module {name!r} needs lora_A and lora_B; found {sorted(parts)}.")
  m = parts.get("M")
  t = TorchAdapter(kind, a, b, scale, None if m is None else m.reshape(-1))
  tf.check_tensors(name, t)
  if t.rank != rank:
    raise ValueError(f"module {name!r}: its tensors have rank {t.rank}, but the config gives"
                     f" r={rank} (r or rank_pattern).")
  return t


def adapters_from_peft(config: dict, tensors: dict) -> dict[str, TorchAdapter]:
  """``{torch module name: TorchAdapter}`` of a PEFT config and its tensors."""
  check_config(config)
  r0, a0 = int(config.get("r", 8)), config.get("lora_alpha", 8)
  ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
  rslora = bool(config.get("use_rslora", False))
  groups = group_tensors(tensors)
  dora = [n for n, parts in groups.items() if "M" in parts]
  if bool(config.get("use_dora")) != bool(dora):
    raise ValueError(f"the config sets use_dora={config.get('use_dora')}, but the file has"
                     f" {'no' if not dora else ''} lora_magnitude_vector tensors.")
  out = {}
  for name, parts in groups.items():
    rk, ak = pattern_key(ranks, name), pattern_key(alphas, name)
    r = int(ranks[rk]) if rk is not None else r0
    alpha = alphas[ak] if ak is not None else a0
    out[name] = torch_adapter(name, parts, r, float(alpha) / (math.sqrt(r) if rslora else r))
  return out


# ---------------------------------------------------------------------------
# Writing.


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def peft_files(adapters: dict[str, TorchAdapter], base_model_name_or_path=None,
               dropout: float = 0.0) -> tuple[dict, dict[str, np.ndarray]]:
  """``(adapter_config, tensors)`` for ``{torch module name: TorchAdapter}``.

  ``r`` and ``lora_alpha`` are the most common values; every other module gets
  exact (``^``-anchored) ``rank_pattern``/``alpha_pattern`` entries, with
  ``alpha = scale · r`` (``use_rslora`` False). ``target_modules`` is a regex that
  PEFT full-matches against module names, so it reaches the adapted modules and
  nothing else (a list would also reach every module whose name ends like one).
  """
  names = list(adapters)
  dora = [n for n in names if adapters[n].m is not None]
  if dora and len(dora) != len(names):
    plain = [n for n in names if adapters[n].m is None]
    raise UnsupportedPeftError(f"DoRA on some modules only ({dora[0]!r} has it, {plain[0]!r}"
                               " not): PEFT's use_dora is one flag for the whole adapter.")
  ranks = {n: adapters[n].rank for n in names}
  alphas = {n: _number(adapters[n].scale * adapters[n].rank) for n in names}
  r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
  a0 = collections.Counter(alphas.values()).most_common(1)[0][0]
  anchored = lambda n: "^" + re.escape(n)
  tensors = {}
  for n in names:
    t = adapters[n]
    key = PREFIX + n
    if t.kind == "embedding":
      tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = t.a, t.b
    else:
      tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = t.a, t.b
    if t.m is not None:
      m = np.asarray(t.m)
      tensors[key + ".lora_magnitude_vector"] = (
          m.reshape((1, -1) + (1,) * (np.ndim(t.a) - 2)) if t.kind == "conv" else m)
  config = {
      "peft_type": "LORA", "task_type": None,
      "base_model_name_or_path": base_model_name_or_path,
      "r": r0, "lora_alpha": a0, "use_rslora": False,
      "rank_pattern": {anchored(n): ranks[n] for n in names if ranks[n] != r0},
      "alpha_pattern": {anchored(n): alphas[n] for n in names if alphas[n] != a0},
      "target_modules": "(?:" + "|".join(re.escape(n) for n in names) + ")",
      "use_dora": bool(dora), "fan_in_fan_out": False, "init_lora_weights": True,
      "lora_dropout": dropout, "bias": "none", "lora_bias": False, "modules_to_save": None,
      "inference_mode": True,
  }
  return config, tensors


# ---------------------------------------------------------------------------
# The public functions.


def save_peft(directory, params, *, key_map: KeyMap = None, base_model_name_or_path=None,
              kinds=None) -> dict:
  """Writes the adapters of ``params`` as a PEFT LoRA adapter directory.

  ``peft.PeftModel.from_pretrained(torch_model, directory)`` loads it and gives
  the outputs of ``jlora.lora(fn)(params, ...)`` on the matching torch model.

  Args:
    directory: created if needed; gets ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    params: an adapted tree.
    key_map: jlora module path (``/``-joined, no leaf name; ``"<module>/<i>"`` for
      layer ``i`` of a stacked adapter) -> torch module name, as a dict (names it
      lacks use the default) or a callable. The default drops a leading
      ``params`` and turns ``/`` into ``.``; stacked adapters need a ``key_map``.
    base_model_name_or_path: written to the config (PEFT only reports it).
    kinds: ``{regex: "linear" | "conv" | "embedding"}`` for kernels whose torch
      module the layout does not tell (``torch_format.kind_of``).

  A PiSSA/OLoRA adapter is written as a plain LoRA of rank ``2r`` for the
  original base (see ``torch_format.export``). Adapters keep their dtype.

  Returns:
    The config written.

  Raises:
    ValueError: no adapters, a stacked adapter without a key_map, two modules
      with one name, or DoRA on some adapters only (``UnsupportedPeftError``).
  """
  adapters = tf.export(params, key_map, tf.dotted, kinds)
  dropout = max((float(np.max(ad.dropout)) for ad in adapter_lib.adapters(params)
                 if ad.dropout is not None), default=0.0)
  config, tensors = peft_files(adapters, base_model_name_or_path, dropout)
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  tf.write_safetensors(d / WEIGHTS_NAME, tensors, {"format": "pt"})
  (d / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
  return config


def read_peft(directory) -> dict[str, TorchAdapter]:
  """``{torch module name: TorchAdapter}`` of a PEFT adapter directory."""
  d = pathlib.Path(directory)
  if not (d / CONFIG_NAME).exists():
    raise FileNotFoundError(f"{d / CONFIG_NAME} not found: not a PEFT adapter directory.")
  if not (d / WEIGHTS_NAME).exists():
    raise FileNotFoundError(f"{d / WEIGHTS_NAME} not found (jlora does not read the pickled"
                            " adapter_model.bin; save with safe_serialization=True).")
  tensors, _ = tf.read_safetensors(d / WEIGHTS_NAME)
  return adapters_from_peft(json.loads((d / CONFIG_NAME).read_text()), tensors)


def load_peft(directory, params, *, key_map: KeyMap = None):
  """Puts a PEFT LoRA adapter onto ``params``.

  Args:
    directory: a PEFT adapter directory (``save_pretrained``).
    params: the base, or an adapted tree whose adapters are replaced and which
      then fixes the layouts (``jlora.attach``). On a base tree each kernel's split
      is read from the shapes, input-first when both fit: a square torch-layout
      ``(out, in)`` kernel needs an adapted tree (``jlora.init`` with
      ``in_axes={...: -1}``, or with ``fn``). A base kernel is stacked when the
      ``key_map`` names its layers (``"<module>/0"`` ...).
    key_map: as in ``save_peft``; a callable may return None for modules that
      have no torch counterpart.

  Returns:
    The adapted tree: each adapter has the file's rank, scale (``lora_alpha``,
    ``use_rslora`` and the patterns applied) and DoRA magnitude, in the file's
    dtype (the template's on an adapted tree), placed like its kernel.

  Raises:
    UnsupportedPeftError: a feature jlora cannot apply (named).
    ValueError: file modules that match no kernel (named), or tensors that do
      not fit their kernel (both shapes named).
  """
  adapters = read_peft(directory)
  to = tf.mapper(key_map, tf.dotted)
  what = f"the PEFT adapter in {directory}"
  loaded, unmatched = tf.import_(params, adapters, lambda n: [to(n)], what)
  if unmatched:
    raise ValueError(f"{what} adapts modules that match no kernel of params: {unmatched[:5]}"
                     f"{' ...' if len(unmatched) > 5 else ''}. Pass a key_map from jlora"
                     " module paths to these names.")
  return attach_lib.attach(params, loaded, what)

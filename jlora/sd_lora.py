"""Single-file Stable Diffusion LoRAs: ``jlora.load_sd_lora`` and ``jlora.save_sd_lora``.

Key styles read (one ``.safetensors`` file; layouts in ``torch_format``):

* kohya: ``lora_unet_<module, '.' as '_'>.lora_down.weight`` (A),
  ``.lora_up.weight`` (B) and ``.alpha`` (a scalar); ``lora_te_``/``lora_te1_``
  is the text encoder, ``lora_te2_`` the second one (SDXL). Conv layers (LoCon)
  have ``lora_down (r, c_in, kh, kw)`` and ``lora_up (c_out, r, 1, 1)``.
* diffusers: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT's keys,
  also ``text_encoder.``), with ``r``, ``lora_alpha`` and the patterns in the
  header JSON ``lora_adapter_metadata`` when the writer put them there.
* old diffusers: ``[unet.]<module>.lora.down.weight`` / ``.lora.up.weight``,
  ``<attn>.processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0``),
  ``text_encoder.<module>.lora_linear_layer.down.weight``; alpha from a
  ``<module>.alpha`` tensor, the header's ``lora_adapter_metadata`` or kohya's
  ``ss_network_alpha``.

The scale of every module is ``alpha / rank``, and ``alpha = rank`` where the file
has none (not the file's first or most common alpha: diffusers <= 0.39 gives
every module of a mixed-rank file without alphas the alpha of the first one).
LyCORIS variants (LoHa, LoKr, Tucker ``lora_mid``, ``dora_scale``, ...) are
refused by name.

Module names are compared after ``normalize`` (``/``, ``.`` and ``_`` all become
``_``), with or without the component (``unet``, ``text_encoder``), so a Flax
UNet whose modules are named like diffusers' (``down_blocks_0/attentions_0/
transformer_blocks_0/attn1/to_q``) matches the file with no ``key_map``.
"""

from __future__ import annotations

import collections
import json
import re
from typing import NamedTuple

import numpy as np

from jlora import attach as attach_lib
from jlora import peft as peft_lib
from jlora import torch_format as tf
from jlora.torch_format import KeyMap, TorchAdapter

_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"),
                   ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"))
_KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
_KOHYA_OUT = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
METADATA_KEY = "lora_adapter_metadata"
#: Key fragments of adapter types that are not plain LoRA.
_NOT_LORA = {
    "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_mid": "LyCORIS Tucker (lora_mid)",
    ".diff": "a LyCORIS full diff", ".dora_scale": "kohya/LyCORIS DoRA (dora_scale)",
    ".on_input": "LyCORIS IA3", ".w_norm": "LyCORIS norm", ".b_norm": "LyCORIS norm",
    "oft_": "OFT",
}
_OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class FileModule(NamedTuple):
  """One module of a file: its component, its name as the file writes it, and
  every tensor key that belongs to it."""
  component: str
  name: str
  keys: list


def normalize(name: str) -> str:
  """``/``, ``.`` and ``_`` all become ``_``."""
  return re.sub(r"[./_]", "_", name)


# ---------------------------------------------------------------------------
# Reading.


def _refuse_foreign(key: str) -> None:
  for fragment, what in _NOT_LORA.items():
    if fragment in key:
      raise peft_lib.UnsupportedPeftError(f"tensor {key!r} is {what}, not plain LoRA; jlora"
                                          " does not load it.")


def _alpha(x, rank: int) -> float:
  """A file's alpha, ``rank`` where it has none (missing, None, 0)."""
  v = None if x is None else float(np.asarray(x, np.float64).reshape(()))
  return float(rank) if not v else v


def _plain(name: str, down, up, alpha) -> TorchAdapter:
  t = TorchAdapter("conv" if np.ndim(down) > 2 else "linear", down, up, 1.0)
  tf.check_tensors(name, t)
  return t._replace(scale=_alpha(alpha, t.rank) / t.rank)


def _header_config(header: dict, component: str) -> dict | None:
  """The PEFT config of one component from ``lora_adapter_metadata``, if any."""
  raw = header.get(METADATA_KEY)
  if not raw:
    return None
  cut = len(component) + 1
  cfg = {k[cut:]: v for k, v in json.loads(raw).items() if k.startswith(component + ".")}
  return cfg or None


def _old_module(component: str, stem: str) -> str:
  """The module of an old-style key stem (attention processors, lora_linear_layer)."""
  stem = stem.replace(".processor.", ".")
  m = re.fullmatch(r"(.*)\.(to_q|to_k|to_v|to_out)_lora", stem)
  if m:
    base, proj = m.groups()
    if component.startswith("text_encoder"):
      return f"{base}.{_OLD_TEXT_NAMES[proj]}"
    return f"{base}.to_out.0" if proj == "to_out" else f"{base}.{proj}"
  for tail in (".lora_linear_layer", ".lora"):
    if stem.endswith(tail):
      return stem[:-len(tail)]
  raise ValueError(f"cannot read the old-style LoRA key stem {stem!r}.")


def _split_component(key: str) -> tuple[str, str]:
  for c in COMPONENTS:
    if key.startswith(c + "."):
      return c, key[len(c) + 1:]
  return "unet", key


def read_sd_lora(tensors: dict, header: dict) -> dict[str, tuple[FileModule, TorchAdapter]]:
  """``{module id: (FileModule, TorchAdapter)}`` of one file's tensors and header.

  The id is ``"<component>.<name as in the file>"``.

  Raises:
    UnsupportedPeftError: a tensor of a LyCORIS variant or of no known style.
    ValueError: a module that lacks its down or up tensor.
  """
  kohya = collections.defaultdict(dict)
  peft_style = collections.defaultdict(dict)
  old = collections.defaultdict(dict)
  keys = collections.defaultdict(list)
  for key, v in tensors.items():
    _refuse_foreign(key)
    prefix = next(((p, c) for p, c in _KOHYA_PREFIXES if key.startswith(p)), None)
    if prefix is not None:
      stem, _, tail = key[len(prefix[0]):].partition(".")
      if tail not in _KOHYA_PARTS:
        raise peft_lib.UnsupportedPeftError(f"kohya tensor {key!r} has the unknown part {tail!r}.")
      kohya[(prefix[1], stem)][_KOHYA_PARTS[tail]] = v
      keys[(prefix[1], stem)].append(key)
      continue
    component, rest = _split_component(key)
    if re.search(r"\.(lora_A|lora_B)\.weight$|\.lora_embedding_[AB]$|\.lora_magnitude_vector$|"
                 r"\.lora_B\.bias$", rest):
      peft_style[component][rest] = v
      stem = re.sub(r"\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                    r"lora_embedding_B|lora_magnitude_vector)$", "", rest)
      keys[(component, stem)].append(key)
      continue
    m = re.fullmatch(r"(.*)\.(down|up)\.weight", rest)
    if m and re.search(r"(_lora|\.lora|\.lora_linear_layer)$", m.group(1)):
      name = _old_module(component, m.group(1))
      old[(component, name)]["A" if m.group(2) == "down" else "B"] = v
      keys[(component, name)].append(key)
      continue
    if rest.endswith(".alpha"):
      old[(component, rest[:-len(".alpha")])]["alpha"] = v
      keys[(component, rest[:-len(".alpha")])].append(key)
      continue
    raise peft_lib.UnsupportedPeftError(f"tensor {key!r} is not a LoRA tensor of a key style"
                                        " jlora reads (kohya, diffusers, old diffusers).")
  out: dict[str, tuple[FileModule, TorchAdapter]] = {}

  def add(component, name, t):
    out[f"{component}.{name}"] = (FileModule(component, name, sorted(keys[(component, name)])), t)

  for (component, name), parts in kohya.items():
    if "A" not in parts or "B" not in parts:
      raise ValueError(f"kohya module {name!r} needs lora_down and lora_up; it has"
                       f" {sorted(parts)}.")
    add(component, name, _plain(name, parts["A"], parts["B"], parts.get("alpha")))
  for component, tensors_of in peft_style.items():
    cfg = _header_config(header, component)
    if cfg is None:  # no config: alpha = rank (scale 1) for every module
      for name, parts in peft_lib.group_tensors(tensors_of).items():
        rank = int(np.shape(parts.get("A", parts.get("EA")))[0])
        add(component, name, peft_lib.torch_adapter(name, parts, rank, 1.0))
    else:
      for name, t in peft_lib.adapters_from_peft({"peft_type": "LORA", **cfg}, tensors_of).items():
        add(component, name, t)
  network_alpha = header.get("ss_network_alpha")
  for (component, name), parts in old.items():
    if "A" not in parts or "B" not in parts:
      raise ValueError(f"old-style module {name!r} needs its down and up weights; it has"
                       f" {sorted(parts)}.")
    alpha = parts.get("alpha")
    cfg = _header_config(header, component) or {}
    if alpha is None and cfg:
      k = peft_lib.pattern_key(cfg.get("alpha_pattern"), name)
      alpha = cfg["alpha_pattern"][k] if k is not None else cfg.get("lora_alpha")
    if alpha is None and network_alpha not in (None, "", "None"):
      alpha = float(network_alpha)
    add(component, name, _plain(name, parts["A"], parts["B"], alpha))
  return out


# ---------------------------------------------------------------------------
# The public functions.


def load_sd_lora(path, params, *, key_map: KeyMap = None, strict: bool = True):
  """Puts a Stable Diffusion LoRA file (kohya, diffusers or old diffusers keys) onto ``params``.

  Args:
    path: a ``.safetensors`` file.
    params: the base (a UNet's or text encoder's params, or a dict holding both
      under names like ``unet``/``text_encoder``), or an adapted tree whose
      adapters are replaced (``jlora.attach``).
    key_map: jlora module path (``/``-joined, no leaf name) -> the file's module
      name (``"down_blocks.0.attentions.0.proj_in"``, with or without
      ``unet.``), as a dict (names it lacks use the default) or a callable. Names
      are compared after ``normalize``; the default drops a leading ``params``.
    strict: every module of the file must match a kernel, or ``ValueError``
      names the ones that do not. With ``strict=False`` they are skipped.

  Returns:
    The adapted tree (scale ``alpha / rank`` per module, placed like the
    kernels). With ``strict=False``: ``(params, skipped)``, where ``skipped`` is
    the sorted list of the file's tensor keys that were not loaded (e.g. the
    ``lora_te_...`` keys when ``params`` is a UNet).

  Raises:
    UnsupportedPeftError: LyCORIS variants and unknown key styles (named).
    ValueError: unmatched modules (with ``strict``), or tensors that do not fit
      their kernel (both shapes named).
  """
  tensors, header = tf.read_safetensors(path)
  found = read_sd_lora(tensors, header)
  index = collections.defaultdict(set)
  for fid, (fm, _) in found.items():
    index[normalize(fm.name)].add(fid)
    index[normalize(f"{fm.component}.{fm.name}")].add(fid)
  to = tf.mapper(key_map, tf.dotted)

  def lookup(name):
    target = to(name)
    return sorted(index.get(normalize(target), ())) if target else []

  what = f"the LoRA file {path}"
  loaded, unmatched = tf.import_(params, {f: t for f, (_, t) in found.items()}, lookup, what)
  skipped = sorted(k for f in unmatched for k in found[f][0].keys)
  if unmatched and strict:
    names = [found[f][0].name for f in unmatched]
    raise ValueError(
        f"{len(unmatched)} module(s) of {what} match no kernel of params: {sorted(names)[:5]}"
        f"{' ...' if len(names) > 5 else ''}. Pass a key_map, or strict=False to skip them"
        " (the skipped keys are returned).")
  out = attach_lib.attach(params, loaded, what)
  return out if strict else (out, skipped)


def diffusers_name(module: str) -> str:
  """A Flax module path as diffusers names the torch module: a leading ``params``
  dropped, ``/`` -> ``.``, and a trailing ``_<n>`` of a name -> ``.<n>``
  (``down_blocks_0/attentions_0/to_out_0`` -> ``down_blocks.0.attentions.0.to_out.0``);
  a leading component (``unet``, ``text_encoder_2``) stays as it is."""
  component, rest = _component(tf.dotted(module))
  return (component + "." if component else "") + re.sub(r"_(\d+)(?=\.|$)", r".\1", rest)


def _component(name: str) -> tuple[str, str]:
  """``("text_encoder", "text_model...")`` of ``"text_encoder.text_model..."``;
  ``("", name)`` when ``name`` starts with no component."""
  for c in sorted(_KOHYA_OUT, key=len, reverse=True):
    if name.startswith(c + "."):
      return c, name[len(c) + 1:]
  return "", name


def save_sd_lora(path, params, *, format: str = "kohya", key_map: KeyMap = None,
                 kinds=None) -> None:
  """Writes the adapters of ``params`` as one Stable Diffusion LoRA ``.safetensors`` file.

  Args:
    path: the file.
    params: an adapted tree.
    format: ``"kohya"``: ``lora_unet_<module>.lora_down.weight``/``.lora_up.weight``
      and ``.alpha`` holding the true alpha, ``scale · rank``, so kohya's
      ``alpha / rank`` gives the adapter's scale back (diffusers' own kohya export
      writes ``alpha = rank`` and loses it). ``"diffusers"``: PEFT keys under
      ``unet.`` with ``r``, ``lora_alpha`` and the patterns in the header's
      ``lora_adapter_metadata``, which diffusers reads.
    key_map: jlora module path -> the module's name in the file, as a dict or
      a callable. A name that starts with ``unet.``, ``text_encoder.`` or
      ``text_encoder_2.`` goes to that component, others to ``unet``. The
      default is ``diffusers_name`` (kohya normalises the name anyway).
    kinds: as in ``jlora.save_peft``.

  A PiSSA/OLoRA adapter is written as a plain LoRA of rank ``2r`` for the
  original base (``torch_format.export``).

  Raises:
    ValueError: an unknown format; DoRA or an embedding in kohya format (kohya's
      ``dora_scale`` means something else, and it has no embedding LoRA); the
      cases of ``torch_format.export``.
  """
  if format not in ("kohya", "diffusers"):
    raise ValueError(f"format must be 'kohya' or 'diffusers'; got {format!r}.")
  adapters = tf.export(params, key_map, diffusers_name, kinds)
  by_component = collections.defaultdict(dict)
  for name, t in adapters.items():
    component, rest = _component(name)
    by_component[component or "unet"][rest] = t
  tensors, header = {}, {"format": "pt"}
  if format == "diffusers":
    meta = {}
    for component, ts in by_component.items():
      cfg, t = peft_lib.peft_files(ts)
      tensors.update({component + "." + k[len(peft_lib.PREFIX):]: v for k, v in t.items()})
      for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                "target_modules"):
        meta[f"{component}.{k}"] = cfg[k]
    header[METADATA_KEY] = json.dumps(meta, sort_keys=True)
  else:
    for component, ts in by_component.items():
      for name, t in ts.items():
        if t.m is not None or t.kind == "embedding":
          raise peft_lib.UnsupportedPeftError(
              f"the adapter of {name!r} is {'DoRA' if t.m is not None else 'an embedding'},"
              " which kohya files cannot hold; use format='diffusers' or jlora.save_peft.")
        key = _KOHYA_OUT[component] + normalize(name)
        tensors[key + ".lora_down.weight"] = t.a
        tensors[key + ".lora_up.weight"] = t.b
        tensors[key + ".alpha"] = np.asarray(t.scale * t.rank, np.float32)
  tf.write_safetensors(path, tensors, header)


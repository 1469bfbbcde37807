"""Counting and listing adapters."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jlora import adapter as adapter_lib
from jlora import quant
from jlora import tree as tree_lib


class ParamCount(NamedTuple):
  """``trainable``: Σ r·(in + out) per adapted matrix (per stacked layer) plus DoRA
  magnitudes; ``total``: every base parameter plus the trainable ones (the
  constant ``lora_scale``/``lora_dropout`` leaves are bookkeeping, not parameters;
  a quantized kernel counts its float elements, and its scales count as bookkeeping)."""
  trainable: int
  total: int

  @property
  def fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0


def count_params(params) -> ParamCount:
  """Trainable and total parameter counts of an adapted tree.

  A stacked adapter (``jlora.stack_adapters``) counts each of its adapters at its
  own rank (``lora_ranks``), not the zero padding.
  """
  flat = tree_lib.flatten(params)
  sizes = {p: int(np.size(tree_lib.value(v))) for p, v in flat.items()}
  quantized = quant.find(flat)
  sizes.update({p: quant.read(flat, p, roles).size for p, roles in quantized.items()})
  owned = adapter_lib.adapter_leaf_paths(flat) | tree_lib.owned(quantized)
  trainable = sum(_trainable(flat, kp, roles, sizes)
                  for kp, roles in adapter_lib.find(flat).items())
  base = sum(n for p, n in sizes.items() if p not in owned)
  return ParamCount(trainable, base + trainable)


def _trainable(flat, kp, roles, sizes) -> int:
  """The trainable parameters of one adapter (of every adapter of a stacked one)."""
  m = sizes[roles["lora_m"]] if "lora_m" in roles else 0
  if not adapter_lib.is_stacked(roles):
    return sizes[roles["lora_a"]] + sizes[roles["lora_b"]] + m
  st = adapter_lib.read_stacked(flat, kp, roles)
  padded = st.slot_shapes().rank
  per_rank = (sizes[roles["lora_a"]] + sizes[roles["lora_b"]]) // (st.n * padded) if padded else 0
  return per_rank * int(np.sum(np.asarray(st.ranks))) + m


def summary(params, print_fn=print) -> str:
  """A table of adapted layers: path, shapes, rank, scale, params; and the trainable %.

  A stacked adapter is one row: its kind ends in ``[n adapters]`` and its rank
  lists each adapter's own (the factors are padded to the largest).
  Prints it with ``print_fn`` (pass ``None`` to only return it).
  """
  rows = [("path", "kind", "kernel", "lora_a", "lora_b", "rank", "scale", "params")]
  flat = tree_lib.flatten(params)
  sizes = {p: int(np.size(tree_lib.value(v))) for p, v in flat.items()}
  for kp, roles in adapter_lib.find(flat).items():
    if adapter_lib.is_stacked(roles):
      st = adapter_lib.read_stacked(flat, kp, roles)
      ad = st.ad
      kind = _kind(st.slot_shapes()) + f" [{st.n} adapters]"
      rank = ",".join(str(int(r)) for r in np.asarray(st.ranks))
    else:
      ad = adapter_lib.read(flat, kp, roles)
      kind, rank = _kind(ad), str(ad.rank)
    scales = np.unique(np.asarray(ad.scale))
    scale = f"{scales[0]:.4g}" if scales.size == 1 else f"{scales.min():.4g}..{scales.max():.4g}"
    rows.append((ad.name + (" (dora)" if ad.m is not None else ""), kind,
                 _shape(ad.kernel), _shape(ad.a), _shape(ad.b), rank, scale,
                 f"{_trainable(flat, kp, roles, sizes):,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  c = count_params(params)
  lines.append(f"{len(rows) - 1} adapted kernels; trainable {c.trainable:,} of {c.total:,}"
               f" ({100 * c.fraction:.3f}%)")
  text = "\n".join(lines)
  if print_fn is not None:
    print_fn(text)
  return text


def _kind(ad: tree_lib.Adapter) -> str:
  """A label from the layout alone: embed, dense (one in and one out axis) or general."""
  if ad.path[-1] == "embedding":
    return "embed"
  kind = "dense" if ad.n_in == ad.n_out == 1 else f"general {ad.n_in}->{ad.n_out}"
  kind += " (out, in)" if ad.out_first else ""
  kind += f" {ad.kernel.bits}-bit" if quant.is_quantized(ad.kernel) else ""
  return kind + (f" x{ad.n_stack} stacked" if ad.n_stack else "")


def _shape(x) -> str:
  return "x".join(str(d) for d in np.shape(x)) or "()"


def adapter_bytes(params) -> int:
  """Bytes of the adapter leaves (what ``partition(params)[0]`` saves)."""
  flat = tree_lib.flatten(params)
  return sum(int(np.size(tree_lib.value(flat[p]))) * np.dtype(tree_lib.value(flat[p]).dtype).itemsize
             for p in adapter_lib.adapter_leaf_paths(flat))


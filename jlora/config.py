"""``LoraConfig``: what to adapt and how, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

#: A target selector: a regex searched in the ``/``-joined leaf path, a sequence of
#: module names (exact or suffix match on the module path, as PEFT does; a match
#: also covers the modules inside it), or a predicate ``(path, leaf) -> bool``.
Selector = Union[str, Sequence[str], Callable[[str, Any], bool]]

INITS = ("kaiming", "gaussian", "pissa", "olora")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get an adapter, and how each adapter is built.

  Attributes:
    rank: the adapter rank ``r >= 1``.
    alpha: scale numerator: the scale is ``alpha / rank``, or ``alpha / sqrt(rank)``
      with ``rslora`` (Kalajdzievski 2023, arXiv 2312.03732). ``None`` means scale
      1.0 for every rank, with or without ``rslora``.
    targets: the kernels to adapt (see ``Selector``).
    exclude: kernels never to adapt, same forms; checked first.
    init: ``"kaiming"`` (A kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(fan_in)),
      B = 0; PEFT/loralib), ``"gaussian"`` (A ~ N(0, 1/r^2), B = 0),
      ``"pissa"`` (A, B from the top-r singular triplets of W, base replaced by the
      residual; Meng et al. 2024) or ``"olora"`` (from a QR of W, base replaced by
      the residual; Buyukakyuz 2024). Embeddings get A = 0, B ~ N(0, 1) under
      kaiming and gaussian (the PEFT and loralib convention).
    rslora: use ``alpha / sqrt(rank)``.
    dora: add a trainable magnitude ``lora_m`` (Liu et al. 2024, arXiv 2402.09353).
    dropout: dropout rate on the adapter's input, applied by ``jlora.lora`` when it
      is given an rng; stored in the tree as ``lora_dropout``.
    rank_pattern, alpha_pattern: ``{regex: value}`` per-path overrides searched in
      the kernel path; the first match wins.
    in_axes: ``{regex: n}``: the kernel's first ``n`` axes (after any stack axes)
      are its inputs; a negative ``n`` means its *last* ``-n`` axes are, for
      kernels stored output-first (a torch-style ``(out, in)`` kernel used as
      ``x @ kernel.T`` has ``in_axes=-1``). Overrides both the default rule and
      what ``fn`` shows.
    stack_axes: ``{regex: n}``: the kernel's first ``n`` axes index stacked layers
      (``nn.scan``), so each layer gets its own adapter. With ``fn`` given to
      ``jlora.init`` they are found from the model.
    dtype: adapter dtype; ``None`` means the kernel's dtype. Use ``"float32"`` for
      float32 adapters on bf16 kernels.
  """
  rank: int = 8
  alpha: float | None = None
  targets: Selector = r"kernel$"
  exclude: Selector | None = None
  init: str = "kaiming"
  rslora: bool = False
  dora: bool = False
  dropout: float = 0.0
  rank_pattern: Mapping[str, int] | None = None
  alpha_pattern: Mapping[str, float] | None = None
  in_axes: Mapping[str, int] | None = None
  stack_axes: Mapping[str, int] | None = None
  dtype: Any = None

  def __post_init__(self):
    _check_rank(self.rank, "rank")
    if self.alpha is not None:
      _check_positive(self.alpha, "alpha")
    if self.init not in INITS:
      raise ValueError(f"init={self.init!r} is not one of {INITS}.")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"dropout={self.dropout!r} must lie in [0, 1).")
    _check_selector(self.targets, "targets")
    if self.exclude is not None:
      _check_selector(self.exclude, "exclude")
    for name, check in (("rank_pattern", lambda v, w: _check_rank(v, w)),
                        ("alpha_pattern", _check_positive),
                        ("in_axes", _check_nonzero),
                        ("stack_axes", _check_count)):
      pattern = getattr(self, name)
      if pattern is None:
        continue
      if not isinstance(pattern, Mapping):
        raise TypeError(f"{name} must be a mapping {{regex: value}}; got {type(pattern).__name__}.")
      for key, v in pattern.items():
        _compile(key, f"{name} key")
        check(v, f"{name}[{key!r}]")
    if self.dtype is not None:
      dt = np.dtype(self.dtype)
      if not np.issubdtype(dt, np.floating) and dt.name != "bfloat16":
        raise ValueError(f"dtype={self.dtype!r} is not a float dtype.")
    # Freeze the mutable mappings so that the config stays hashable and equal
    # configs compare equal.
    for name in ("rank_pattern", "alpha_pattern", "in_axes", "stack_axes"):
      pattern = getattr(self, name)
      if pattern is not None:
        object.__setattr__(self, name, _FrozenMapping(pattern))

  def scale(self, rank: int, alpha: float | None) -> float:
    """``alpha / rank`` (or ``alpha / sqrt(rank)`` with rslora); 1.0 when alpha is None."""
    if alpha is None:
      return 1.0
    return float(alpha) / (math.sqrt(rank) if self.rslora else rank)


class _FrozenMapping(dict):
  """An insertion-ordered mapping that refuses mutation and hashes by items."""

  def __hash__(self):
    return hash(tuple(self.items()))

  def __reduce__(self):  # pickle rebuilds it from a plain dict, not item by item
    return (_FrozenMapping, (dict(self),))

  def _refuse(self, *a, **k):
    raise TypeError("LoraConfig patterns are read-only.")
  __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse


def _check_rank(v, what):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
    raise ValueError(f"{what} must be an int >= 1; got {v!r}.")


def _check_nonzero(v, what):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v == 0:
    raise ValueError(f"{what} must be a nonzero int (n > 0: the first n axes are inputs;"
                     f" n < 0: the last -n); got {v!r}.")


def _check_count(v, what):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
    raise ValueError(f"{what} must be an int >= 0; got {v!r}.")


def _check_positive(v, what):
  if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not v > 0:
    raise ValueError(f"{what} must be a number > 0; got {v!r}.")


def _compile(pattern: str, what: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}.") from None


def _check_selector(sel, what):
  if callable(sel):
    return
  if isinstance(sel, str):
    _compile(sel, what)
    return
  if isinstance(sel, Sequence) and sel and all(isinstance(s, str) and s for s in sel):
    return
  raise TypeError(
      f"{what} must be a regex string, a non-empty sequence of module names, or a"
      f" callable (path, leaf) -> bool; got {sel!r}.")

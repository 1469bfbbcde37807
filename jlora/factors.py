"""Adapter trees read per kernel without the kernels: what ``jlora.partition`` returns.

``jlora.mix`` and ``jlora.stack_adapters`` combine adapter trees. Such a tree holds
an adapter's leaves only (``lora_a``, ``lora_b``, ``lora_scale``, ...), so each adapter
is found by its *site* (the module path and the kernel's leaf name, see ``Site``)
rather than by its kernel, and its layout (``adapter.Split``) is read from the
factors' shapes alone:

* input-first, ``A: S + I + (r,)`` and ``B: S + (r,) + O``, fits when A's last axis
  equals B's first after the stack axes (``S`` has ``ndim(lora_scale)`` axes);
* output-first, ``A: S + (r,) + I`` and ``B: S + O + (r,)``, fits when A's first
  after the stack axes equals B's last; a DoRA magnitude (``S + O``) must fit too.

Where both fit (a square Dense kernel, say), the reading with the smaller rank
wins, and input-first on a tie. That is right for every adapter ``jlora.init`` builds
on a kernel with one input axis or one output axis (Dense, Conv, Embed, attention
projections), since its rank is at most that axis. Elsewhere a wrong reading could
only move the rank axis onto an input or output axis, which ``jlora.combine`` with the
base refuses, naming the path. To take the layout from the kernels instead, pass the
adapted params (with kernels): their complete adapters are read exactly as
``jlora.adapters`` reads them.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from jlora import adapter as adapter_lib
from jlora import tree as tree_lib
from jlora.adapter import Adapter, Split
from jlora.tree import Path, path_str


class Site(NamedTuple):
  """Where an adapter lives: ``head`` (the module path) and ``stem``, the kernel's
  leaf name when its adapter leaves carry it (``w`` -> ``w_lora_a``), or None for the
  bare names beside a ``kernel`` or ``embedding``."""
  head: Path
  stem: Any = None

  def path(self, role: str) -> Path:
    return self.head + ((role,) if self.stem is None else (f"{self.stem}_{role}",))

  @property
  def name(self) -> str:
    """The ``/``-joined module path (and kernel name where it is known), for messages."""
    return path_str(self.head + (() if self.stem is None else (self.stem,)))


class Factors(NamedTuple):
  """One kernel's adapter from an adapter tree.

  ``ad`` holds its arrays (``ad.kernel`` is the kernel if the tree had it, else a
  ``jax.ShapeDtypeStruct`` of the kernel's shape, read from the factors); ``split``
  its layout; ``leaves`` the stored leaves by role (NNX Variables stay wrapped).
  For a stacked adapter, ``ranks`` is its ``lora_ranks`` and every array of ``ad``
  but the kernel leads with the adapter axis (``split`` is one adapter's layout).
  """
  site: Site
  ad: Adapter
  split: Split
  leaves: dict
  ranks: Any = None

  @property
  def lead(self) -> int:
    """1 for a stacked adapter (the adapter axis leads), else 0."""
    return 0 if self.ranks is None else 1

  @property
  def rank(self) -> int:
    """The rank (zero-padded, for a stacked adapter)."""
    return np.shape(self.ad.a)[self.a_rank_axis]

  @property
  def kernel_shape(self) -> tuple:
    return tuple(np.shape(self.ad.kernel))

  @property
  def a_rank_axis(self) -> int:
    return self.lead + self.split.n_stack if self.split.out_first else np.ndim(self.ad.a) - 1

  @property
  def b_rank_axis(self) -> int:
    return np.ndim(self.ad.b) - 1 if self.split.out_first else self.lead + self.split.n_stack


def _site_of_kernel(kernel_path: Path) -> Site:
  name = kernel_path[-1]
  return Site(kernel_path[:-1], None if name in adapter_lib.BARE_KERNEL_NAMES else name)


def _role_of(path: Path):
  """``(site, role)`` of a leaf named like an adapter leaf, else None."""
  last = path[-1] if path else None
  if not isinstance(last, str):
    return None
  for role in adapter_lib.ROLES:
    if last == role:
      return Site(path[:-1]), role
    if last.endswith("_" + role) and len(last) > len(role) + 1:
      return Site(path[:-1], last[:-len(role) - 1]), role
  return None


def _kernel_shape(split: Split, a_shape, b_shape) -> tuple:
  ns = split.n_stack
  if split.out_first:
    return tuple(a_shape[:ns]) + tuple(b_shape[ns:-1]) + tuple(a_shape[ns + 1:])
  return tuple(a_shape[:-1]) + tuple(b_shape[ns + 1:])


def infer_split(a_shape, b_shape, n_stack: int, m_shape=None) -> Split | None:
  """The layout of factors of these shapes, read without the kernel (module docstring)."""
  a_shape, b_shape = tuple(a_shape), tuple(b_shape)
  n_in = len(a_shape) - n_stack - 1
  if n_in < 1 or len(b_shape) - n_stack - 1 < 1:
    return None
  fits = []
  for out_first in (False, True):
    split = Split(n_stack, n_in, out_first)
    r = a_shape[n_stack] if out_first else a_shape[-1]
    shape = _kernel_shape(split, a_shape, b_shape)
    stack, _, outs = split.shapes(shape)
    if (split.a_shape(shape, r) == a_shape and split.b_shape(shape, r) == b_shape
        and (m_shape is None or tuple(m_shape) == stack + outs)):
      fits.append((r, out_first, split))
  return min(fits)[2] if fits else None


def read(tree, what: str, *, stacked: bool = False) -> dict[Site, Factors]:
  """``{site: Factors}`` of every adapter of ``tree``, in tree order.

  ``tree`` is an adapter tree (``jlora.partition(params)[0]``) or adapted params;
  with kernels, only complete adapters count (as in ``jlora.adapters``). With
  ``stacked``, every adapter must be stacked (``jlora.stack_adapters``), else none.

  Raises:
    ValueError: ``tree`` has no adapter, an adapter lacks ``lora_a``, ``lora_b`` or
      ``lora_scale``, its factors fit no layout, or it is (not) stacked. ``what``
      names the tree in the message (e.g. ``"adapter 'style'"``).
  """
  flat = tree_lib.flatten(tree)
  found = adapter_lib.find(flat)
  out: dict[Site, Factors] = {}
  for kp, roles in found.items():
    _check_stacked(what, path_str(kp), adapter_lib.is_stacked(roles), stacked)
    site = _site_of_kernel(kp)
    leaves = {r: flat[p] for r, p in roles.items()}
    if stacked:
      st = adapter_lib.read_stacked(flat, kp, roles)
      split = adapter_lib.read_split(np.shape(st.ad.kernel), np.shape(st.ad.a)[1:],
                                     np.shape(st.ad.b)[1:], np.ndim(st.ad.scale) - 1)
      out[site] = Factors(site, st.ad, split, leaves, st.ranks)
    else:
      ad = adapter_lib.read(flat, kp, roles)
      out[site] = Factors(site, ad, ad.split, leaves)
  if found:
    return out
  groups: dict[Site, dict] = {}
  for p, leaf in flat.items():
    hit = _role_of(p)
    if hit is not None:
      groups.setdefault(hit[0], {})[hit[1]] = leaf
  if not groups:
    raise ValueError(f"{what} has no adapter leaves (lora_a, lora_b, lora_scale): pass"
                     " jlora.partition(params)[0], or the adapted params.")
  for site, leaves in groups.items():
    _check_stacked(what, site.name, adapter_lib.STACKED_ROLE in leaves, stacked)
    out[site] = _read_kernelless(site, leaves, what, stacked)
  return out


def _check_stacked(what: str, where: str, is_stacked: bool, want: bool) -> None:
  if is_stacked and not want:
    raise ValueError(f"{what} is stacked (at {where!r}, by jlora.stack_adapters): pass plain"
                     " adapter trees (jlora.unstack_adapters takes a stack apart).")
  if want and not is_stacked:
    raise ValueError(f"{what} is not stacked (no lora_ranks at {where!r}): pass the tree that"
                     " jlora.stack_adapters returned.")


def _read_kernelless(site: Site, leaves: dict, what: str, stacked: bool) -> Factors:
  """One adapter of an adapter tree, its layout read from the factors (module docstring)."""
  missing = [r for r in adapter_lib.REQUIRED_ROLES if r not in leaves]
  if missing:
    raise ValueError(f"the adapter of {site.name!r} in {what} has no {', '.join(missing)};"
                     " an adapter tree needs lora_a, lora_b and lora_scale per kernel.")
  arr = {r: tree_lib.value(v) for r, v in leaves.items()}
  lead = int(stacked)
  if stacked:
    n = np.shape(arr[adapter_lib.STACKED_ROLE])[:1]
    short = [r for r, x in arr.items() if np.shape(x)[:1] != n]
    if np.ndim(arr[adapter_lib.STACKED_ROLE]) != 1 or short:
      raise ValueError(
          f"the stacked adapter of {site.name!r} in {what} needs lora_ranks of shape (n,) and"
          f" every leaf leading with n adapters; got " + ", ".join(
              f"{r} {np.shape(x)}" for r, x in arr.items()) + ".")
  one = lambda r: None if arr.get(r) is None else np.shape(arr[r])[lead:]
  a_shape, b_shape = one("lora_a"), one("lora_b")
  ns = np.ndim(arr["lora_scale"]) - lead
  split = infer_split(a_shape, b_shape, ns, one("lora_m")) if ns >= 0 else None
  if split is None:
    raise ValueError(
        f"the adapter of {site.name!r} in {what} fits no layout: lora_a"
        f" {np.shape(arr['lora_a'])}, lora_b {np.shape(arr['lora_b'])}, lora_scale"
        f" {np.shape(arr['lora_scale'])}. Expected lora_a = stack + in + (r,) and lora_b ="
        " stack + (r,) + out (or stack + (r,) + in and stack + out + (r,)), lora_scale = stack"
        + (", each after the leading adapter axis." if stacked else "."))
  kernel = jax.ShapeDtypeStruct(_kernel_shape(split, a_shape, b_shape), arr["lora_a"].dtype)
  ad = Adapter(site.path("kernel") if site.stem is None else site.head + (site.stem,), kernel,
               arr["lora_a"], arr["lora_b"], arr["lora_scale"], arr.get("lora_m"),
               arr.get("lora_dropout"))
  return Factors(site, ad, split, leaves, arr.get(adapter_lib.STACKED_ROLE))


def check_same_kernel(site: Site, entries: Mapping[str, Factors]) -> None:
  """Raise ``ValueError`` unless every adapter of one site fits one kernel and layout."""
  (first, f0), *rest = entries.items()
  for name, f in rest:
    if f.kernel_shape != f0.kernel_shape or f.split != f0.split:
      raise ValueError(
          f"the adapters {first!r} and {name!r} do not fit one kernel at {site.name!r}:"
          f" {first!r} has lora_a {np.shape(f0.ad.a)}, lora_b {np.shape(f0.ad.b)} (kernel"
          f" {f0.kernel_shape}, {_describe(f0.split)}), {name!r} has lora_a"
          f" {np.shape(f.ad.a)}, lora_b {np.shape(f.ad.b)} (kernel {f.kernel_shape},"
          f" {_describe(f.split)}). Adapters of one base model are needed.")


def _describe(split: Split) -> str:
  return (f"{split.n_stack} stack axes, " if split.n_stack else "") + (
      "output-first" if split.out_first else "input-first")


def build(entries: Mapping[Site, Mapping[str, Any]], like, templates: Mapping[Site, Factors]):
  """An adapter tree from ``{site: {role: array}}``, with ``like``'s containers.

  Each array is stored like the same role's leaf of ``templates[site]`` (an NNX
  Variable stays one), or as a fresh leaf of that kind for a role it lacks.
  """
  flat = {}
  for site, arrays in entries.items():
    leaves = templates[site].leaves
    for role, arr in arrays.items():
      flat[site.path(role)] = (tree_lib.rewrap(leaves[role], arr) if role in leaves
                               else adapter_lib.new_leaf(leaves["lora_a"], arr, role))
  return tree_lib.unflatten(flat, like)

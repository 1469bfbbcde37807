"""Putting loaded adapters onto a params tree: the one step every loader ends with.

``jlora.load`` (checkpoints), ``jlora.load_peft`` and ``jlora.load_sd_lora`` turn
what they read into ``Loaded`` adapters (leaves laid out like the kernel, see
``adapter.Split``) and hand them to ``attach``, which

* takes ``params`` as the base the adapters were trained on, or as an adapted
  tree whose adapters are replaced. An adapted tree is a template: it must have
  adapters on exactly the loaded kernels, with the same ``lora_a``, ``lora_b``,
  ``lora_scale`` and ``lora_m`` shapes (rank, layout, DoRA), and the loaded
  leaves take its dtypes, so a jitted step built for it runs on the result
  without compiling again. Its ``lora_dropout`` stays where the file has none
  (PEFT and SD files carry no dropout);
* rebuilds residual kernels (PiSSA, OLoRA): a loaded adapter with
  ``lora_a0``/``lora_b0`` gets the kernel ``W - A0 @ B0`` of the original ``W``
  (``merge.residual_kernel``, the function ``jlora.init`` used, so the same ``W``
  gives the same bits). A template's own residual is undone first
  (``W = kernel + A0 @ B0``), unless it is the very one loaded, which keeps the
  template's kernel as it is (exact resume);
* places every loaded leaf like its kernel. This is the only place where loaded
  leaves are placed: ``_place``.

Nothing is returned until every adapter has been checked, so a failed load never
gives a partial tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jlora import adapter as adapter_lib
from jlora import quant
from jlora import sharding as sharding_lib
from jlora import tree as tree_lib
from jlora.adapter import Adapter
from jlora.merge import original_kernel, residual_kernel
from jlora.tree import Path, path_str


class Loaded(NamedTuple):
  """One adapter read from a file.

  ``leaves`` maps roles (``lora_a``, ``lora_b``, ``lora_scale`` and, where present,
  ``lora_m``, ``lora_dropout``, ``lora_a0``, ``lora_b0``) to arrays laid out for the
  kernel at ``path`` (``stack + in + (r,)`` etc., see ``adapter``).
  """
  path: Path
  leaves: dict[str, Any]

  @property
  def name(self) -> str:
    return path_str(self.path)


def shape_text(leaves) -> str:
  """``lora_a (6, 2), lora_b (2, 5), ...`` for messages."""
  return ", ".join(f"{role} {tuple(np.shape(v))}" for role, v in leaves.items()
                   if role in ("lora_a", "lora_b", "lora_m"))


def _place(kernel, split, leaves: dict, where: str) -> dict:
  """Loaded leaves put where their kernel lives, by ``sharding.kernel_shardings`` (the
  one placement call site of the loaders). A kernel with no placement leaves them as
  they are."""
  rule = sharding_lib.kernel_shardings(kernel, split, where=where)
  if rule is None:
    return leaves
  return {role: jax.device_put(v, rule[role]) for role, v in leaves.items()}


def check_template(found: dict, loaded: Sequence[Loaded], flat, what: str) -> None:
  """An adapted ``params`` must be adapted exactly like the loaded adapters.

  Raises:
    ValueError: naming the first path where they differ and both sets of shapes.
  """
  if not found:
    return
  by_path = {l.path: l for l in loaded}
  for l in loaded:
    if l.path not in found:
      raise ValueError(
          f"{what} has an adapter at {l.name!r} ({shape_text(l.leaves)}), but the adapted"
          " params have none there. Load onto the base (`jlora.partition(params)[1]`) or"
          " onto a tree adapted like the saved one.")
    mine = {r: tree_lib.value(flat[p]) for r, p in found[l.path].items()}
    for role in ("lora_a", "lora_b", "lora_scale", "lora_m"):
      a, b = mine.get(role), l.leaves.get(role)
      if (a is None) != (b is None) or (a is not None and np.shape(a) != np.shape(b)):
        raise ValueError(
            f"{what}: the adapter of {l.name!r} has {shape_text(l.leaves)}, but the adapted"
            f" params have {shape_text(mine)} there ({role}: {_shape_or_none(b)} against"
            f" {_shape_or_none(a)}). Load onto the base (`jlora.partition(params)[1]`), or"
            " adapt it with the saved rank, layout and DoRA setting.")
  for p in found:
    if p not in by_path:
      raise ValueError(
          f"the adapted params have an adapter at {path_str(p)!r} that {what} lacks."
          " Load onto the base (`jlora.partition(params)[1]`).")


def _shape_or_none(x):
  return "absent" if x is None else tuple(np.shape(x))


def attach(params, loaded: Sequence[Loaded], what: str):
  """``params`` with the ``loaded`` adapters on their kernels (see the module docstring).

  Args:
    params: the base tree, or an adapted template.
    loaded: the adapters, at most one per kernel path.
    what: the source, for messages (``"checkpoint step 3 in /ckpt"``).

  Returns:
    A tree with ``params``' containers: its base leaves, the loaded adapters
    (``nnx.Variable``s in an NNX state), and kernels rebuilt where residual
    adapters come or go.

  Raises:
    ValueError: an adapted ``params`` is adapted differently (the message names the
      path and both shapes). The loaders check beforehand that every kernel is
      there and fits its adapter.
  """
  flat = tree_lib.flatten(params)
  found = adapter_lib.find(flat)
  check_template(found, loaded, flat, what)
  owned = tree_lib.owned(found)
  out = {p: v for p, v in flat.items() if p not in owned}
  for l in loaded:
    leaf = flat[l.path]  # the loaders check that every kernel is there
    w = quant.read_kernel(flat, l.path)
    mine = {r: tree_lib.value(flat[p]) for r, p in found.get(l.path, {}).items()}
    leaves = {r: (v.astype(mine[r].dtype) if r in mine else v) for r, v in l.leaves.items()}
    if "lora_dropout" in mine and "lora_dropout" not in leaves:
      leaves["lora_dropout"] = mine["lora_dropout"]
    ad = _adapter(l.path, w, leaves)
    kernel = _kernel(w, ad.split, mine, leaves)
    if kernel is not w:
      out[l.path] = tree_lib.rewrap(leaf, kernel)
    where = adapter_lib.role_paths(l.path)
    for role, arr in _place(w, ad.split, leaves, l.name).items():
      p = where[role]
      out[p] = (tree_lib.rewrap(flat[p], arr) if p in owned
                else adapter_lib.new_leaf(leaf, arr, role))
  return tree_lib.unflatten(out, params)


def _adapter(path: Path, w, leaves: dict) -> Adapter:
  ad = Adapter(path, w, leaves["lora_a"], leaves["lora_b"], leaves["lora_scale"],
               leaves.get("lora_m"), leaves.get("lora_dropout"))
  adapter_lib.check_layout(ad)
  return ad


def _kernel(w, split, mine: dict, leaves: dict):
  """The kernel under the loaded adapter: ``w`` itself, or a residual rebuilt."""
  theirs = ("lora_a0" in leaves, "lora_a0" in mine)
  if theirs == (False, False):
    return w
  if theirs == (True, True) and all(
      np.array_equal(np.asarray(mine[r]), np.asarray(leaves[r])) for r in adapter_lib.RESIDUAL_ROLES):
    return w  # the template was built by the same residual init: keep its exact kernel
  if quant.is_quantized(w):
    raise ValueError(
        "a PiSSA/OLoRA adapter rewrites its kernel to the residual W - A0·B0, but the kernel"
        " is quantized and the residual would need quantizing again: load it onto the float"
        " base, then jlora.quantize the result.")
  if "lora_a0" in mine:
    w = original_kernel(w, split, mine["lora_a0"], mine["lora_b0"])
  if "lora_a0" in leaves:
    w = residual_kernel(w, split, leaves["lora_a0"], leaves["lora_b0"])
  return w

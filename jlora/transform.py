"""``jlora.init``: add adapter leaves next to the targeted kernels.

For a kernel with stack, input and output shapes ``S``, ``I``, ``O`` (see
``adapter.Split``), rank ``r`` and scale ``s``, ``init`` adds

* ``lora_a``: ``S + I + (r,)`` and ``lora_b``: ``S + (r,) + O`` (output-first
  kernels: ``S + (r,) + I`` and ``S + O + (r,)``);
* ``lora_scale``: ``S``, float32, the constant ``s``;
* ``lora_m``: ``S + O`` with DoRA, the column norm ``‖W‖`` over the input axes;
* ``lora_dropout``: ``S``, float32, the rate, when the config asks for dropout;
* ``lora_a0``, ``lora_b0``: float32, shaped like ``lora_a``/``lora_b``, for the
  residual inits (``merge.residual_kernel``);

so that ``delta = s · A₂ @ B₂`` on the canonical matrices, per stacked layer.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from jlora import adapter as adapter_lib
from jlora import quant
from jlora import sharding as sharding_lib
from jlora import split as split_lib
from jlora import targets as targets_lib
from jlora import tree as tree_lib
from jlora.config import LoraConfig
from jlora.merge import column_norm, residual_kernel


def init(key, params, cfg: LoraConfig, *, fn=None, args=(), kwargs=None,
         replicate: sharding_lib.Replicate = False):
  """Returns ``params`` with adapter leaves beside every targeted kernel.

  Args:
    key: a ``jax.random`` key. Each kernel draws from ``fold_in(key, crc32(name))``
      (``name`` its ``/``-joined path), so changing one layer's rank or the target
      set leaves other adapters as they were.
    params: a linen variables dict, an ``nnx.State`` or a nested dict (lists and
      tuples too) of arrays. It is not modified.
    cfg: the ``LoraConfig``.
    fn, args, kwargs: optionally the function you will wrap with ``jlora.lora``
      and example inputs; the kernels' in/out splits are then read from it
      (``split.read``) instead of the default rule.
    replicate: where the adapters of sharded kernels go. ``False``: beside their
      kernel, by ``jlora.sharding``'s rule; ``True``: replicated on its mesh; mesh
      axis names: the rule without those axes. Pass the same to ``jlora.shardings``.

  Placement: each adapter is built where its kernel lives, as global arrays (so
  also across processes): on the kernel's device, or sharded like it on a mesh
  (``jlora.sharding``). Under ``jit`` that holds on Explicit mesh axes, where the
  kernel's sharding is part of its type; on Auto axes it cannot be seen, so give
  that ``jit`` ``out_shardings=jlora.shardings(...)``. Uncommitted kernels get
  uncommitted adapters.

  Returns:
    A new tree. With ``init="pissa"`` or ``"olora"`` the targeted kernels hold the
    residual ``W - s · A @ B``, so the returned tree (not the old base) is the one
    to train, save and merge; ``merge`` of it gives back ``W`` up to rounding. The
    subtracted part is kept as ``lora_a0 = s · A`` and ``lora_b0 = B`` (float32
    constants), which is what lets ``jlora.load`` put a saved adapter onto the
    original base and ``jlora.save_peft`` export a plain LoRA.
    Quantized kernels (``jlora.quantize``) stay as they are and get adapters like
    the float kernels they stand for: the same shapes, split and fan-in; DoRA's
    magnitude starts at the dequantized kernel's column norm.

  Raises:
    ValueError: no kernel matched (the message lists candidates), a rank outside
      ``[1, min(in, out)]``, a pattern key that matches no target, adapters
      already present, a kernel whose use fits no adapter layout, a grouped
      convolution, or PiSSA/OLoRA on a quantized kernel.
    TypeError: a non-float kernel.
  """
  flat = tree_lib.flatten(params)
  # Quantized kernels are selected, read and sized as the float kernels they stand for.
  view = quant.float_view(flat)
  found = None
  if fn is not None:
    found = split_lib.read(fn, tree_lib.unflatten(view, params), args, kwargs)
  targets = targets_lib.select(view, cfg, found)
  qfound = quant.find(flat)
  quantized = [t.name for t in targets if t.path in qfound]
  if quantized and cfg.init in ("pissa", "olora"):
    raise ValueError(
        f"init={cfg.init!r} replaces the kernel by the residual W - s·A·B, but"
        f" {quantized[0]!r} is quantized and the residual would need quantizing again."
        f" Initialize the float base with init={cfg.init!r}, then jlora.quantize the"
        " returned tree (its adapters keep their split), or use init='kaiming'.")
  kernels = [quant.read_kernel(flat, t.path) for t in targets]
  residual = cfg.init in ("pissa", "olora")

  def make(key, kernels):
    out = []
    for t, w in zip(targets, kernels):
      kernel, leaves = _init_one(jax.random.fold_in(key, zlib.crc32(t.name.encode())), w, t, cfg)
      out.append((kernel if residual else None, leaves))
    return out

  # Each kernel's adapter is built where the kernel lives (see jlora.sharding); the
  # kernel itself is an output only when the init rewrites it (PiSSA, OLoRA).
  where = [_placement(w, t, cfg, replicate) for t, w in zip(targets, kernels)]
  built = sharding_lib.build(make, (key, kernels), where)
  out = dict(flat)
  for t, w, (kernel, leaves) in zip(targets, kernels, built):
    leaf = flat[t.path]
    if quant.is_quantized(w):  # its scales must be per layer along the adapter's stack axes
      adapter_lib.check_layout(adapter_lib.Adapter(t.path, w, leaves["lora_a"], leaves["lora_b"],
                                                   leaves["lora_scale"]))
    if residual:
      out[t.path] = tree_lib.rewrap(leaf, kernel)
    roles = adapter_lib.role_paths(t.path)
    for role, arr in leaves.items():
      out[roles[role]] = adapter_lib.new_leaf(leaf, arr, role)
  return tree_lib.unflatten(out, params)


def _placement(w, t: targets_lib.Target, cfg: LoraConfig, replicate):
  """``(kernel sharding or None, {role: sharding})`` of what ``_init_one`` builds for
  one target, or None where the kernel carries no placement to follow (an
  uncommitted array, or a traced one on Auto mesh axes)."""
  rule = sharding_lib.kernel_shardings(w, t.split, replicate=replicate, where=t.name)
  if rule is None:
    return None
  residual = cfg.init in ("pissa", "olora")  # never on a quantized kernel (refused above)
  roles = ["lora_a", "lora_b", "lora_scale"] + ["lora_m"] * cfg.dora \
      + ["lora_dropout"] * (cfg.dropout > 0) + list(adapter_lib.RESIDUAL_ROLES) * residual
  return (sharding_lib.carried(w) if residual else None), {r: rule[r] for r in roles}


def _init_one(key, w, t: targets_lib.Target, cfg: LoraConfig):
  """The (possibly residual) kernel and the adapter leaves of one target. ``w`` is an
  array or a ``quant.Quantized`` (whose ``astype`` dequantizes)."""
  split, shape = t.split, t.shape
  stack, ins, outs = split.shapes(shape)
  r, s = t.rank, t.scale
  dtype = jnp.dtype(cfg.dtype) if cfg.dtype is not None else t.dtype
  fan_in, fan_out = math.prod(ins), math.prod(outs)
  ka, kb = jax.random.split(key)
  residual = {}
  if cfg.init in ("pissa", "olora"):
    a2, b2 = _from_weight(cfg.init, split.kernel_matrix(w.astype(jnp.float32)), r, s)
    residual = {"lora_a0": split.a_from_matrix(s * a2, shape),
                "lora_b0": split.b_from_matrix(b2, shape)}
    w = residual_kernel(w, split, residual["lora_a0"], residual["lora_b0"])
  elif t.kind == "embed":  # PEFT/loralib: A = 0, B ~ N(0, 1) for embeddings
    a2 = jnp.zeros(stack + (fan_in, r), jnp.float32)
    b2 = jax.random.normal(kb, stack + (r, fan_out), jnp.float32)
  elif cfg.init == "kaiming":  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    a2 = jax.random.uniform(ka, stack + (fan_in, r), jnp.float32, -bound, bound)
    b2 = jnp.zeros(stack + (r, fan_out), jnp.float32)
  else:  # gaussian: std 1/r, as PEFT
    a2 = jax.random.normal(ka, stack + (fan_in, r), jnp.float32) / r
    b2 = jnp.zeros(stack + (r, fan_out), jnp.float32)
  leaves = {"lora_a": split.a_from_matrix(a2, shape).astype(dtype),
            "lora_b": split.b_from_matrix(b2, shape).astype(dtype),
            "lora_scale": jnp.full(stack, s, jnp.float32)}
  if cfg.dora:
    # m starts at ||W + s·A@B|| over the inputs, which equals ||W_original||: the
    # merged DoRA kernel then equals W exactly at init.
    v = w.astype(jnp.float32) + split.kernel_from_matrix(
        s * (a2.astype(dtype).astype(jnp.float32) @ b2.astype(dtype).astype(jnp.float32)), shape)
    leaves["lora_m"] = column_norm(v, split).astype(dtype)
  if cfg.dropout > 0:
    leaves["lora_dropout"] = jnp.full(stack, cfg.dropout, jnp.float32)
  return w, {**leaves, **residual}


def _from_weight(how: str, w2, r: int, s: float):
  """PiSSA or OLoRA factors of ``w2`` (``S + (fan_in, fan_out)``), float32.

  PiSSA: ``W = U diag(S) Vh``; ``A = U_r sqrt(S_r/s)``, ``B = sqrt(S_r/s) Vh_r`` so
  that ``s A B`` is the best rank-r part of W. OLoRA: ``W^T = Q R``; ``B = Q_r^T``,
  ``A = R_r^T`` (PEFT's choice: no division by s).
  """
  if how == "pissa":
    u, sv, vh = jnp.linalg.svd(w2, full_matrices=False)
    root = jnp.sqrt(sv[..., :r] / s)
    return u[..., :, :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]
  q, rr = jnp.linalg.qr(jnp.swapaxes(w2, -1, -2))
  return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)

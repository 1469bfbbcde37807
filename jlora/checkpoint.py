"""Adapter checkpoints on orbax-checkpoint: ``jlora.save`` and ``jlora.load``.

One step is ``<directory>/<step>/``, written by an orbax ``CheckpointManager``
with three items:

* ``adapters/``: the adapter leaves only (``adapter<i>/<role>``), never the base;
* ``opt_state/``: the optimizer state's leaves in ``jax.tree.leaves`` order
  (``leaf<i>``), when one is given; ``load`` puts them back into the template's
  tree structure, so any optax state (NamedTuples, masked states) round-trips;
* ``meta/``: JSON (see ``save``), with a SHA-256 of every array: orbax does not
  checksum array data, and a flipped byte would otherwise restore silently.

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when it
is complete, so a save killed half-way leaves the previous steps as they were
and is never taken for a finished step (tested with SIGKILL in a subprocess).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora import adapter as adapter_lib
from jlora import attach as attach_lib
from jlora import quant
from jlora import sharding as sharding_lib
from jlora import tree as tree_lib

FORMAT = "jlora-checkpoint"
FORMAT_VERSION = 1


class CorruptCheckpointError(ValueError):
  """A finished step exists on disk but cannot be read back intact."""


class Checkpoint(NamedTuple):
  """What ``jlora.load`` returns.

  ``params``: the given tree with the saved adapters on it; ``opt_state``: the
  restored optimizer state (None unless a template was given); ``step``: the step
  loaded; ``metadata``: the JSON ``save`` wrote (``metadata["user"]`` is your dict).
  """
  params: Any
  opt_state: Any
  step: int
  metadata: dict


class Saved(NamedTuple):
  """What ``jlora.save`` returns: the step's directory, and ``wait()``, which
  blocks until an ``async_save`` is on disk (at once otherwise) and returns it."""
  path: pathlib.Path
  manager: Any = None

  def wait(self) -> pathlib.Path:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
    return self.path


# ---------------------------------------------------------------------------
# Steps on disk.


def steps(directory) -> list[int]:
  """The finished steps in ``directory``, ascending (``[]`` when there are none).

  A step directory without orbax's ``.orbax-checkpoint-tmp`` suffix is finished:
  orbax renames it only after everything is written.
  """
  d = pathlib.Path(directory)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def _manager(directory, *, writing: bool, max_to_keep=None, async_save=False):
  options = ocp.CheckpointManagerOptions(
      create=writing,
      max_to_keep=max_to_keep if writing else None,
      enable_async_checkpointing=async_save,
      # Removes the tmp directory a killed save left behind, when writing only:
      # a reader must never delete the tmp directory of a save still running.
      cleanup_tmp_directories=writing,
  )
  handlers = dict(adapters=ocp.StandardCheckpointHandler(),
                  opt_state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_handlers=handlers,
                               options=options)


# ---------------------------------------------------------------------------
# Save.


def _digest(x) -> str | None:
  """SHA-256 of an array's dtype, shape and bytes (None where this host sees only part)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  a = np.ascontiguousarray(jax.device_get(x))
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def _describe(x) -> dict:
  return {"shape": list(np.shape(x)), "dtype": np.dtype(x.dtype).name, "sha256": _digest(x)}


def _json_path(path) -> list:
  for k in path:
    if isinstance(k, bool) or not isinstance(k, (str, int)):
      raise TypeError(f"cannot save the adapter at {path!r}: its key {k!r} is neither a str"
                      " nor an int, so JSON cannot record it.")
  return list(path)


def _adapter_record(ad: adapter_lib.Adapter, leaves: dict) -> dict:
  split = ad.split
  scale = np.asarray(ad.scale, np.float64)
  return {
      "name": ad.name,
      "path": _json_path(ad.path),
      "kernel": {"shape": list(np.shape(ad.kernel)), "dtype": np.dtype(ad.kernel.dtype).name},
      "rank": int(ad.rank),
      "scale": scale.tolist(),
      "split": {"n_stack": split.n_stack, "n_in": split.n_in, "out_first": split.out_first},
      "init": "residual" if "lora_a0" in leaves else "additive",
      "dora": ad.m is not None,
      "leaves": {role: _describe(v) for role, v in leaves.items()},
  }


def _check_json(obj) -> None:
  try:
    json.dumps(obj, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"metadata must be JSON-serialisable (str keys; str, int, float, bool,"
                    f" None, lists, dicts; no NaN): {e}. Convert numpy scalars with"
                    " float() or int().") from None


def save(directory, params, *, step: int, opt_state=None, metadata: dict | None = None,
         max_to_keep: int | None = None, async_save: bool = False) -> Saved:
  """Writes one checkpoint step: the adapters of ``params``, ``opt_state`` and metadata.

  Args:
    directory: the checkpoint root; the step goes to ``directory/<step>/``.
    params: an adapted tree. Only its adapter leaves are written (``lora_a``,
      ``lora_b``, ``lora_scale`` and, where present, ``lora_m``, ``lora_dropout``
      and the residual inits' ``lora_a0``/``lora_b0``).
    step: an int larger than every step already in ``directory``.
    opt_state: the optimizer state, e.g. of ``jlora.optimizer(tx, params)``.
    metadata: your JSON-serialisable dict, returned by ``load`` as
      ``metadata["user"]``.
    max_to_keep: keep only the newest ``max_to_keep`` steps (older ones are
      deleted after this one is complete). None keeps all.
    async_save: return once the arrays are copied off the device and write in the
      background; call ``.wait()`` on the result before relying on the step or
      exiting.

  Returns:
    ``Saved(path)``; ``.wait()`` returns the step's path once it is on disk.

  The JSON ``metadata`` of a step holds ``format``, ``jlora_version``,
  ``adapters`` (one record per adapted kernel: ``name``, ``path``, ``kernel``
  shape and dtype, ``rank``, ``scale``, ``split`` = ``n_stack``/``n_in``/
  ``out_first``, ``init`` = ``"residual"`` for PiSSA/OLoRA kernels or
  ``"additive"``, ``dora``, and per leaf its shape, dtype and SHA-256),
  ``opt_state`` (the same per leaf, or None) and ``user``.

  Raises:
    ValueError: ``params`` has no adapters, or ``step`` is not newer than the
      latest step on disk (orbax would skip such a save without a word).
    TypeError: ``metadata`` is not JSON-serialisable, or a path key is neither
      str nor int.
  """
  import jlora  # the package's version; a module-level import would be circular
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an int >= 0; got {step!r}.")
  step = int(step)
  metadata = {} if metadata is None else metadata
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict; got {type(metadata).__name__}.")
  _check_json(metadata)
  flat = tree_lib.flatten(params)
  found = adapter_lib.find(flat)
  if not found:
    raise ValueError("params has no adapters to save; call jlora.init(key, params, cfg) first.")
  last = steps(directory)
  if last and step <= last[-1]:
    raise ValueError(f"cannot save step {step} in {directory}: step {last[-1]} is there"
                     " already and steps must increase. Save a larger step, or delete it.")
  arrays, records = {}, []
  for i, (kp, roles) in enumerate(found.items()):
    leaves = {role: tree_lib.value(flat[p]) for role, p in roles.items()}
    records.append(_adapter_record(adapter_lib.read(flat, kp, roles), leaves))
    arrays[f"adapter{i}"] = leaves
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
          "jlora_version": jlora.__version__, "adapters": records, "opt_state": None,
          "user": metadata}
  items = {"adapters": ocp.args.StandardSave(arrays)}
  if opt_state is not None:
    kleaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    state = {f"leaf{i}": np.asarray(x) if not isinstance(x, jax.Array) else x
             for i, (_, x) in enumerate(kleaves)}
    meta["opt_state"] = [dict(_describe(x), path=jax.tree_util.keystr(kp))
                         for (kp, _), x in zip(kleaves, state.values())]
    items["opt_state"] = ocp.args.StandardSave(state)
  items["meta"] = ocp.args.JsonSave(meta)
  mngr = _manager(directory, writing=True, max_to_keep=max_to_keep, async_save=async_save)
  try:
    if not mngr.save(step, args=ocp.args.Composite(**items)):
      raise ValueError(f"orbax declined to save step {step} in {directory}.")
  except BaseException:
    mngr.close()
    raise
  saved = Saved(pathlib.Path(directory) / str(step), mngr)
  return saved if async_save else Saved(saved.wait())


# ---------------------------------------------------------------------------
# Load.


def _target(d: dict, sharding=None):
  return jax.ShapeDtypeStruct(tuple(d["shape"]), np.dtype(d["dtype"]), sharding=sharding)


def _read_to(rec: dict, flat) -> dict:
  """``{role: sharding}`` to read the saved leaves of the adapter ``rec`` into: where
  ``attach`` puts them, beside their kernel in ``flat`` (``sharding.kernel_shardings``),
  or this process's first device for a kernel with no placement. Never the placement orbax
  recorded: its device ids are the saving run's, and another process or device count
  has others (orbax then fails with "Topology mismatch")."""
  split = adapter_lib.Split(**rec["split"])
  rule = sharding_lib.kernel_shardings(quant.read_kernel(flat, tuple(rec["path"])), split,
                                       where=rec["name"])
  if rule is None:
    return dict.fromkeys(rec["leaves"], jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return {role: rule[role] for role in rec["leaves"]}


def _check_base(records: list, flat, where: str) -> None:
  """Every saved adapter's kernel is in ``flat``, with the saved shape and dtype."""
  for rec in records:
    path, kernel = tuple(rec["path"]), rec["kernel"]
    want = f"{tuple(kernel['shape'])} {kernel['dtype']}"
    if path not in flat:
      raise ValueError(
          f"{where} has an adapter on a kernel {rec['name']!r} of shape {want}, but params"
          " has no leaf there. Pass the base the adapter was trained on.")
    w = quant.read_kernel(flat, path)  # a quantized kernel as the float kernel it stands for
    got = f"{tuple(np.shape(w))} {np.dtype(w.dtype).name}"
    if got != want:
      raise ValueError(
          f"{where}: the kernel {rec['name']!r} was {want} when saved, but params has {got}"
          " there. Pass the base the adapter was trained on.")


def _check_opt_state(saved: list, template, where: str) -> list:
  """The template's leaves, checked against the saved ones; their restore targets."""
  kleaves = jax.tree_util.tree_flatten_with_path(template)[0]
  if len(kleaves) != len(saved):
    raise ValueError(
        f"{where} holds an optimizer state of {len(saved)} leaves; the opt_state template"
        f" has {len(kleaves)}. Build it with the optimizer of the saved run:"
        " `tx.init(params)`.")
  targets = []
  for (kp, x), d in zip(kleaves, saved):
    shape, dtype = tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype)).name
    if shape != tuple(d["shape"]) or dtype != d["dtype"]:
      raise ValueError(
          f"{where}: optimizer state leaf {jax.tree_util.keystr(kp)} is {tuple(d['shape'])}"
          f" {d['dtype']} on disk (saved as {d['path']}), but {shape} {dtype} in the"
          " template.")
    targets.append(_target(d, x.sharding if isinstance(x, jax.Array) else None))
  return targets


def load(directory, params, *, step: int | None = None, opt_state=None) -> Checkpoint:
  """Puts a saved adapter onto ``params``, and restores the optimizer state.

  Args:
    directory: the root given to ``save``.
    params: the base the adapter was trained on (the original base for PiSSA and
      OLoRA: the saved ``lora_a0``/``lora_b0`` rebuild the residual kernels), or an
      adapted tree whose adapters are replaced; see ``jlora.attach`` for the rules.
    step: the step to load; the latest finished step by default.
    opt_state: a template to restore the optimizer state into, usually
      ``tx.init(params)`` of the adapted params; the result has its tree structure
      and shardings.

  Returns:
    ``Checkpoint(params, opt_state, step, metadata)``. Loaded adapter leaves are
    read straight to where their kernels are (onto a kernel's mesh, or this
    process's first device for an unplaced kernel), so a step saved by another
    number of processes or devices loads.

  Raises:
    FileNotFoundError: no finished step, or not the one asked for.
    ValueError: the base does not fit (the message names the first path and both
      shapes): a missing kernel, another kernel shape or dtype, or an adapted
      ``params`` with other adapters; or an ``opt_state`` template that does not
      fit, or one given for a step saved without optimizer state.
    CorruptCheckpointError: the step is truncated, corrupted or fails its
      checksums; the message names the step. Nothing partial is returned.
  """
  have = steps(directory)
  if step is None:
    if not have:
      raise FileNotFoundError(f"no finished checkpoint step in {directory}.")
    step = have[-1]
  if step not in have:
    raise FileNotFoundError(f"checkpoint step {step} not found in {directory}; finished"
                            f" steps: {have}.")
  where = f"checkpoint step {step} in {directory}"
  others = [s for s in have if s != step]

  def corrupt(msg, e=None):
    cause = f" ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})" if e else ""
    hint = f" Other steps: {others}." if others else ""
    return CorruptCheckpointError(f"{where} is corrupted or incomplete: {msg}{cause}.{hint}")

  with _manager(directory, writing=False) as mngr:
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001 - any failure here means the step is unreadable
      raise corrupt("its JSON metadata cannot be read", e) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise corrupt(f"meta/ is not a {FORMAT} record")
    records = meta["adapters"]
    flat = tree_lib.flatten(params)
    _check_base(records, flat, where)
    attach_lib.check_template(
        adapter_lib.find(flat),
        [attach_lib.Loaded(tuple(r["path"]), {k: _target(v) for k, v in r["leaves"].items()})
         for r in records], flat, where)
    read_to = [_read_to(rec, flat) for rec in records]
    items = {"adapters": ocp.args.StandardRestore(
        {f"adapter{i}": {role: _target(d, to[role]) for role, d in rec["leaves"].items()}
         for i, (rec, to) in enumerate(zip(records, read_to))})}
    if opt_state is not None:
      if meta["opt_state"] is None:
        raise ValueError(f"{where} was saved without an optimizer state; pass opt_state=None.")
      targets = _check_opt_state(meta["opt_state"], opt_state, where)
      items["opt_state"] = ocp.args.StandardRestore(
          {f"leaf{i}": t for i, t in enumerate(targets)})
    try:
      got = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      raise corrupt("reading its arrays failed", e) from e

  loaded = []
  for i, rec in enumerate(records):
    leaves = got.adapters[f"adapter{i}"]
    for role, d in rec["leaves"].items():
      if d["sha256"] is not None and _digest(leaves[role]) != d["sha256"]:
        raise corrupt(f"{role} of {rec['name']!r} fails its SHA-256 check")
    loaded.append(attach_lib.Loaded(tuple(rec["path"]), dict(leaves)))
  state = None
  if opt_state is not None:
    leaves = [got.opt_state[f"leaf{i}"] for i in range(len(meta["opt_state"]))]
    for x, d in zip(leaves, meta["opt_state"]):
      if d["sha256"] is not None and _digest(x) != d["sha256"]:
        raise corrupt(f"optimizer state leaf {d['path']} fails its SHA-256 check")
    state = jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
  return Checkpoint(attach_lib.attach(params, loaded, where), state, step, meta)

"""The collectives of a compiled XLA program, read from its optimized HLO text.

``collectives(hlo, mesh)`` lists every collective instruction of
``jax.jit(f).lower(...).compile().as_text()``: its kind, operand shapes and bytes,
the mesh axes its replica groups span, and how many times it runs per call (an
instruction in a ``while`` body, as ``lax.scan`` compiles to, runs once per trip).
Async pairs (``all-gather-start``/``-done``) count once, under the plain name.
``summary`` folds the list into counts and bytes per (kind, axes).

The tests assert these counts per mesh (``tests/test_mesh.py``) and
``experiments/scale.py`` reports the bytes.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast", "ragged-all-to-all")
# An HLO instruction line: ``[ROOT] %name = <result type, maybe a tuple> opcode(...``.
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s"
                         r"(?P<op>[\w\-]+)\(")
# A computation's header line: ``[ENTRY] %name (params) -> type {``.
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
  """``({computation name: its instruction lines}, entry name)`` of an HLO module."""
  bodies: dict[str, list[str]] = {}
  current, entry = None, None
  for line in hlo.splitlines():
    head = _HEADER.match(line)
    if head and not line.startswith(" "):
      current = head.group("name")
      bodies[current] = []
      entry = current if head.group("entry") else entry
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def nbytes(dtype: str, dims) -> int:
  """Bytes of one HLO array, ``f32[8,4]`` being ``("f32", (8, 4))``."""
  return _BYTES[dtype] * int(np.prod(dims, dtype=np.int64))


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _ARRAY.findall(text) if dt in _BYTES]


def _runs(bodies: dict[str, list[str]], entry: str | None) -> Counter:
  """``{computation: times it runs per call of the entry}``, through while trip counts."""
  calls = defaultdict(list)
  for name, lines in bodies.items():
    for line in lines:
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      for attr, callee in re.findall(r"\b(body|condition|to_apply|calls|true_computation|"
                                     r"false_computation|branch_computations)=\{?%?([\w.\-]+)",
                                     line):
        n = int(trip.group(1)) if trip and attr in ("body", "condition") else 1
        calls[name].append((callee, n + (attr == "condition" and trip is not None)))
  runs: Counter = Counter()

  def visit(name, times, depth=0):
    runs[name] += times
    for callee, n in calls.get(name, ()) if depth < 64 else ():
      visit(callee, times * n, depth + 1)
  if entry is not None:
    visit(entry, 1)
  return runs


def _groups(line: str):
  """Replica groups as lists of device ids: ``{{0,1},{2,3}}``, iota ``[2,4]<=[8]T(1,0)``,
  or XLA's mesh form ``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}``; None if absent."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?)?"
                r"\s*\{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, dims = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = np.arange(int(np.prod(dims)))
    if m.group(2):
      ids = ids.reshape([int(v) for v in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(v) for v in m.group(3).split(",")])
    ids = ids.reshape(dims)
    picked = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
    rest = [i for i in range(len(dims)) if i not in picked]
    size = int(np.prod([dims[i] for i in picked])) if picked else 1
    return ids.transpose(rest + picked).reshape(-1, size).tolist()
  m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
  if m:
    return [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
  if m:
    ids = np.arange(int(np.prod([int(v) for v in m.group(2).split(",")])))
    ids = ids.reshape([int(v) for v in m.group(2).split(",")])
    if m.group(3):
      ids = ids.transpose([int(v) for v in m.group(3).split(",")])
    return ids.reshape([int(v) for v in m.group(1).split(",")]).tolist()
  return None


def mesh_axes(groups, mesh) -> tuple[str, ...] | None:
  """The mesh axes along which ``groups`` run (device ids index ``mesh.devices.flat``)."""
  if groups is None or mesh is None:
    return None
  names, shape = tuple(mesh.axis_names), tuple(mesh.devices.shape)
  ids = np.arange(int(np.prod(shape))).reshape(shape)
  want = sorted(sorted(g) for g in groups)
  for k in range(len(names) + 1):
    for axes in itertools.combinations(range(len(names)), k):
      rest = [i for i in range(len(names)) if i not in axes]
      got = ids.transpose(rest + list(axes)).reshape(-1, int(np.prod([shape[i] for i in axes])))
      if sorted(sorted(g) for g in got.tolist()) == want:
        return tuple(names[i] for i in axes)
  return ("?",)


def collectives(hlo: str, mesh=None) -> list[dict]:
  """Every collective of an optimized HLO module.

  Returns:
    dicts with ``kind``, ``operands`` (``[(dtype, dims)]``), ``bytes`` (operand
    bytes of one run), ``axes`` (mesh axis names, when ``mesh`` is given, else
    None) and ``runs`` (per call of the module).
  """
  bodies, entry = computations(hlo)
  runs = _runs(bodies, entry)
  result_of = {m.group("name"): _arrays(m.group("type"))
               for lines in bodies.values() for line in lines if (m := INSTRUCTION.match(line))}
  out = []
  for comp, lines in bodies.items():
    for line in lines:
      m = INSTRUCTION.match(line)
      kind = m and m.group("op").removesuffix("-start")
      if kind not in KINDS:
        continue
      args = line[m.end():]
      args = args[:args.find(")")] if ")" in args else args
      operands = _arrays(args) or [a for n in re.findall(r"%([\w.\-]+)", args)
                                   for a in result_of.get(n, [])]
      out.append(dict(kind=kind, operands=operands,
                      bytes=sum(nbytes(dt, d) for dt, d in operands),
                      axes=mesh_axes(_groups(line), mesh), runs=runs.get(comp, 1) or 1))
  return out


def summary(found: list[dict]) -> dict[tuple, dict]:
  """``{(kind, axes): {'count': instructions, 'runs': per call, 'bytes': per call}}``."""
  out: dict[tuple, dict] = {}
  for c in found:
    s = out.setdefault((c["kind"], c["axes"]), {"count": 0, "runs": 0, "bytes": 0})
    s["count"] += 1
    s["runs"] += c["runs"]
    s["bytes"] += c["bytes"] * c["runs"]
  return out


def describe(found: list[dict]) -> str:
  """One line per collective, for failure messages and logs."""
  return "\n".join(
      f"{c['kind']:<18} axes={c['axes']} x{c['runs']} "
      f"[{', '.join(f'{dt}{list(d)}' for dt, d in c['operands'])}] {c['bytes']}B" for c in found)

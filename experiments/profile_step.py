"""Where a train step's time goes on XLA:CPU: per-op profile of the floor, jlora and full steps.

Run::

    python -m experiments.profile_step --quick              # mlp, transformer, unet at rank 8
    python -m experiments.profile_step --quick --models mlp --rank 64
    python -m experiments.profile_step --smoke              # tiny shapes (the tests use it)

Each variant of ``experiments/bench.py`` (same models, same steps) is traced with
``jax.profiler`` for a few calls. Every traced XLA op is matched to its instruction in the
compiled module's optimized HLO and put in one of three groups:

* ``products``: dots and convolutions, alone or inside a fusion;
* ``copies``: copies and transposes (layout changes);
* ``other``: every other fusion or op (elementwise work, reductions, ...).

Beside the op times (summed over XLA's threads, in ms per step) it records, per step,
the process's minor page faults and system CPU time, and XLA's temp-buffer size
(``compiled.memory_analysis()``). On this runtime each call maps a fresh temp arena,
so every page of it is faulted in again on every step, inside whichever op touches it
first. XLA also runs independent ops side by side on its threads, so group times overlap
and an op's time includes waiting for cores. To time steps without the page faults,
preload ``experiments/tools/arena_cache.c``. Times under the profiler are not results;
read the table as shares of the floor's step (``/floor`` columns).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time

import jax

from experiments import bench, common
from experiments.collectives import INSTRUCTION, computations

NAME = "profile_step"
GROUPS = ("products", "copies", "other")


def hlo_groups(hlo: str) -> dict[str, str]:
  """Map each instruction name of an optimized HLO module to one of ``GROUPS``.

  A fusion is a product when its fused computation contains a ``dot`` or a
  ``convolution``, a copy when it contains only copies, transposes and bitcasts.
  """
  bodies, _ = computations(hlo)

  def opcodes(lines):
    return {m.group("op") for l in lines if (m := INSTRUCTION.match(l))}

  groups = {}
  for lines in bodies.values():
    for line in lines:
      m = INSTRUCTION.match(line)
      if not m:
        continue
      name, op = m.group("name"), m.group("op")
      inner = set()
      if op == "fusion" and (c := re.search(r"calls=%?([\w.\-]+)", line)):
        inner = opcodes(bodies.get(c.group(1), []))
      ops = inner or {op}
      if ops & {"dot", "convolution"}:
        groups[name] = "products"
      elif ops <= {"copy", "transpose", "bitcast", "parameter"}:
        groups[name] = "copies"
      else:
        groups[name] = "other"
  return groups


def profile(v: bench.Variant, calls: int) -> dict:
  """Trace ``calls`` steps of a compiled bench variant; op times per step by group."""
  groups = hlo_groups(v.compiled.as_text())
  v.call()
  v.call()
  ru0 = resource.getrusage(resource.RUSAGE_SELF)
  walls = []
  for _ in range(calls):
    t0 = time.perf_counter()
    v.call()
    walls.append(time.perf_counter() - t0)
  ru1 = resource.getrusage(resource.RUSAGE_SELF)
  out_dir = tempfile.mkdtemp(prefix="jlora_profile_")
  try:
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
      for _ in range(calls):
        v.call()
    path = glob.glob(f"{out_dir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  ms = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in groups:
      ms[groups[e["name"]]] += e["dur"] / 1e3 / calls
  # Tiny programs run without per-op trace events: report no breakdown then.
  return {
      "step_ms": 1e3 * statistics.median(walls),
      **{f"{g}_ms": (ms[g] if ms else None) for g in GROUPS},
      "faults_k": (ru1.ru_minflt - ru0.ru_minflt) / calls / 1e3,
      "sys_ms": 1e3 * (ru1.ru_stime - ru0.ru_stime) / calls,
      "temp_mib": bench.memory(v.compiled).get("temp", 0) / 2**20,
  }


def run_model(name: str, spec: dict, rank: int, calls: int, seed: int) -> list[dict]:
  s = bench.build_setup(name, spec, seed)
  makers = [bench.make_floor, lambda s: bench.make_jlora(s, rank, seed), bench.make_full]
  rows = []
  for make in makers:  # compile each just before its trace: XLA:CPU's per-op events need it
    v = make(s)
    rows.append({"model": name, "variant": v.name, **profile(v, calls)})
    del v
  floor = rows[0]
  for r in rows:
    r["step/floor"] = r["step_ms"] / floor["step_ms"]
    for g in GROUPS:
      r[f"{g}/floor"] = None if r[f"{g}_ms"] is None else r[f"{g}_ms"] / floor["step_ms"]
    r["sys/floor"] = r["sys_ms"] / floor["step_ms"]
  return rows


COLUMNS = ["model", "variant", "step/floor", "products/floor", "copies/floor", "other/floor",
           "sys/floor", "faults_k", "temp_mib"]


def main(argv=None):
  args, known, models = bench.parse_args(__doc__, argv, "rank", default_models=bench.TRAIN_MODELS)
  size = bench.SIZES[args.size]
  rank = known.rank or size["peer_rank"]
  calls = 2 if args.size == "smoke" else 5
  results = common.Results(NAME, args)
  rows = []
  for name in models:
    print(f"[{name}] rank {rank}", flush=True)
    rows += run_model(name, size["models"][name], rank, calls, args.seed)
  results.table(rows, COLUMNS, title=f"Step time by op group, as shares of the floor's step "
                f"(rank {rank}; op times summed over XLA's threads; sys = kernel CPU time, "
                f"mostly page faults)", stem="results")
  path = results.save_json({"rank": rank, "calls": calls, "rows": rows,
                            "argv": sys.argv[1:] if argv is None else list(argv)})
  print(f"wrote {path}", flush=True)
  return rows


if __name__ == "__main__":
  main()

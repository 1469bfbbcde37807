"""Peak memory only (``memory_analysis()``, no timing) of ``experiments.qlora``'s train step
on a deeper model: ``python -m experiments.tools.qlora_memory_probe 16`` builds the d=1024
transformer with 16 blocks, and writes ``experiments/results/qlora/memory_<blocks>.json``."""

import dataclasses
import json
import pathlib
import sys

import jlora
from experiments import bench, qlora


def main(blocks: int = 16):
  spec = qlora._spec(1024, blocks)
  s = bench.build_setup("transformer", spec, 0)
  targets = [ad.path for ad in jlora.adapters(bench.lora_params(s, qlora.RANK, 0))]
  out = {}
  for fmt in ("float32", "int8", "int4", "nf4"):
    base = qlora.quantized(s.params, fmt, s.targets, s.apply, s.inputs)
    v = bench.make_jlora(dataclasses.replace(s, params=base), qlora.RANK, 0)
    mem = bench.memory(v.compiled)
    out[fmt] = dict(kernel_bytes=qlora.kernel_bytes(base, targets), args=mem["argument"],
                    temp=mem["temp"])
    del v, base
  ref = out["float32"]
  for fmt, m in out.items():
    m["peak_ratio"] = (m["args"] + m["temp"]) / (ref["args"] + ref["temp"])
    print(f"{fmt}: args {m['args'] / 2**20:.1f} MiB, temp {m['temp'] / 2**20:.1f} MiB,"
          f" peak ratio {m['peak_ratio']:.3f}")
  path = pathlib.Path(__file__).resolve().parents[1] / "results" / "qlora" / f"memory_{blocks}.json"
  path.write_text(json.dumps({"spec": spec, "rows": out}, indent=1))


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)

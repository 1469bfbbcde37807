"""One process of the multi-process test (``test_mesh.py``): the Megatron LoRA step
of ``mesh_setups`` on a (2, 4) mesh that spans every process.

  python tests/multihost_worker.py --process-id I --processes N --port P --out FILE

It joins the others through ``jax.distributed`` (on CPU the collectives between
processes run over gloo, jax's default), then runs exactly the code a single
process runs: global arrays are built with ``make_array_from_callback`` and
``jit(out_shardings=)``, so nothing differs but the device count per process.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--process-id", type=int, required=True)
  ap.add_argument("--processes", type=int, required=True)
  ap.add_argument("--port", type=int, required=True)
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  jax.distributed.initialize(coordinator_address=f"localhost:{a.port}",
                             num_processes=a.processes, process_id=a.process_id,
                             initialization_timeout=120)
  import mesh_setups
  name, explicit, unroll = mesh_setups.TWO_PROCESS_CASE
  r = mesh_setups.run(name, explicit, unroll_max_rank=unroll)
  result = dict(process_count=jax.process_count(), local_devices=jax.local_device_count(),
                devices=jax.device_count(), losses=r.losses, cache_size=r.cache_size,
                moved=sorted({str(p) for s in r.specs for p in s if s[p] != r.expected[p]}),
                warnings=r.warnings)
  with open(a.out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

"""One process of the multi-process test (``test_mesh.py``): the Megatron LoRA step
of ``mesh_setups`` on a (2, 4) mesh that spans every process.

  python tests/multihost_worker.py --process-id I --processes N --port P --out FILE [--ckpt DIR]

It joins the others through ``jax.distributed`` (on CPU the collectives between
processes run over gloo, jax's default), then runs exactly the code a single
process runs: global arrays are built with ``make_array_from_callback`` and
``jit(out_shardings=)``, so nothing differs but the device count per process.
With ``--ckpt`` (a directory every process sees) it then saves the trained
adapters and Adam state there and loads them back (``round_trip``).
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
  ap.add_argument("--ckpt", help="a directory every process sees: save and load the run there")
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
  if a.ckpt:
    result["checkpoint"] = round_trip(a.ckpt, r)
  with open(a.out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


def round_trip(directory, r) -> dict:
  """Every process saves the trained adapters and Adam state of the run ``r`` to
  ``directory``, then loads them onto a fresh template (``mesh_setups.template``).

  Returns the step loaded; ``leaves``, how many arrays were saved; ``unequal``, the
  names (``mesh_setups.checkpointed``) of those whose loaded value differs from the
  saved one, each array gathered whole onto every process; ``moved``, those whose
  loaded sharding is not the saved one; and ``sha256``, the digest of every saved
  array, for the test to compare its own load of ``directory`` with.
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  import jlora
  import mesh_setups
  jlora.save(directory, r.params, step=mesh_setups.STEPS, opt_state=r.opt_state)
  params, opt_state = mesh_setups.template(*mesh_setups.TWO_PROCESS_CASE[:2])
  ck = jlora.load(directory, params, opt_state=opt_state)
  saved = mesh_setups.checkpointed(r.params, r.opt_state)
  loaded = mesh_setups.checkpointed(ck.params, ck.opt_state)
  assert saved.keys() == loaded.keys(), (sorted(saved), sorted(loaded))
  # A global array is gathered whole onto every process (jax asks for tiled=True).
  want = multihost_utils.process_allgather(saved, tiled=True)
  got = multihost_utils.process_allgather(loaded, tiled=True)
  return dict(
      step=ck.step, leaves=len(saved),
      unequal=sorted(k for k in saved if not np.array_equal(got[k], want[k])),
      moved=sorted(k for k, v in saved.items()
                   if not loaded[k].sharding.is_equivalent_to(v.sharding, v.ndim)),
      sha256={k: mesh_setups.digest(v) for k, v in want.items()})


if __name__ == "__main__":
  main()

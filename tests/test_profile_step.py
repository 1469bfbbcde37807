"""``experiments/profile_step.py``: HLO op grouping on real compiled modules, and its smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_step

ROOT = Path(__file__).resolve().parents[1]


def _groups(fn, *args):
  return profile_step.hlo_groups(jax.jit(fn).lower(*args).compile().as_text())


def test_groups_products_and_elementwise():
  x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
  groups = _groups(lambda x, w: jnp.tanh(x @ w) * 2.0, x, w)
  assert "products" in groups.values() and "other" in groups.values()
  # Every instruction of the entry computation is grouped, not just fusion bodies.
  assert any(name.startswith("param") or name.startswith("Arg") or "." in name for name in groups)


def test_groups_entry_with_many_results():
  # A long result tuple prints `/*index=5*/` comments in the ENTRY header; the parser once
  # skipped such entries and so lost every top-level op (the ones the profiler names).
  xs = [jnp.ones((16, 16)) for _ in range(8)]
  hlo = jax.jit(lambda *xs: tuple(x @ x for x in xs)).lower(*xs).compile().as_text()
  assert "/*index=" in hlo[hlo.index("\nENTRY"):].splitlines()[1]
  entry = hlo[hlo.index("\nENTRY") + 1:].splitlines()[1:]
  entry = entry[:entry.index("}")]
  names = [line.split("=")[0].replace("ROOT", "").strip().lstrip("%") for line in entry]
  groups = profile_step.hlo_groups(hlo)
  assert names and all(n in groups for n in names), [n for n in names if n not in groups]
  assert sum(groups[n] == "products" for n in names) >= 1


def test_groups_copies():
  x = jnp.ones((64, 32))
  groups = _groups(lambda x: jnp.transpose(x) + 0.0, x)
  assert "copies" in groups.values() and "products" not in groups.values()


@pytest.mark.slow
def test_smoke(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.profile_step", "--smoke",
                         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  payload = json.loads((tmp_path / "results.json").read_text())
  rows = payload["rows"]
  assert {(r["model"], r["variant"].split("_")[0]) for r in rows} == {
      (m, v) for m in ("mlp", "transformer", "unet") for v in ("floor", "jlora", "full")}
  for r in rows:
    assert r["step_ms"] > 0 and r["temp_mib"] > 0 and r["faults_k"] >= 0
  assert "step/floor" in (tmp_path / "results.md").read_text()

"""The benchmark's smoke run: every variant runs, times are positive, FLOPs are ordered.

Wall times are never asserted (the machine is shared); XLA's FLOP counts are
deterministic, so their ordering is.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--smoke", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads((out / "results.json").read_text()), out


@pytest.mark.slow
def test_smoke_has_every_variant_with_positive_times(smoke):
  payload, out = smoke
  rows = payload["rows"]
  multi = {r["variant"]: r for r in payload["multi_rows"]}
  assert {"fwd_base", "fwd_one_r4", "fwd_4x_r4", "fwd_mix3_r4", "fwd_one_r12", "step_one_r4",
          "step_4x_r4"} <= set(multi)
  for r in multi.values():
    assert len(r["wall_s"]) == payload["rounds"] and min(r["wall_s"]) > 0, r["variant"]
  # a cat mix is one adapter of the summed rank: its FLOPs, plus scaling the factors
  one = multi["fwd_one_r12"]["flops"]
  assert one <= multi["fwd_mix3_r4"]["flops"] <= 1.01 * one
  assert any("stacked adapters" in t["target"] for t in payload["targets"])
  by_model = {}
  for r in rows:
    by_model.setdefault(r["model"], {})[r["variant"]] = r
  assert set(by_model) == {"mlp", "transformer", "unet"}
  for model, variants in by_model.items():
    kinds = {r["kind"] for r in variants.values()}
    assert {"full", "floor", "jlora", "jlora_merged"} <= kinds, model
    for r in variants.values():
      assert len(r["wall_s"]) == payload["rounds"] and min(r["wall_s"]) > 0, (model, r["variant"])
      assert r["wall_ms"] > 0 and r["flops"] > 0 and r["peak_mib"] > 0
    assert by_model[model]["full"]["t/full"] == 1.0
  for name in ("results.md", "results.csv", "hlo.md", "multi.md"):
    assert (out / name).exists()


@pytest.mark.slow
def test_smoke_flops_ordered(smoke):
  """floor <= factored jlora < merged jlora (and floor < full), and no
  kernel-shaped weight-gradient product in the factored step (the merged one has them).

  ``floor <= jlora`` is a property of these small shapes, where the rank-r products
  outweigh the one input gradient jlora skips (the first adapted layer's: no parameter
  lies below it). On the reference MLP at rank 8, jlora's count is 0.98x the floor."""
  rows = smoke[0]["rows"]
  for model in {r["model"] for r in rows}:
    by = {r["variant"]: r for r in rows if r["model"] == model}
    merged = [r for r in by.values() if r["kind"] == "jlora_merged"][0]
    same_rank = by[f"jlora_r{merged['rank']}"]
    assert by["floor"]["flops"] <= same_rank["flops"] < merged["flops"], model
    assert by["floor"]["flops"] < by["full"]["flops"], model
    for r in by.values():
      if r["kind"] == "jlora":
        assert r["kernel_dot"] == 0 and r["kernel_add"] == 0, (model, r["variant"])
        assert r["opt_state_mib"] < by["full"]["opt_state_mib"]
    assert merged["kernel_dot"] > 0, model

"""The experiments' ``--smoke`` runs end to end: every results file is written with its keys.

Each test runs one experiment as a user would (``python -m experiments.NAME --smoke``) in a
subprocess, so argument parsing, caching, plotting and the exit code are all exercised. Smoke runs
are too short to learn anything, so their hard checks do not fail the run; these tests assert
plumbing only.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(module: str, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
  """``python -m experiments.<module> --smoke --out <out>`` from the repository root, on CPU."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", f"experiments.{module}", "--smoke", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def read_csv(path: Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def assert_png(path: Path):
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.mark.slow
def test_rank_ablation_smoke(tmp_path):
  run_smoke("rank_ablation", tmp_path)
  payload = json.loads((tmp_path / "results.json").read_text())
  for key in ("config", "model", "corpus_sha256", "base", "rows", "rank_table", "budget_table",
              "checks", "timing", "versions", "merge_error"):
    assert key in payload, key
  kinds = {r["kind"] for r in payload["rows"]}
  assert kinds == {"none", "lora", "full"}
  for row in payload["rows"]:
    # Exact counts are plumbing, so they must hold even in a smoke run.
    assert row["trainable"] == row["formula"], row
  rows = read_csv(tmp_path / "results.csv")
  assert {"run", "rank", "scale", "trainable", "prose_bpc", "code_bpc", "forgetting",
          "seconds"} <= set(rows[0])
  assert (tmp_path / "rank_table.csv").exists() and (tmp_path / "budget_table.csv").exists()
  assert_png(tmp_path / "loss_vs_rank.png")
  assert "check" in (tmp_path / "checks.md").read_text()


@pytest.mark.slow
def test_subspace_smoke(tmp_path):
  run_smoke("subspace", tmp_path)
  payload = json.loads((tmp_path / "results.json").read_text())
  for key in ("plan", "runs", "phi", "drift", "table7", "intruders", "grids", "checks"):
    assert key in payload, key
  grids = payload["grids"]["r_small_vs_large"]
  some = next(iter(grids.values()))
  assert {"A", "B", "dW_in", "dW_out", "A_init", "gaussian"} <= set(some)
  t7 = read_csv(tmp_path / "table7.csv")
  assert {"r", "kernel", "amplification"} <= set(t7[0])
  for name in ("phi.csv", "intruders.csv", "drift.csv"):
    assert (tmp_path / name).exists(), name
  for png in ("phi_r8_vs_r64.png", "phi_seeds.png", "phi_diagonal.png"):
    assert_png(tmp_path / png)


@pytest.mark.slow
def test_synthetic_quick_passes_hard_checks(tmp_path):
  # --quick, not --smoke: it takes seconds, and its hard checks (the top
  # direction shared between r=8 and r=64, the initial-A control at the random
  # baseline, the rsLoRA grad-norm slopes -1/2 and 0) are the point of the test:
  # a failed hard check exits 1.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.synthetic", "--quick", "--out",
                         str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  payload = json.loads((tmp_path / "results.json").read_text())
  for key in ("config", "subspace", "grad_norm", "loss_sweep", "checks", "versions"):
    assert key in payload, key
  assert set(payload["grad_norm"]) == {"alpha/r", "alpha/sqrt(r)"}
  for g in payload["grad_norm"].values():
    assert {"ranks", "grad_norm", "slope"} <= set(g)
  for name in ("phi_A", "phi_B", "phi_dW", "phi_A_init", "baseline"):
    assert "phi(1,1)" in payload["subspace"][name], name
  hard = [c for c in payload["checks"] if c["kind"] == "hard"]
  assert hard and all(c["result"] == "PASS" for c in hard), hard
  for png in ("grad_norm_vs_rank.png", "phi_grid.png"):
    assert_png(tmp_path / png)
  for name in ("phi.csv", "grad_norm.csv", "results.csv", "checks.md"):
    assert (tmp_path / name).exists(), name


@pytest.mark.slow
def test_diffusion_smoke(tmp_path):
  # A few steps of every path: pretraining, LoRA on attn and attn+conv, DoRA,
  # full FT, the strength sweep, evaluation and figures.
  run_smoke("diffusion", tmp_path)
  payload = json.loads((tmp_path / "results.json").read_text())
  for key in ("config", "runs", "strength", "timings", "checks", "svc_heldout_accuracy",
              "data_sha256", "versions"):
    assert key in payload, key
  assert {r["kind"] for r in payload["runs"]} == {"base", "lora", "dora", "ft"}
  for row in payload["runs"]:
    # Exact counts are plumbing, so they must hold even in a smoke run.
    assert row["trainable"] == row["expected_trainable"], row
    assert {"loss_target", "loss_source", "acc_target", "acc_source", "div_target"} <= set(row)
  result = {c["check"]: c["result"] for c in payload["checks"]}
  # lora_scale x 0 must give the base model back exactly, trained or not.
  assert result["strength 0 reproduces the base exactly (loss)"] == "PASS"
  rows = read_csv(tmp_path / "results.csv")
  assert {"name", "trainable", "loss_target", "acc_target", "acc_source"} <= set(rows[0])
  assert (tmp_path / "strength.csv").exists()
  for png in ("samples_base.png", "samples_full_ft.png", "samples_overview_89.png",
              "samples_strength.png", "summary.png"):
    assert_png(tmp_path / png)


def test_compile_time_smoke(tmp_path):
  run_smoke("compile_time", tmp_path)
  payload = json.loads((tmp_path / "results.json").read_text())
  variants = {r["variant"] for r in payload["rows"]}
  assert variants == {"full", "jlora", "jlora_unrolled", "jlora_merged"}
  for r in payload["rows"]:
    assert r["trace_s"] > 0 and r["compile_s"] > 0 and r["total/full"] > 0

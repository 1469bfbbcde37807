"""The README's quickstart runs as written."""

import pathlib
import re

import numpy as np

import jlora

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_trains(capsys):
  text = README.read_text()
  code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
  assert len(code.splitlines()) <= 30
  scope: dict = {}
  exec(compile(code, "README-quickstart", "exec"), scope)
  model, params, x = scope["model"], scope["params"], scope["x"]
  # the frozen base alone is what the model computed at init (B = 0); training beat it
  before = float(np.mean((model.apply(scope["base"], x) - 0.5 * x) ** 2))
  assert float(scope["loss"]) < 0.5 * before
  assert "query/kernel" in capsys.readouterr().out
  # the merged params run the model as the adapted params do
  np.testing.assert_allclose(model.apply(scope["merged"], x), jlora.lora(model.apply)(params, x),
                             rtol=1e-4, atol=1e-5)


def test_package_installs_jlora_only():
  """The wheel holds ``jlora`` alone: ``experiments`` runs from the checkout, and must not
  land as a top-level package in users' environments."""
  import tomllib
  from pathlib import Path

  import setuptools
  root = Path(__file__).resolve().parents[1]
  cfg = tomllib.loads((root / "pyproject.toml").read_text())
  include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
  found = setuptools.find_packages(where=str(root), include=include)
  assert found and all(p == "jlora" or p.startswith("jlora.") for p in found), found
  assert cfg["project"]["requires-python"] == ">=3.11"

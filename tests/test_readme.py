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


def test_saving_sharing_loading_snippets_run(tmp_path, monkeypatch):
  text = README.read_text()
  section = re.search(r"## Saving, sharing and loading adapters\n(.*?)\n## ", text, re.S).group(1)
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 3
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  for i, code in enumerate(blocks):
    exec(compile(code, f"README-saving-{i}", "exec"), scope)
  ck = scope["ck"]
  assert ck.step == 3 and ck.metadata["user"] == {"lr": 1e-2}
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
  assert (tmp_path / "peft_adapter" / "adapter_config.json").exists()
  # every form gives back the adapters that were saved
  saved = {ad.name: ad for ad in jlora.adapters(ck.params)}
  for tree in (scope["params"], scope["unet_params"]):
    got = jlora.adapters(tree)
    assert sorted(ad.name for ad in got) == sorted(saved) == ["params/fc1/kernel", "params/fc2/kernel"]
    for ad in got:
      for f in ("a", "b", "scale"):
        np.testing.assert_allclose(getattr(ad, f), getattr(saved[ad.name], f), rtol=1e-6)
  assert scope["skipped"] == []


def test_several_adapters_snippets_run():
  """The "Several adapters" section: every snippet runs, in order, and does what it says."""
  section = re.search(r"## Several adapters\n(.*?)\n## ", README.read_text(), re.S).group(1)
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 5
  scope: dict = {}
  exec(compile("\n".join(blocks), "README-several-adapters", "exec"), scope)
  base, x, model, ads = scope["base"], scope["x"], scope["model"], scope["adapters"]
  deltas = {k: jlora.deltas(jlora.combine(t, base))[("params", "kernel")] for k, t in ads.items()}
  # mix: exact cat; svd at rank 4 is close
  merged = jlora.merge(jlora.combine(scope["mixed"], base))["params"]["kernel"]
  np.testing.assert_allclose(merged, base["params"]["kernel"] + 0.8 * deltas["style"]
                             + 0.5 * deltas["subject"], rtol=1e-5, atol=1e-6)
  assert jlora.adapters(jlora.combine(scope["small"], base))[0].rank == 4
  # the learned weights are the ones that made the target
  np.testing.assert_allclose(scope["w"], [0.7, 0.3], atol=1e-3)
  # per example: each row as if run alone with its adapter
  ids = np.asarray(scope["ids"])
  for b, i in enumerate(ids):
    kernel = base["params"]["kernel"] + (0 if i < 0 else deltas[["style", "subject"][i]])
    want = x[b] @ kernel + base["params"]["bias"]
    np.testing.assert_allclose(scope["y"][b], want, rtol=1e-5, atol=1e-5)
  assert scope["serve"]._cache_size() == 1

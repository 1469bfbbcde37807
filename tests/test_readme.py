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

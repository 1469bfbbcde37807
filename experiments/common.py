"""What every experiment shares: run sizes, results files, pass checks, cached bases.

An experiment script does::

    args = common.parse_args("what it reproduces")        # --smoke / --quick / --full
    out = common.Results("rank_ablation", args)            # experiments/results/<name>/
    ... train, measure ...
    out.table(rows, title="...")                           # printed markdown + CSV
    out.save_json({...})                                   # config, versions, numbers
    out.figure(fig, "loss_vs_rank.png")
    checks = common.Checks(strict=not args.smoke)
    checks.hard("name", condition, "detail"); checks.soft(...)
    checks.finish()                                        # exits 1 on a failed hard check
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"


def parse_args(description: str, argv=None) -> argparse.Namespace:
  """``--smoke`` (plumbing only, < 1 min), ``--quick`` (default, minutes) or ``--full``."""
  p = argparse.ArgumentParser(description=description)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--smoke", action="store_const", dest="size", const="smoke",
                 help="tiny run that checks the plumbing only (used by the tests)")
  g.add_argument("--quick", action="store_const", dest="size", const="quick",
                 help="the default: a few minutes on 2 CPU cores")
  g.add_argument("--full", action="store_const", dest="size", const="full",
                 help="larger models and longer training")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=Path, default=None, help="results folder (default: experiments/results/NAME)")
  p.add_argument("--no-cache", action="store_true", help="retrain cached base models")
  p.set_defaults(size="quick")
  return p.parse_args(argv)


def versions() -> dict[str, str]:
  import flax
  import optax

  import jlora
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__, "jlora": jlora.__version__,
          "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
          "cpu_count": str(os.cpu_count()), "backend": jax.default_backend()}


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, Path):
    return str(x)
  return x


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4g") -> str:
  """Rows of dicts as a GitHub markdown table."""
  if not rows:
    return "(no rows)"
  columns = columns or list(rows[0])
  fmt = lambda v: format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


class Results:
  """The results folder of one experiment run: JSON, CSV, markdown and PNG files."""

  def __init__(self, name: str, args: argparse.Namespace):
    self.name, self.args = name, args
    self.dir = Path(args.out) if args.out else RESULTS / name
    if args.size == "smoke" and not args.out:
      self.dir = RESULTS / f"{name}_smoke"
    self.dir.mkdir(parents=True, exist_ok=True)
    self.started = time.time()

  def table(self, rows: list[dict], columns: list[str] | None = None, *, title: str = "",
            stem: str = "results", floatfmt: str = ".4g") -> str:
    """Print ``rows`` as markdown, and write ``<stem>.csv`` and ``<stem>.md``."""
    text = markdown_table(rows, columns, floatfmt)
    if title:
      text = f"### {title}\n\n{text}"
    print("\n" + text + "\n", flush=True)
    columns = columns or list(rows[0])
    with open(self.dir / f"{stem}.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
      w.writeheader()
      w.writerows(rows)
    (self.dir / f"{stem}.md").write_text(text + "\n")
    return text

  def save_json(self, payload: dict[str, Any], stem: str = "results") -> Path:
    body = {"experiment": self.name, "size": self.args.size, "seed": self.args.seed,
            "versions": versions(), "wall_seconds": round(time.time() - self.started, 1),
            **payload}
    path = self.dir / f"{stem}.json"
    path.write_text(json.dumps(_jsonable(body), indent=2))
    return path

  def figure(self, fig, filename: str) -> Path:
    path = self.dir / filename
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


class Checks:
  """Pass checks run at the end. Hard checks fail the run; soft checks warn.

  With ``strict=False`` (``--smoke``), hard checks are reported but do not fail:
  a smoke run is too short to learn anything and only tests the plumbing.
  """

  def __init__(self, strict: bool = True):
    self.strict = strict
    self.rows: list[dict] = []

  def _add(self, kind, name, ok, detail):
    ok = bool(ok)
    self.rows.append({"check": name, "kind": kind, "result": "PASS" if ok else (
        "FAIL" if kind == "hard" else "WARN"), "detail": detail})
    return ok

  def hard(self, name: str, ok, detail: str = "") -> bool:
    return self._add("hard", name, ok, detail)

  def soft(self, name: str, ok, detail: str = "") -> bool:
    return self._add("soft", name, ok, detail)

  @property
  def failed(self) -> list[dict]:
    return [r for r in self.rows if r["result"] == "FAIL"]

  def finish(self, results: Results | None = None) -> None:
    print(markdown_table(self.rows, ["check", "kind", "result", "detail"]), flush=True)
    if results is not None:
      (results.dir / "checks.md").write_text(markdown_table(self.rows) + "\n")
    if self.failed and self.strict:
      print(f"\n{len(self.failed)} hard check(s) failed.", file=sys.stderr)
      sys.exit(1)


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-able parts (configs, data hashes) for cache keys."""
  blob = json.dumps(_jsonable(list(parts)), sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def cached(name: str, key: str, build: Callable[[], Any], like: Callable[[], Any] | None = None,
           *, refresh: bool = False):
  """``build()``'s params pytree, saved with orbax under ``experiments/.cache/<name>-<key>``.

  Args:
    like: returns an abstract or concrete tree of the same structure, used to
      restore with the right structure and dtypes (e.g. ``jax.eval_shape`` of init).
  """
  import orbax.checkpoint as ocp
  path = (CACHE / f"{name}-{key}").resolve()
  ckpt = ocp.StandardCheckpointer()
  if path.exists() and not refresh:
    try:
      target = like() if like is not None else None
      return ckpt.restore(path, target) if target is not None else ckpt.restore(path)
    except Exception as e:  # a cache written by another version: rebuild it
      print(f"[cache] could not restore {path.name} ({type(e).__name__}); rebuilding", flush=True)
  tree = build()
  CACHE.mkdir(parents=True, exist_ok=True)
  if path.exists():
    import shutil
    shutil.rmtree(path)
  ckpt.save(path, tree)
  ckpt.wait_until_finished()
  return tree


def progress(iterable: Iterable, total: int | None = None, desc: str = "", disable: bool = False):
  """A tqdm bar (to stderr), quiet when ``disable`` or when tqdm is missing."""
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is an experiments extra; degrade to a plain loop
    return iterable
  return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)

"""Tests that need a mesh run in a subprocess with 8 simulated CPU devices.

The main pytest process keeps its one device (XLA fixes the device count when the
backend starts, and every other test wants one). A mesh module marks its tests
``mesh_only`` and adds one launcher, ``test_on_8_devices = launcher(__file__)``,
which runs the module again under ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
and fails with its output if anything there fails. In that run the launcher skips
itself and the marked tests run.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import pytest

N_DEVICES = 8
ROOT = pathlib.Path(__file__).resolve().parents[1]

mesh_only = pytest.mark.skipif(jax.device_count() != N_DEVICES,
                               reason="runs in the 8-device subprocess (test_on_8_devices)")


def env(n_devices: int) -> dict:
  """This process's environment with ``n_devices`` simulated CPU devices."""
  out = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
  out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  return out


def launcher(module_file: str, timeout: float = 900):
  """A test that runs ``module_file`` with pytest on 8 devices."""
  def test_on_8_devices():
    if jax.device_count() == N_DEVICES:
      pytest.skip("this is the 8-device run")
    if not hasattr(jax, "set_mesh"):
      pytest.skip(f"the mesh tests use jax.set_mesh, which jax {jax.__version__} does not have")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
        cwd=ROOT, env=env(N_DEVICES), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
      out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # its own process group: it and its children
      out, _ = proc.communicate()
      pytest.fail(f"the 8-device run took over {timeout:.0f}s:\n{out[-6000:]}")
    if proc.returncode != 0:
      pytest.fail(f"the 8-device run failed:\n{out[-12000:]}")
  return test_on_8_devices


def free_port() -> int:
  """A TCP port that is free on localhost now (the OS picks it)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Processes:
  """``script --process-id i --processes n --port P --out FILE *args`` started in
  ``n`` processes of ``n_devices`` devices each; ``results()`` waits for the JSON each
  writes to its FILE.

  Each process runs in its own process group, so a failed or hung one takes only
  its own group down: all are killed when one fails or the deadline passes, and
  the error carries the tail of every process's output.
  """

  def __init__(self, script: str, n: int, n_devices: int, args=()):
    self.dir = pathlib.Path(tempfile.mkdtemp())
    port, self.procs = free_port(), []
    for i in range(n):
      with open(self.dir / f"log{i}", "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, script, "--process-id", str(i), "--processes", str(n),
             "--port", str(port), "--out", str(self.dir / f"out{i}.json"), *args],
            cwd=ROOT, env=env(n_devices), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))

  def results(self, timeout: float) -> list[dict]:
    try:
      deadline = time.monotonic() + timeout
      while (any(p.poll() is None for p in self.procs) and time.monotonic() < deadline
             and not any(p.poll() not in (None, 0) for p in self.procs)):
        time.sleep(0.2)
      if any(p.poll() != 0 for p in self.procs):
        raise RuntimeError(f"exit codes {[p.poll() for p in self.procs]} (None: still running"
                           f" after {timeout:.0f}s, or killed when another failed)")
      return [json.loads((self.dir / f"out{i}.json").read_text()) for i in range(len(self.procs))]
    except BaseException as e:
      self.kill()
      logs = [f"--- process {i}:\n{(self.dir / f'log{i}').read_text()[-3000:]}"
              for i in range(len(self.procs))]
      raise RuntimeError(f"{e}\n" + "\n".join(logs)) from e

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()

  def close(self):
    self.kill()
    shutil.rmtree(self.dir, ignore_errors=True)

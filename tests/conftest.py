import os

import hypothesis
import jax
import pytest

# The suite runs on 2 CPU cores in CI; keep property tests small and undeadlined
# (the first example of each test pays for compilation).
hypothesis.settings.register_profile(
    "ci", max_examples=int(os.environ.get("JLORA_EXAMPLES", "12")), deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("ci")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
  return jax.random.key(0)

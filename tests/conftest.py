"""Test set-up: 8 fake CPU devices before JAX starts, absl flags marked parsed."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def gemma(tmp_path_factory):
  """The packaged Gemma 3 270M, converted once per test session into a temporary cache."""
  import calibjax.models as models
  return models.load("gemma3-270m", cache_dir=str(tmp_path_factory.mktemp("cache")),
                     progress=False)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after each test module. Every program compiled on CPU
  holds a few hundred memory mappings for its kernels until freed; a worker that keeps all
  of them (hundreds of programs over the suite) exceeds Linux's 65,530 mappings and aborts
  inside the compiler ("LLVM compilation error: Cannot allocate memory")."""
  yield
  import jax
  jax.clear_caches()


def pytest_configure(config):
  # After a deliberately damaged checkpoint fails to restore, Orbax leaves read coroutines
  # that are garbage-collected later, in whichever test runs then.
  config.addinivalue_line(
      "filterwarnings",
      "ignore:Exception ignored in.*_read_array_index_and_device_put"
      ":pytest.PytestUnraisableExceptionWarning")

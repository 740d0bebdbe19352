"""Test set-up: 8 fake CPU devices before JAX starts, absl flags marked parsed.

The tests compile with LLVM's optimisation level 0 (``--xla_backend_optimization_level=0``;
XLA's own HLO passes all run): compiling, not running, is most of the suite's time on CPU,
and the suite ran 17% faster so (BUILD_NOTES.md). Every comparison is between results of the
same configuration or against references within tolerances; the binaries, the benchmark and
users run at XLA's default level. Compiled programs are shared through JAX's persistent
cache in the system's temporary folder (``calibjax-tests-jax-cache``).
"""

import contextlib
import os
import pickle
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one persistent compilation cache for both xdist workers and the processes tests start (the
# binaries, jax.distributed, the lower bounds' suite): many programs are compiled by several
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "calibjax-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def gemma(tmp_path_factory):
  """The packaged Gemma 3 270M, converted once per test run into a temporary cache that the
  xdist workers share (the first converts it under a lock, the others restore it)."""
  import calibjax.models as models
  shared = _shared(tmp_path_factory)
  with _locked(shared / "gemma-cache.lock"):
    return models.load("gemma3-270m", cache_dir=str(shared / "gemma-cache"), progress=False)


def _shared(tmp_path_factory):
  """A folder that every xdist worker of this run sees, and a lock in it."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # basetemp/popen-gwN: the parent is the run's
  return shared


@contextlib.contextmanager
def _locked(path):
  import fcntl
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


@pytest.fixture(scope="session")
def gemma_tokenizer(tmp_path_factory):
  """The packaged Gemma 3 270M's tokenizer alone (no weights converted), for the tests that
  need its vocabulary only: read from the GGUF metadata by the first xdist worker (10 s of
  GGUF parsing) and shared with the others as its SentencePiece model."""
  import calibjax.models as models
  shared = _shared(tmp_path_factory)
  with _locked(shared / "gemma-tokenizer.lock"):
    path = shared / "gemma-tokenizer.pkl"
    if path.exists():
      with open(path, "rb") as f:
        return pickle.load(f)
    tok = models.load_tokenizer("gemma3-270m")
    with open(path, "wb") as f:
      pickle.dump(tok, f)
    return tok


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
  config.addinivalue_line(
      "markers", "slow: what only a benchmark or a full check needs; README's test command "
      "leaves it out, `pytest -m slow tests` runs it")
  # After a deliberately damaged checkpoint fails to restore, Orbax leaves read coroutines
  # that are garbage-collected later, in whichever test runs then.
  config.addinivalue_line(
      "filterwarnings",
      "ignore:Exception ignored in.*_read_array_index_and_device_put"
      ":pytest.PytestUnraisableExceptionWarning")


# The longest test files (about 100 s each on 2 cores), started first: with one worker per
# file (`--dist loadfile`) a long file started last would leave the other worker idle. (xdist
# orders files by their number of tests unless told `--no-loadscope-reorder`, as README is.)
LONGEST_FIRST = ("tests/test_lower_bounds.py", "tests/sequence/", "tests/tasks/test_validity.py", "tests/kernels/",
                 "tests/experiments/test_experiments.py", "tests/core/test_sharding.py",
                 "tests/models/test_gemma3_golden.py")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    path = item.nodeid.replace("\\", "/")
    return next((i for i, p in enumerate(LONGEST_FIRST) if path.startswith(p)),
                len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within a file is kept

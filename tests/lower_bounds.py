"""The oldest versions setup.py allows, installed and tested: the check that the ranges are
honest and that installing calibjax keeps the versions a user already has. CI runs it as
``tests/test_lower_bounds.py``; by hand:

    python -m tests.lower_bounds [--venv=.venv-lower] [pytest arguments]

Reads calibjax's requirements from its installed metadata (``install_requires`` and the
``test`` and ``plots`` extras) and makes a fresh virtual environment in which

1. the lower bound of every range is installed first (with ``uv``, in seconds), as a user's
   existing stack would hold it: older numpy, protobuf, jax, … than ``constraints.txt``;
2. calibjax is installed into it the way a user installs it, ``pip install -e
   '.[test,plots]'`` without constraints, and every version of step 1 must still be there;
3. the tests named by the arguments run there (by default ``FAST``, each dependency's tests:
   flax, orbax, gguf, safetensors, ml-dtypes, sentencepiece and protobuf in the loading
   tests; tokenizers and jinja2 in the chat tests; outlines-core in the validity masks; optax
   in head training; jax, numpy, absl, tqdm and matplotlib in the binary the wheel test runs,
   this checkout's wheel installed outside it and its command run end to end).

Needs the network (PyPI).
"""

import json
import os
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-lower")
EXTRAS = ("test", "plots")
FAST = ["tests/models/test_loading.py",
        "tests/models/test_chat.py", "tests/tasks/test_validity.py::test_regex_escapes_and_"
        "terminator_required", "tests/tasks/test_validity.py::test_markdown_surface_forms_when_"
        "the_task_accepts_them", "tests/recalibration/test_recalibration.py::test_training_"
        "resumes_with_identical_losses", "tests/experiments/test_installed.py"]


def lower_bounds() -> dict[str, str]:
  """``{distribution: oldest allowed version}`` for each requirement of calibjax (and of the
  extras in ``EXTRAS``) that has a ``>=`` bound."""
  pins = {}
  for line in metadata.requires("calibjax") or []:
    req = Requirement(line)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in EXTRAS):
      continue
    low = [s.version for s in req.specifier if s.operator == ">="]
    if low:
      pins[req.name] = low[0]
  return pins


def install(venv: str = VENV) -> dict[str, tuple[str, str]]:
  """Steps 1 and 2 in a fresh ``venv``; returns ``{name: (lower bound, version now)}`` of the
  versions installing calibjax changed (empty: it kept them all)."""
  from uv import find_uv_bin
  pins = lower_bounds()
  python = os.path.join(venv, "bin", "python")
  subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
  subprocess.run([find_uv_bin(), "pip", "install", "-q", "-p", python,
                  *(f"{n}=={v}" for n, v in pins.items())], check=True)
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-"
                  "check", "-e", f"{ROOT}[{','.join(EXTRAS)}]"], check=True)
  code = ("import json, sys; from importlib import metadata; print(json.dumps("
          "{n: metadata.version(n) for n in sys.argv[1:]}))")
  have = json.loads(subprocess.run([python, "-c", code, *pins], check=True, capture_output=True,
                                   text=True).stdout)
  return {n: (v, have[n]) for n, v in pins.items() if Version(have[n]) != Version(v)}


def run_tests(args=FAST, venv: str = VENV, workers: int = 0) -> subprocess.CompletedProcess:
  """pytest in ``venv`` on ``args`` (no marker filter: the wheel test is ``slow``)."""
  env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTEST_XDIST_WORKER",
                                                          "PYTEST_XDIST_TESTRUNUID")}
  return subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pytest", "-q", "-p",
                         "no:cacheprovider", "-n", str(workers), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True)


def main(argv: list[str]) -> int:
  venv = VENV
  if argv and argv[0].startswith("--venv="):
    venv, argv = argv[0].split("=", 1)[1], argv[1:]
  print("lower bounds: " + " ".join(f"{n}=={v}" for n, v in lower_bounds().items()), flush=True)
  moved = install(venv)
  if moved:
    print("installing calibjax changed versions the environment had: " + ", ".join(
        f"{n} {a} -> {b}" for n, (a, b) in moved.items()), file=sys.stderr)
    return 1
  out = run_tests(argv or FAST, venv, workers=2)
  print(out.stdout + out.stderr)
  return out.returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

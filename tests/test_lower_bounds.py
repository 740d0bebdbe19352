"""setup.py's ranges are honest: at the oldest version of every range, installed first as a
user's stack would hold them, ``pip install`` of calibjax keeps them all and each dependency's
tests pass (``tests/lower_bounds.py``; needs PyPI)."""

from tests import lower_bounds


def test_oldest_versions_are_kept_by_pip_and_pass_the_tests():
  pins = lower_bounds.lower_bounds()
  assert {"jax", "flax", "numpy", "protobuf", "sentencepiece", "pytest"} <= set(pins), pins
  moved = lower_bounds.install()
  assert not moved, f"installing calibjax changed versions the environment had: {moved}"
  out = lower_bounds.run_tests()
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-2000:]

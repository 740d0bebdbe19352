"""The one place where the array core chooses how whole-vocabulary ops run.

Public functions that use a kernel op take ``implementation=``:

- ``"xla"``: the sort-free XLA row functions of the array core (the references of
  :mod:`kernels`);
- ``"pallas"``: the Pallas kernels of :mod:`kernels` — on TPU their ``"grid"`` variant
  (Mosaic), on GPU their ``"loop"`` variant (Triton: a GPU grid runs its programs in any
  order, so each program loops over the vocabulary itself), on CPU the ``"grid"`` variant in
  interpret mode (for tests, never for speed);
- ``None``: the best available for the backend — ``"pallas"`` on TPU, ``"xla"`` elsewhere.
  (No accelerator has been measured yet, see BUILD_NOTES.md: the TPU choice follows from the
  XLA paths' scatter histograms, which TPUs serialise; on GPU the kernels are opt-in until
  measured.)
"""

from __future__ import annotations

import functools

import jax

import kernels
from calibjax import errors
from calibjax.rowwise import split_rows

IMPLEMENTATIONS = ("xla", "pallas")
VARIANT = {"cpu": "grid", "tpu": "grid", "gpu": "loop"}  # the kernels' variant per backend


def resolve(implementation: str | None) -> str:
  """``"xla"`` or ``"pallas"`` for the current default backend; raises for bad choices."""
  backend = jax.default_backend()
  if implementation is None:
    return "pallas" if backend == "tpu" else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise errors.InputError(f"implementation must be one of {IMPLEMENTATIONS} or None, got "
                            f"{implementation!r}.")
  if implementation == "pallas" and backend not in VARIANT:
    raise errors.InputError(f"implementation='pallas' has no {backend} variant; use 'xla'.")
  return implementation


def _kernel(fn):
  """``fn`` in the backend's variant (interpreted on CPU), data-parallel over the mesh's
  ``"data"`` axis."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    backend = jax.default_backend()
    local = lambda *xs: fn(*xs, variant=VARIANT[backend], interpret=backend == "cpu", **kwargs)
    return split_rows(local, args[0].shape[0])(*args)
  return run


row_stats = _kernel(kernels.row_stats)
threshold_stats = _kernel(kernels.threshold_stats)
valid_rank_counts = _kernel(kernels.valid_rank_counts)

"""The one place where the array core chooses how whole-vocabulary ops run.

Each op of :data:`OPS` has one signature, shared by its two implementations:

- ``"xla"``: the op's plain-jnp reference from :mod:`calibjax_kernels`, mapped row by row
  (:func:`calibjax.core.rows.map_rows`: bounded memory, data-parallel over a mesh);
- ``"pallas"``: the Pallas kernel — on TPU its ``"grid"`` variant (Mosaic), on GPU its
  ``"loop"`` variant (Triton: a GPU grid runs its programs in any order, so each program loops
  over the vocabulary itself), on CPU the ``"grid"`` variant in interpret mode (for tests,
  never for speed). Pallas itself is imported only when a kernel is built.

Public functions that run an op take ``implementation=``: ``"xla"``, ``"pallas"``, or
``None``: the best available for the backend — ``"pallas"`` on TPU, ``"xla"`` elsewhere. (No
accelerator has been measured yet, see BUILD_NOTES.md: the TPU choice follows from the XLA
paths' scatter histograms, which TPUs serialise; on GPU the kernels are opt-in until
measured.) ``truncate`` and ``order_stats`` have fused XLA row algorithms of their own (cut
and sums in one pass per row); with ``"pallas"`` they take their sums from
``threshold_stats`` / ``valid_rank_counts`` here.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

import calibjax_kernels as kernels
from calibjax import errors
from calibjax.core.rows import map_rows, split_rows

IMPLEMENTATIONS = ("xla", "pallas")
VARIANT = {"cpu": "grid", "tpu": "grid", "gpu": "loop"}  # the kernels' variant per backend

# op name -> (kernel, its plain-jnp reference); both take [B, V] arrays first
OPS = {
    "row_stats": (kernels.row_stats, kernels.row_stats_reference),
    "threshold_stats": (kernels.threshold_stats, kernels.threshold_stats_reference),
    "valid_rank_counts": (kernels.valid_rank_counts, kernels.valid_rank_counts_reference),
}


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


def _rows(reference):
  """``reference`` one row at a time (rows of every array argument; ``None`` passes)."""
  @functools.wraps(reference)
  def run(*args, **kwargs):
    given = [i for i, a in enumerate(args) if a is not None]

    def row(*xs):
      full = list(args)
      for i, x in zip(given, xs):
        full[i] = x[None]
      return jax.tree.map(lambda v: v[0], reference(*full, **kwargs))
    return map_rows(row, *(args[i] for i in given), batch_shape=args[0].shape[:1])
  return run


def _kernel(fn):
  """``fn`` in the backend's variant (interpreted on CPU), data-parallel over the mesh's
  ``"data"`` axis."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    backend = jax.default_backend()
    local = lambda *xs: fn(*xs, variant=VARIANT[backend], interpret=backend == "cpu", **kwargs)
    return split_rows(local, args[0].shape[0])(*args)
  return run


def op(name: str, implementation: str | None = None) -> Callable:
  """The implementation of op ``name`` (a key of :data:`OPS`) chosen by ``implementation``
  (resolved as :func:`resolve` does); it takes the kernel's arguments, ``[B, V]`` first."""
  kernel, reference = OPS[name]
  return _kernel(kernel) if resolve(implementation) == "pallas" else _rows(reference)

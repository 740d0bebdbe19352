"""Row-at-a-time evaluation of whole-vocabulary reductions, data-parallel over a mesh.

One next-token distribution of 262,144 float32 logits is 1 MiB: it stays in cache while a row
function makes several passes over it, whereas the same passes over a whole ``[B, V]`` batch
stream it from memory each time. On CPU, mapping rows with ``lax.map`` is ~2-3x faster than
vmapping the same function for the reductions here (measured in ``experiments/benchmark.py``).

Under a mesh with a ``"data"`` axis (``jax.set_mesh``, see :mod:`calibjax.core.sharding`; or,
without one, the mesh of the inputs' own Explicit sharding, as ``jax.device_put(x,
NamedSharding(mesh, P("data")))`` makes it), rows are split over that axis with
``jax.shard_map``: each device maps its own rows, and the results stay sharded by row. Row
functions are independent per row, so the numbers are the single-device numbers exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

DATA = "data"  # the mesh axis that rows (positions, samples, nodes) are split over


def input_mesh(*arrays) -> contextlib.AbstractContextManager:
  """A context with the mesh the rows live on: the current mesh when there is one, else the
  (abstract) mesh named by an input's Explicit sharding, so that inputs placed with
  ``device_put`` on an Explicit mesh work without ``jax.set_mesh`` (Auto-sharded and
  unsharded inputs need no mesh: nothing changes for them)."""
  if jax.sharding.get_abstract_mesh().empty:
    for a in jax.tree.leaves(arrays):
      if not isinstance(a, jax.Array):
        continue
      traced = isinstance(a, jax.core.Tracer)  # a traced value's type names its mesh
      mesh = getattr(jax.typeof(a).sharding if traced else a.sharding, "mesh", None)
      if (mesh is not None and not mesh.empty and
          jax.sharding.AxisType.Explicit in mesh.axis_types):
        return jax.sharding.use_abstract_mesh(mesh) if traced else jax.set_mesh(mesh)
  return contextlib.nullcontext()


def on_input_mesh(fn: Callable) -> Callable:
  """Runs a public function of the array core under :func:`input_mesh` of its arguments, so
  that everything inside (row maps, kernels, steps that mix rows) sees the rows' mesh."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with input_mesh(*args, *kwargs.values()):
      return fn(*args, **kwargs)
  return wrapped


def data_axis() -> tuple[int, bool]:
  """Devices along the ``"data"`` axis of the current mesh (1 without one), and whether the
  axis is Explicit (arrays carry their sharding in their type)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA not in mesh.axis_names:
    return 1, False
  kind = dict(zip(mesh.axis_names, mesh.axis_types))[DATA]
  if kind == jax.sharding.AxisType.Manual:  # inside a shard_map: rows are already local
    return 1, False
  return mesh.shape[DATA], kind == jax.sharding.AxisType.Explicit


def split_rows(fn: Callable, rows: int) -> Callable:
  """``fn`` over row-major arrays (every leaf ``[rows, ...]``), data-parallel when the current
  mesh has a ``"data"`` axis that divides ``rows`` (each device runs ``fn`` on its rows)."""
  devices, explicit = data_axis()
  if devices <= 1 or rows % devices:
    return fn
  mapped = jax.shard_map(fn, in_specs=P(DATA), out_specs=P(DATA), check_vma=False)
  # shard_map takes Explicit arrays only as sharded as its in_specs
  to = lambda spec: ((lambda x: jax.reshard(x, spec)) if explicit else
                     (lambda x: jax.lax.with_sharding_constraint(x, spec)))
  many = jax.process_count() > 1  # every process must be able to read every row's result

  def run(*xs):
    out = mapped(*(jax.tree.map(to(P(DATA)), xs) if explicit else xs))
    return jax.tree.map(to(P()), out) if many else out
  return run


def spread(tree):
  """Inside ``jit``: row-major arrays (leading dim = rows) constrained to split over the mesh's
  ``"data"`` axis, so the partitioner runs everything downstream data-parallel (a model
  forward over a batch of nodes or samples); unchanged without such an axis or when the rows
  do not divide it."""
  devices, explicit = data_axis()

  def one(x):
    if devices <= 1 or not x.ndim or x.shape[0] % devices:
      return x
    spec = P(DATA, *([None] * (x.ndim - 1)))
    return jax.reshard(x, spec) if explicit else jax.lax.with_sharding_constraint(x, spec)
  return jax.tree.map(one, tree)


def replicate(tree):
  """Per-row results made whole on every device before a step that mixes rows (a histogram
  over all positions); identity unless the mesh's ``"data"`` axis is Explicit."""
  devices, explicit = data_axis()
  if devices <= 1 or not explicit:
    return tree
  return jax.tree.map(lambda x: jax.reshard(x, P()), tree)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of ``x`` as a NumPy array on every process, also when its rows are split over
  devices of several processes (``jax.distributed``), where ``np.asarray`` refuses."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def map_rows(fn: Callable, *arrays: jax.Array, batch_shape: tuple[int, ...]):
  """Applies ``fn`` to each row: every array has leading dims ``batch_shape``.

  Returns ``fn``'s pytree with those leading dims restored.
  """
  n = math.prod(batch_shape)
  flat = [jnp.reshape(a, (n,) + a.shape[len(batch_shape):]) for a in arrays]
  out = split_rows(lambda *xs: jax.lax.map(lambda x: fn(*x), xs), n)(*flat)
  return jax.tree.map(lambda o: jnp.reshape(o, batch_shape + o.shape[1:]), out)

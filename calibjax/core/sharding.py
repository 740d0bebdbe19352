"""Meshes from flags, model weight placement, and vocabulary-sharded ops (``jax.shard_map``).

Two mesh axes have a meaning in calibjax: ``"data"`` splits rows (positions, samples, nodes;
every row function does this by itself under ``jax.set_mesh``, see :mod:`calibjax.core.rows`),
``"model"`` splits the vocabulary of rows too large for one device, and the model's weights
(:func:`param_shardings`: FSDP over ``"data"``, tensor parallel over ``"model"``;
:func:`param_placement`, :func:`abstract_params` and :func:`place_params` put them there, an
Orbax restore straight into place). The vocabulary-sharded ops
compute each shard's partial result with the array core's own implementation (XLA or the
Pallas kernels, :mod:`calibjax.core.dispatch`) and combine shards with explicit collectives:

- :func:`row_stats`: ``pmax`` of the maxima, ``psum`` of the rescaled normalisers; entropies
  by the chain rule ``H = Σ_k w_k (H_k − log w_k)`` with ``w_k`` the mass of shard ``k``;
- :func:`threshold_stats`, :func:`valid_rank_counts`: ``psum`` of the per-shard counts and
  sums (thresholds and reference logits are per row, the same on every shard);
- :func:`top_valid`: the largest valid logits of each row (the slots of the valid-rank
  counts) from an ``all_gather`` of each shard's own.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import calibjax_kernels as kernels
from calibjax import errors
from calibjax.core import dispatch
from calibjax.core.rows import DATA

MODEL = "model"
AXES = (DATA, MODEL)


def parse_mesh(spec: str) -> dict[str, int]:
  """``"data:4,model:2"`` → ``{"data": 4, "model": 2}``; errors name the bad item."""
  axes = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    m = re.fullmatch(r"([a-z]+):([0-9]+)", item)
    if not m:
      raise errors.InputError(f"mesh {spec!r}: cannot read {item!r}; write axis:size items, "
                              "e.g. data:8 or data:4,model:2.")
    name, size = m.group(1), int(m.group(2))
    if name not in AXES:
      raise errors.InputError(f"mesh {spec!r}: unknown axis {name!r}; axes are {AXES}.")
    if name in axes or size < 1:
      raise errors.InputError(f"mesh {spec!r}: axis {name!r} repeated or of size {size}.")
    axes[name] = size
  if not axes:
    raise errors.InputError(f"mesh {spec!r} names no axis.")
  return axes


def make_mesh(spec: str) -> jax.sharding.Mesh:
  """The device mesh of a ``--mesh`` flag value (all devices of all processes)."""
  axes = parse_mesh(spec)
  need, have = int(np.prod(list(axes.values()))), jax.device_count()
  if need != have:
    raise errors.InputError(f"mesh {spec!r} needs {need} devices; {have} are available "
                            f"({jax.default_backend()}).")
  return jax.make_mesh(tuple(axes.values()), tuple(axes),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


# Logical axes of the model's weights (calibjax.models.decoder) → mesh axes: FSDP over "data"
# for the model width, tensor parallel over "model" for vocabulary, heads and MLP.
PARAM_RULES = {"embed": DATA, "vocab": MODEL, "heads": MODEL, "mlp": MODEL}


def param_shardings(state, mesh: jax.sharding.Mesh):
  """``NamedSharding`` of every weight of an NNX ``state`` on ``mesh``, from its
  ``logical_axes`` metadata by :data:`PARAM_RULES`. A dimension stays whole where the mesh has no
  such axis or the axis does not divide it (e.g. 1 key/value head over 2 devices); weights
  without names (norms) are replicated."""
  from flax import nnx

  def spec(var):
    names = var.get_metadata().get("logical_axes") or ()
    axes = []
    for name, size in zip(names, var.shape):
      axis = PARAM_RULES.get(name)
      ok = axis in mesh.axis_names and size % mesh.shape[axis] == 0 and axis not in axes
      axes.append(axis if ok else None)
    return jax.sharding.NamedSharding(mesh, P(*axes))

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_placement(state, mesh: jax.sharding.Mesh | None = None):
  """Where a model's weights go: by :func:`param_shardings` on ``mesh``; else whole on every
  device of the mesh in context (``jax.set_mesh``), so they meet row-sharded inputs there;
  None (default placement) without either."""
  from flax import nnx
  if mesh is not None:
    return param_shardings(state, mesh)
  here = jax.sharding.get_mesh()
  if here.empty:
    return None
  whole = jax.sharding.NamedSharding(here, P())
  return jax.tree.map(lambda v: whole, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _each_param(fn, state, placement):
  from flax import nnx
  return jax.tree.map(lambda v, s: v.replace(fn(v.get_value(), s)), state, placement,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_params(state, placement):
  """An abstract NNX ``state`` whose leaves carry their ``placement`` (a tree of shardings):
  an Orbax restore into it reads each device's shard straight into place (no host copy)."""
  return _each_param(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                     placement)


def place_params(state, placement):
  """A concrete NNX ``state`` moved to its ``placement`` through host memory (which works
  across processes, where a device-to-device copy between hosts may not)."""
  return _each_param(lambda a, s: jax.device_put(np.asarray(a), s), state, placement)


def replicated(tree):
  """Small arrays (a recalibration head) whole on every device of the mesh in context;
  unchanged without a mesh."""
  here = jax.sharding.get_mesh()
  if here.empty:
    return tree
  return jax.device_put(jax.tree.map(np.asarray, tree), jax.sharding.NamedSharding(here, P()))


def _specs(z, mesh):
  """(rows × vocabulary, rows) partition specs of ``z [B, V]`` on ``mesh``; checks that the
  mesh has a ``"model"`` axis that splits the vocabulary evenly."""
  if MODEL not in mesh.axis_names:
    raise errors.InputError(f"vocabulary sharding needs a {MODEL!r} mesh axis; the mesh has "
                            f"{mesh.axis_names}.")
  if z.shape[-1] % mesh.shape[MODEL]:
    raise errors.ShapeMismatchError(f"vocabulary of {z.shape[-1]} tokens does not split into "
                                    f"{mesh.shape[MODEL]} equal shards over mesh axis "
                                    f"{MODEL!r}.")
  rows = DATA if DATA in mesh.axis_names else None
  return P(rows, MODEL), P(rows)


def _merge_entropy(lse_k, h_k, mu):
  """log-normaliser and entropy of the union of shards from each shard's own."""
  safe = jnp.where(mu == -jnp.inf, 0.0, mu)
  lse = jnp.log(jax.lax.psum(jnp.exp(lse_k - safe), MODEL)) + safe
  w = jnp.exp(lse_k - lse)
  h = jax.lax.psum(jnp.where(w > 0, w * (h_k - jnp.log(w)), 0.0), MODEL)
  return lse, jnp.where(lse > -jnp.inf, h, jnp.nan)


def row_stats(z: jax.Array, mask: jax.Array | None, temperature: jax.Array, *,
              mesh: jax.sharding.Mesh, implementation: str | None = None) -> kernels.RowStats:
  """:func:`calibjax.row_stats` of ``z [B, V]`` with the vocabulary split over ``"model"``."""
  from calibjax.core import shape  # shape imports this module's neighbours
  impl = dispatch.resolve(implementation)
  tiles, rows = _specs(z, mesh)

  def local(zk, mk, tk):
    s = shape.row_stats_flat(zk, mk, tk, impl)
    mu = jax.lax.pmax(s.max, MODEL)
    lse, h = _merge_entropy(s.logsumexp, s.entropy, mu)
    if mk is None:
      return kernels.RowStats(mu, lse, h, None, None)
    # a shard without a finite logit has no valid mass (its own valid_mass is 0/0)
    lse_v_k = jnp.where(s.logsumexp > -jnp.inf, s.logsumexp + jnp.log(s.valid_mass), -jnp.inf)
    lse_v, h_v = _merge_entropy(lse_v_k, s.valid_entropy, jax.lax.pmax(lse_v_k, MODEL))
    return kernels.RowStats(mu, lse, h, jnp.exp(lse_v - lse), h_v)

  run = jax.shard_map(local, mesh=mesh, in_specs=(tiles, tiles, rows), out_specs=rows,
                      check_vma=False)
  return jax.jit(run)(z, mask, jnp.asarray(temperature, jnp.float32))


def threshold_stats(z: jax.Array, mask: jax.Array | None, consts: jax.Array,
                    thresholds: jax.Array, *, mesh: jax.sharding.Mesh, score: str = "logit",
                    implementation: str | None = None) -> kernels.ThresholdStats:
  """:func:`calibjax_kernels.threshold_stats` of ``z [B, V]`` with the vocabulary split over
  ``"model"`` (``consts`` and ``thresholds`` are per row, for the whole vocabulary)."""
  op = dispatch.op("threshold_stats", implementation)
  tiles, rows = _specs(z, mesh)
  local = lambda zk, mk, c, th: jax.tree.map(lambda v: jax.lax.psum(v, MODEL),
                                             op(zk, mk, c, th, score=score))
  run = jax.shard_map(local, mesh=mesh, in_specs=(tiles, tiles, rows, rows), out_specs=rows,
                      check_vma=False)
  return jax.jit(run)(z, mask, consts, thresholds)


def valid_rank_counts(z: jax.Array, slots: jax.Array, consts: jax.Array, *,
                      mesh: jax.sharding.Mesh,
                      implementation: str | None = None) -> kernels.RankCounts:
  """:func:`calibjax_kernels.valid_rank_counts` of ``z [B, V]`` with the vocabulary split over
  ``"model"`` (``slots`` from :func:`top_valid`; ``consts`` for the whole vocabulary)."""
  op = dispatch.op("valid_rank_counts", implementation)
  tiles, rows = _specs(z, mesh)
  local = lambda zk, s, c: jax.tree.map(lambda v: jax.lax.psum(v, MODEL), op(zk, s, c))
  run = jax.shard_map(local, mesh=mesh, in_specs=(tiles, rows, rows), out_specs=rows,
                      check_vma=False)
  return jax.jit(run)(z, slots, consts)


def top_valid(z: jax.Array, mask: jax.Array, slots: int, *,
              mesh: jax.sharding.Mesh) -> jax.Array:
  """The ``slots`` largest valid logits of each row of ``z [B, V]``, ascending, ``+inf``
  where a row has fewer (the reference logits of :func:`valid_rank_counts`)."""
  tiles, rows = _specs(z, mesh)
  k = min(slots, z.shape[-1] // mesh.shape[MODEL])

  def local(zk, mk):
    n = jax.lax.psum(jnp.sum(mk, axis=-1), MODEL)
    top = jax.lax.top_k(jnp.where(mk, zk, -jnp.inf), k)[0]
    every = jax.lax.all_gather(top, MODEL, axis=1, tiled=True)
    best = jax.lax.top_k(every, min(slots, every.shape[-1]))[0][:, ::-1]  # ascending
    best = jnp.pad(best, ((0, 0), (slots - best.shape[-1], 0)), constant_values=-jnp.inf)
    j = jnp.arange(slots)
    # the n valid logits fill the first n slots, ascending; the rest is +inf
    idx = jnp.clip(slots - n[:, None] + j, 0, slots - 1)
    return jnp.where(j < n[:, None], jnp.take_along_axis(best, idx, axis=-1), jnp.inf)

  run = jax.shard_map(local, mesh=mesh, in_specs=(tiles, tiles), out_specs=rows,
                      check_vma=False)
  return jax.jit(run)(z, mask)


def peak_bytes(fn, *args) -> int:
  """Per-device memory of ``jit(fn)`` compiled for ``args`` (arrays or ``ShapeDtypeStruct``s
  with shardings), from XLA's memory analysis: arguments + outputs + temporaries − aliases."""
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)

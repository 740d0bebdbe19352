"""Sort-free exact threshold selection over a row, for one value or a whole sweep at once.

Float32 values are mapped to uint32 *keys* that sort like the floats (NaN excluded), so
"the largest threshold with enough weight above it" is a search over 2^32 integers whose
answer is always one of the row's own values — exact, never an interpolated probability.

:func:`select` runs that search as a three-pass radix selection (12, 10, 10 bits): each pass
is one weighted histogram (``bincount``) of the next digit of every key, restricted to the
prefixes chosen so far, so ``S`` targets (a parameter sweep) cost three passes, not ``S``.
A target's answer depends only on its own histogram cells, so a sweep returns exactly the
per-value results.

:func:`threshold_stats` counts and sums per-token quantities above ``S`` thresholds with one
histogram per quantity; :func:`joint_threshold_stats` sums one quantity over the thresholds
of several scores with one histogram.

Histogram cells that most tokens fall into are split (a spare block in :func:`select`, copies
in :func:`histogram`): XLA's CPU ``bincount`` adds token by token, and additions to one cell
wait on each other.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_WIDTHS = (12, 10, 10)
_COPIES = 16  # histogram: copies of each cell (a power of two)
_SIGN = np.uint32(0x80000000)  # numpy: no JAX backend at import (jax.distributed needs that)


def float_key(x: jax.Array) -> jax.Array:
  """Monotone uint32 key of float32 ``x``: ``x < y  ⟺  key(x) < key(y)`` (NaN excluded)."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(b >= _SIGN, ~b, b | _SIGN)


def key_float(k: jax.Array) -> jax.Array:
  """Inverse of :func:`float_key`."""
  b = jnp.where(k >= _SIGN, k ^ _SIGN, ~k)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _slots(prefixes: jax.Array, high: jax.Array):
  """Index of each token's high bits among the sorted target prefixes, and membership."""
  up = jnp.sort(prefixes)
  slot = sum((up[j] < high).astype(jnp.int32) for j in range(up.shape[0]))
  member = jnp.take(up, jnp.minimum(slot, up.shape[0] - 1)) == high
  return up, slot, member


def select(keys: jax.Array, weights: jax.Array, targets: jax.Array,
           with_masses: bool = False):
  """For each target t: the largest key K with ``Σ_{keys ≥ K} weights ≥ t``.

  Args:
    keys: uint32 ``[V]`` (one row); weights: float32 ``[V]`` ≥ 0; targets: float32 ``[S]``.
    with_masses: also return the histograms' (float32) weight above K and at or above K.

  Returns:
    uint32 ``[S]`` (and with ``with_masses`` two float32 ``[S]``). Always a key present in
    ``keys`` when the target is reachable; when the total weight is below t, a key at or
    below every key (the caller clamps it).
  """
  n_targets = targets.shape[0]
  prefix = jnp.zeros(n_targets, jnp.uint32)
  above = jnp.zeros(n_targets, jnp.float32)
  shift = 32
  for i, width in enumerate(_WIDTHS):
    shift -= width
    size = 1 << width
    digit = ((keys >> shift) & (size - 1)).astype(jnp.int32)
    if i == 0:
      slots, cell, row_of = 1, digit, jnp.zeros(n_targets, jnp.int32)
    else:
      up, slot, member = _slots(prefix, keys >> (shift + width))
      slots = n_targets
      # tokens outside every target's prefix (most of them) go to a spare block by digit:
      # one shared spare cell would chain every addition on the one before (3x slower)
      cell = jnp.where(member, slot, slots) * size + digit
      row_of = jnp.searchsorted(up, prefix, side="left").astype(jnp.int32)
    hist = jnp.bincount(cell, weights=weights, length=(slots + (i > 0)) * size)[:slots * size]
    rows = hist.reshape(slots, size)[row_of]                    # [S, size]
    at_or_above = jnp.cumsum(rows[:, ::-1], axis=-1)[:, ::-1]   # weight of digits >= d
    ok = above[:, None] + at_or_above >= targets[:, None]       # True for d <= d*
    d = jnp.maximum(jnp.sum(ok, axis=-1) - 1, 0)
    nxt = jnp.concatenate([at_or_above[:, 1:], jnp.zeros((n_targets, 1))], axis=-1)
    at_or_above_k = above + jnp.take_along_axis(at_or_above, d[:, None], axis=-1)[:, 0]
    above = above + jnp.take_along_axis(nxt, d[:, None], axis=-1)[:, 0]
    prefix = (prefix << width) | d.astype(jnp.uint32)
  return (prefix, above, at_or_above_k) if with_masses else prefix


_BLOCK = 128


def top_values(x: jax.Array, k: int) -> jax.Array:
  """The ``k`` largest entries of ``x [V]`` (multiplicities kept), descending.

  They lie in at most ``k`` blocks of 128 entries, and those blocks are among the ``k``
  blocks with the largest maxima: ``top_k`` over the block maxima, then over the ``k``
  gathered blocks, is exact and ~6x faster on CPU than ``top_k`` over the row."""
  blocks = -(-x.shape[-1] // _BLOCK)
  if k >= blocks // 2:
    return jax.lax.top_k(x, k)[0]
  x = jnp.pad(x, (0, blocks * _BLOCK - x.shape[-1]), constant_values=-jnp.inf)
  x = x.reshape(blocks, _BLOCK)
  chosen = jax.lax.top_k(jnp.max(x, axis=-1), k)[1]
  return jax.lax.top_k(x[chosen].reshape(-1), k)[0]


def histogram(cells: jax.Array, length: int, weights: jax.Array | None = None) -> jax.Array:
  """``jnp.bincount(cells, weights, length=length)`` for cells that most tokens share: each
  cell is kept in ``_COPIES`` copies, token ``u`` adding to copy ``u mod _COPIES``. XLA's CPU
  ``bincount`` adds token by token, and additions to one cell each wait for the last (3x
  slower when most tokens fall in one cell, as below every threshold)."""
  spread = cells * _COPIES + (jnp.arange(cells.shape[-1], dtype=cells.dtype) & (_COPIES - 1))
  counts = jnp.bincount(spread, weights=weights, length=length * _COPIES)
  return jnp.sum(counts.reshape(length, _COPIES), axis=-1)


def threshold_stats(x: jax.Array, alive: jax.Array, thresholds: jax.Array,
                    columns: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """Sums of each column over ``{u : alive_u and x_u ≥ θ_s}`` for every threshold ``θ_s``.

  Each token's number of passed thresholds (sorted), then one :func:`histogram` per column
  over ``S + 1`` cells and suffix sums: about the same cost for any ``S`` (on CPU over
  [32, 262144]: 12 ms at 8 thresholds, 21 at 64; one masked sum per threshold took 21 ms at 8).
  Returns one ``[S]`` array per column.
  """
  n = thresholds.shape[0]
  order = jnp.argsort(thresholds)
  th = thresholds[order]
  passed = sum((th[j] <= x).astype(jnp.int32) for j in range(n))
  passed = jnp.where(alive, passed, 0)
  rank = jnp.argsort(order)  # position of each original threshold in sorted order
  out = []
  for col in columns:
    hist = histogram(passed, n + 1, col)
    suffix = jnp.cumsum(hist[::-1])[::-1]  # suffix[i] = Σ_{passed >= i}
    out.append(suffix[1:][rank])          # sorted threshold i is passed by `passed >= i+1`
  return tuple(out)


_JOINT_CELLS = 8192  # a larger joint grid: one histogram per score


def joint_threshold_stats(xs: tuple[jax.Array, ...], alive: jax.Array,
                          thresholds: tuple[jax.Array, ...], weights: jax.Array,
                          part: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
  """:func:`threshold_stats` of one weight column for several scores at once, split in two
  by ``part``: for each score ``xs[i]`` and each of its thresholds ``θ``, ``(Σ weights over
  {u : alive_u, xs[i]_u ≥ θ, not part_u}, the same over part_u)``, ``[S_i]`` each.

  Each token's numbers of passed thresholds (one per score) and its part make one cell of a
  joint grid, and one :func:`histogram` over the grid serves every score and both parts (a
  ``bincount`` per score and column otherwise: the samplers' pass made four per temperature)."""
  if len(xs) > 1 and math.prod(th.shape[0] + 1 for th in thresholds) > _JOINT_CELLS:
    return [out for i in range(len(xs)) for out in joint_threshold_stats(
        xs[i:i + 1], alive, thresholds[i:i + 1], weights, part)]
  cells, sizes = jnp.zeros(weights.shape, jnp.int32), []
  order = [jnp.argsort(th) for th in thresholds]
  for x, th, o in zip(xs, thresholds, order):
    th = th[o]
    passed = sum((th[j] <= x).astype(jnp.int32) for j in range(th.shape[0]))
    cells = cells + passed * math.prod(sizes)
    sizes.append(th.shape[0] + 1)
  grid = math.prod(sizes)
  cells = jnp.where(alive, cells + grid * part.astype(jnp.int32), 0)
  hist = histogram(cells, 2 * grid, weights).reshape([2] + sizes[::-1])
  out = []
  for i, o in enumerate(order):
    axis = len(sizes) - i  # score i's axis (the grid is stored last score first)
    marginal = jnp.sum(hist, axis=tuple(k for k in range(1, len(sizes) + 1) if k != axis))
    suffix = jnp.cumsum(marginal[:, ::-1], axis=-1)[:, ::-1]  # [2, n + 1]: Σ over passed >= i
    at = suffix[:, 1:][:, jnp.argsort(o)]
    out.append((at[0], at[1]))
  return out

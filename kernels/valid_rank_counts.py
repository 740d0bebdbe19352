"""Valid-rank counting: for each of ``C`` reference logits per row (the row's valid logits,
sorted, ``+inf`` padded), the number of tokens ranked strictly above it and tied with it, and
their probability mass — the primitive behind AUROC, average precision, the clean head,
``k_all_valid`` and the oracle cutoffs.

Per row, with constants ``(T, top, total)``: ``p = exp((z − top) / T) / total`` (``top`` =
max z, ``total`` = Σ exp((z − top) / T)). For each slot ``j``:
``gt[j] = #{u : z_u > s_j}``, ``eq[j] = #{u : z_u = s_j}``, ``gt_mass[j] = Σ_{z_u > s_j} p_u``,
``eq_mass[j] = Σ_{z_u = s_j} p_u``. Comparisons are on the raw logits ``z``, so the counts are
exact integers whatever the temperature.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from calibjax_kernels import blocks


class RankCounts(NamedTuple):
  gt: jax.Array       # [B, C] int32
  eq: jax.Array       # [B, C] int32
  gt_mass: jax.Array  # [B, C] float32
  eq_mass: jax.Array  # [B, C] float32


def _probs(z, consts):
  t, top, total = consts  # [rows, 1] each
  return jnp.exp((z - top) / t) / total


def _columns(consts):
  return tuple(consts[:, k:k + 1] for k in range(3))


def _step(acc, tiles, rows, inside):
  """Adds one block's tokens above and tied with every slot, and their mass."""
  *consts, s = rows
  z = tiles[0].astype(jnp.float32)
  p = jnp.where(inside, _probs(z, consts), 0.0)[:, None, :]
  s = s[:, :, None]
  inside = inside[:, None, :]
  above = inside & (z[:, None, :] > s)   # [rows, C, bv]
  tied = inside & (z[:, None, :] == s)
  new = (jnp.sum(above.astype(jnp.int32), axis=-1), jnp.sum(tied.astype(jnp.int32), axis=-1),
         jnp.sum(jnp.where(above, p, 0.0), axis=-1), jnp.sum(jnp.where(tied, p, 0.0), axis=-1))
  return tuple(old + inc for old, inc in zip(acc, new))


@functools.partial(jax.jit, static_argnames=("variant", "block_rows", "block_vocab", "interpret"))
def valid_rank_counts(z: jax.Array, slots: jax.Array, consts: jax.Array, *,
                      variant: str = "grid", block_rows: int | None = None,
                      block_vocab: int = 256, interpret: bool = False) -> RankCounts:
  """Counts and masses of ``z [B, V]`` (float32/bfloat16) above and at ``slots [B, C]``.

  ``consts``: float32 ``[B, 3]`` = (T, top, total) per row (module doc); ``variant``,
  ``block_rows`` (None: the variant's default), ``block_vocab``: see :mod:`calibjax_kernels.blocks`.
  """
  n = slots.shape[-1]
  rows = [*_columns(consts.astype(jnp.float32)), slots.astype(jnp.float32)]
  outs = blocks.stream(_step, [z], rows,
                       [(n, d, 0) for d in (jnp.int32, jnp.int32, jnp.float32, jnp.float32)],
                       variant=variant, block_rows=block_rows, block_vocab=block_vocab,
                       interpret=interpret)
  return RankCounts(*outs)


@jax.jit
def valid_rank_counts_reference(z: jax.Array, slots: jax.Array, consts: jax.Array) -> RankCounts:
  """The same counts in plain jnp: one masked reduction over the whole row per slot."""
  z = z.astype(jnp.float32)
  p = _probs(z, _columns(consts.astype(jnp.float32)))

  def at(s):  # [B] one slot of every row
    above, tied = z > s[:, None], z == s[:, None]
    return (jnp.sum(above, axis=-1, dtype=jnp.int32), jnp.sum(tied, axis=-1, dtype=jnp.int32),
            jnp.sum(jnp.where(above, p, 0.0), axis=-1), jnp.sum(jnp.where(tied, p, 0.0), axis=-1))

  return RankCounts(*(c.T for c in jax.lax.map(at, slots.astype(jnp.float32).T)))

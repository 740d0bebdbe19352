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
from jax.experimental import pallas as pl

from kernels import blocks

T, TOP, TOTAL = range(3)


class RankCounts(NamedTuple):
  gt: jax.Array       # [B, C] int32
  eq: jax.Array       # [B, C] int32
  gt_mass: jax.Array  # [B, C] float32
  eq_mass: jax.Array  # [B, C] float32


def _probs(z, consts):
  col = lambda k: consts[:, k:k + 1]
  return jnp.exp((z - col(TOP)) / col(T)) / col(TOTAL)


def _kernel(z_ref, c_ref, s_ref, gt_ref, eq_ref, gtm_ref, eqm_ref, *, vocab, bv):
  outs = (gt_ref, eq_ref, gtm_ref, eqm_ref)

  @pl.when(blocks.first_step())
  def _init():
    for r in outs:
      r[...] = jnp.zeros(r.shape, r.dtype)

  inside = blocks.in_bounds(z_ref.shape, vocab, bv)[:, None, :]
  z = z_ref[...].astype(jnp.float32)
  p = jnp.where(inside[:, 0, :], _probs(z, c_ref[...]), 0.0)[:, None, :]
  s = s_ref[...][:, :, None]
  above = inside & (z[:, None, :] > s)   # [rows, C, bv]
  tied = inside & (z[:, None, :] == s)
  gt_ref[...] += jnp.sum(above.astype(jnp.int32), axis=-1)
  eq_ref[...] += jnp.sum(tied.astype(jnp.int32), axis=-1)
  gtm_ref[...] += jnp.sum(jnp.where(above, p, 0.0), axis=-1)
  eqm_ref[...] += jnp.sum(jnp.where(tied, p, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("block_rows", "block_vocab", "interpret"))
def valid_rank_counts(z: jax.Array, slots: jax.Array, consts: jax.Array, *,
                      block_rows: int = blocks.ROWS, block_vocab: int = 256,
                      interpret: bool = False) -> RankCounts:
  """Counts and masses of ``z [B, V]`` (float32/bfloat16) above and at ``slots [B, C]``.

  ``consts``: float32 ``[B, 3]`` = (T, top, total) per row (module doc).
  """
  batch, vocab = z.shape
  n = slots.shape[-1]
  bb, bv = blocks.block_rows(batch, block_rows), blocks.block_vocab(vocab, block_vocab)
  dtypes = (jnp.int32, jnp.int32, jnp.float32, jnp.float32)
  outs = pl.pallas_call(
      functools.partial(_kernel, vocab=vocab, bv=bv),
      grid=blocks.grid(batch, vocab, bb, bv),
      in_specs=[blocks.tile_spec(bb, bv), blocks.row_spec(bb, 3), blocks.row_spec(bb, n)],
      out_specs=[blocks.row_spec(bb, n)] * 4,
      out_shape=[jax.ShapeDtypeStruct((batch, n), d) for d in dtypes],
      interpret=interpret)(z, consts.astype(jnp.float32), slots.astype(jnp.float32))
  return RankCounts(*outs)


@jax.jit
def valid_rank_counts_reference(z: jax.Array, slots: jax.Array, consts: jax.Array) -> RankCounts:
  """The same counts in plain jnp: one masked reduction over the whole row per slot."""
  z = z.astype(jnp.float32)
  p = _probs(z, consts)

  def at(s):  # [B] one slot of every row
    above, tied = z > s[:, None], z == s[:, None]
    return (jnp.sum(above, axis=-1, dtype=jnp.int32), jnp.sum(tied, axis=-1, dtype=jnp.int32),
            jnp.sum(jnp.where(above, p, 0.0), axis=-1), jnp.sum(jnp.where(tied, p, 0.0), axis=-1))

  return RankCounts(*(c.T for c in jax.lax.map(at, slots.astype(jnp.float32).T)))

"""Threshold statistics: for ``S`` thresholds per row, the count and mass of tokens whose score
is at or above each one (and, with a valid mask, their valid count, valid mass and valid
``Σ p log p``), in one pass over ``[B, V]`` logits — the primitive behind exact threshold search
and whole parameter sweeps for every truncation rule.

Per row, from ``a = z / T`` and per-row constants ``(T, top, total, c₁, c₂, c₃)``:

- probability ``p = exp(a − top) / total`` (``top`` = max a, ``total`` = Σ exp(a − top));
- score, by ``score`` (static):
  ``"logit"``: ``x = (a − c₁) − c₂`` (``c₁ = c₂ = 0``: the scaled logit; ``c₁ = top``: log of
  ``p / max p``; ``c₂ = log total`` too: ``log p``);
  ``"typical"``: ``x = −|−((a − c₁) − c₂) − c₃|`` (with ``c₃`` = the entropy: locally typical);
  ``"valid_or_top"``: ``x = [valid] + ½·[a = c₁]`` (the oracle set, its top tokens marked).

Only tokens with ``a > −inf`` count. Each score is computed with the very operations of the
array core's rules, so the comparisons ``x ≥ θ`` are bit-identical to its XLA path. Counts are
int32; sums float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import blocks

SCORES = ("logit", "typical", "valid_or_top")
# columns of the per-row constants array [B, 6]
T, TOP, TOTAL, C1, C2, C3 = range(6)


class ThresholdStats(NamedTuple):
  count: jax.Array               # [B, S] int32, alive tokens with x ≥ θ
  mass: jax.Array                # [B, S] float32, their Σ p
  valid_count: jax.Array | None  # [B, S] int32
  valid_mass: jax.Array | None   # [B, S] float32
  valid_plogp: jax.Array | None  # [B, S] float32, Σ p log p over kept valid tokens


def scores(z, consts, mask, score):
  """``(a, x, p)`` of a tile: scaled logits, scores and probabilities (see the module doc)."""
  col = lambda k: consts[:, k:k + 1]
  a = z.astype(jnp.float32) / col(T)
  if score == "logit":
    x = a - col(C1) - col(C2)
  elif score == "typical":
    x = jnp.where(a > -jnp.inf, -jnp.abs(-(a - col(C1) - col(C2)) - col(C3)), -jnp.inf)
  elif score == "valid_or_top":
    x = mask.astype(jnp.float32) + 0.5 * (a == col(C1))
  else:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
  return a, x, jnp.exp(a - col(TOP)) / col(TOTAL)


def _kernel(z_ref, c_ref, th_ref, *refs, vocab, bv, score, masked):
  m_ref, outs = (refs[0], refs[1:]) if masked else (None, refs)

  @pl.when(blocks.first_step())
  def _init():
    for r in outs:
      r[...] = jnp.zeros(r.shape, r.dtype)

  inside = blocks.in_bounds(z_ref.shape, vocab, bv)
  valid = (m_ref[...] != 0) if masked else None
  a, x, p = scores(z_ref[...], c_ref[...], valid, score)
  alive = inside & (a > -jnp.inf)
  kept = alive[:, None, :] & (x[:, None, :] >= th_ref[...][:, :, None])  # [rows, S, bv]
  total = lambda w: jnp.sum(jnp.where(kept, w[:, None, :], 0.0), axis=-1)
  count = lambda k: jnp.sum(k.astype(jnp.int32), axis=-1)
  outs[0][...] += count(kept)
  outs[1][...] += total(p)
  if masked:
    kv = kept & valid[:, None, :]
    pv = jnp.where(valid & alive, p, 0.0)
    outs[2][...] += count(kv)
    outs[3][...] += total(pv)
    outs[4][...] += total(jnp.where(pv > 0, pv * jnp.log(pv), 0.0))


@functools.partial(jax.jit, static_argnames=("score", "block_rows", "block_vocab", "interpret"))
def threshold_stats(z: jax.Array, mask: jax.Array | None, consts: jax.Array,
                    thresholds: jax.Array, *, score: str = "logit",
                    block_rows: int = blocks.ROWS, block_vocab: int = 512,
                    interpret: bool = False) -> ThresholdStats:
  """Threshold statistics of ``z [B, V]`` (float32/bfloat16) at ``thresholds [B, S]``.

  ``consts``: float32 ``[B, 6]`` = (T, top, total, c₁, c₂, c₃) per row (module doc);
  ``mask``: optional bool ``[B, V]`` (required by ``score="valid_or_top"``).
  """
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
  if score == "valid_or_top" and mask is None:
    raise ValueError("score='valid_or_top' needs a mask.")
  batch, vocab = z.shape
  n = thresholds.shape[-1]
  bb, bv = blocks.block_rows(batch, block_rows), blocks.block_vocab(vocab, block_vocab)
  masked = mask is not None
  args = [z, consts.astype(jnp.float32), thresholds.astype(jnp.float32)]
  specs = [blocks.tile_spec(bb, bv), blocks.row_spec(bb, 6), blocks.row_spec(bb, n)]
  if masked:
    args.append(blocks.as_int8(mask))
    specs.append(blocks.tile_spec(bb, bv))
  dtypes = [jnp.int32, jnp.float32] + ([jnp.int32, jnp.float32, jnp.float32] if masked else [])
  outs = pl.pallas_call(
      functools.partial(_kernel, vocab=vocab, bv=bv, score=score, masked=masked),
      grid=blocks.grid(batch, vocab, bb, bv), in_specs=specs,
      out_specs=[blocks.row_spec(bb, n)] * len(dtypes),
      out_shape=[jax.ShapeDtypeStruct((batch, n), d) for d in dtypes],
      interpret=interpret)(*args)
  return ThresholdStats(*outs, *([None] * (5 - len(outs))))


@functools.partial(jax.jit, static_argnames=("score",))
def threshold_stats_reference(z: jax.Array, mask: jax.Array | None, consts: jax.Array,
                              thresholds: jax.Array, *, score: str = "logit") -> ThresholdStats:
  """The same sums in plain jnp: one masked reduction over the whole row per threshold."""
  a, x, p = scores(z, consts, mask, score)
  alive = a > -jnp.inf

  def at(theta):  # [B] threshold -> sums over the kept tokens
    kept = alive & (x >= theta[:, None])
    out = [jnp.sum(kept, axis=-1, dtype=jnp.int32), jnp.sum(jnp.where(kept, p, 0.0), axis=-1)]
    if mask is not None:
      kv = kept & mask
      out += [jnp.sum(kv, axis=-1, dtype=jnp.int32), jnp.sum(jnp.where(kv, p, 0.0), axis=-1),
              jnp.sum(jnp.where(kv & (p > 0), p * jnp.log(p), 0.0), axis=-1)]
    return out

  cols = jax.lax.map(at, thresholds.T)  # each [S, B]
  return ThresholdStats(*(c.T for c in cols), *([None] * (5 - len(cols))))

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

from calibjax_kernels import blocks

SCORES = ("logit", "typical", "valid_or_top")


class ThresholdStats(NamedTuple):
  count: jax.Array               # [B, S] int32, alive tokens with x ≥ θ
  mass: jax.Array                # [B, S] float32, their Σ p
  valid_count: jax.Array | None  # [B, S] int32
  valid_mass: jax.Array | None   # [B, S] float32
  valid_plogp: jax.Array | None  # [B, S] float32, Σ p log p over kept valid tokens


def scores(z, consts, mask, score):
  """``(a, x, p)`` of a tile: scaled logits, scores and probabilities (see the module doc).
  ``consts``: the six per-row constants, each ``[rows, 1]``."""
  t, top, total, c1, c2, c3 = consts
  a = z.astype(jnp.float32) / t
  if score == "logit":
    x = a - c1 - c2
  elif score == "typical":
    x = jnp.where(a > -jnp.inf, -jnp.abs(-(a - c1 - c2) - c3), -jnp.inf)
  elif score == "valid_or_top":
    x = mask.astype(jnp.float32) + 0.5 * (a == c1)
  else:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
  return a, x, jnp.exp(a - top) / total


def _columns(consts):
  return tuple(consts[:, k:k + 1] for k in range(6))


def _step(acc, tiles, rows, inside, *, score):
  """Adds one block's kept counts and sums at every threshold."""
  valid = (tiles[1] != 0) if len(tiles) == 2 else None
  *consts, th = rows
  a, x, p = scores(tiles[0], consts, valid, score)
  alive = inside & (a > -jnp.inf)
  kept = alive[:, None, :] & (x[:, None, :] >= th[:, :, None])  # [rows, S, bv]
  total = lambda w: jnp.sum(jnp.where(kept, w[:, None, :], 0.0), axis=-1)
  count = lambda k: jnp.sum(k.astype(jnp.int32), axis=-1)
  new = [count(kept), total(p)]
  if valid is not None:
    pv = jnp.where(valid & alive, p, 0.0)
    new += [count(kept & valid[:, None, :]), total(pv),
            total(jnp.where(pv > 0, pv * jnp.log(pv), 0.0))]
  return tuple(old + inc for old, inc in zip(acc, new))


@functools.partial(jax.jit, static_argnames=("score", "variant", "block_rows", "block_vocab",
                                             "interpret"))
def threshold_stats(z: jax.Array, mask: jax.Array | None, consts: jax.Array,
                    thresholds: jax.Array, *, score: str = "logit", variant: str = "grid",
                    block_rows: int | None = None, block_vocab: int = 512,
                    interpret: bool = False) -> ThresholdStats:
  """Threshold statistics of ``z [B, V]`` (float32/bfloat16) at ``thresholds [B, S]``.

  ``consts``: float32 ``[B, 6]`` = (T, top, total, c₁, c₂, c₃) per row (module doc);
  ``mask``: optional bool ``[B, V]`` (required by ``score="valid_or_top"``); ``variant``,
  ``block_rows`` (None: the variant's default), ``block_vocab``: see :mod:`calibjax_kernels.blocks`.
  """
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
  if score == "valid_or_top" and mask is None:
    raise ValueError("score='valid_or_top' needs a mask.")
  n = thresholds.shape[-1]
  tiles = [z] if mask is None else [z, blocks.as_int8(mask)]
  rows = [*_columns(consts.astype(jnp.float32)), thresholds.astype(jnp.float32)]
  dtypes = [jnp.int32, jnp.float32] + ([jnp.int32, jnp.float32, jnp.float32] if mask is not None
                                       else [])
  outs = blocks.stream(functools.partial(_step, score=score), tiles, rows,
                       [(n, d, 0) for d in dtypes], variant=variant, block_rows=block_rows,
                       block_vocab=block_vocab, interpret=interpret)
  return ThresholdStats(*outs, *([None] * (5 - len(outs))))


@functools.partial(jax.jit, static_argnames=("score",))
def threshold_stats_reference(z: jax.Array, mask: jax.Array | None, consts: jax.Array,
                              thresholds: jax.Array, *, score: str = "logit") -> ThresholdStats:
  """The same sums in plain jnp: one masked reduction over the whole row per threshold."""
  a, x, p = scores(z, _columns(consts.astype(jnp.float32)), mask, score)
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

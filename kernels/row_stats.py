"""Fused row statistics: one pass over ``[B, V]`` logits gives, per row of ``a = z / T``,

- ``max`` = max a, ``logsumexp`` = log Σ exp a, ``entropy`` = H(softmax a) in nats,
- with a valid mask: ``valid_mass`` = p(V) and ``valid_entropy`` = H of p restricted to the
  valid set and renormalised.

The kernel streams the softmax over vocabulary blocks (online rescaling): per row it keeps the
running maximum ``μ``, ``S = Σ exp(a − μ)`` and ``W = Σ exp(a − μ)(a − μ)``; a new maximum μ'
rescales ``S ← S·e^{μ−μ'}`` and ``W ← e^{μ−μ'}(W + (μ − μ')S)``. Then ``log Σ e^a = μ + log S``
and ``H = log S − W / S``. The same three accumulators run over the valid tokens. ``-inf``
logits contribute nothing; a row without a finite logit has ``logsumexp = -inf`` and NaN
entropy; a row without a valid token has ``valid_mass = 0`` and NaN ``valid_entropy``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from calibjax_kernels import blocks


class RowStats(NamedTuple):
  max: jax.Array             # [B] float32
  logsumexp: jax.Array       # [B]
  entropy: jax.Array         # [B]
  valid_mass: jax.Array | None     # [B]; None without a mask
  valid_entropy: jax.Array | None  # [B]


def _finish(mu, s, w):
  """(max, log Σ e^a, entropy) from the accumulators."""
  log_s = jnp.log(s)
  return mu, mu + log_s, log_s - w / s


def _combine(stats, valid):
  """RowStats from the (μ, S, W) accumulators of all tokens and of the valid ones."""
  mu, lse, h = _finish(*stats)
  if valid is None:
    return RowStats(mu, lse, h, None, None)
  mu_v, lse_v, h_v = _finish(*valid)
  return RowStats(mu, lse, h, jnp.exp(lse_v - lse), h_v)


def _accumulate(x):
  """(μ, S, W) of one block of rows, ``x [rows, n]`` (-inf entries contribute nothing)."""
  mu = jnp.max(x, axis=-1, keepdims=True)
  d = x - jnp.where(mu == -jnp.inf, 0.0, mu)
  e = jnp.exp(d)
  return mu, jnp.sum(e, axis=-1, keepdims=True), jnp.sum(jnp.where(e > 0, e * d, 0.0), axis=-1,
                                                         keepdims=True)


def _merge(old, new):
  """Online-softmax merge of two (μ, S, W) partial results."""
  (mu0, s0, w0), (mu1, s1, w1) = old, new
  mu = jnp.maximum(mu0, mu1)
  safe = jnp.where(mu == -jnp.inf, 0.0, mu)
  def part(m, s, w):
    scale = jnp.exp(m - safe)
    return s * scale, jnp.where(s > 0, scale * (w + (m - safe) * s), 0.0)
  (sa, wa), (sb, wb) = part(mu0, s0, w0), part(mu1, s1, w1)
  return mu, sa + sb, wa + wb


def _step(acc, tiles, rows, inside):
  """Merges one block into (μ, S, W) of all tokens and, with a mask, of the valid ones."""
  (t,) = rows
  a = jnp.where(inside, tiles[0].astype(jnp.float32) / t, -jnp.inf)
  xs = (a, jnp.where(tiles[1] != 0, a, -jnp.inf)) if len(tiles) == 2 else (a,)
  merged = ()
  for k, x in enumerate(xs):
    merged += _merge(acc[3 * k:3 * k + 3], _accumulate(x))
  return merged


@functools.partial(jax.jit, static_argnames=("variant", "block_rows", "block_vocab", "interpret"))
def row_stats(z: jax.Array, mask: jax.Array | None, temperature: jax.Array, *,
              variant: str = "grid", block_rows: int | None = None, block_vocab: int = 2048,
              interpret: bool = False) -> RowStats:
  """Fused row statistics of ``z [B, V]`` (float32 or bfloat16, upcast in the kernel).

  ``mask``: optional bool ``[B, V]``; ``temperature``: float32 ``[B]``, > 0; ``variant``,
  ``block_rows`` (None: the variant's default), ``block_vocab``: see :mod:`calibjax_kernels.blocks`.
  """
  batch = z.shape[0]
  tiles = [z] if mask is None else [z, blocks.as_int8(mask)]
  acc = [(1, jnp.float32, -jnp.inf), (1, jnp.float32, 0.0), (1, jnp.float32, 0.0)]
  outs = blocks.stream(_step, tiles, [jnp.asarray(temperature, jnp.float32).reshape(batch, 1)],
                       acc * len(tiles), variant=variant, block_rows=block_rows,
                       block_vocab=block_vocab, interpret=interpret)
  outs = [o[:, 0] for o in outs]
  return _combine(outs[:3], outs[3:] if mask is not None else None)


@jax.jit
def row_stats_reference(z: jax.Array, mask: jax.Array | None,
                        temperature: jax.Array) -> RowStats:
  """The same statistics in plain jnp, whole rows at once (float32, no streaming)."""
  a = z.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)[:, None]

  def stats(x):
    lse = jax.nn.logsumexp(x, axis=-1)
    log_p = x - lse[:, None]
    p = jnp.exp(log_p)
    h = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
    return jnp.max(x, axis=-1), lse, jnp.where(lse > -jnp.inf, h, jnp.nan)

  mu, lse, h = stats(a)
  if mask is None:
    return RowStats(mu, lse, h, None, None)
  _, lse_v, h_v = stats(jnp.where(mask, a, -jnp.inf))
  return RowStats(mu, lse, h, jnp.exp(lse_v - lse), h_v)

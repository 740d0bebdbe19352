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
from jax.experimental import pallas as pl

from kernels import blocks


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


def _kernel(z_ref, t_ref, *refs, vocab, bv, masked):
  if masked:
    m_ref, refs = refs[0], refs[1:]
  outs = (refs[:3], refs[3:]) if masked else (refs,)

  @pl.when(blocks.first_step())
  def _init():
    for mu, s, w in outs:
      mu[...] = jnp.full(mu.shape, -jnp.inf, jnp.float32)
      s[...] = jnp.zeros(s.shape, jnp.float32)
      w[...] = jnp.zeros(w.shape, jnp.float32)

  inside = blocks.in_bounds(z_ref.shape, vocab, bv)
  a = jnp.where(inside, z_ref[...].astype(jnp.float32) / t_ref[...], -jnp.inf)
  xs = (a, jnp.where(m_ref[...] != 0, a, -jnp.inf)) if masked else (a,)
  for (mu, s, w), x in zip(outs, xs):
    mu[...], s[...], w[...] = _merge((mu[...], s[...], w[...]), _accumulate(x))


@functools.partial(jax.jit, static_argnames=("block_rows", "block_vocab", "interpret"))
def row_stats(z: jax.Array, mask: jax.Array | None, temperature: jax.Array, *,
              block_rows: int = blocks.ROWS, block_vocab: int = 2048,
              interpret: bool = False) -> RowStats:
  """Fused row statistics of ``z [B, V]`` (float32 or bfloat16, upcast in the kernel).

  ``mask``: optional bool ``[B, V]``; ``temperature``: float32 ``[B]``, > 0.
  """
  batch, vocab = z.shape
  bb, bv = blocks.block_rows(batch, block_rows), blocks.block_vocab(vocab, block_vocab)
  masked = mask is not None
  args = [z, jnp.asarray(temperature, jnp.float32).reshape(batch, 1)]
  specs = [blocks.tile_spec(bb, bv), blocks.row_spec(bb, 1)]
  if masked:
    args.append(blocks.as_int8(mask))
    specs.append(blocks.tile_spec(bb, bv))
  n_out = 6 if masked else 3
  outs = pl.pallas_call(
      functools.partial(_kernel, vocab=vocab, bv=bv, masked=masked),
      grid=blocks.grid(batch, vocab, bb, bv), in_specs=specs,
      out_specs=[blocks.row_spec(bb, 1)] * n_out,
      out_shape=[jax.ShapeDtypeStruct((batch, 1), jnp.float32)] * n_out,
      interpret=interpret)(*args)
  outs = [o[:, 0] for o in outs]
  return _combine(outs[:3], outs[3:] if masked else None)


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

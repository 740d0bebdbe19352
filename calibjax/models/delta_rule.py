"""The gated delta rule of Gated DeltaNet layers (Qwen3.5's linear attention) and their short
causal convolution: pure functions over arrays, float32 inside.

Per value head, a state ``S [dk, dv]`` is carried along the sequence; token ``t`` with query
``q``, key ``k`` (both L2-normalised, ``q`` scaled by ``dk^-1/2``), value ``v``, decay
``g ≤ 0`` (log space) and write strength ``β ∈ (0, 1)`` does

    S ← e^g S;   S ← S + k (β (v − Sᵀk))ᵀ;   o = Sᵀ q.

:func:`gated_delta_rule` computes this in chunks of ``C`` tokens (the "UT transform" of the
reference implementation, ``transformers``' ``torch_chunk_gated_delta_rule``): within a chunk
everything is matrix products plus one unit-triangular solve, and a ``lax.scan`` carries
``S`` from chunk to chunk. A call of one token (decoding) is a chunk of one: exactly the
recurrent step above, O(1) state whatever the context length. A token with ``g = β = 0``
changes nothing (how padding is skipped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalise(x, eps: float = 1e-6):
  """``x / sqrt(Σx² + eps)`` over the last axis (the reference's ``l2norm``)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gated_delta_rule(q, k, v, g, beta, state, chunk: int = 64):
  """Outputs and final state of the gated delta rule.

  Args:
    q, k: ``[B, T, H, dk]`` (already normalised and scaled); v: ``[B, T, H, dv]``;
    g, beta: ``[B, T, H]``; state: ``[B, H, dk, dv]`` (the state before the first token);
    chunk: tokens per chunk (``min(chunk, T)`` is used; ``T`` is padded to a multiple).

  Returns:
    ``(o [B, T, H, dv], state [B, H, dk, dv])``, float32.
  """
  f32 = jnp.float32
  q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
  b, t, h, dk = k.shape
  dv = v.shape[-1]
  c = min(chunk, t)
  pad = -t % c
  n = (t + pad) // c

  def chunks(x):  # [B, T, H, ...] -> [N, B, H, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, c) + x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

  q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
  cum = jnp.cumsum(g, axis=-1)  # [N, B, H, C]: log decay since the chunk's start
  lower = jnp.tril(jnp.ones((c, c), bool))
  gap = cum[..., :, None] - cum[..., None, :]
  decay = jnp.where(lower, jnp.exp(jnp.where(lower, gap, 0.0)), 0.0)  # e^(cum_i − cum_j), j ≤ i
  kb, vb = k * beta[..., None], v * beta[..., None]
  strict = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), kb @ jnp.swapaxes(k, -1, -2) * decay,
                     0.0)
  system = strict + jnp.eye(c, dtype=f32)
  solve = lambda rhs: jax.lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True,
                                                      unit_diagonal=True)
  u = solve(vb)  # the values to write, before the old state's prediction is removed
  w = solve(kb * jnp.exp(cum)[..., None])  # the keys that read the old state
  attn = q @ jnp.swapaxes(k, -1, -2) * decay
  q_decayed = q * jnp.exp(cum)[..., None]
  k_decayed = k * jnp.exp(cum[..., -1:] - cum)[..., None]
  chunk_decay = jnp.exp(cum[..., -1])[..., None, None]

  def step(s, xs):
    u, w, attn, qd, kd, cd = xs
    fresh = u - w @ s
    out = qd @ s + attn @ fresh
    return s * cd + jnp.swapaxes(kd, -1, -2) @ fresh, out

  state, out = jax.lax.scan(step, state.astype(f32),
                            (u, w, attn, q_decayed, k_decayed, chunk_decay))
  out = jnp.moveaxis(jnp.moveaxis(out, 3, 2), 0, 1).reshape(b, n * c, h, dv)[:, :t]
  return out, state


def causal_conv(x, tail, weight):
  """Depthwise causal convolution of ``x [B, T, C]`` after the cached inputs ``tail
  [B, K-1, C]`` with ``weight [K, C]`` (tap ``K-1`` on the current token):
  ``y_t = Σ_j w_j · x_{t-K+1+j}``."""
  taps = weight.shape[0]
  xs = jnp.concatenate([tail.astype(x.dtype), x], axis=1)
  t = x.shape[1]
  return sum(xs[:, j:j + t] * weight[j].astype(x.dtype) for j in range(taps))


def conv_tail(x, tail, mask):
  """The convolution's next cached inputs: each row's last ``K-1`` real inputs (``mask``), the
  old tail continuing where a row has fewer than ``K-1`` new ones."""
  xs = jnp.concatenate([tail.astype(x.dtype), x], axis=1)
  last = jnp.max(jnp.where(mask, jnp.arange(x.shape[1]), -1), axis=1)  # -1: no real token
  at = last[:, None] + 1 + jnp.arange(tail.shape[1])
  return jnp.take_along_axis(xs, at[:, :, None], axis=1)

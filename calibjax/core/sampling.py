"""Drawing a token from a whole-vocabulary distribution (SPEC §7), tail-faithful and cheap.

One Gumbel-max draw over ``V`` logits needs ``V`` random numbers per row — in JAX's
high-dynamic-range mode (needed to reach probabilities far below 1e-7) twice the random bits:
for 256 rows of 262,144 tokens, ~2.4 s on a 2-core CPU, more than the truncation and the
model's decoding step together. :func:`categorical` draws in two stages instead: a block of
``block`` consecutive tokens by its log-mass, then a token inside that block, each stage a
high-dynamic-range Gumbel-max. ``P(token) = P(block) · P(token | block)``: the same
distribution, with ``2·√V`` random numbers per row. Block log-masses are log-sum-exps (no
underflow), so no tail probability is lost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def categorical(key: jax.Array, logits: jax.Array, block: int = 512) -> jax.Array:
  """One draw per row from ``softmax(logits [B, V])`` (``−inf``: never drawn): int32 ``[B]``.

  Same key and inputs, same draws, on any backend."""
  rows, v = logits.shape
  z = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, -v % block)),
              constant_values=-jnp.inf).reshape(rows, -1, block)
  top = jnp.max(z, axis=-1)
  finite = jnp.where(jnp.isfinite(top), top, 0.0)
  log_mass = finite + jnp.log(jnp.sum(jnp.exp(z - finite[..., None]), axis=-1))
  outer, inner = jax.random.split(key)
  chosen = jax.random.categorical(outer, log_mass, axis=-1, mode="high")
  within = jnp.take_along_axis(z, chosen[:, None, None], axis=1)[:, 0]
  return (chosen * block + jax.random.categorical(inner, within, axis=-1, mode="high")
          ).astype(jnp.int32)

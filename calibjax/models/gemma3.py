"""Gemma 3 text decoder in Flax NNX, with a static-shape KV cache.

The architecture of the reference implementation: embeddings scaled by ``sqrt(d)``; RMSNorm
``x / rms(x) · (1 + w)`` in float32; grouped-query attention with RMS-normalised queries and
keys (QK-norm), rotary embeddings (rotate-half) with one base for the sliding-window layers
and another (optionally linearly scaled) for the global ones, every ``sliding_pattern``-th
layer global; norms before and after attention and before and after the gated-GELU (tanh)
MLP; a final norm and the output projection tied to the embedding.

One code path serves the full forward and cached decoding: a call writes its tokens into the
cache at ``cache.index`` and attends over the whole (static) cache, masking by the stored
positions. Positions count real tokens only (``cumsum(mask) − 1``), so left and right padding
both give each sequence exactly its unpadded result.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Dimensions and constants; read from checkpoint metadata (see ``calibjax.models.gguf``)."""
  vocab_size: int
  hidden: int
  layers: int
  ffn: int
  heads: int
  kv_heads: int
  head_dim: int
  eps: float
  sliding_window: int
  rope_global: float
  rope_local: float = 10_000.0
  rope_global_scale: float = 1.0
  sliding_pattern: int = 6
  query_pre_attn_scalar: float | None = None  # None: head_dim
  context_length: int = 32_768

  def is_global(self, layer: int) -> bool:
    return (layer + 1) % self.sliding_pattern == 0

  @property
  def scaling(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


@struct.dataclass
class KVCache:
  """Per layer keys/values ``[B, S, KV, hd]`` (tuples of L arrays: a step updates each in
  place without copying the others), the position of each slot ``[B, S]`` (−1: empty or
  padding) and the next slot to write."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pos: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, cfg: Gemma3Config, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
    shape = (batch, size, cfg.kv_heads, cfg.head_dim)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.layers)),
               pos=jnp.full((batch, size), -1, jnp.int32), index=jnp.zeros((), jnp.int32))


def _param(rngs, shape, axes, scale=0.02):
  """A weight annotated with logical axis names (``logical_axes`` metadata): ``"vocab"``,
  ``"embed"``, ``"heads"``, ``"mlp"``. :func:`calibjax.core.sharding.param_shardings` maps them onto
  a mesh (FSDP over ``"data"`` for ``"embed"``, tensor parallel over ``"model"`` for the
  rest). Not NNX's ``out_sharding``, which NNX applies by itself under any mesh in context
  (and fails where the mesh lacks an axis); placement here is explicit, at load time."""
  value = jax.random.normal(rngs.params(), shape, jnp.float32) * scale
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def inv_freq(base: float, hd: int) -> np.ndarray:
  """RoPE inverse frequencies ``1 / base^(2i/hd)`` in float32, each power correctly rounded
  (PyTorch's float32 ``pow`` is one ulp off at i = 111 for hd = 256; see BUILD_NOTES.md).
  The power is taken in float64 and rounded once: NumPy's float32 ``pow`` depends on the
  CPU's SIMD loops (23 of 128 powers one ulp off on an AMD EPYC without AVX-512)."""
  exponent = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
  power = (np.float64(base) ** exponent.astype(np.float64)).astype(np.float32)
  return np.float32(1) / power


def rope(x, pos, base: float, scale: float):
  """Rotary embedding (rotate-half convention) of ``x [B, T, N, hd]`` at ``pos [B, T]``.

  The angles ``pos × inv_freq`` are float32 products, as in the reference implementations;
  exact angles would move log-probabilities past a few hundred tokens by up to ~4e-3 away
  from them (BUILD_NOTES.md, "The model")."""
  hd = x.shape[-1]
  freqs = jnp.asarray(inv_freq(base, hd))
  angles = (pos.astype(jnp.float32)[..., None] / scale) * freqs  # [B, T, hd/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = hd // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: Gemma3Config, layer: int, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    self.q_proj = _param(rngs, (d, h * hd), ("embed", "heads"))
    self.k_proj = _param(rngs, (d, kv * hd), ("embed", "heads"))
    self.v_proj = _param(rngs, (d, kv * hd), ("embed", "heads"))
    self.o_proj = _param(rngs, (h * hd, d), ("heads", "embed"))
    self.q_norm = RMSNorm(hd, cfg.eps)
    self.k_norm = RMSNorm(hd, cfg.eps)
    self.is_global = cfg.is_global(layer)
    self.base = cfg.rope_global if self.is_global else cfg.rope_local
    self.scale = cfg.rope_global_scale if self.is_global else 1.0
    self.window = cfg.sliding_window
    self.scaling = cfg.scaling
    self.shape = (h, kv, hd)

  def __call__(self, x, pos, k_cache, v_cache, kpos, index):
    """Writes this call's keys/values into the layer's cache ``[B, S, KV, hd]`` at ``index``
    (in place when the buffer is donated) and attends over the whole cache."""
    b, t, _ = x.shape
    h, kv, hd = self.shape
    q = self.q_norm((x @ self.q_proj[...]).reshape(b, t, h, hd))
    k = self.k_norm((x @ self.k_proj[...]).reshape(b, t, kv, hd))
    v = (x @ self.v_proj[...]).reshape(b, t, kv, hd)
    q, k = rope(q, pos, self.base, self.scale), rope(k, pos, self.base, self.scale)
    zero = jnp.zeros((), index.dtype)
    at = (zero, index, zero, zero)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->btkgs", q, k_cache,
                        preferred_element_type=jnp.float32) * self.scaling
    qp, kp = pos[:, :, None], kpos[:, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if not self.is_global:
      allowed &= qp - kp < self.window
    scores = jnp.where(allowed[:, :, None, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("btkgs,bskd->btkgd", probs, v_cache).reshape(b, t, h * hd)
    return out @ self.o_proj[...], k_cache, v_cache


class MLP(nnx.Module):
  def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs):
    self.gate = _param(rngs, (cfg.hidden, cfg.ffn), ("embed", "mlp"))
    self.up = _param(rngs, (cfg.hidden, cfg.ffn), ("embed", "mlp"))
    self.down = _param(rngs, (cfg.ffn, cfg.hidden), ("mlp", "embed"))

  def __call__(self, x):
    return (jax.nn.gelu(x @ self.gate[...], approximate=True) * (x @ self.up[...])) @ self.down[...]


class Block(nnx.Module):
  def __init__(self, cfg: Gemma3Config, layer: int, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden, cfg.eps)
    self.attn = Attention(cfg, layer, rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden, cfg.eps)
    self.pre_ffw_norm = RMSNorm(cfg.hidden, cfg.eps)
    self.mlp = MLP(cfg, rngs)
    self.post_ffw_norm = RMSNorm(cfg.hidden, cfg.eps)

  def __call__(self, x, pos, k_cache, v_cache, kpos, index):
    a, k_cache, v_cache = self.attn(self.input_norm(x), pos, k_cache, v_cache, kpos, index)
    x = x + self.post_attn_norm(a)
    x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
    return x, k_cache, v_cache


class Gemma3(nnx.Module):
  """The decoder. ``__call__(ids, mask, cache)`` → ``(logits [B, T, V] float32, final hidden
  states [B, T, d], cache)``; with ``at [B]`` (a position per row) only that position's
  logits ``[B, V]`` and hidden state ``[B, d]`` are computed — the output projection is the
  largest matrix product of a forward. See the module docstring for the cache and padding."""

  def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden), ("vocab", "embed"), 1.0)
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.layers)])
    self.final_norm = RMSNorm(cfg.hidden, cfg.eps)

  def __call__(self, ids, mask, cache: KVCache, at=None):
    emb = self.embed[...]
    x = jnp.take(emb, ids, axis=0) * jnp.asarray(math.sqrt(self.cfg.hidden), emb.dtype)
    # positions continue after what the cache already holds for each row
    start = jnp.max(cache.pos, axis=-1, keepdims=True) + 1
    pos = jnp.where(mask, start + jnp.cumsum(mask, axis=-1) - 1, -1).astype(jnp.int32)
    kpos = jax.lax.dynamic_update_slice(cache.pos, pos, (jnp.zeros((), cache.index.dtype),
                                                          cache.index))
    ks, vs = [], []
    for block, k, v in zip(self.blocks, cache.k, cache.v):
      x, k, v = block(x, pos, k, v, kpos, cache.index)
      ks.append(k)
      vs.append(v)
    hidden = self.final_norm(x)
    if at is not None:
      hidden = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]
    logits = jnp.einsum("...d,vd->...v", hidden, emb, preferred_element_type=jnp.float32)
    new = KVCache(k=tuple(ks), v=tuple(vs), pos=kpos, index=cache.index + ids.shape[1])
    return logits, hidden, new

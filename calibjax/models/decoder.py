"""One configurable decoder-only transformer in Flax NNX, with a static-shape KV cache.

The families calibjax reads (Llama 3, Mistral, Qwen 2.5 / 3 and Qwen3-MoE, Olmo 2 / 3,
Gemma 2 / 3, the Qwen3.5 hybrids; ``calibjax.models.families`` configures each from its
checkpoint) differ only in the switches of :class:`DecoderConfig`:

- norms: RMSNorm in float32, weight applied as ``w`` or ``1 + w`` (Gemma); placed before
  attention and MLP (``"pre"``: Llama, Mistral, Qwen), on their outputs only (``"post"``:
  Olmo 2/3, ``x + N(attn(x))``), or both (``"sandwich"``: Gemma 2/3);
- query/key norm: none, per head before RoPE (Qwen3, Gemma 3), or over the whole projection
  width before the head split (Olmo 2/3); q/k/v bias (Qwen 2.5) and output bias;
- grouped-query attention scaled by ``query_pre_attn_scalar^-1/2`` (default ``head_dim``),
  optionally soft-capped (Gemma 2: ``c · tanh(s / c)``, the final logits too);
- per layer: full or sliding-window attention (a query sees keys less than ``sliding_window``
  positions back), each layer type with its own rotary embedding (:class:`Rope`: default,
  ``linear``, ``llama3``, ``yarn``; rotate-half convention; on all of each head or on its
  first part), or a Gated DeltaNet linear-attention layer (:class:`GatedDeltaNet`, Qwen3.5);
  attention output optionally gated per head (``attn_gate``, Qwen3.5);
- feed-forward: gated MLP (SiLU or tanh-GELU) or a routed mixture of experts (softmax router,
  top-k, optional renormalisation, optional sigmoid-gated shared expert) computed on the
  chosen experts only, by grouped matrix products (``jax.lax.ragged_dot``);
- embeddings scaled by ``sqrt(d)`` (Gemma); output projection tied to the embedding or not.

One code path serves the full forward and cached decoding: a call writes its tokens into the
cache at ``cache.index`` and attends over the whole (static) cache, masking by the stored
positions; a Gated DeltaNet layer continues from its cached recurrent state. Positions count
real tokens only (``cumsum(mask) − 1``), so left and right padding both give each sequence
exactly its unpadded result.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calibjax.core import pytree
from calibjax.models import delta_rule

FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"


@dataclasses.dataclass(frozen=True)
class Rope:
  """A rotary embedding: base ``theta`` and scaling ``kind`` with its parameters, as in the
  reference implementation (``transformers.modeling_rope_utils``)."""
  theta: float
  kind: str = "default"  # "default", "linear", "llama3" or "yarn"
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  original_context: int = 0  # llama3, yarn: the pre-training context
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  truncate: bool = True  # yarn
  attention_factor: float = 1.0  # yarn: multiplies cos and sin
  partial: float = 1.0  # the fraction of each head that rotates (its first dimensions)

  def inv_freq(self, hd: int) -> np.ndarray:
    """The ``hd / 2`` inverse frequencies, float32 (the reference's float32 arithmetic)."""
    f32 = np.float32
    base = base_inv_freq(self.theta, hd)
    if self.kind == "default":
      return base
    if self.kind == "linear":
      return base / f32(self.factor)
    if self.kind == "llama3":
      low_wavelen = f32(self.original_context / self.low_freq_factor)
      high_wavelen = f32(self.original_context / self.high_freq_factor)
      wavelen = f32(2 * math.pi) / base
      scaled = np.where(wavelen > low_wavelen, base / f32(self.factor), base)
      smooth = ((f32(self.original_context) / wavelen - f32(self.low_freq_factor))
                / f32(self.high_freq_factor - self.low_freq_factor))
      smoothed = (f32(1) - smooth) * scaled / f32(self.factor) + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      return np.where(medium, smoothed, scaled).astype(f32)
    if self.kind == "yarn":
      def correction(rotations):
        return hd * math.log(self.original_context / (rotations * 2 * math.pi)) / (
            2 * math.log(self.theta))
      low, high = correction(self.beta_fast), correction(self.beta_slow)
      if self.truncate:
        low, high = math.floor(low), math.ceil(high)
      low, high = max(low, 0), min(high, hd - 1)
      high = high + 0.001 if low == high else high
      ramp = np.clip((np.arange(hd // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
      extrapolation = f32(1) - ramp.astype(f32)
      interpolation = f32(1) / (f32(self.factor) * _powers(self.theta, hd))
      return (interpolation * (f32(1) - extrapolation) + base * extrapolation).astype(f32)
    raise ValueError(f"unknown RoPE kind {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class MoE:
  """A routed mixture of experts: ``experts`` gated MLPs of width ``ffn``, ``top_k`` per
  token, the router's top-k weights renormalised when ``norm_topk_prob``; ``layers``: the
  layers that have it (the others keep the dense MLP)."""
  experts: int
  top_k: int
  ffn: int
  norm_topk_prob: bool
  layers: tuple[int, ...]
  shared_ffn: int = 0  # a shared expert of this width, gated by sigmoid(x w) (Qwen3.5)


@dataclasses.dataclass(frozen=True)
class DeltaNet:
  """A Gated DeltaNet linear-attention layer's dimensions (Qwen3.5): ``key_heads`` query/key
  heads of ``key_dim`` serving ``value_heads`` value heads of ``value_dim``, a causal
  convolution of ``conv`` taps, the delta rule in chunks of ``chunk`` tokens."""
  key_heads: int
  value_heads: int
  key_dim: int
  value_dim: int
  conv: int = 4
  chunk: int = 64

  @property
  def channels(self) -> int:  # the convolution's: queries, keys, values
    return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Dimensions and switches; read from a checkpoint by ``calibjax.models.families``."""
  family: str
  vocab_size: int
  hidden: int
  layers: int
  ffn: int
  heads: int
  kv_heads: int
  head_dim: int
  eps: float
  layer_types: tuple[str, ...]  # FULL, SLIDING or LINEAR, one per layer
  rope: tuple[tuple[str, Rope], ...]  # (layer type, its rotary embedding)
  sliding_window: int | None = None
  norm: str = "pre"  # "pre", "post" or "sandwich"
  norm_plus_one: bool = False  # RMSNorm weight applied as 1 + w
  qk_norm: str = "none"  # "none", "head" or "full"
  qkv_bias: bool = False
  out_bias: bool = False
  activation: str = "silu"  # "silu" or "gelu_tanh"
  embed_scale: bool = False  # embeddings times sqrt(hidden)
  query_pre_attn_scalar: float | None = None  # None: head_dim
  attn_softcap: float | None = None
  final_softcap: float | None = None
  tie_embeddings: bool = True
  moe: MoE | None = None
  attn_gate: bool = False  # attention output times sigmoid(x W_gate) per head (Qwen3.5)
  delta_net: DeltaNet | None = None  # the LINEAR layers' dimensions
  context_length: int = 32_768

  @property
  def scaling(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def rope_of(self, layer: int) -> Rope:
    return dict(self.rope)[self.layer_types[layer]]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "DecoderConfig":
    """Inverse of :meth:`to_dict` (after a JSON round trip)."""
    d = dict(d)
    d["layer_types"] = tuple(d["layer_types"])
    d["rope"] = tuple((kind, Rope(**r)) for kind, r in d["rope"])
    if d.get("moe") is not None:
      d["moe"] = MoE(**{**d["moe"], "layers": tuple(d["moe"]["layers"])})
    if d.get("delta_net") is not None:
      d["delta_net"] = DeltaNet(**d["delta_net"])
    return cls(**d)


@pytree.dataclass
class KVCache:
  """The decoding state: per layer (a tuple of L pairs, so a step updates each in place
  without copying the others) the keys and values ``[B, S, KV, hd]`` of an attention layer,
  or the recurrent state ``[B, H, dk, dv]`` (float32) and the convolution's last inputs
  ``[B, K-1, C]`` of a Gated DeltaNet layer (O(1) in the context length); the position of
  each slot ``[B, S]`` (−1: empty or padding) and the next slot to write."""
  layers: tuple[tuple[jax.Array, jax.Array], ...]
  pos: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, cfg: DecoderConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
    def layer(kind):
      if kind == LINEAR:
        n = cfg.delta_net
        return (jnp.zeros((batch, n.value_heads, n.key_dim, n.value_dim), jnp.float32),
                jnp.zeros((batch, n.conv - 1, n.channels), dtype))
      shape = (batch, size, cfg.kv_heads, cfg.head_dim)
      return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return cls(layers=tuple(layer(kind) for kind in cfg.layer_types),
               pos=jnp.full((batch, size), -1, jnp.int32), index=jnp.zeros((), jnp.int32))


def _param(rngs, shape, axes, scale=0.02):
  """A weight annotated with logical axis names (``logical_axes`` metadata): ``"vocab"``,
  ``"embed"``, ``"heads"``, ``"mlp"``, ``"experts"``. :func:`calibjax.core.sharding.param_shardings`
  maps them onto a mesh (FSDP over ``"data"`` for ``"embed"``, tensor parallel over
  ``"model"`` for the rest). Not NNX's ``out_sharding``, which NNX applies by itself under any
  mesh in context (and fails where the mesh lacks an axis); placement here is explicit, at
  load time."""
  value = jax.random.normal(rngs.params(), shape, jnp.float32) * scale
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  """``x / rms(x) · w`` (or ``· (1 + w)``), computed in float32."""

  def __init__(self, dim: int, eps: float, plus_one: bool):
    self.weight = nnx.Param((jnp.zeros if plus_one else jnp.ones)((dim,), jnp.float32))
    self.eps = eps
    self.plus_one = plus_one

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = self.weight[...].astype(jnp.float32)
    return (y * (1.0 + w if self.plus_one else w)).astype(x.dtype)


def _powers(base: float, hd: int) -> np.ndarray:
  """``base^(2i/hd)`` in float32, each correctly rounded (PyTorch's float32 ``pow`` is one ulp
  off at i = 111 for hd = 256; see BUILD_NOTES.md). Taken in float64 and rounded once:
  NumPy's float32 ``pow`` depends on the CPU's SIMD loops (23 of 128 powers one ulp off on an
  AMD EPYC without AVX-512)."""
  exponent = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
  return (np.float64(base) ** exponent.astype(np.float64)).astype(np.float32)


def base_inv_freq(base: float, hd: int) -> np.ndarray:
  """RoPE inverse frequencies ``1 / base^(2i/hd)`` in float32 (powers correctly rounded)."""
  return np.float32(1) / _powers(base, hd)


def rope(x, pos, spec: Rope):
  """Rotary embedding (rotate-half convention) of ``x [B, T, N, hd]`` at ``pos [B, T]``, on
  the first ``hd · spec.partial`` dimensions of each head (the rest pass unchanged).

  The angles ``pos × inv_freq`` are float32 products, as in the reference implementations;
  exact angles would move log-probabilities past a few hundred tokens by up to ~4e-3 away
  from them (BUILD_NOTES.md, "The model")."""
  rd = int(x.shape[-1] * spec.partial)
  freqs = jnp.asarray(spec.inv_freq(rd))
  angles = pos.astype(jnp.float32)[..., None] * freqs  # [B, T, rd/2]
  angles = jnp.concatenate([angles, angles], -1)
  cos = (jnp.cos(angles) * np.float32(spec.attention_factor))[:, :, None, :]
  sin = (jnp.sin(angles) * np.float32(spec.attention_factor))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  r, half = x32[..., :rd], rd // 2
  rotated = jnp.concatenate([-r[..., half:], r[..., :half]], -1)
  return jnp.concatenate([r * cos + rotated * sin, x32[..., rd:]], -1).astype(x.dtype)


def _softcap(x, cap):
  return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
  def __init__(self, cfg: DecoderConfig, layer: int, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    self.q_proj = _param(rngs, (d, h * hd), ("embed", "heads"))
    if cfg.attn_gate:
      self.gate_proj = _param(rngs, (d, h * hd), ("embed", "heads"))
    self.k_proj = _param(rngs, (d, kv * hd), ("embed", "heads"))
    self.v_proj = _param(rngs, (d, kv * hd), ("embed", "heads"))
    self.o_proj = _param(rngs, (h * hd, d), ("heads", "embed"))
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (h * hd,), ("heads",))
      self.k_bias = _param(rngs, (kv * hd,), ("heads",))
      self.v_bias = _param(rngs, (kv * hd,), ("heads",))
    if cfg.out_bias:
      self.o_bias = _param(rngs, (d,), ("embed",))
    if cfg.qk_norm != "none":
      full = cfg.qk_norm == "full"
      self.q_norm = RMSNorm(h * hd if full else hd, cfg.eps, cfg.norm_plus_one)
      self.k_norm = RMSNorm(kv * hd if full else hd, cfg.eps, cfg.norm_plus_one)
    self.qk_norm = cfg.qk_norm
    self.rope = cfg.rope_of(layer)
    self.window = cfg.sliding_window if cfg.layer_types[layer] == SLIDING else None
    self.scaling = cfg.scaling
    self.softcap = cfg.attn_softcap
    self.shape = (h, kv, hd)

  def _project(self, x, name):
    y = x @ getattr(self, f"{name}_proj")[...]
    bias = getattr(self, f"{name}_bias", None)
    return y if bias is None else y + bias[...].astype(y.dtype)

  def __call__(self, x, pos, cache, kpos, index):
    """Writes this call's keys/values into the layer's cache ``[B, S, KV, hd]`` at ``index``
    (in place when the buffer is donated) and attends over the whole cache."""
    k_cache, v_cache = cache
    b, t, _ = x.shape
    h, kv, hd = self.shape
    q, k, v = self._project(x, "q"), self._project(x, "k"), self._project(x, "v")
    if self.qk_norm == "full":
      q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
    if self.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, pos, self.rope), rope(k, pos, self.rope)
    zero = jnp.zeros((), index.dtype)
    at = (zero, index, zero, zero)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->btkgs", q, k_cache,
                        preferred_element_type=jnp.float32) * self.scaling
    scores = _softcap(scores, self.softcap)
    qp, kp = pos[:, :, None], kpos[:, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if self.window is not None:
      allowed &= qp - kp < self.window
    scores = jnp.where(allowed[:, :, None, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("btkgs,bskd->btkgd", probs, v_cache).reshape(b, t, h * hd)
    if hasattr(self, "gate_proj"):
      out = out * jax.nn.sigmoid(x @ self.gate_proj[...])
    out = out @ self.o_proj[...]
    bias = getattr(self, "o_bias", None)
    return (out if bias is None else out + bias[...].astype(out.dtype)), (k_cache, v_cache)


class GatedDeltaNet(nnx.Module):
  """Qwen3.5's linear attention: queries, keys and values through a causal convolution and
  SiLU, L2-normalised queries and keys, per-token decay ``g = −e^A · softplus(x W_a + dt)``
  and write strength ``β = sigmoid(x W_b)`` (:func:`calibjax.models.delta_rule.gated_delta_rule`;
  each query/key head serves ``value_heads / key_heads`` consecutive value heads), then a
  per-head RMSNorm (weight ``w``) times ``silu(x W_z)`` and the output projection. Its cache
  is the recurrent state and the convolution's last ``K-1`` inputs. Padding tokens
  (``pos < 0``) change neither; a row's real tokens must be contiguous, and start the call
  when the cache already holds some (right padding), as every caller does."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    n, d = cfg.delta_net, cfg.hidden
    keys, values = n.key_heads * n.key_dim, n.value_heads * n.value_dim
    self.q_proj = _param(rngs, (d, keys), ("embed", "heads"))
    self.k_proj = _param(rngs, (d, keys), ("embed", "heads"))
    self.v_proj = _param(rngs, (d, values), ("embed", "heads"))
    self.z_proj = _param(rngs, (d, values), ("embed", "heads"))
    self.b_proj = _param(rngs, (d, n.value_heads), ("embed", "heads"))
    self.a_proj = _param(rngs, (d, n.value_heads), ("embed", "heads"))
    self.conv = _param(rngs, (n.conv, n.channels), (None, None), 0.5)
    self.a_log = _param(rngs, (n.value_heads,), ("heads",), 1.0)
    self.dt_bias = _param(rngs, (n.value_heads,), ("heads",), 1.0)
    self.norm = RMSNorm(n.value_dim, cfg.eps, plus_one=False)
    self.o_proj = _param(rngs, (values, d), ("heads", "embed"))
    self.dims = n

  def __call__(self, x, pos, cache, kpos, index):
    state, tail = cache
    n, (b, t, _) = self.dims, x.shape
    mask = (pos >= 0)[..., None]
    qkv = jnp.concatenate([x @ self.q_proj[...], x @ self.k_proj[...], x @ self.v_proj[...]], -1)
    qkv = jnp.where(mask, qkv, 0)
    mixed = jax.nn.silu(delta_rule.causal_conv(qkv, tail, self.conv[...]))
    tail = delta_rule.conv_tail(qkv, tail, mask[..., 0])
    keys = n.key_heads * n.key_dim
    q = mixed[..., :keys].reshape(b, t, n.key_heads, n.key_dim).astype(jnp.float32)
    k = mixed[..., keys:2 * keys].reshape(b, t, n.key_heads, n.key_dim).astype(jnp.float32)
    v = mixed[..., 2 * keys:].reshape(b, t, n.value_heads, n.value_dim)
    group = n.value_heads // n.key_heads
    q = jnp.repeat(delta_rule.l2_normalise(q), group, axis=2) * np.float32(n.key_dim ** -0.5)
    k = jnp.repeat(delta_rule.l2_normalise(k), group, axis=2)
    beta = jnp.where(mask, jax.nn.sigmoid((x @ self.b_proj[...]).astype(jnp.float32)), 0.0)
    g = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(
        (x @ self.a_proj[...]).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    g = jnp.where(mask, g, 0.0)
    out, state = delta_rule.gated_delta_rule(q, k, v, g, beta, state, n.chunk)
    z = (x @ self.z_proj[...]).reshape(b, t, n.value_heads, n.value_dim)
    out = self.norm(out.astype(x.dtype)) * jax.nn.silu(z.astype(jnp.float32)).astype(x.dtype)
    return out.reshape(b, t, -1) @ self.o_proj[...], (state, tail)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
  """The gated feed-forward ``(act(x W_gate) · x W_up) W_down`` (width ``ffn``, default the
  config's)."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, ffn: int | None = None):
    ffn = ffn or cfg.ffn
    self.gate = _param(rngs, (cfg.hidden, ffn), ("embed", "mlp"))
    self.up = _param(rngs, (cfg.hidden, ffn), ("embed", "mlp"))
    self.down = _param(rngs, (ffn, cfg.hidden), ("mlp", "embed"))
    self.act = cfg.activation

  def __call__(self, x):
    act = _ACTIVATIONS[self.act]
    return (act(x @ self.gate[...]) * (x @ self.up[...])) @ self.down[...]


class Experts(nnx.Module):
  """A routed mixture of gated MLPs (Qwen3-MoE): router softmax in float32, the top-k experts
  of each token (weights renormalised when ``norm_topk_prob``), each token's rows computed by
  its chosen experts only: the ``N · k`` (token, expert) pairs sorted by expert and run
  through grouped matrix products (``ragged_dot``), then weighted and summed per token. With
  ``shared_ffn`` (Qwen3.5) every token also goes through a shared expert, weighted by
  ``sigmoid(x w_shared)``."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    m = cfg.moe
    self.router = _param(rngs, (cfg.hidden, m.experts), ("embed", None))
    self.gate = _param(rngs, (m.experts, cfg.hidden, m.ffn), ("experts", "embed", "mlp"))
    self.up = _param(rngs, (m.experts, cfg.hidden, m.ffn), ("experts", "embed", "mlp"))
    self.down = _param(rngs, (m.experts, m.ffn, cfg.hidden), ("experts", "mlp", "embed"))
    self.top_k, self.norm, self.act = m.top_k, m.norm_topk_prob, cfg.activation
    if m.shared_ffn:
      self.shared = MLP(cfg, rngs, m.shared_ffn)
      self.shared_gate = _param(rngs, (cfg.hidden, 1), ("embed", None))

  def __call__(self, x):
    shape, d = x.shape, x.shape[-1]
    x = x.reshape(-1, d)
    probs = jax.nn.softmax((x @ self.router[...]).astype(jnp.float32), axis=-1)
    weight, expert = jax.lax.top_k(probs, self.top_k)  # [N, k]
    if self.norm:
      weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    expert = expert.reshape(-1)
    order = jnp.argsort(expert, stable=True)
    token = order // self.top_k
    sizes = jnp.zeros(self.gate.shape[0], jnp.int32).at[expert].add(1)
    rows = x[token]
    act = _ACTIVATIONS[self.act]
    hidden = (act(jax.lax.ragged_dot(rows, self.gate[...], sizes))
              * jax.lax.ragged_dot(rows, self.up[...], sizes))
    out = jax.lax.ragged_dot(hidden, self.down[...], sizes)
    out = out * weight.reshape(-1)[order].astype(x.dtype)[:, None]
    out = jnp.zeros_like(x).at[token].add(out)
    if hasattr(self, "shared"):
      out = out + jax.nn.sigmoid(x @ self.shared_gate[...]) * self.shared(x)
    return out.reshape(shape)


class Block(nnx.Module):
  """Attention (``attn``: :class:`Attention`, or :class:`GatedDeltaNet` on a ``LINEAR``
  layer) and feed-forward with residuals; which of the four norms exist depends on
  ``cfg.norm`` (``input_norm``/``pre_ffw_norm`` before, ``post_attn_norm``/``post_ffw_norm``
  on the outputs)."""

  def __init__(self, cfg: DecoderConfig, layer: int, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden, cfg.eps, cfg.norm_plus_one)
    if cfg.norm in ("pre", "sandwich"):
      self.input_norm, self.pre_ffw_norm = norm(), norm()
    if cfg.norm in ("post", "sandwich"):
      self.post_attn_norm, self.post_ffw_norm = norm(), norm()
    linear = cfg.layer_types[layer] == LINEAR
    self.attn = GatedDeltaNet(cfg, rngs) if linear else Attention(cfg, layer, rngs)
    moe = cfg.moe is not None and layer in cfg.moe.layers
    self.mlp = Experts(cfg, rngs) if moe else MLP(cfg, rngs)

  def _norm(self, name, x):
    norm = getattr(self, name, None)
    return x if norm is None else norm(x)

  def __call__(self, x, pos, cache, kpos, index):
    a, cache = self.attn(self._norm("input_norm", x), pos, cache, kpos, index)
    x = x + self._norm("post_attn_norm", a)
    x = x + self._norm("post_ffw_norm", self.mlp(self._norm("pre_ffw_norm", x)))
    return x, cache


class Decoder(nnx.Module):
  """The decoder. ``__call__(ids, mask, cache)`` → ``(logits [B, T, V] float32, final hidden
  states [B, T, d], cache)``; with ``at [B]`` (a position per row) only that position's
  logits ``[B, V]`` and hidden state ``[B, d]`` are computed — the output projection is the
  largest matrix product of a forward. See the module docstring for the cache and padding."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden), ("vocab", "embed"), 1.0)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.vocab_size, cfg.hidden), ("vocab", "embed"))
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.layers)])
    self.final_norm = RMSNorm(cfg.hidden, cfg.eps, cfg.norm_plus_one)

  def output_embedding(self) -> jax.Array:
    """The output projection ``[V, d]`` (logits are ``hidden @ Wᵀ``)."""
    return (self.embed if self.cfg.tie_embeddings else self.lm_head)[...]

  def __call__(self, ids, mask, cache: KVCache, at=None):
    emb = self.embed[...]
    x = jnp.take(emb, ids, axis=0)
    if self.cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden), emb.dtype)
    # positions continue after what the cache already holds for each row
    start = jnp.max(cache.pos, axis=-1, keepdims=True) + 1
    pos = jnp.where(mask, start + jnp.cumsum(mask, axis=-1) - 1, -1).astype(jnp.int32)
    kpos = jax.lax.dynamic_update_slice(cache.pos, pos, (jnp.zeros((), cache.index.dtype),
                                                          cache.index))
    layers = []
    for block, layer in zip(self.blocks, cache.layers):
      x, layer = block(x, pos, layer, kpos, cache.index)
      layers.append(layer)
    hidden = self.final_norm(x)
    if at is not None:
      hidden = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]
    logits = jnp.einsum("...d,vd->...v", hidden, self.output_embedding(),
                        preferred_element_type=jnp.float32)
    logits = _softcap(logits, self.cfg.final_softcap)
    new = KVCache(layers=tuple(layers), pos=kpos, index=cache.index + ids.shape[1])
    return logits, hidden, new

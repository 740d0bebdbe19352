"""The model families calibjax reads: each one's switches of the decoder, read from a Hugging
Face ``config.json``, and each one's tensor names.

A family is a ``model_type`` of ``transformers``: ``llama`` (Llama 3 / 3.1 / 3.2), ``mistral``,
``qwen2`` (Qwen 2.5), ``qwen3``, ``qwen3_moe``, ``olmo2``, ``olmo3``, ``gemma2``, ``gemma3_text``,
``qwen3_5_text`` and ``qwen3_5_moe_text`` (Qwen3.5's hybrids: Gated DeltaNet layers, gated
attention with partial RoPE, experts with a shared one), and the multimodal ``gemma3``,
``qwen3_5`` and ``qwen3_5_moe``, whose text model is read. Any other ``model_type`` is an
"unsupported architecture" error that names it.

RoPE is read from the legacy ``rope_theta`` + ``rope_scaling`` (``type`` or ``rope_type``;
Gemma 3's sliding layers: ``rope_local_base_freq``) and from the newer ``rope_parameters``
(one dict for every layer, or one per layer type).
"""

from __future__ import annotations

import math

import numpy as np

from calibjax import errors
from calibjax.models.decoder import FULL, LINEAR, SLIDING, DecoderConfig, DeltaNet, MoE, Rope

_PRE = dict(norm="pre", activation="silu")
_GEMMA = dict(norm="sandwich", norm_plus_one=True, activation="gelu_tanh", embed_scale=True)
_QWEN35 = dict(norm="pre", norm_plus_one=True, qk_norm="head", attn_gate=True)
SWITCHES = {  # model_type -> the decoder switches that do not depend on config values
    "llama": _PRE, "mistral": _PRE, "qwen2": {**_PRE, "qkv_bias": True},
    "qwen3": {**_PRE, "qk_norm": "head"}, "qwen3_moe": {**_PRE, "qk_norm": "head"},
    "olmo2": dict(norm="post", activation="silu", qk_norm="full"),
    "olmo3": dict(norm="post", activation="silu", qk_norm="full"),
    "gemma2": _GEMMA, "gemma3_text": {**_GEMMA, "qk_norm": "head"},
    "qwen3_5_text": _QWEN35, "qwen3_5_moe_text": _QWEN35,
}
FAMILIES = tuple(SWITCHES)
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_ALIASES = {"gemma3": "gemma3_text", "qwen3_5": "qwen3_5_text",  # multimodal: text_config
            "qwen3_5_moe": "qwen3_5_moe_text"}
_HYBRID = ("qwen3_5_text", "qwen3_5_moe_text")


def _rope(params: dict, raw: dict, head_dim: int, where: str) -> Rope:
  """One :class:`Rope` from a ``rope_parameters`` / ``rope_scaling`` dict (``rope_theta`` and
  ``partial_rotary_factor`` inside it or in the config)."""
  kind = params.get("rope_type", params.get("type", "default"))
  theta = float(params.get("rope_theta", raw.get("rope_theta", 10_000.0)))
  partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
  if kind == "default":
    return Rope(theta, partial=partial)
  if kind == "linear":
    return Rope(theta, "linear", factor=float(params["factor"]), partial=partial)
  original = params.get("original_max_position_embeddings")
  if kind == "llama3":
    return Rope(theta, "llama3", factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_context=int(original), partial=partial)
  if kind == "yarn":
    original = int(original or raw["max_position_embeddings"])
    factor = params.get("factor")
    factor = float(raw["max_position_embeddings"] / original if factor is None else factor)
    mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention = params.get("attention_factor")
    if attention is None:
      m, m_all = params.get("mscale"), params.get("mscale_all_dim")
      attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return Rope(theta, "yarn", factor=factor, original_context=original,
                beta_fast=float(params.get("beta_fast") or 32),
                beta_slow=float(params.get("beta_slow") or 1),
                truncate=bool(params.get("truncate", True)),
                attention_factor=float(attention), partial=partial)
  raise errors.ModelLoadError(f"{where}: RoPE type {kind!r} is not supported (default, linear, "
                              "llama3, yarn).")


def _ropes(c: dict, family: str, types: set[str], head_dim: int, where: str):
  """``(layer type, Rope)`` for each attention layer type present."""
  types = types - {LINEAR}
  params = c.get("rope_parameters")
  if params and all(t in params for t in types):  # one per layer type
    return tuple((t, _rope(params[t] or {}, c, head_dim, where)) for t in sorted(types))
  if params:  # one for every layer
    return tuple((t, _rope(params, c, head_dim, where)) for t in sorted(types))
  scaling = c.get("rope_scaling") or {}
  if family == "gemma3_text":  # legacy: the scaling is the global layers'; local base apart
    local = {"rope_theta": c.get("rope_local_base_freq", 10_000.0)}
    return tuple((t, _rope(scaling if t == FULL else local, c, head_dim, where))
                 for t in sorted(types))
  return tuple((t, _rope(scaling, c, head_dim, where)) for t in sorted(types))


def _layer_types(c: dict, family: str, layers: int, where: str) -> tuple[str, ...]:
  types = c.get("layer_types")
  if types is None:  # configs written before layer_types existed: the family's rule
    window = c.get("sliding_window")
    if family == "mistral":
      types = [SLIDING if window else FULL] * layers
    elif family in ("qwen2", "qwen3", "qwen3_moe"):
      start = c.get("max_window_layers", layers)
      types = [SLIDING if c.get("use_sliding_window") and window and i >= start else FULL
               for i in range(layers)]
    elif family == "gemma2":
      types = [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
    elif family == "gemma3_text":
      p = c.get("sliding_window_pattern", 6)
      types = [SLIDING if (i + 1) % p else FULL for i in range(layers)]
    elif family == "olmo3":
      types = [SLIDING if (i + 1) % 4 else FULL for i in range(layers)]
    elif family in _HYBRID:
      every = c.get("full_attention_interval", 4)
      types = [LINEAR if (i + 1) % every else FULL for i in range(layers)]
    else:
      types = [FULL] * layers
  if family in ("qwen2", "qwen3", "qwen3_moe") and not c.get("use_sliding_window"):
    types = [FULL] * layers  # use_sliding_window=false wins over a listed pattern
  kinds = {FULL, LINEAR} if family in _HYBRID else {FULL, SLIDING}
  if len(types) != layers or set(types) - kinds:
    raise errors.ModelLoadError(f"{where}: layer_types must list {layers} of "
                                f"{' / '.join(map(repr, sorted(kinds)))}, got {types!r:.200}.")
  return tuple(types)


def read_config(raw: dict, where: str) -> DecoderConfig:
  """The decoder configuration of a Hugging Face ``config.json`` (already parsed).

  Raises:
    ModelLoadError: unsupported architecture (names ``model_type``), missing field,
      unsupported option (RoPE type, activation, MLP bias).
  """
  family = raw.get("model_type")
  if family in _ALIASES:  # a multimodal checkpoint: its text model's config, which may leave
    # tie_word_embeddings to the outer one (Qwen3.5's small models are tied)
    text = raw.get("text_config", raw)
    tied = {"tie_word_embeddings": raw["tie_word_embeddings"]} if (
        "tie_word_embeddings" in raw) else {}
    raw, family = {**tied, **text}, _ALIASES[family]
    family = raw.get("model_type", family)
  if family not in SWITCHES:
    raise errors.ModelLoadError(
        f"{where}: unsupported architecture: model_type {family!r} "
        f"(architectures {raw.get('architectures')}); calibjax reads {', '.join(FAMILIES)}.")
  c = raw
  try:
    layers, heads = int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    act = c.get("hidden_activation") or c.get("hidden_act") or (
        "gelu_tanh" if family.startswith("gemma") else "silu")
    if act not in _ACTIVATIONS:
      raise errors.ModelLoadError(f"{where}: activation {act!r} is not supported.")
    if c.get("mlp_bias"):
      raise errors.ModelLoadError(f"{where}: mlp_bias=true is not supported.")
    types = _layer_types(c, family, layers, where)
    switches = dict(SWITCHES[family], activation=_ACTIVATIONS[act])
    if c.get("attention_bias"):
      switches.update(qkv_bias=True, out_bias=True)
    moe = None
    experts = c.get("num_experts") or c.get("num_local_experts")  # the latter: transformers 5
    if family == "qwen3_moe" and experts:
      step, dense = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or ())
      moe = MoE(experts=int(experts), top_k=int(c["num_experts_per_tok"]),
                ffn=int(c["moe_intermediate_size"]), norm_topk_prob=bool(c["norm_topk_prob"]),
                layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0))
    if family == "qwen3_5_moe_text":  # every layer; top-k weights always renormalised
      moe = MoE(experts=int(experts), top_k=int(c["num_experts_per_tok"]),
                ffn=int(c["moe_intermediate_size"]), norm_topk_prob=True,
                layers=tuple(range(layers)),
                shared_ffn=int(c.get("shared_expert_intermediate_size") or 0))
    delta_net = None
    if LINEAR in types:
      delta_net = DeltaNet(key_heads=int(c["linear_num_key_heads"]),
                           value_heads=int(c["linear_num_value_heads"]),
                           key_dim=int(c["linear_key_head_dim"]),
                           value_dim=int(c["linear_value_head_dim"]),
                           conv=int(c.get("linear_conv_kernel_dim", 4)))
      if delta_net.value_heads % delta_net.key_heads:
        raise errors.ModelLoadError(f"{where}: linear_num_value_heads must be a multiple of "
                                    "linear_num_key_heads.")
    gemma = family.startswith("gemma")
    return DecoderConfig(
        family=family, vocab_size=int(c["vocab_size"]), hidden=int(c["hidden_size"]),
        layers=layers, ffn=int(c["intermediate_size"] if moe is None or len(moe.layers) < layers
                               else c.get("intermediate_size") or 0), heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim,
        eps=float(c.get("rms_norm_eps", 1e-6)), layer_types=types,
        rope=_ropes(c, family, set(types), head_dim, where),
        sliding_window=int(c["sliding_window"]) if SLIDING in types else None,
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]) if gemma else None,
        attn_softcap=c.get("attn_logit_softcapping") if gemma else None,
        final_softcap=c.get("final_logit_softcapping") if gemma else None,
        tie_embeddings=bool(c.get("tie_word_embeddings", gemma)), moe=moe, delta_net=delta_net,
        context_length=int(c.get("max_position_embeddings", 32_768)), **switches)
  except KeyError as e:
    raise errors.ModelLoadError(f"{where}: field {e} is missing.") from None


# ----------------------------------------------------------------------------- tensor names

def transposed(w):
  """A linear layer's ``[out, in]`` weight in the ``x @ W`` layout."""
  return np.ascontiguousarray(w.T)


def _same(w):
  return w


def _attention_recipes(cfg: DecoderConfig, p: str) -> dict:
  """An attention layer's parameters (under ``attn.``)."""
  out = {f"attn.{n}_proj": ([f"{p}self_attn.{n}_proj.weight"], transposed) for n in "qkvo"}
  if cfg.attn_gate:  # q_proj holds each head's query then its gate: [h, 2, hd, d]
    h, hd = cfg.heads, cfg.head_dim
    half = lambda i: lambda w: transposed(w.reshape(h, 2, hd, -1)[:, i].reshape(h * hd, -1))
    out["attn.q_proj"] = ([p + "self_attn.q_proj.weight"], half(0))
    out["attn.gate_proj"] = ([p + "self_attn.q_proj.weight"], half(1))
  if cfg.qkv_bias:
    for n in "qkv":
      out[f"attn.{n}_bias"] = ([f"{p}self_attn.{n}_proj.bias"], _same)
  if cfg.out_bias:
    out["attn.o_bias"] = ([p + "self_attn.o_proj.bias"], _same)
  if cfg.qk_norm != "none":
    for n in "qk":
      out[f"attn.{n}_norm.weight"] = ([f"{p}self_attn.{n}_norm.weight"], _same)
  return out


def _delta_net_recipes(cfg: DecoderConfig, p: str) -> dict:
  """A Gated DeltaNet layer's parameters (under ``attn.``): ``in_proj_qkv`` split into
  queries, keys and values; the convolution ``[C, 1, K]`` as ``[K, C]``."""
  n, a = cfg.delta_net, p + "linear_attn."
  keys = n.key_heads * n.key_dim
  rows = {"q": slice(0, keys), "k": slice(keys, 2 * keys), "v": slice(2 * keys, None)}
  out = {f"attn.{x}_proj": ([a + "in_proj_qkv.weight"], lambda w, r=r: transposed(w[r]))
         for x, r in rows.items()}
  for x in "zba":
    out[f"attn.{x}_proj"] = ([f"{a}in_proj_{x}.weight"], transposed)
  out["attn.o_proj"] = ([a + "out_proj.weight"], transposed)
  out["attn.conv"] = ([a + "conv1d.weight"], lambda w: transposed(w[:, 0, :]))
  out["attn.a_log"] = ([a + "A_log"], _same)
  out["attn.dt_bias"] = ([a + "dt_bias"], _same)
  out["attn.norm.weight"] = ([a + "norm.weight"], _same)
  return out


def _expert_recipes(cfg: DecoderConfig, p: str, names: set[str]) -> dict:
  """A mixture of experts' parameters (under ``mlp.``), per-expert or fused tensors."""
  out = {"mlp.router": ([p + "mlp.gate.weight"], transposed)}
  e, f = cfg.moe.experts, cfg.moe.ffn
  if p + "mlp.experts.gate_up_proj" in names:  # fused: [E, 2f, d] and [E, d, f]
    fused = [p + "mlp.experts.gate_up_proj"]
    out["mlp.gate"] = (fused, lambda w: np.ascontiguousarray(w[:, :f].transpose(0, 2, 1)))
    out["mlp.up"] = (fused, lambda w: np.ascontiguousarray(w[:, f:].transpose(0, 2, 1)))
    out["mlp.down"] = ([p + "mlp.experts.down_proj"],
                       lambda w: np.ascontiguousarray(w.transpose(0, 2, 1)))
  else:
    stack = lambda *ws: np.stack([w.T for w in ws])
    for target, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      out[f"mlp.{target}"] = ([f"{p}mlp.experts.{j}.{name}.weight" for j in range(e)], stack)
  if cfg.moe.shared_ffn:
    for target, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      out[f"mlp.shared.{target}"] = ([f"{p}mlp.shared_expert.{name}.weight"], transposed)
    out["mlp.shared_gate"] = ([p + "mlp.shared_expert_gate.weight"], transposed)
  return out


_NORMS = {"pre": {"input_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"},
          "post": {"post_attn_norm": "post_attention_layernorm",
                   "post_ffw_norm": "post_feedforward_layernorm"},
          "sandwich": {"input_norm": "input_layernorm",
                       "post_attn_norm": "post_attention_layernorm",
                       "pre_ffw_norm": "pre_feedforward_layernorm",
                       "post_ffw_norm": "post_feedforward_layernorm"}}


def layer_recipes(cfg: DecoderConfig, layer: int, names: set[str], prefix: str) -> dict:
  """How each parameter of one layer is made from the checkpoint's tensors: NNX path under
  ``blocks.<layer>`` → (the tensor names it reads, a function of those arrays). ``names``
  (every tensor of the checkpoint) decides between the per-expert and fused expert
  layouts."""
  p = f"{prefix}layers.{layer}."
  linear = cfg.layer_types[layer] == LINEAR
  out = _delta_net_recipes(cfg, p) if linear else _attention_recipes(cfg, p)
  for target, name in _NORMS[cfg.norm].items():
    out[f"{target}.weight"] = ([f"{p}{name}.weight"], _same)
  if cfg.moe is not None and layer in cfg.moe.layers:
    return {**out, **_expert_recipes(cfg, p, names)}
  for target, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
    out[f"mlp.{target}"] = ([f"{p}mlp.{name}.weight"], transposed)
  return out


def recipes(cfg: DecoderConfig, names: set[str], prefix: str) -> dict:
  """Every parameter's recipe (NNX path → (tensor names, function)); see
  :func:`layer_recipes`. The output projection is ``lm_head.weight`` unless tied."""
  out = {"embed": ([f"{prefix}embed_tokens.weight"], _same),
         "final_norm.weight": ([f"{prefix}norm.weight"], _same)}
  if not cfg.tie_embeddings:
    out["lm_head"] = (["lm_head.weight"], _same)
  for i in range(cfg.layers):
    for target, recipe in layer_recipes(cfg, i, names, prefix).items():
      out[f"blocks.{i}.{target}"] = recipe
  return out

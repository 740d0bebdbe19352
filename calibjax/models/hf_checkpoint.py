"""Reading Hugging Face-format Gemma 3 directories: ``config.json``, ``*.safetensors`` and
the SentencePiece ``tokenizer.model``.

Text-only (``Gemma3ForCausalLM``) and multimodal (``Gemma3ForConditionalGeneration``, whose
text weights sit under ``language_model.``) checkpoints are read; only the text decoder is
used. Linear weights are stored ``[out, in]`` and transposed to the ``x @ W`` layout.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from calibjax import errors
from calibjax.models.gemma3 import Gemma3Config

LAYER_TENSORS = {  # HF name under model.layers.i -> (NNX path under blocks.i, transpose)
    "input_layernorm.weight": ("input_norm.weight", False),
    "self_attn.q_proj.weight": ("attn.q_proj", True),
    "self_attn.k_proj.weight": ("attn.k_proj", True),
    "self_attn.v_proj.weight": ("attn.v_proj", True),
    "self_attn.o_proj.weight": ("attn.o_proj", True),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", False),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", False),
    "post_attention_layernorm.weight": ("post_attn_norm.weight", False),
    "pre_feedforward_layernorm.weight": ("pre_ffw_norm.weight", False),
    "mlp.gate_proj.weight": ("mlp.gate", True),
    "mlp.up_proj.weight": ("mlp.up", True),
    "mlp.down_proj.weight": ("mlp.down", True),
    "post_feedforward_layernorm.weight": ("post_ffw_norm.weight", False),
}


def read_config(folder: str) -> Gemma3Config:
  path = os.path.join(folder, "config.json")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.ModelLoadError(f"{path}: cannot be read ({e}).") from e
  c = raw.get("text_config", raw)
  if c.get("model_type", "gemma3_text") not in ("gemma3_text", "gemma3"):
    raise errors.ModelLoadError(f"{path}: model_type {c.get('model_type')!r}; calibjax reads "
                                "Gemma 3 ('gemma3_text').")
  try:
    rope = c.get("rope_parameters") or {}
    rope_global = rope.get("full_attention", {}).get("rope_theta", c.get("rope_theta", 1e6))
    rope_local = rope.get("sliding_attention", {}).get(
        "rope_theta", c.get("rope_local_base_freq", 10_000.0))
    scaling = (c.get("rope_scaling") or rope.get("full_attention") or {}).get("factor", 1.0)
    pattern = c.get("sliding_window_pattern", 6)
    layers = int(c["num_hidden_layers"])
    types = c.get("layer_types")
    if types is not None:
      pattern = next((p for p in range(1, layers + 2) if types == [
          "full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(layers)
      ]), None)
      if pattern is None:
        raise errors.ModelLoadError(f"{path}: layer_types is not a periodic sliding/global "
                                    "pattern; not supported.")
    return Gemma3Config(
        vocab_size=int(c["vocab_size"]), hidden=int(c["hidden_size"]), layers=layers,
        ffn=int(c["intermediate_size"]), heads=int(c["num_attention_heads"]),
        kv_heads=int(c["num_key_value_heads"]), head_dim=int(c.get("head_dim", 256)),
        eps=float(c.get("rms_norm_eps", 1e-6)), sliding_window=int(c["sliding_window"]),
        rope_global=float(rope_global), rope_local=float(rope_local),
        rope_global_scale=float(scaling), sliding_pattern=int(pattern),
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", c.get("head_dim", 256))),
        context_length=int(c.get("max_position_embeddings", 32_768)))
  except KeyError as e:
    raise errors.ModelLoadError(f"{path}: field {e} is missing.") from None


def read_params(folder: str, cfg: Gemma3Config) -> dict[str, np.ndarray]:
  """Float32 parameters keyed by NNX path, from every ``*.safetensors`` file in ``folder``."""
  from safetensors.numpy import load_file
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise errors.ModelLoadError(f"{folder}: no *.safetensors files.")
  tensors = {}
  for f in files:
    try:
      tensors.update(load_file(f))
    except Exception as e:  # the package raises its own error types for damaged files
      raise errors.ModelLoadError(f"{f}: cannot be read ({e}).") from e
  prefix = next((p for p in ("model.", "language_model.model.", "model.language_model.")
                 if f"{p}embed_tokens.weight" in tensors), None)
  if prefix is None:
    raise errors.ModelLoadError(f"{folder}: no embed_tokens.weight; not a Gemma 3 checkpoint.")
  wanted = {f"{prefix}embed_tokens.weight": ("embed", False),
            f"{prefix}norm.weight": ("final_norm.weight", False)}
  for i in range(cfg.layers):
    for name, target in LAYER_TENSORS.items():
      wanted[f"{prefix}layers.{i}.{name}"] = (f"blocks.{i}.{target[0]}", target[1])
  missing = sorted(set(wanted) - set(tensors))
  if missing:
    raise errors.ModelLoadError(f"{folder}: {len(missing)} tensors missing, e.g. {missing[:5]}.")
  out = {}
  for name, (target, transpose) in wanted.items():
    w = np.asarray(tensors[name], np.float32)
    out[target] = np.ascontiguousarray(w.T) if transpose else w
  out["embed"] = out["embed"][:cfg.vocab_size]
  return out


def read_tokenizer_fields(folder: str) -> dict:
  """Pieces, scores, types and special ids of ``tokenizer.model``."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  path = os.path.join(folder, "tokenizer.model")
  proto = pb.ModelProto()
  try:
    with open(path, "rb") as f:
      proto.ParseFromString(f.read())
  except Exception as e:  # OSError, protobuf DecodeError
    raise errors.ModelLoadError(f"{path}: not a readable SentencePiece model ({e}).") from e
  ts = proto.trainer_spec
  return dict(tokens=[p.piece for p in proto.pieces],
              scores=np.asarray([p.score for p in proto.pieces], np.float32),
              types=np.asarray([p.type for p in proto.pieces], np.int32),
              bos=ts.bos_id, eos=ts.eos_id, unk=ts.unk_id, pad=ts.pad_id)

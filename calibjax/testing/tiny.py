"""Tiny Gemma 3 checkpoints the tests build themselves: a config, random NNX weights, a
byte-level tokenizer, a GGUF file written with the `gguf` package and a Hugging Face folder."""

import numpy as np
from flax import nnx

from calibjax.models import families
from calibjax.models.decoder import FULL, SLIDING, Decoder, DecoderConfig, Rope
from calibjax.models.tokenizer import SentencePieceTokenizer

TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + [
    "▁", "▁a", "b", "▁ab", "  "]
TYPES = [3, 3, 3, 2] + [6] * 256 + [1, 1, 1, 1, 4]
# Six layers: the architecture's pattern makes layer 5 global, 0-4 sliding-window (5 tokens).
CONFIG = DecoderConfig(
    family="gemma3_text", vocab_size=len(TOKENS), hidden=32, layers=6, ffn=64, heads=4,
    kv_heads=2, head_dim=16, eps=float(np.float32(1e-6)), sliding_window=5,
    layer_types=(SLIDING,) * 5 + (FULL,), rope=((FULL, Rope(1e6)), (SLIDING, Rope(10_000.0))),
    query_pre_attn_scalar=16.0, context_length=128, **families.SWITCHES["gemma3_text"])


def tokenizer() -> SentencePieceTokenizer:
  return SentencePieceTokenizer(TOKENS, np.linspace(0, -1, len(TOKENS)), np.array(TYPES), bos=2, eos=1,
                   unk=3, pad=0)


def model(seed: int = 0, cfg: DecoderConfig = CONFIG) -> Decoder:
  m = Decoder(cfg, nnx.Rngs(seed))
  # non-trivial norms, so the (1 + w) convention is exercised
  for path, var in nnx.iter_graph(m):
    if isinstance(var, nnx.Param) and path[-1] == "weight":
      var[...] = np.random.default_rng(len(path)).normal(0, 0.1, var.shape).astype(np.float32)
  return m


def _params(m: Decoder):
  state = nnx.to_pure_dict(nnx.state(m))

  def get(key):
    node = state
    for k in key.split("."):
      node = node[int(k) if k.isdigit() else k]
    return np.asarray(node, np.float32)
  return get


def write_hf(folder: str, m: Decoder) -> None:
  """Writes ``m`` (a Gemma 3 configuration) as a Hugging Face folder: ``config.json``, HF
  tensor names (the inverse of the family's recipes) and the SentencePiece
  ``tokenizer.model``."""
  import json
  import os
  from safetensors.numpy import save_file
  cfg = m.cfg
  os.makedirs(folder, exist_ok=True)
  config = {"model_type": "gemma3_text", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
            "intermediate_size": cfg.ffn, "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.eps, "sliding_window": cfg.sliding_window,
            "rope_theta": dict(cfg.rope)[FULL].theta,
            "rope_local_base_freq": dict(cfg.rope)[SLIDING].theta,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "max_position_embeddings": cfg.context_length, "layer_types": list(cfg.layer_types)}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  get = _params(m)
  tensors = {}
  for target, ((name,), fn) in families.recipes(cfg, set(), "model.").items():
    t = get(target)
    tensors[name] = np.ascontiguousarray(t.T) if fn is families.transposed else t
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(tokenizer().model_proto)


def write_gguf(path: str, m: Decoder, arch: str = "gemma3", drop: str | None = None) -> None:
  """Writes ``m`` as GGUF (F32 tensors, llama.cpp's layout and 1 + w norms)."""
  import gguf
  from calibjax.models.gguf import BLOCK_TENSORS
  cfg = m.cfg
  w = gguf.GGUFWriter(path, arch)
  w.add_uint32(f"{arch}.embedding_length", cfg.hidden)
  w.add_uint32(f"{arch}.block_count", cfg.layers)
  w.add_uint32(f"{arch}.feed_forward_length", cfg.ffn)
  w.add_uint32(f"{arch}.attention.head_count", cfg.heads)
  w.add_uint32(f"{arch}.attention.head_count_kv", cfg.kv_heads)
  w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
  w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
  w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.eps)
  w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
  w.add_float32(f"{arch}.rope.freq_base", dict(cfg.rope)[FULL].theta)
  w.add_uint32(f"{arch}.context_length", cfg.context_length)
  w.add_tokenizer_model("llama")
  w.add_token_list(TOKENS)
  w.add_token_scores(list(np.linspace(0, -1, len(TOKENS))))
  w.add_token_types(TYPES)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  get = _params(m)
  tensors = {"token_embd.weight": get("embed"), "output_norm.weight": get("final_norm.weight") + 1}
  for i in range(cfg.layers):
    for name, (target, kind) in BLOCK_TENSORS.items():
      t = get(f"blocks.{i}.{target}")
      tensors[f"blk.{i}.{name}.weight"] = t + 1 if kind == "norm" else np.ascontiguousarray(t.T)
  for name, t in tensors.items():
    if name != drop:
      w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()

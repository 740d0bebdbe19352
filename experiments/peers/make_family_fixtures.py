"""Builds the tiny random checkpoints of every model family with `transformers` (from configs
alone, no hub) and their reference log-probabilities: the fixtures of
``tests/models/test_families.py``. Runs in the PyTorch peer environment, never in CI:

  bash experiments/peers/setup_peer_env.sh
  OMP_WAIT_POLICY=PASSIVE .venv-peer/bin/python experiments/peers/make_family_fixtures.py \
      tests/data/families

For each variant: ``<out>/<variant>/`` holds ``config.json``, the safetensors weights,
``tokenizer.json`` (a byte-level BPE trained here on the built-in tasks' texts),
``tokenizer_config.json``, ``generation_config.json`` and ``reference.npz``: the prompt ids
``[1, 304]`` (longer than every sliding window, every scaled-RoPE range and four of the
Gated DeltaNet's 64-token chunks) and the log-probabilities at every position of ``COLUMNS`` fixed token ids plus each position's next
token, from the float32 run (``float32``) and the float64 run (``float64``) of the same
weights (the Qwen3.5 float64 run computes its gated delta rule in float64 too, token by
token: ``transformers`` casts it to float32). Every tensor is re-randomised before saving
(default init leaves norms at 1 and biases at 0, which hides mapping bugs). Options:

  --only NAME[,NAME]   build these variants only
  --shape=qwen3-0.6b   instead: one random Qwen3-0.6B-shaped bfloat16 checkpoint (not a
                       fixture; for the model benchmark and the memory measurement);
                       --shape=qwen3-1.7b the same at the next size; --shape=qwen3.5-0.8b a
                       Qwen3.5 hybrid of about 0.8B parameters (dimensions assumed, SHAPES)
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT, COLUMNS, VOCAB, TOKENIZER = 304, 32, 320, 300
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                   temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=32,
                   num_position_embeddings=16)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
             pad_token_id=2)

HYBRID = dict(num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
              rope_parameters=dict(rope_type="default", rope_theta=10_000.0,
                                   partial_rotary_factor=0.25))
EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
               shared_expert_intermediate_size=40, tie_word_embeddings=False)
VARIANTS = {
    # name: (model_type, config overrides, how it is stored)
    "llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64), tie_word_embeddings=False),
        dict(legacy_rope=True)),
    "llama32_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500_000.0, factor=32.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64)), dict(dtype="bfloat16")),
    "mistral": ("mistral", dict(sliding_window=24, tie_word_embeddings=False), {}),
    "qwen25": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False,
                             sliding_window=16, rope_theta=1_000_000.0),
               dict(dtype="float16", shards=2)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True), {}),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                    norm_topk_prob=True, decoder_sparse_step=1,
                                    mlp_only_layers=[1], tie_word_embeddings=False),
                  {}),
    "qwen3_moe_fused": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=24, norm_topk_prob=False,
                                          tie_word_embeddings=False), dict(experts="fused")),
    "olmo2": ("olmo2", dict(tie_word_embeddings=False), {}),
    "olmo3": ("olmo3", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"],
                            rope_parameters=dict(rope_type="yarn", rope_theta=500_000.0,
                                                 factor=8.0, original_max_position_embeddings=64,
                                                 attention_factor=1.2),
                            tie_word_embeddings=False), {}),
    "gemma2": ("gemma2", dict(sliding_window=24, query_pre_attn_scalar=16,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              hidden_activation="gelu_pytorch_tanh"), {}),
    "gemma3": ("gemma3_text", dict(sliding_window=24, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={
                                       "full_attention": dict(rope_type="linear", factor=4.0,
                                                              rope_theta=1_000_000.0),
                                       "sliding_attention": dict(rope_type="default",
                                                                 rope_theta=10_000.0)}), {}),
    # Qwen3.5 hybrids: 3 Gated DeltaNet layers + 1 gated attention layer (partial RoPE);
    # query/key and value heads of different counts and widths
    "qwen35": ("qwen3_5_text", dict(HYBRID, intermediate_size=64, tie_word_embeddings=True), {}),
    "qwen35_moe": ("qwen3_5_moe_text", dict(HYBRID, **EXPERTS), {}),
    # the multimodal checkpoint: language model under model.language_model, a vision tower,
    # fused experts (as Qwen3.5 ships them), bfloat16, multi-token-prediction tensors
    "qwen35_moe_vl": ("qwen3_5_moe", dict(HYBRID, **EXPERTS),
                      dict(multimodal=True, experts="fused", dtype="bfloat16", mtp=True)),
}


def corpus() -> list[str]:
  """The built-in tasks' prompts and answers, and some prose: what the tokenizer learns."""
  texts = []
  for path in sorted(glob.glob(os.path.join(ROOT, "calibjax", "tasks", "builtin", "*.json"))):
    with open(path) as f:
      task = json.load(f)
    texts += task.get("prompts", []) + [" " + a for a in task.get("answers") or []]
  return texts + ["The quick brown fox jumps over the lazy dog. Randomly name a state in US."] * 4


def tokenizer(bos: bool):
  """A byte-level BPE of ``TOKENIZER`` tokens (ids 0-2: BOS, EOS, PAD), with a BOS-adding
  post-processor when ``bos``."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=TOKENIZER, special_tokens=["<|bos|>", "<|eos|>",
                                                                      "<|pad|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus(), trainer)
  if bos:
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", 0)])
  return tok


def rerandomise(model, model_type: str, seed: int) -> None:
  """Every tensor drawn afresh: norms around their identity (1, or 0 for Gemma's and
  Qwen3.5's 1 + w; Qwen3.5's DeltaNet norm is w), biases small, matrices scaled by their
  fan-in, embeddings of unit scale, DeltaNet decay rates ``e^A`` around 0.05 (a memory of
  some 30 tokens, across chunk boundaries)."""
  g = torch.Generator().manual_seed(seed)
  plus_one = model_type.startswith(("gemma", "qwen3_5"))
  with torch.no_grad():
    for name, p in model.named_parameters():
      n = torch.randn(p.shape, generator=g, dtype=torch.float64)
      if name.endswith("A_log"):
        value = -3 + 0.5 * n
      elif "norm" in name:
        value = 0.2 * n if plus_one and "linear_attn.norm" not in name else 1 + 0.2 * n
      elif name.endswith("bias"):
        value = 0.1 * n
      elif "embed_tokens" in name or "lm_head" in name:
        value = n
      else:
        value = n / np.sqrt(p.shape[-1])
      p.copy_(value.to(p.dtype))


def build(name: str, out: str) -> None:
  from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
  model_type, overrides, store = VARIANTS[name]
  torch.manual_seed(0)
  if store.get("multimodal"):
    from transformers import AutoModelForImageTextToText
    cfg = AutoConfig.for_model(model_type, text_config={**SMALL, **overrides},
                               vision_config=TINY_VISION, tie_word_embeddings=False)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32,
                                                    experts_implementation="eager").eval()
  else:
    cfg = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                             experts_implementation="eager").eval()
  rerandomise(model, model_type, seed=sum(map(ord, name)))
  dtype = store.get("dtype", "float32")
  if dtype != "float32":  # the reference runs the stored (rounded) weights
    with torch.no_grad():
      for p in model.parameters():
        p.copy_(p.to(getattr(torch, dtype)).to(torch.float32))
  folder = os.path.join(out, name)
  os.makedirs(folder, exist_ok=True)
  for old in glob.glob(os.path.join(folder, "*")):
    os.remove(old)
  model.save_pretrained(folder, safe_serialization=True)
  rewrite_weights(folder, dtype, store)
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  if store.get("legacy_rope"):  # the pre-5.0 layout: rope_theta + rope_scaling
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  GenerationConfig(bos_token_id=0, eos_token_id=[1], pad_token_id=2).save_pretrained(folder)
  bos = not model_type.startswith(("qwen", "olmo"))
  tokenizer(bos).save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|bos|>" if bos else None, "eos_token": "<|eos|>",
               "pad_token": "<|pad|>"}, f, indent=2)
  reference(model, folder)
  print(name, sorted(os.listdir(folder)), flush=True)


def rewrite_weights(folder: str, dtype: str, store: dict) -> None:
  """The saved weights in the dtype, expert layout and number of shards asked for."""
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
    os.remove(f)
  for f in glob.glob(os.path.join(folder, "*.index.json")):
    os.remove(f)
  if store.get("experts") == "fused":  # transformers writes per-expert tensors: fuse them
    prefixes = sorted({k.split("experts.")[0] for k in tensors if ".experts.0." in k})
    for p in prefixes:
      count = len({k for k in tensors if k.startswith(p + "experts.") and "gate_proj" in k})
      pop = lambda part: [tensors.pop(f"{p}experts.{j}.{part}.weight") for j in range(count)]
      gate, up, down = pop("gate_proj"), pop("up_proj"), pop("down_proj")
      tensors[p + "experts.gate_up_proj"] = torch.stack(
          [torch.cat([g, u]) for g, u in zip(gate, up)])  # [E, 2f, d], gate rows first
      tensors[p + "experts.down_proj"] = torch.stack(down)  # [E, d, f]
  if store.get("mtp"):  # as Qwen3.5 checkpoints hold them (transformers does not build them)
    hidden = tensors["lm_head.weight"].shape[1]
    tensors["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden)
    tensors["mtp.norm.weight"] = torch.randn(hidden)
  tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}
  shards = store.get("shards", 1)
  if shards == 1:
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return
  names = sorted(tensors)
  weight_map = {}
  for i in range(shards):
    part = names[i::shards]
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({k: tensors[k] for k in part}, os.path.join(folder, file), metadata={"format": "pt"})
    weight_map.update({k: file for k in part})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def delta_rule_recurrence(query, key, value, g, beta, initial_state=None,
                          output_final_state=False, use_qk_l2norm_in_kernel=False, **_):
  """The gated delta rule token by token in the inputs' dtype (``transformers``' own
  implementations compute it in float32 whatever the model's dtype)."""
  heads = value.shape[2]
  query, key = (x.repeat_interleave(heads // x.shape[2], dim=2) for x in (query, key))
  if use_qk_l2norm_in_kernel:
    query, key = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (query, key))
  query = query / query.shape[-1] ** 0.5
  b, t, _, dk = key.shape
  state = torch.zeros(b, heads, dk, value.shape[-1], dtype=value.dtype)
  if initial_state is not None:
    state = initial_state.to(value.dtype)
  out = torch.zeros_like(value)
  for i in range(t):
    state = state * g[:, i].exp()[..., None, None]
    delta = (value[:, i] - (state * key[:, i, :, :, None]).sum(-2)) * beta[:, i, :, None]
    state = state + key[:, i, :, :, None] * delta[:, :, None, :]
    out[:, i] = (state * query[:, i, :, :, None]).sum(-2)
  return out, state if output_final_state else None


@contextlib.contextmanager
def delta_rule_in(dtype):
  """Within: Qwen3.5's gated delta rule in float64 when ``dtype`` is (else unchanged)."""
  from transformers.models.qwen3_5 import modeling_qwen3_5
  from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
  names = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
  saved = [(m, n, getattr(m, n)) for m in (modeling_qwen3_5, modeling_qwen3_5_moe) for n in names]
  if dtype == torch.float64:
    for m, n, _ in saved:
      setattr(m, n, delta_rule_recurrence)
  try:
    yield
  finally:
    for m, n, f in saved:
      setattr(m, n, f)


def reference(model, folder: str) -> None:
  """``reference.npz``: prompt ids, the chosen columns, float32 and float64 log-probs."""
  rng = np.random.default_rng(len(folder))
  ids = rng.integers(3, TOKENIZER, size=(1, PROMPT))
  columns = np.sort(rng.choice(VOCAB, size=COLUMNS, replace=False))
  out = {"ids": ids, "columns": columns}
  for dtype in (torch.float32, torch.float64):
    m = model.to(dtype)
    with torch.no_grad(), delta_rule_in(dtype):
      logits = m(torch.as_tensor(ids)).logits[0].to(torch.float64)
    logp = torch.log_softmax(logits, -1).numpy()
    nxt = np.append(ids[0, 1:], 0)
    out[str(dtype).split(".")[-1]] = np.concatenate(
        [logp[:, columns], logp[np.arange(PROMPT), nxt][:, None]], 1)
  model.to(torch.float32)
  np.savez(os.path.join(folder, "reference.npz"), **out)


_QWEN3 = dict(vocab_size=151_936, num_hidden_layers=28, num_attention_heads=16,
              num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
              rope_theta=1_000_000.0)
_QWEN35 = dict(vocab_size=248_320, num_hidden_layers=24, num_attention_heads=8,
               num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
               linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
               max_position_embeddings=262_144,
               rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0,
                                    partial_rotary_factor=0.25))
SHAPES = {  # name: (model_type, config); the Qwen3.5 one is assumed (no hub to read the real)
    "qwen3-0.6b": ("qwen3", dict(_QWEN3, hidden_size=1024, intermediate_size=3072)),
    "qwen3-1.7b": ("qwen3", dict(_QWEN3, hidden_size=2048, intermediate_size=6144)),
    "qwen3.5-0.8b": ("qwen3_5_text", dict(_QWEN35, hidden_size=1024, intermediate_size=3584)),
}


def shaped(out: str, shape: str) -> None:
  """A random bfloat16 checkpoint of ``SHAPES[shape]`` (tied embeddings)."""
  from transformers import AutoConfig, AutoModelForCausalLM
  model_type, config = SHAPES[shape]
  cfg = AutoConfig.for_model(model_type, tie_word_embeddings=True, rms_norm_eps=1e-6,
                             eos_token_id=1, bos_token_id=0, **config)
  model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
  rerandomise(model, model_type, seed=0)
  model.save_pretrained(out, safe_serialization=True)
  tokenizer(False).save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|eos|>"}, f)
  print(out, sorted(os.listdir(out)))


def main(argv):
  args = [a for a in argv if not a.startswith("--")]
  opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
  if not args:
    raise SystemExit(__doc__)
  if "shape" in opts:
    return shaped(args[0], opts["shape"])
  names = opts["only"].split(",") if "only" in opts else list(VARIANTS)
  for name in names:
    build(name, args[0])


if __name__ == "__main__":
  main(sys.argv[1:])

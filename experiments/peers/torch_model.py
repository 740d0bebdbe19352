r"""PyTorch peer: the reference Gemma 3 of `transformers`, loading the packaged GGUF file.

Runs in `.venv-peer` (see setup_peer_env.sh; needs gguf, accelerate, sentencepiece too).

  .venv-peer/bin/python experiments/peers/torch_model.py golden GGUF_PATH OUT.npz
      next-token log-probabilities (top 100 per position) on fixed prompts, one longer than
      the 512-token sliding window, and tokenizer encodings of a mixed corpus;
  .venv-peer/bin/python experiments/peers/torch_model.py time MODEL_PATH OUT.json
      prefill of 8 x 128 tokens and greedy decoding of 32 tokens for a batch of 8 (MODEL_PATH:
      a GGUF file or a Hugging Face folder).
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

LONG = " ".join(f"Item {i}: the {w} of Texas, California, Ohio and Maine." for i, w in
                enumerate(["capital", "largest city", "river", "flag", "motto"] * 12))
PROMPTS = [
    "Name a random US state. Answer:",
    "Generate a random integer uniformly between 1 and 20. Answer:",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: What is the chemical symbol for gold?\nAnswer:",
    LONG,
]
CORPUS = [
    "Hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n\nand   runs     of spaces",
    "digits 1234567890 and 3.14159", "Café naïve résumé Ångström", "emoji 🙂🚀👩‍👩‍👧 done",
    "中文 日本語 한국어", "control \x01\x02 bytes", "Texas", " Texas", "\n\nTexas.", "",
    "ẞ ǅ ﬁ ligature", "a" * 50, "<b>markup</b> & entities",
]


def load(path, dtype=torch.float32):
  if os.path.isdir(path):
    return None, AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
  folder, name = os.path.split(path)
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
  return tok, model.eval()


def golden(path, out):
  """Top-100 next tokens of the float64 run and their log-probabilities in float64 and in
  float32. The float64 run is float64 except its rotary angles, which `transformers`
  computes in float32 whatever the model's dtype (as calibjax does; see BUILD_NOTES.md)."""
  tok, model64 = load(path, torch.float64)
  _, model32 = load(path, torch.float32)
  data = {}
  for i, prompt in enumerate(PROMPTS):
    ids = tok(prompt, return_tensors="pt").input_ids  # BOS added
    with torch.no_grad():
      logp64 = torch.log_softmax(model64(ids).logits[0], dim=-1)
      logp32 = torch.log_softmax(model32(ids).logits[0].float(), dim=-1)
    top = torch.topk(logp64, 100, dim=-1)
    data[f"prompt{i}/text"] = np.array(prompt)
    data[f"prompt{i}/ids"] = ids[0].numpy()
    data[f"prompt{i}/top_ids"] = top.indices.numpy().astype(np.int32)
    data[f"prompt{i}/top_logp64"] = top.values.numpy()
    data[f"prompt{i}/top_logp32"] = torch.gather(logp32, -1, top.indices).numpy()
  for i, text in enumerate(CORPUS):
    data[f"corpus{i}/text"] = np.array(text)
    data[f"corpus{i}/ids"] = np.array(tok.encode(text, add_special_tokens=False), np.int32)
  data["meta/versions"] = np.array([torch.__version__, __import__("transformers").__version__])
  np.savez_compressed(out, **data)
  print(f"wrote {out}: {len(PROMPTS)} prompts, lengths",
        [len(data[f"prompt{i}/ids"]) for i in range(len(PROMPTS))])


def timing(path, out, batch=8, prompt_len=128, new_tokens=32):
  _, model = load(path)
  high = min(20000, model.config.get_text_config().vocab_size)
  ids = torch.randint(10, high, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    model(ids[:, :8])  # warm-up
    start = time.perf_counter()
    model(ids, logits_to_keep=1)  # what generate() runs first, and what calibjax's prefill does
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    total = time.perf_counter() - start
  decode = max(total - prefill, 1e-9)
  res = {"torch": torch.__version__, "threads": torch.get_num_threads(),
         "prefill_tokens_per_s": batch * prompt_len / prefill,
         "decode_tokens_per_s": batch * new_tokens / decode}
  with open(out, "w") as f:
    json.dump(res, f, indent=2)


if __name__ == "__main__":
  mode, *args = sys.argv[1:]
  {"golden": golden, "time": timing}[mode](*args)

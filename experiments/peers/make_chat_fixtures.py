"""Builds the chat and tokenizer fixtures of ``tests/models/test_chat.py`` with `transformers`
(its ``apply_chat_template`` and fast tokenizers). Runs in the PyTorch peer environment, never
in CI:

  bash experiments/peers/setup_peer_env.sh
  .venv-peer/bin/python experiments/peers/make_chat_fixtures.py tests/data/chat

Writes into the folder:
- ``renders.json``: for each of the six real templates of ``../shared/chat_templates`` (copied
  here, byte for byte, as ``templates/<file>``) and each conversation (one user turn; system +
  user; two turns; Qwen3 with thinking on and off; Llama with a fixed ``date_string``), the
  text ``transformers.apply_chat_template`` renders (``add_generation_prompt=True``), or the
  error it raises;
- ``byte_level/`` and ``sentencepiece/``: a byte-level BPE ``tokenizer.json`` (2,000 tokens,
  Llama 3 / Qwen style, with special and added tokens) and a SentencePiece-style one (``▁``
  pieces and ``<0xAB>`` byte fallback, Gemma / Mistral style), trained here on the built-in
  tasks' texts, each with ``tokenizer_config.json`` and ``golden.json``: the ids that
  `transformers`' tokenizer gives a corpus (unicode, digits, whitespace runs, special tokens in
  text), with and without special tokens, and its decodings;
- ``chat_model/``: tokenizer files with ``<|im_start|>`` / ``<|im_end|>`` and Qwen3's template,
  for the tiny Qwen3 checkpoint of ``tests/data/families`` (the end-to-end chat test).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATES = os.path.join(ROOT, "..", "shared", "chat_templates")
SPECIAL = {  # each model's special-token strings (its tokenizer_config.json)
    "meta-llama--Llama-3.1-8B-Instruct.jinja": {"bos_token": "<|begin_of_text|>",
                                                "eos_token": "<|eot_id|>"},
    "Qwen--Qwen3-8B.jinja": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "Qwen--Qwen2.5-7B-Instruct.jinja": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "google--gemma-3-270m-it.jinja": {"bos_token": "<bos>", "eos_token": "<eos>",
                                      "pad_token": "<pad>"},
    "mistralai--Mistral-7B-Instruct-v0.3.jinja": {"bos_token": "<s>", "eos_token": "</s>",
                                                  "unk_token": "<unk>"},
    "allenai--OLMo-2-1124-7B-Instruct.jinja": {"bos_token": "<|endoftext|>",
                                               "eos_token": "<|endoftext|>",
                                               "pad_token": "<|pad|>"},
}
USER = {"role": "user", "content": "Randomly name a state in US."}
CONVERSATIONS = {
    "user": ([USER], {}),
    "system_user": ([{"role": "system", "content": "Answer with one name only."}, USER], {}),
    "two_turns": ([USER, {"role": "assistant", "content": "Ohio"},
                   {"role": "user", "content": "Another one, please."}], {}),
}
EXTRA = {
    "Qwen--Qwen3-8B.jinja": {"thinking_off": ([USER], {"enable_thinking": False}),
                             "thinking_on": ([USER], {"enable_thinking": True})},
    "meta-llama--Llama-3.1-8B-Instruct.jinja": {"fixed_date": ([USER],
                                                               {"date_string": "01 Jan 2026"})},
}
CORPUS = [
    "Hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n\nand   runs     of spaces",
    "digits 1234567890 and 3.14159", "Café naïve résumé Ångström", "emoji 🙂🚀👩‍👩‍👧 done",
    "中文 日本語 한국어", "control \x01\x02 bytes", "Texas", " Texas", "\n\nTexas.", "",
    "New Hampshire, New Jersey and New Mexico", "<|eos|> in text, <|im_start|>user",
    "a" * 40, "<b>markup</b> & entities",
]


def renders(out: str) -> None:
  from transformers.utils.chat_template_utils import render_jinja_template
  os.makedirs(os.path.join(out, "templates"), exist_ok=True)
  result = {}
  for name, special in SPECIAL.items():
    shutil.copyfile(os.path.join(TEMPLATES, name), os.path.join(out, "templates", name))
    with open(os.path.join(TEMPLATES, name), encoding="utf-8", newline="") as f:
      source = f.read()
    cases = {**CONVERSATIONS, **EXTRA.get(name, {})}
    result[name] = {"special": special, "cases": {}}
    for case, (messages, kwargs) in cases.items():
      try:
        text = render_jinja_template(conversations=[messages], chat_template=source,
                                     add_generation_prompt=True, **special, **kwargs)[0][0]
        entry = {"messages": messages, "kwargs": kwargs, "text": text}
      except Exception as e:  # the template's raise_exception
        entry = {"messages": messages, "kwargs": kwargs, "error": f"{type(e).__name__}: {e}"}
      result[name]["cases"][case] = entry
  with open(os.path.join(out, "renders.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False, sort_keys=True)


def corpus() -> list[str]:
  texts = []
  for path in sorted(glob.glob(os.path.join(ROOT, "calibjax", "tasks", "builtin", "*.json"))):
    with open(path) as f:
      task = json.load(f)
    texts += task.get("prompts", []) + task.get("chat_prompts", [])
    texts += [" " + a for a in task.get("answers") or []] + list(task.get("answers") or [])
  return texts * 3 + CORPUS


def byte_level(vocab: int = 2000):
  """Llama 3 / Qwen style: byte-level BPE, special tokens, one added (non-special) token."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>", "<|eot|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus(), trainer)
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  tok.add_tokens([AddedToken(" United States", normalized=False)])
  return tok, {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}


def sentencepiece(vocab: int = 1200):
  """Gemma / Mistral style: "▁" for spaces, BPE pieces, <0xAB> byte-fallback tokens."""
  from tokenizers import Tokenizer, models, normalizers, trainers
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.Replace(" ", "▁")
  trainer = trainers.BpeTrainer(vocab_size=vocab - 256, special_tokens=["<pad>", "<eos>", "<bos>",
                                                                       "<unk>"])
  tok.train_from_iterator(corpus(), trainer)
  spec = json.loads(tok.to_str())
  v = spec["model"]["vocab"]
  for b in range(256):  # byte tokens, as SentencePiece stores them
    v.setdefault(f"<0x{b:02X}>", len(v))
  spec["model"]["byte_fallback"] = True
  spec["model"]["unk_token"] = "<unk>"
  spec["decoder"] = {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"}]}
  spec["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                     {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [v["<bos>"]],
                                                         "tokens": ["<bos>"]}}}
  return Tokenizer.from_str(json.dumps(spec)), {"bos_token": "<bos>", "eos_token": "<eos>"}


def tokenizer_fixture(out: str, name: str, make) -> None:
  from transformers import PreTrainedTokenizerFast
  folder = os.path.join(out, name)
  os.makedirs(folder, exist_ok=True)
  tok, special = make()
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(special, f, indent=1)
  ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), **special)
  golden = []
  for text in CORPUS:
    ids = ref(text, add_special_tokens=False).input_ids
    golden.append({"text": text, "ids": ids,
                   "ids_special": ref(text, add_special_tokens=True).input_ids,
                   "decoded": ref.decode(ids)})
  with open(os.path.join(folder, "golden.json"), "w", encoding="utf-8") as f:
    json.dump({"vocab_size": len(ref), "corpus": golden}, f, indent=1, ensure_ascii=False)


def chat_model(out: str) -> None:
  """Tokenizer files for the tiny Qwen3 fixture with Qwen3's template and its turn tokens."""
  import sys as _sys
  _sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from make_family_fixtures import tokenizer
  folder = os.path.join(out, "chat_model")
  os.makedirs(folder, exist_ok=True)
  tok = tokenizer(bos=False)
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 300, 301
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}, f, indent=1)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [301, 1]}, f, indent=1)
  shutil.copyfile(os.path.join(TEMPLATES, "Qwen--Qwen3-8B.jinja"),
                  os.path.join(folder, "chat_template.jinja"))


def main(argv):
  if not argv:
    raise SystemExit(__doc__)
  out = argv[0]
  renders(out)
  tokenizer_fixture(out, "byte_level", byte_level)
  tokenizer_fixture(out, "sentencepiece", sentencepiece)
  chat_model(out)
  print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
  main(sys.argv[1:])

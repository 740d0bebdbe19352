"""Chat templates and `tokenizer.json` tokenizers against `transformers` (fixtures of
``tests/data/chat``, made by ``experiments/peers/make_chat_fixtures.py``): the six real templates
of the paper's instruct models render byte for byte what ``apply_chat_template`` renders; a
byte-level BPE and a SentencePiece-style ``tokenizer.json`` encode and decode a golden corpus
as `transformers`' tokenizer does, and their token bytes rebuild the text."""

import datetime
import json
import os

import numpy as np
import pytest

from calibjax import errors
from calibjax.models import hf_checkpoint
from calibjax.models.chat import ChatTemplate
from tests.helpers import ROOT

DATA = os.path.join(ROOT, "tests", "data", "chat")
with open(os.path.join(DATA, "renders.json"), encoding="utf-8") as _f:
  RENDERS = json.load(_f)
CASES = [(name, case) for name in sorted(RENDERS) for case in sorted(RENDERS[name]["cases"])]


def template(name):
  with open(os.path.join(DATA, "templates", name), encoding="utf-8", newline="") as f:
    return ChatTemplate(f.read(), RENDERS[name]["special"], name)


@pytest.mark.parametrize("name,case", CASES)
def test_templates_render_what_transformers_renders(name, case):
  want = RENDERS[name]["cases"][case]
  t = template(name)
  if "error" in want:
    with pytest.raises(errors.InputError, match="refused"):
      t.render(want["messages"], **want["kwargs"])
  else:
    assert t.render(want["messages"], **want["kwargs"]) == want["text"]


def test_every_template_and_the_special_cases_are_covered():
  assert len(RENDERS) == 6 and len(CASES) == 6 * 3 + 3
  assert RENDERS["Qwen--Qwen3-8B.jinja"]["cases"]["thinking_off"]["text"].endswith(
      "<think>\n\n</think>\n\n")


def test_the_date_is_fixed_not_the_clock():
  """A template that asks for today's date (Llama 3.2 style) gets the fixed date, or the one
  given: the day a run starts never changes its prompt."""
  t = ChatTemplate('{{ strftime_now("%d %b %Y") }}|{{ messages[0].content }}')
  messages = [{"role": "user", "content": "x"}]
  assert t.render(messages) == "26 Jul 2024|x"
  assert t.render(messages, date=datetime.date(2026, 1, 2)) == "02 Jan 2026|x"


def test_template_sources_in_a_folder(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": {"content": "<s>"}, "eos_token": "</s>",
      "chat_template": [{"name": "default", "template": "{{ bos_token }}D"},
                        {"name": "tool_use", "template": "{{ eos_token }}T"}]}))
  assert ChatTemplate.from_folder(str(tmp_path)).render([]) == "<s>D"
  assert ChatTemplate.from_folder(str(tmp_path), "tool_use").render([]) == "</s>T"
  with pytest.raises(errors.ModelLoadError, match="no chat template named 'rag'"):
    ChatTemplate.from_folder(str(tmp_path), "rag")
  (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}J{% if x %}")
  with pytest.raises(errors.ModelLoadError, match="does not compile"):
    ChatTemplate.from_folder(str(tmp_path))
  (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}J")
  assert ChatTemplate.from_folder(str(tmp_path)).render([]) == "<s>J"  # the .jinja file first
  assert ChatTemplate.from_folder(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_tokenizers_equal_transformers_on_a_golden_corpus(kind, tmp_path):
  folder = os.path.join(DATA, kind)
  with open(os.path.join(folder, "golden.json"), encoding="utf-8") as f:
    golden = json.load(f)
  tok = hf_checkpoint.read_tokenizer(folder, vocab_size=golden["vocab_size"] + 7)
  tb = tok.token_bytes()
  assert len(tok.vocab) == golden["vocab_size"] + 7 and tb[-7:] == [None] * 7
  for case in golden["corpus"]:
    text = case["text"]
    assert tok.encode(text, add_bos=False) == case["ids"], text
    assert tok.encode(text) == case["ids_special"], text
    assert tok.decode(case["ids"]) == case["decoded"], text
    if not any(tb[i] is None for i in case["ids"]):  # no special token written in the text
      assert b"".join(tb[i] for i in case["ids"]) == text.encode(), text
  special = [i for i, t in enumerate(tok.vocab) if t in ("<|eos|>", "<eos>", "<|im_start|>")]
  assert special and all(tb[i] is None for i in special)


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
  """The tiny random Qwen3 of ``tests/data/families`` with a chat tokenizer (``<|im_start|>``,
  ``<|im_end|>``), two EOS ids and Qwen3's real template."""
  import shutil
  from calibjax import models
  folder = tmp_path_factory.mktemp("chat") / "qwen3_chat"
  shutil.copytree(os.path.join(ROOT, "tests", "data", "families", "qwen3"), folder)
  for f in os.listdir(os.path.join(DATA, "chat_model")):
    shutil.copyfile(os.path.join(DATA, "chat_model", f), folder / f)
  return models.load(str(folder), cache_dir=str(folder.parent / "cache"), progress=False)


def test_chat_prompts_render_the_template_and_encode_it_once(chat_lm):
  from calibjax import tasks
  from calibjax.models import prompts
  task = tasks.load("us_states")
  p = prompts.task_prompt(chat_lm, task)  # auto: the checkpoint has a template
  assert p.style == "chat" and p.text == (
      "<|im_start|>user\nRandomly name a state in US.<|im_end|>\n<|im_start|>assistant\n"
      "<think>\n\n</think>\n\n")  # Qwen3 with enable_thinking off (the default)
  tok = chat_lm.tokenizer
  assert list(p.ids) == tok.encode(p.text, add_bos=False) and p.ids[0] == tok.vocab.index(
      "<|im_start|>") and p.ids.count(p.ids[0]) == 2  # the turn tokens, each once
  assert tok.eos_ids == (301, 1)  # <|im_end|> (tokenizer_config) and generation_config's
  thinking = prompts.task_prompt(chat_lm, task, "chat", enable_thinking=True)
  assert thinking.text.endswith("<|im_start|>assistant\n")
  system = tasks.from_dict({"name": "s", "description": "", "prompts": ["Q:"],
                            "chat_prompts": ["Pick one."], "system_prompt": "Be brief.",
                            "answers": ["a"]})
  assert prompts.task_prompt(chat_lm, system).text.startswith(
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPick one.<|im_end|>")
  plain = prompts.task_prompt(chat_lm, task, "completion")
  assert plain.text == task.prompts[0] and list(plain.ids) == tok.encode(task.prompts[0])
  no_chat = tasks.from_dict({"name": "n", "description": "", "prompts": ["ab"], "answers": ["a"]})
  with pytest.raises(errors.TaskError, match="no 'chat_prompts'"):
    prompts.task_prompt(chat_lm, no_chat, "chat")
  from tests.helpers import small_lm
  with pytest.raises(errors.InputError, match="no chat template"):
    prompts.task_prompt(small_lm(), task, "chat")
  assert prompts.task_prompt(small_lm(), no_chat).style == "completion"  # auto


def test_every_eos_id_ends_an_answer(chat_lm):
  from calibjax import tasks
  from calibjax.sequence.tree import Tree
  tree = Tree(tasks.load("us_states"), chat_lm.tokenizer)
  assert tree.eos_ids == {301, 1}
  node = tree.root(np.ones(1))
  for token in chat_lm.tokenizer.encode("Ohio", add_bos=False):
    node = tree.child(node, token, np.ones(1))
  mask = tree.valid_mask(node)
  assert mask[301] and mask[1] and tree.index.advance(node.state, 301) is None

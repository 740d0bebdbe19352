"""Token-validity masks (outlines-core) against a pure-Python string-prefix oracle, on the
packaged Gemma 3 vocabulary, at sampled prefixes of every built-in task."""

import os
import random

import numpy as np
import pytest

from calibjax import tasks
from calibjax.models import hf_checkpoint
from calibjax.tasks import validity
from tests.helpers import ROOT


# On the packaged Gemma vocabulary (262,144 tokens, 2–8 s per task), the main job's tasks and
# those with multi-word, numeric and single-letter answers by default; every task with -m slow.
GEMMA_DEFAULT = ("us_states", "integers_1_20", "weekdays", "us_state_capitals", "integers_1_100",
                 "letters")
CASES = [pytest.param(kind, name, marks=[pytest.mark.slow] if kind == "gemma" and
                      name not in GEMMA_DEFAULT else []) for kind in ("gemma", "byte_level",
                                                                      "sentencepiece")
         for name in tasks.names()]


@pytest.fixture(scope="module")
def vocab(request):
  """The packaged Gemma 3 vocabulary (SentencePiece, from GGUF), and the byte-level BPE and
  SentencePiece-style ``tokenizer.json`` vocabularies of ``tests/data/chat``."""
  if request.param == "gemma":
    tok = request.getfixturevalue("gemma_tokenizer")
  else:
    tok = hf_checkpoint.read_tokenizer(os.path.join(ROOT, "tests", "data", "chat", request.param),
                                       vocab_size=2048)
  return tok.vocab, tok.eos_ids, tok.token_bytes()


@pytest.fixture(scope="module")
def index_cache(tmp_path_factory):
  """One validity-index cache for the module: each task's index is built once."""
  return str(tmp_path_factory.mktemp("index"))


class PrefixOracle:
  """SPEC §6 by brute force: a token is valid iff text + its bytes is a prefix of some
  leading + answer + terminator string; EOS iff the text is a complete answer (when the task
  allows it) or ends with a terminator."""

  def __init__(self, task):
    fold = (lambda b: b) if task.case_sensitive else (lambda b: b.lower())
    self.fold = fold
    self.full = {fold((l + a + x).encode()) for l in task.leading for a in task.answers
                 for x in task.terminators}
    self.answers = {fold((l + a).encode()) for l in task.leading for a in task.answers}
    self.prefixes = {s[:i] for s in self.full for i in range(1, len(s) + 1)}
    self.eos_ends = task.end_of_sequence

  def mask(self, text, token_bytes, eos_ids):
    t = self.fold(text)
    m = np.array([b is not None and b != b"" and self.fold(t + b) in self.prefixes
                  for b in token_bytes])
    m[list(eos_ids)] = t in self.full or (self.eos_ends and t in self.answers)
    return m


def walk(index, text, byte_token):
  """The index state after ``text`` fed byte by byte (a non-canonical tokenisation)."""
  state = index.initial_state
  for b in text:
    state = index.advance(state, byte_token[b])
    if state is None:
      return None
  return state


@pytest.mark.parametrize("vocab,name", CASES, indirect=["vocab"])
def test_masks_equal_the_string_prefix_oracle(vocab, name, index_cache):
  words, eos, tb = vocab
  task = tasks.load(name)
  index = validity.ValidityIndex(task, tb, eos, cache_dir=index_cache)
  oracle = PrefixOracle(task)
  byte_token = {}  # a one-byte token per byte: walking byte by byte is non-canonical
  for i, b in enumerate(tb):
    if b is not None and len(b) == 1:
      byte_token.setdefault(b[0], i)
  rng = random.Random(name)
  prefixes = {b""}
  for _ in range(3):
    full = (rng.choice(task.leading) + rng.choice(task.answers) +
            rng.choice(task.terminators)).encode()
    prefixes.update(full[:rng.randint(1, len(full))] for _ in range(2))
    prefixes.add(full[:-1])          # a complete answer: EOS and terminators valid
  for text in sorted(prefixes):
    state = walk(index, text, byte_token)
    assert state is not None, text
    got = index.mask(state, text)
    want = oracle.mask(text, tb, eos)
    diff = np.flatnonzero(got != want)
    assert diff.size == 0, (text, [(words[i], bool(got[i])) for i in diff[:5]])
  # invalid continuations are rejected by advance()
  assert walk(index, b"Zz9!", byte_token) is None


def test_prefix_answers_and_multi_token_paths(gemma_tokenizer, index_cache):
  words, eos, tb = gemma_tokenizer.vocab, gemma_tokenizer.eos_ids, gemma_tokenizer.token_bytes()
  index = validity.ValidityIndex(tasks.load("integers_1_20"), tb, eos,
                                 cache_dir=index_cache)
  state = index.advance(index.initial_state, words.index("1"))
  ok = {words[i] for i in np.flatnonzero(index.mask(state, b"1"))}
  assert {"0", "9", "\n", ".", ",", "<eos>"} <= ok          # "1" complete, "10".."19" open
  state = index.advance(state, words.index("9"))
  ok = {words[i] for i in np.flatnonzero(index.mask(state, b"19"))}
  assert "0" not in ok and "<eos>" in ok                    # "190" is no answer
  states = validity.ValidityIndex(tasks.load("us_states"), tb, eos,
                                  cache_dir=index_cache)
  s = states.advance(states.initial_state, words.index("▁New"))
  ok = {words[i] for i in np.flatnonzero(states.mask(s, b" New"))}
  assert {"▁York", "▁Hampshire", "▁Jersey", "▁Mexico"} <= ok and "<eos>" not in ok


def test_regex_escapes_and_terminator_required():
  t = tasks.from_dict({"name": "x", "description": "", "prompts": ["Q"],
                       "answers": ["a+b", "(c)", "1", "10"]})
  r = validity.task_regex(t)
  assert r == r"( |)(a\+b|\(c\)|10|1)(" + "\n" + r"|\.|,)"  # longest first, stable


def test_index_cache_is_plain_data_checked_by_its_digest(tmp_path, capsys):
  """The cached index is the index's binary form behind its SHA-256 (never a pickle): a
  damaged or planted file is reported and rebuilt, and a pickle placed there never runs."""
  import os
  import pickle
  from calibjax.testing import tiny
  task = tasks.load("coin_flip")
  build = lambda: validity.ValidityIndex(task, tiny.tokenizer().token_bytes(), 1,
                                         cache_dir=str(tmp_path))
  masks = lambda idx: np.stack([idx.mask(idx.initial_state, b"")] + [
      idx.mask(s, b"") for s in [idx.advance(idx.initial_state, 4 + ord(" "))] if s is not None])
  first = build()
  (name,) = os.listdir(tmp_path)
  path = tmp_path / name
  assert not path.read_bytes().startswith(b"\x80")  # pickle's protocol marker
  np.testing.assert_array_equal(masks(build()), masks(first))
  assert capsys.readouterr().err == ""
  blob = bytearray(path.read_bytes())
  blob[-1] ^= 0x01  # one flipped bit
  path.write_bytes(bytes(blob))
  np.testing.assert_array_equal(masks(build()), masks(first))
  assert "checksum mismatch" in capsys.readouterr().err

  class Planted:
    def __reduce__(self):
      return (os.mkdir, (str(tmp_path / "code-ran"),))
  path.write_bytes(pickle.dumps(Planted()))
  np.testing.assert_array_equal(masks(build()), masks(first))
  assert not (tmp_path / "code-ran").exists()
  assert "rebuilding the validity index" in capsys.readouterr().err


def test_markdown_surface_forms_when_the_task_accepts_them(index_cache):
  """``markdown: true`` accepts ``**Ohio**`` (and ``*``, ``__``, ``_``, backticks) — masks
  equal the string-prefix oracle over the wrapped strings; the default stays strict."""
  from calibjax.testing import tiny
  tb = tiny.tokenizer().token_bytes()
  raw = {"name": "md", "description": "", "prompts": ["Q"], "answers": ["ab", "b"]}
  strict, loose = tasks.from_dict(raw), tasks.from_dict({**raw, "markdown": True})
  wrapped = [m + a + m for m in ("**", "__", "*", "_", "`") for a in raw["answers"]]
  oracle = PrefixOracle(tasks.from_dict({**raw, "answers": raw["answers"] + wrapped}))
  index = validity.ValidityIndex(loose, tb, (1,), cache_dir=index_cache)
  byte_token = {b[0]: i for i, b in enumerate(tb) if b is not None and len(b) == 1}
  for text in [b"", b" *", b" **a", b" **ab*", b" **ab**", b"`b`", b"_b"]:
    state = walk(index, text, byte_token)
    assert state is not None, text
    np.testing.assert_array_equal(index.mask(state, text), oracle.mask(text, tb, (1,)), str(text))
  assert loose.answer_index("**ab**") == 0 and loose.answer_index("`b`") == 1
  assert strict.answer_index("**ab**") is None and loose.answer_index("**ab*") is None
  strict_index = validity.ValidityIndex(strict, tb, (1,), cache_dir=index_cache)
  assert walk(strict_index, b" **", byte_token) is None

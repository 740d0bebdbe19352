"""Helpers shared by the tests: adversarial logits and masks, a small task with its
seven-token model, and running an experiment binary with flags."""

import dataclasses
import json
import os

import numpy as np
from absl.testing import flagsaver

from calibjax import tasks
from calibjax.models import LanguageModel
from calibjax.testing import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def random_case(rng, batch, vocab, n_valid=None, ties=False, neg_inf=0.0):
  """Logits ``[batch, vocab]`` and a mask with ``n_valid`` valid tokens per row (random if
  None). ``ties`` draws small integers (many ties); ``neg_inf`` is the share of -inf logits."""
  if ties:
    z = rng.integers(-3, 4, size=(batch, vocab)).astype(np.float32)
  else:
    z = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
  if neg_inf:
    z[rng.random((batch, vocab)) < neg_inf] = -np.inf
  m = np.zeros((batch, vocab), bool)
  for b in range(batch):
    k = rng.integers(0, vocab + 1) if n_valid is None else n_valid
    m[b, rng.choice(vocab, size=k, replace=False)] = True
  return z, m


# Answers that share prefixes ("a" / "ab"), two leading texts, two terminators.
TASK = tasks.from_dict({"name": "tiny", "description": "", "prompts": ["ab"],
                        "answers": ["ab", "b", "a", "ba"], "terminators": ["\n", "."]})


class SmallTokenizer:
  """Seven tokens, so that a random tiny model puts real mass on the task's answers."""
  vocab = ["<pad>", "<eos>", "<bos>", "a", "b", " ", "\n", ".", "ab"]
  types = np.array([3, 3, 3, 1, 1, 1, 1, 1, 1])
  bos_id, eos_id, pad_id = 2, 1, 0
  eos_ids = (1,)

  def encode(self, text, add_bos=True):
    return [self.bos_id] * add_bos + [self.vocab.index(c) for c in text]

  def token_bytes(self):
    return [None if kind == 3 else tok.encode() for tok, kind in zip(self.vocab, self.types)]


def small_lm():
  """A random tiny Gemma 3 over :class:`SmallTokenizer` (every token has real mass)."""
  cfg = dataclasses.replace(tiny.CONFIG, vocab_size=len(SmallTokenizer.vocab))
  model = tiny.model(seed=7, cfg=cfg)
  model.embed[...] = model.embed[...] * 0.3  # moderate logits: every token has mass
  return LanguageModel(model, SmallTokenizer(), "small")


def run(module, setup, out, **extra):
  flags = dict(model=setup["model"], task=setup["tasks"], out=str(out),
               cache_dir=setup["cache_dir"], batch_size=8)
  with flagsaver.flagsaver(**{**flags, **extra}):
    return module.run()


def read(path):
  with open(path) as f:
    return f.read()


def tiny_run_setup(folder) -> dict:
  """A tiny GGUF model and one small task file in ``folder``: what :func:`run` and the
  binaries' command lines take (``model``, ``tasks``, ``cache_dir``)."""
  model = str(folder / "tiny.gguf")
  tiny.write_gguf(model, tiny.model(seed=3))
  task = folder / "tiny_ab.json"
  task.write_text(json.dumps({"name": "tiny_ab", "description": "test task", "prompts": ["ab"],
                              "answers": ["ab", "b", "a", "ba"], "terminators": ["\n", "."]}))
  return {"model": model, "tasks": [str(task)], "cache_dir": str(folder / "cache")}

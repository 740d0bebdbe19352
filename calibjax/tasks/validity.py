"""Token validity over the whole vocabulary (SPEC §6), from a constrained-decoding engine.

A task's language is ``leading · answer · terminator`` — the leading texts, the answers (or
the answer regex) and the terminators as alternations, the terminator *required* (an
optional one would let leftmost-first matching drop "10" after "1"). ``outlines-core``
compiles it against the tokenizer's vocabulary given as bytes (``tokenizer.token_bytes()``:
SentencePiece "▁" is a space, byte tokens ``<0xAB>`` are that byte, byte-level BPE tokens map
back through the byte alphabet, control and special tokens never match), so a
token is valid exactly when the text so far plus the token's bytes is still a prefix of
the language: multi-token answers, non-canonical tokenisations, byte-fallback tokens and
tokens that would run past a terminator are all decided at the string level.

End of sequence is decided from the text, outside the regex: EOS is valid after a complete
answer when the task allows it (``end_of_sequence``), and after a terminator.

Index construction grows with the answer set (seconds for hundreds of answers), so indexes
are cached on disk per task × vocabulary: the index's own binary serialisation
(``Index.from_binary``, plain data that cannot run code, never a pickle) behind its SHA-256.
A cache file that does not match its digest is reported on stderr and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys

import numpy as np

from calibjax import errors
from calibjax.tasks.schema import MARKDOWN, Task

_META = set("\\.+*?()|[]{}^$#&-~")


def _escape(text: str) -> str:
  return "".join("\\" + c if c in _META else c for c in text)


def _alternation(options) -> str:
  # longest first, so that no alternative can stop a longer one under leftmost-first matching
  return "(" + "|".join(_escape(o) for o in sorted(options, key=len, reverse=True)) + ")"


def task_regex(task: Task) -> str:
  """The task's language as one regex: leading, answer, terminator (required)."""
  answers = _alternation(task.answers) if task.answers is not None else f"({task.answer_regex})"
  if task.markdown:  # the answer alone or wrapped in one emphasis mark
    answers = "(" + "|".join([answers] + [f"{_escape(m)}{answers}{_escape(m)}"
                                          for m in MARKDOWN]) + ")"
  if not task.case_sensitive:
    answers = f"(?i:{answers})"
  terms = _alternation(task.terminators) if task.terminators else "()"
  return _alternation(task.leading) + answers + terms


def _write_index(path: str, index) -> None:
  """``sha256(data) + data``, ``data`` the index's binary form, written atomically."""
  constructor, (data,) = index.__reduce__()  # (Index.from_binary, (bytes,))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(hashlib.sha256(data).digest() + data)
  os.replace(tmp, path)


def _read_index(path: str):
  """The cached index, or None (reported on stderr) when the file fails its digest."""
  from outlines_core import Index
  with open(path, "rb") as f:
    blob = f.read()
  digest, data = blob[:32], blob[32:]
  if hashlib.sha256(data).digest() == digest:
    try:
      return Index.from_binary(data)
    except Exception as e:  # a digest-valid file of another outlines-core version
      reason = f"unreadable ({type(e).__name__})"
  else:
    reason = "checksum mismatch (corrupt)"
  print(f"calibjax: rebuilding the validity index {path}: {reason}.", file=sys.stderr)
  return None


@functools.lru_cache(maxsize=4)
def _vocabulary(token_bytes: tuple, eos_ids: tuple) -> tuple[dict[bytes, list[int]], str]:
  """outlines-core's token table (bytes → ids, EOS and empty tokens left out) and its digest,
  once per vocabulary: ~1 s for 262,144 tokens, the same for every task of a run."""
  table: dict[bytes, list[int]] = {}
  for i, b in enumerate(token_bytes):
    if b is not None and b and i not in eos_ids:
      table.setdefault(b, []).append(i)
  digest = hashlib.sha256(repr((sorted(table.items()), eos_ids)).encode()).hexdigest()
  return table, digest


class ValidityIndex:
  """Valid next tokens of one task at any state of its decoding.

  ``initial_state``; ``mask(state, text) -> bool [V]`` (``text``: the bytes generated so far,
  which decide EOS); ``advance(state, token) -> state or None`` (None: the token is invalid).
  ``eos_ids``: the end-of-sequence id, or several (instruct models often have more than one:
  each ends an answer).
  """

  def __init__(self, task: Task, token_bytes: list[bytes | None], eos_ids,
               cache_dir: str | None = None):
    from outlines_core import Index, Vocabulary
    self.task = task
    self.vocab_size = len(token_bytes)
    self.eos_ids = tuple(sorted({int(e) for e in np.atleast_1d(eos_ids)}))
    eos_id = self.eos_ids[0]
    table, vocabulary = _vocabulary(tuple(token_bytes), self.eos_ids)
    self.regex = task_regex(task)
    key = hashlib.sha256(repr((self.regex, vocabulary)).encode()).hexdigest()
    path = os.path.join(cache_dir, f"{task.name}-{key[:16]}.index") if cache_dir else None
    index = _read_index(path) if path and os.path.exists(path) else None
    if index is None:
      try:
        index = Index(self.regex, Vocabulary(eos_id, table))
      except Exception as e:
        raise errors.TaskError(f"{task.source}: the task's language {self.regex!r:.200} cannot "
                               f"be compiled against the vocabulary ({e}).") from e
      if path:
        _write_index(path, index)
    self._index = index
    self._final = set(index.get_final_states())
    self.initial_state = index.get_initial_state()
    self._terminators = [t.encode() for t in task.terminators]

  def complete(self, text: bytes) -> bool:
    """Whether ``text`` is a leading text plus a complete answer (no terminator yet)."""
    s = text.decode("utf-8", errors="replace")
    return any(s.startswith(l) and self.task.is_answer(s[len(l):]) for l in self.task.leading)

  def mask(self, state: int, text: bytes) -> np.ndarray:
    m = np.zeros(self.vocab_size, bool)
    allowed = self._index.get_allowed_tokens(state)
    if allowed:
      m[np.asarray(allowed, np.int64)] = True
    m[list(self.eos_ids)] = state in self._final or (self.task.end_of_sequence and
                                                     self.complete(text))
    return m

  def advance(self, state: int, token: int) -> int | None:
    if token in self.eos_ids:
      return None
    nxt = self._index.get_next_state(state, int(token))
    return None if nxt is None else nxt

  def is_final(self, state: int) -> bool:
    """After a terminator: the answer is over."""
    return state in self._final

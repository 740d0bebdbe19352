"""The task schema (SPEC §6): a JSON task file and the :class:`Task` it becomes.

A task file is JSON with these fields (unknown fields are errors):

=================  ========================  =============================================
field              type                      meaning
=================  ========================  =============================================
``name``           str, ``[a-z0-9_]+``        identifier (the built-in file's stem)
``description``    str                       what is asked and where the facts come from
``prompts``        list of str, ≥ 1          base-model prompts ("… Answer:" style)
``chat_prompts``   list of str (optional)    the same request for chat models (a user turn)
``system_prompt``  str (optional)            a system turn before it (chat style only)
``answers``        list of str, ≥ 1          the valid answers (or ``answer_regex``)
``answer_regex``   str                       a regular language of answers instead
``leading``        list of str               allowed text before an answer; default
                                             ``["", " "]`` (an optional single space)
``terminators``    list of str               text that ends an answer; default
                                             ``["\\n", ".", ","]``
``end_of_sequence``  bool                    EOS also ends an answer (default true)
``case_sensitive`` bool                      default true (strict labelling)
``markdown``       bool                      also accept an answer wrapped in ``**``,
                                             ``*``, ``__``, ``_`` or backticks; default
                                             false (strict labelling)
``target``         {answer: weight}          target distribution; default uniform;
                                             unlisted answers get weight 0
``split``          ``"train"`` / ``"eval"``  default ``"eval"``
=================  ========================  =============================================

Labelling is strict by default, as the paper's: only the exact answers count. Surface forms
an instruct model writes can be accepted explicitly: case variants (``case_sensitive:
false``), markdown emphasis (``markdown: true``); a trailing period is a terminator by
default (leave ``"."`` out of ``terminators`` to count "Ohio." as invalid).

Errors (:class:`calibjax.errors.TaskError`) name the file and the field: unknown fields,
wrong types, both or neither of ``answers``/``answer_regex``, an empty answer set,
duplicate answers (after case folding when case-insensitive), an answer that contains a
terminator, a target weight for an unknown answer, a regex that does not compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from calibjax import errors

_DEFAULTS = {"leading": ["", " "], "terminators": ["\n", ".", ","], "end_of_sequence": True,
             "case_sensitive": True, "markdown": False, "split": "eval", "chat_prompts": [],
             "system_prompt": None, "target": None}
MARKDOWN = ("**", "__", "*", "_", "`")  # emphasis marks an answer may be wrapped in
_FIELDS = {"name", "description", "prompts", "answers", "answer_regex", *_DEFAULTS}


@dataclasses.dataclass(frozen=True)
class Task:
  """A validated task; ``weights`` is the normalised target over ``answers`` (uniform by
  default; empty for regex tasks). ``source`` is the file it came from."""
  name: str
  description: str
  prompts: tuple[str, ...]
  answers: tuple[str, ...] | None
  answer_regex: str | None
  leading: tuple[str, ...]
  terminators: tuple[str, ...]
  end_of_sequence: bool
  case_sensitive: bool
  markdown: bool
  split: str
  chat_prompts: tuple[str, ...]
  system_prompt: str | None
  weights: tuple[float, ...]
  source: str

  def fingerprint(self) -> str:
    """SHA-256 of everything that defines the task (not where it was read from): results
    of a run are resumed only for an unchanged task."""
    spec = {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

  def unwrap(self, text: str) -> str:
    """``text`` without a markdown wrapper (``**Ohio**`` → ``Ohio``) when the task accepts
    one, else unchanged."""
    if self.markdown:
      for mark in MARKDOWN:
        if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
          return text[len(mark):-len(mark)]
    return text

  def answer_index(self, text: str) -> int | None:
    """The index of the answer ``text`` (without leading text or terminator) is, or None."""
    fold = (lambda s: s) if self.case_sensitive else str.casefold
    lookup = {fold(a): i for i, a in enumerate(self.answers or ())}
    return lookup.get(fold(self.unwrap(text)))

  def is_answer(self, text: str) -> bool:
    """Whether ``text`` (without leading text or terminator) is a valid answer."""
    if self.answers is not None:
      return self.answer_index(text) is not None
    flags = 0 if self.case_sensitive else re.IGNORECASE
    return re.fullmatch(self.answer_regex, self.unwrap(text), flags) is not None


def _fail(source, field, what):
  raise errors.TaskError(f"{source}: field {field!r}: {what}")


def _strings(source, field, value, allow_empty=False, blank_items=True):
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    _fail(source, field, f"must be a list of strings, got {value!r:.80}")
  if not value and not allow_empty:
    _fail(source, field, "must not be empty")
  if not blank_items:
    blank = [i for i, v in enumerate(value) if not v.strip()]
    if blank:
      _fail(source, field, f"item {blank[0]} is empty or only whitespace")
  return tuple(value)


def from_dict(raw: dict, source: str = "<dict>") -> Task:
  """Validates a task given as a dict (the parsed JSON); see the module docstring."""
  if not isinstance(raw, dict):
    raise errors.TaskError(f"{source}: a task is a JSON object, got {type(raw).__name__}.")
  unknown = sorted(set(raw) - _FIELDS)
  if unknown:
    _fail(source, unknown[0], f"unknown field (known: {', '.join(sorted(_FIELDS))})")
  for field in ("name", "description", "prompts"):
    if field not in raw:
      _fail(source, field, "is required")
  spec = {**_DEFAULTS, **raw}
  name = spec["name"]
  if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
    _fail(source, "name", f"must match [a-z0-9_]+, got {name!r}")
  if not isinstance(spec["description"], str):
    _fail(source, "description", "must be a string")
  prompts = _strings(source, "prompts", spec["prompts"], blank_items=False)
  chat = _strings(source, "chat_prompts", spec["chat_prompts"], allow_empty=True,
                  blank_items=False)
  leading = _strings(source, "leading", spec["leading"])
  terminators = _strings(source, "terminators", spec["terminators"], allow_empty=True)
  for field in ("end_of_sequence", "case_sensitive", "markdown"):
    if not isinstance(spec[field], bool):
      _fail(source, field, f"must be true or false, got {spec[field]!r}")
  if not terminators and not spec["end_of_sequence"]:
    _fail(source, "terminators", "no terminator and no end of sequence: answers never end")
  system = spec["system_prompt"]
  if system is not None and (not isinstance(system, str) or not system.strip()):
    _fail(source, "system_prompt", f"must be a non-empty string, got {system!r:.80}")
  if spec["split"] not in ("train", "eval"):
    _fail(source, "split", f"must be 'train' or 'eval', got {spec['split']!r}")
  has_list, has_regex = "answers" in raw, "answer_regex" in raw
  if has_list == has_regex:
    _fail(source, "answers", "give exactly one of 'answers' and 'answer_regex'")
  fold = (lambda s: s) if spec["case_sensitive"] else str.casefold
  answers, regex, weights = None, None, ()
  if has_list:
    answers = _strings(source, "answers", raw["answers"])
    seen = {}
    for a in answers:
      if not a:
        _fail(source, "answers", "contains the empty string")
      if fold(a) in seen:
        _fail(source, "answers", f"duplicate answer {a!r} (same as {seen[fold(a)]!r})")
      seen[fold(a)] = a
      bad = [t for t in terminators if t and t in a]
      if bad:
        _fail(source, "answers", f"answer {a!r} contains the terminator {bad[0]!r}")
    target = spec["target"]
    if target is None:
      weights = tuple(1.0 / len(answers) for _ in answers)
    else:
      if not isinstance(target, dict):
        _fail(source, "target", "must map answers to weights")
      extra = sorted(set(target) - set(answers))
      if extra:
        _fail(source, "target", f"weight for {extra[0]!r}, which is not an answer")
      w = [target.get(a, 0.0) for a in answers]
      if not all(isinstance(x, (int, float)) and x >= 0 for x in w) or sum(w) <= 0:
        _fail(source, "target", "weights must be non-negative numbers with a positive sum")
      weights = tuple(x / sum(w) for x in w)
  else:
    regex = raw["answer_regex"]
    if not isinstance(regex, str) or not regex:
      _fail(source, "answer_regex", "must be a non-empty string")
    try:
      re.compile(regex)
    except re.error as e:
      _fail(source, "answer_regex", f"does not compile: {e}")
    if spec["target"] is not None:
      _fail(source, "target", "a regex task has no finite answer list to weight")
  return Task(name=name, description=spec["description"], prompts=prompts, answers=answers,
              answer_regex=regex, leading=leading, terminators=terminators,
              end_of_sequence=spec["end_of_sequence"], case_sensitive=spec["case_sensitive"],
              markdown=spec["markdown"], split=spec["split"], chat_prompts=chat,
              system_prompt=system, weights=weights, source=source)

"""Exact sequence-level answer probabilities under samplers (SPEC §6), by tree enumeration.

The valid-prefix tree of a task (a node is a token path whose text is still a prefix of
``leading · answer · terminator``) is expanded best-first by path probability — the largest
over the samplers — in batches of nodes, the model running once per node on top of the
prompt's KV cache (computed once) and every sampler reusing those logits (single-rule
samplers of one rule and temperature as one sweep). A path ends when EOS follows a complete
answer or a token completes the terminator. Enumeration stops when every sampler's unexplored valid mass is below
``bound`` (or after ``max_nodes``, which the result reports); nothing is hidden:
``seq_validity + invalid_mass + unexplored_mass = 1`` per sampler.

:func:`sample` is the Monte Carlo counterpart: batched cached decoding with explicit keys,
every sample classified, Wilson intervals that the exact values must fall in.

Compounding (SPEC §6): the per-step validity along each answer's canonical path, and its
product, beside the measured sequence validity.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from calibjax import double_float, errors, selection, truncation
from calibjax.models.language_model import bucket
from calibjax.rowwise import map_rows
from calibjax.tasks import Task
from calibjax.validity import ValidityIndex, token_bytes


@dataclasses.dataclass(frozen=True)
class SamplerResult:
  """Exact answer distribution of one sampler. ``answer_probs[i]`` is P_S(answers[i]);
  ``conditional`` = P_S(a | valid); ``kl_to_target`` = KL(target ‖ conditional) (inf when a
  target answer has probability 0); ``coverage[N]`` = E[#distinct valid answers in N
  samples] / |A| = Σ_a (1 − (1 − P_S(a))^N) / |A|. Compounding: ``step_validity[i]`` is the
  sampler's valid mass at each prefix of answer i's canonical path (``ExactResult.
  canonical_paths``), ``path_validity[i]`` their product, to set beside ``seq_validity``."""
  sampler: str
  answer_probs: np.ndarray
  seq_validity: float
  invalid_mass: float
  unexplored_mass: float
  conditional: np.ndarray
  entropy: float
  normalized_entropy: float
  effective_answers: float
  kl_to_target: float
  coverage: dict
  step_validity: tuple[np.ndarray, ...]
  path_validity: np.ndarray


@dataclasses.dataclass(frozen=True)
class ExactResult:
  task: str
  prompt: str
  answers: tuple[str, ...]
  canonical_paths: tuple[tuple[int, ...], ...]
  nodes_expanded: int
  bound: float
  bound_reached: bool
  samplers: tuple[SamplerResult, ...]


def progress_bar(enabled: bool, desc: str, unit: str, total: int | None = None):
  """A tqdm bar on stderr (a no-op when not ``enabled``)."""
  from tqdm import tqdm
  return tqdm(desc=desc, unit=unit, total=total, file=sys.stderr, disable=not enabled)


def _answer_index(task: Task, text: bytes, terminated: bool) -> int | None:
  s = text.decode("utf-8", errors="replace")
  fold = (lambda x: x) if task.case_sensitive else str.casefold
  lookup = {fold(a): i for i, a in enumerate(task.answers)}
  ends = task.terminators if terminated else ("",)
  for lead in task.leading:
    for end in ends:
      if s.startswith(lead) and s.endswith(end) and len(s) >= len(lead) + len(end):
        i = lookup.get(fold(s[len(lead):len(s) - len(end)]))
        if i is not None:
          return i
  return None


def _summary(name, probs, invalid, unexplored, task, coverage_n, steps) -> SamplerResult:
  valid = float(probs.sum())
  cond = probs / valid if valid > 0 else np.full_like(probs, np.nan)
  nz = cond > 0
  entropy = float(-np.sum(cond[nz] * np.log(cond[nz]))) if valid > 0 else float("nan")
  target = np.asarray(task.weights)
  with np.errstate(divide="ignore"):
    kl = float(np.sum(np.where(target > 0, target * (np.log(target) - np.log(cond)), 0.0)))
  n = len(task.answers)
  return SamplerResult(
      sampler=name, answer_probs=probs, seq_validity=valid, invalid_mass=float(invalid),
      unexplored_mass=float(unexplored), conditional=cond, entropy=entropy,
      normalized_entropy=entropy / np.log(n) if n > 1 else 1.0,
      effective_answers=float(np.exp(entropy)), kl_to_target=kl,
      coverage={int(k): float(np.sum(1 - (1 - probs) ** k) / n) for k in coverage_n},
      step_validity=steps, path_validity=np.array([np.prod(x) for x in steps]))


def _as_specs(samplers) -> tuple[truncation.Sampler, ...]:
  return tuple(s if isinstance(s, truncation.Sampler) else truncation.Sampler.parse(s)
               for s in samplers)


def _groups(specs):
  """Samplers grouped for evaluation: single rules sharing a rule and a temperature (one
  sweep), ``oracle_set`` alone, and every other chain on its own."""
  groups: dict = {}
  for k, s in enumerate(specs):
    rule = s.rules[0][0] if len(s.rules) == 1 else None
    if rule in truncation.RULES or rule == truncation.ORACLE_SET:
      groups.setdefault((rule, s.temperature), []).append(k)
    else:
      groups[(None, k)] = [k]
  return groups


def _row_valid_probs(z, m, idx, real, specs):
  """One row: each sampler's probability ``[C]`` of the tokens ``idx`` (``real`` marks the
  valid ones, which are the whole valid set) and its invalid mass ``[]``."""
  out, bad = [None] * len(specs), [None] * len(specs)
  for (rule, t), members in _groups(specs).items():
    if rule is None:
      continue
    a = z / t
    if rule == truncation.ORACLE_SET:  # softmax over the valid logits (never underflows)
      a_idx = jnp.where(real, jnp.take(a, idx), -jnp.inf)
      e = jnp.exp(a_idx - jnp.max(a_idx))
      for k in members:
        out[k], bad[k] = e / jnp.sum(e), jnp.zeros(())
      continue
    p = truncation._softmax_parts(a)[-1]
    p_idx = jnp.where(real, jnp.take(p, idx), 0.0)
    hi, lo = double_float.split([specs[k].rules[0][1] for k in members])
    x, theta, *_ = truncation._cut(rule, a, m, jnp.asarray(hi), jnp.asarray(lo),
                                   lambda: double_float.divide(z, t))
    alive = a > -jnp.inf
    kept, kept_invalid = selection.threshold_stats(x, alive, theta, (p, jnp.where(m, 0.0, p)))
    keep = (jnp.take(x, idx)[None, :] >= theta[:, None]) & jnp.take(alive, idx) & real
    probs = jnp.where(keep, p_idx / kept[:, None], 0.0)
    for j, k in enumerate(members):
      out[k], bad[k] = probs[j], kept_invalid[j] / kept[j]
  return out, bad


@functools.partial(jax.jit, static_argnames=("specs", "cap"))
def _valid_token_probs(z, m, idx, real, specs, cap):
  """Every sampler's probability of the valid tokens ``idx [B, C]`` (``real`` marks them;
  C covers each row's whole valid set): ``[S, B, C]``. Single rules run row by row on one
  score and cut per (rule, temperature) for all their values and one mass pass; the valid
  tokens' own probabilities are gathered, so no ``[B, V]`` keep mask is formed. Also returns
  each sampler's invalid mass ``[S, B]``."""
  rows, bad = map_rows(lambda *r: _row_valid_probs(*r, specs), z, m, idx, real,
                       batch_shape=z.shape[:-1])
  for (rule, k), members in _groups(specs).items():
    if rule is None:  # chains and oracle_rank: the general path
      tr = truncation.truncate_chain(z, specs[k], valid_mask=m, max_valid=cap)
      a = z / specs[k].temperature
      log_p = a - jax.scipy.special.logsumexp(a, axis=-1, keepdims=True)
      keep = jnp.take_along_axis(tr.keep, idx, axis=-1) & real
      rows[k] = jnp.where(keep, jnp.exp(jnp.take_along_axis(log_p, idx, axis=-1))
                          / tr.kept_mass[..., None], 0.0)
      bad[k] = 1.0 - tr.validity
  return jnp.stack(rows), jnp.stack(bad)


@dataclasses.dataclass
class Node:
  """A node of the valid-prefix tree: token ``path`` after the prompt, the validity engine's
  ``state`` and the ``text`` so far, and the path's probability under each sampler."""
  path: tuple[int, ...]
  state: int
  text: bytes
  mass: np.ndarray


class NodeEvaluator:
  """The model at valid-prefix tree nodes: the prompt's KV cache is computed once and every
  batch of node paths runs on top of it (``batch_size`` rows per call, a fixed shape)."""

  def __init__(self, lm, prompt_ids, index, specs=(), batch_size=32, max_depth=24, head=None):
    if len(prompt_ids) < 2:
      raise errors.InputError("the prompt is empty: it must hold at least one token after BOS.")
    self.lm, self.index, self.specs, self.batch_size = lm, index, specs, batch_size
    self.head = head
    self.last = int(prompt_ids[-1])  # each path restarts from it: the root is a path too
    self.cap = 8
    _, _, self.cache = lm.prefill(np.asarray([prompt_ids[:-1]]), max_new_tokens=max_depth + 1)

  def forward(self, nodes):
    """``(logits [batch_size, V], hidden [batch_size, d], valid masks [batch_size, V])``
    (logits through the head when there is one); rows past ``len(nodes)`` repeat the first
    node."""
    n = len(nodes)
    rows = [(self.last,) + node.path for node in nodes]
    rows += rows[:1] * (self.batch_size - n)
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
      ids[i, :len(r)], mask[i, :len(r)] = r, True
    logits, hidden = self.lm.extend(self.cache, ids, mask)
    if self.head is not None:
      logits = self.head(hidden, logits)
    valid = [self.index.mask(node.state, node.text) for node in nodes]
    return logits, hidden, np.stack(valid + valid[:1] * (self.batch_size - n))

  def __call__(self, nodes):
    """``(valid token ids [b, C] with -1 padding, each sampler's probabilities of them
    [S, b, C] (0 at the padding), invalid mass [S, b])``."""
    n = len(nodes)
    logits, _, valid = self.forward(nodes)
    tokens = [np.flatnonzero(v) for v in valid]
    self.cap = max(self.cap, bucket(max(map(len, tokens)), minimum=8))  # grows: few compiles
    idx = np.stack([np.pad(t, (0, self.cap - len(t)), constant_values=-1) for t in tokens])
    probs, invalid = _valid_token_probs(
        logits, jnp.asarray(valid), jnp.asarray(np.maximum(idx, 0)),
        jnp.asarray(idx >= 0), self.specs, self.cap)
    probs = np.asarray(probs, np.float64)[:, :n]
    invalid = np.asarray(invalid, np.float64)[:, :n]
    bad = ~(np.isfinite(probs).all(axis=2) & np.isfinite(invalid))
    if bad.any():
      k, i = np.argwhere(bad)[0]
      raise errors.NonFiniteLogitsError(
          f"sampler {self.specs[k]} gives non-finite probabilities at the node after "
          f"{nodes[i].text!r} (token path {list(nodes[i].path)}); are the model's logits finite?")
    return idx[:n], probs, np.maximum(invalid, 0.0)


def canonical_paths(task: Task, tokenizer) -> list[tuple[int, ...]]:
  """Each answer's canonical token path: the tokenisation of the task's first non-empty leading
  text (``""`` if it has none), the answer and the first terminator (what the compounding
  figures follow)."""
  lead = next((l for l in task.leading if l), "")
  return [tuple(tokenizer.encode(lead + a + task.terminators[0], add_bos=False))
          for a in task.answers]


def exact(lm, task: Task, samplers, *, bound: float = 1e-4, coverage_n=(1, 10, 100, 1000),
          prompt: str | None = None, batch_size: int = 32, max_nodes: int = 50_000,
          max_depth: int = 24, head=None, cache_dir: str | None = None,
          progress: bool = True) -> ExactResult:
  """Exact answer probabilities of ``task`` under each sampler, by tree enumeration.

  Args:
    lm: a :class:`calibjax.models.LanguageModel`.
    task: a :class:`calibjax.tasks.Task` with a finite answer list.
    samplers: :class:`calibjax.Sampler` objects or their text (``"top_p=0.9,t=1.5"``,
      ``"oracle_set,t=2"``, ``"oracle_rank=0.95"``).
    bound: stop when every sampler's unexplored valid mass is below it.
    prompt: defaults to the task's first prompt.
    batch_size: nodes per model call.
    max_nodes: a safety cap; ``bound_reached`` says whether the bound was met.
    max_depth: paths longer than this many tokens stay unexplored (their mass is counted in
      ``unexplored_mass``).
    head: optional recalibration head, a callable ``(hidden [B, d], logits [B, V]) ->
      logits`` (:func:`calibjax.recalibration.bind` / :func:`calibjax.recalibration.load`).

  Returns:
    :class:`ExactResult`, one :class:`SamplerResult` per sampler, in order.
  """
  if task.answers is None:
    raise errors.TaskError(f"{task.source}: the exact engine needs a finite answer list.")
  specs = _as_specs(samplers)
  if not specs:
    raise errors.InputError("exact() needs at least one sampler.")
  tok = lm.tokenizer
  index = ValidityIndex(task, tok.vocab, tok.types, tok.eos_id, cache_dir=cache_dir)
  tbytes = token_bytes(tok.vocab, tok.types)
  prompt = task.prompts[0] if prompt is None else prompt
  evaluate = NodeEvaluator(lm, tok.encode(prompt), index, specs, batch_size, max_depth, head)
  n_s, n_a = len(specs), len(task.answers)
  answer_probs = np.zeros((n_s, n_a))
  invalid = np.zeros(n_s)
  step_validity: dict[tuple[int, ...], np.ndarray] = {}
  counter = itertools.count()
  heap = [(-1.0, next(counter), Node((), index.initial_state, b"", np.ones(n_s)))]
  too_deep = np.zeros(n_s)
  queued = np.ones(n_s)
  expanded = 0
  bar = progress_bar(progress, f"exact {task.name}", "node")
  while heap and queued.max() > bound and expanded < max_nodes:
    batch = [heapq.heappop(heap)[2] for _ in range(min(batch_size, len(heap)))]
    for node in batch:
      queued -= node.mass
    tokens, probs, inv = evaluate(batch)
    for i, node in enumerate(batch):
      step_validity[node.path] = probs[:, i].sum(axis=-1)
      invalid += node.mass * inv[:, i]
      for c, v in enumerate(tokens[i]):
        if v < 0:
          break
        p_child = node.mass * probs[:, i, c]
        if not p_child.any():
          continue
        if v == tok.eos_id:  # valid only after a complete answer (final nodes never expand)
          answer_probs[:, _answer_index(task, node.text, terminated=False)] += p_child
          continue
        child = Node(node.path + (int(v),), index.advance(node.state, v),
                      node.text + tbytes[v], p_child)
        if index.is_final(child.state):
          answer_probs[:, _answer_index(task, child.text, terminated=True)] += p_child
        elif len(child.path) >= max_depth:
          too_deep += p_child
        else:
          heapq.heappush(heap, (-p_child.max(), next(counter), child))
          queued += p_child
    expanded += len(batch)
    bar.update(len(batch))
    bar.set_postfix(unexplored=f"{queued.max():.2e}", refresh=False)
  bar.close()
  # exact, not the running sum (whose rounding drifts): the mass of the nodes left unexpanded
  unexplored = too_deep + sum((node.mass for _, _, node in heap), np.zeros(n_s))
  paths = canonical_paths(task, tok)
  steps = _canonical_step_validity(paths, step_validity, index, tbytes, evaluate, n_s)
  results = tuple(
      _summary(str(s), answer_probs[k], invalid[k], unexplored[k], task, coverage_n,
               tuple(st[:, k] for st in steps))
      for k, s in enumerate(specs))
  return ExactResult(task=task.name, prompt=prompt, answers=task.answers,
                     canonical_paths=tuple(paths), nodes_expanded=expanded, bound=bound,
                     bound_reached=bool(unexplored.max() <= bound), samplers=results)


def _canonical_step_validity(paths, known, index, tbytes, evaluate, n_s):
  """Per answer ``[len(path), S]``: each sampler's valid mass at every prefix of the answer's
  canonical path (NaN where the path leaves the task's language). Prefixes the enumeration
  did not expand are evaluated here."""
  todo = {}
  for path in paths:
    state, text = index.initial_state, b""
    for j in range(len(path)):
      prefix = path[:j]
      if state is None:
        break
      if prefix not in known and prefix not in todo:
        todo[prefix] = Node(prefix, state, text, np.zeros(n_s))
      state = index.advance(state, path[j])
      text += tbytes[path[j]] or b""
  nodes = list(todo.values())
  for start in range(0, len(nodes), evaluate.batch_size):
    chunk = nodes[start:start + evaluate.batch_size]
    _, probs, _ = evaluate(chunk)
    for i, node in enumerate(chunk):
      known[node.path] = probs[:, i].sum(axis=-1)
  nan = np.full(n_s, np.nan)
  return [np.stack([known.get(path[:j], nan) for j in range(len(path))]) for path in paths]


@dataclasses.dataclass(frozen=True)
class MonteCarloResult:
  """Samples of one sampler and their classification.

  ``texts[i]``: the generated bytes (up to the end of the answer, or all ``max_new_tokens``);
  ``answer[i]``: index into ``answers`` or −1; ``reason[i]``: ``"valid"``, ``"wrong"``
  (a token left the task's language), ``"early_eos"`` or ``"no_terminator"`` (the limit was
  reached). ``counts``: samples per answer; ``seq_validity`` with its Wilson interval
  ``seq_validity_ci`` at ``confidence``; ``answer_ci`` [|A|, 2]: Wilson intervals of P_S(a);
  ``coverage``: distinct answers drawn / |A| (its expectation is the exact ``coverage[n]``).
  """
  sampler: str
  answers: tuple[str, ...]
  texts: tuple[bytes, ...]
  answer: np.ndarray
  reason: tuple[str, ...]
  counts: np.ndarray
  seq_validity: float
  seq_validity_ci: tuple[float, float]
  answer_ci: np.ndarray
  confidence: float
  coverage: float


def wilson(successes, n: int, confidence: float = 0.99) -> np.ndarray:
  """Wilson score interval(s) ``[..., 2]`` for ``successes`` out of ``n``."""
  from statistics import NormalDist
  z = NormalDist().inv_cdf(0.5 + confidence / 2)
  p = np.asarray(successes, np.float64) / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return np.stack([centre - half, centre + half], axis=-1)


class _Classifier:
  """Follows one sample token by token and decides it: an answer index and ``"valid"``, or −1
  and ``"wrong"`` (a token left the task's language), ``"early_eos"``, ``"no_terminator"``."""

  def __init__(self, task, index, tbytes, eos_id):
    self.task, self.index, self.tbytes, self.eos_id = task, index, tbytes, eos_id
    self.state, self.text, self.result = index.initial_state, b"", None

  def push(self, token: int) -> bool:
    """Consumes one token; True once the sample is decided."""
    if token == self.eos_id:
      a = (_answer_index(self.task, self.text, terminated=False)
           if self.task.end_of_sequence else None)
      self.result = (-1, "early_eos") if a is None else (a, "valid")
      return True
    self.state = self.index.advance(self.state, token)
    self.text += self.tbytes[token] or b""
    if self.state is None:
      self.result = (-1, "wrong")
    elif self.index.is_final(self.state):
      self.result = (_answer_index(self.task, self.text, terminated=True), "valid")
    return self.result is not None

  def mask(self) -> np.ndarray:
    return self.index.mask(self.state, self.text)


@functools.partial(jax.jit, static_argnames=("spec", "cap"))
def _draw(key, z, m, spec, cap):
  keep = truncation.truncate_chain(z, spec, valid_mask=m, max_valid=cap).keep
  return jax.random.categorical(key, jnp.where(keep, z / spec.temperature, -jnp.inf), axis=-1,
                                mode="high")


def sample(lm, task: Task, sampler, n: int, key, *, max_new_tokens: int = 16,
           prompt: str | None = None, batch_size: int = 256, confidence: float = 0.99,
           head=None, cache_dir: str | None = None, progress: bool = True) -> MonteCarloResult:
  """``n`` answers generated with ``sampler`` (explicit ``key``), classified against the task.

  The prompt runs once; its cache is copied into each batch of ``batch_size`` samples, which
  decode until every sample is decided or ``max_new_tokens`` is reached. Sampling is
  tail-faithful: ``jax.random.categorical`` in its high-dynamic-range mode over the truncated,
  temperature-scaled logits (SPEC §7). Oracle samplers get each sample's valid mask at every
  step. ``head``: as in :func:`exact`. The same key gives the same samples.
  """
  spec = _as_specs([sampler])[0]
  if task.answers is None:
    raise errors.TaskError(f"{task.source}: sample() classifies against a finite answer list.")
  if n < 1:
    raise errors.InputError(f"sample(): n must be >= 1, got {n}.")
  oracle = any(r in truncation.ORACLES for r, _ in spec.rules)
  tok = lm.tokenizer
  index = ValidityIndex(task, tok.vocab, tok.types, tok.eos_id, cache_dir=cache_dir)
  tbytes = token_bytes(tok.vocab, tok.types)
  prompt_ids = tok.encode(task.prompts[0] if prompt is None else prompt)
  logits0, hidden0, prompt_cache = lm.prefill(np.asarray([prompt_ids]),
                                              max_new_tokens=max_new_tokens)
  if head is not None:
    logits0 = head(hidden0, logits0)
  bar = progress_bar(progress, f"sample {task.name} {spec}", "sample", n)
  texts, answer, reason = [], [], []
  for start in range(0, n, batch_size):
    m = min(batch_size, n - start)
    samples = [_Classifier(task, index, tbytes, tok.eos_id) for _ in range(m)]
    logits = jnp.repeat(logits0, m, axis=0)
    cache = lm.repeat(prompt_cache, m)
    for step in range(max_new_tokens):
      key, sub = jax.random.split(key)
      valid, cap = None, None
      if oracle:
        decided = np.zeros(len(tok.vocab), bool)
        decided[tok.eos_id] = True  # any mask will do for a decided sample
        masks = [decided if x.result is not None else x.mask() for x in samples]
        cap = bucket(max(int(x.sum()) for x in masks), minimum=8)
        valid = jnp.asarray(np.stack(masks))
      nxt = _draw(sub, logits, valid, spec, cap)
      for x, t in zip(samples, np.asarray(nxt).tolist()):
        if x.result is None:
          x.push(t)
      if all(x.result is not None for x in samples) or step == max_new_tokens - 1:
        break
      logits, hidden, cache = lm.decode(cache, nxt)
      if head is not None:
        logits = head(hidden, logits)
    for x in samples:
      a, why = x.result or (-1, "no_terminator")
      texts.append(x.text)
      answer.append(a)
      reason.append(why)
    bar.update(m)
  bar.close()
  answer = np.asarray(answer)
  counts = np.bincount(answer[answer >= 0], minlength=len(task.answers))
  valid = int(counts.sum())
  return MonteCarloResult(
      sampler=str(spec), answers=task.answers, texts=tuple(texts), answer=answer,
      reason=tuple(reason), counts=counts, seq_validity=valid / n,
      seq_validity_ci=tuple(float(x) for x in wilson(valid, n, confidence)),
      answer_ci=wilson(counts, n, confidence), confidence=confidence,
      coverage=float(np.count_nonzero(counts) / len(task.answers)))

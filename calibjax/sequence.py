"""Exact sequence-level answer probabilities under samplers (SPEC §6), by tree enumeration.

The valid-prefix tree of a task (a node is a token path whose text is still a prefix of
``leading · answer · terminator``) is expanded best-first by path probability — the largest
over the samplers — in batches of nodes, the model running once per node and every sampler
reusing those logits. A path ends when EOS follows a complete answer or a token completes
the terminator. Enumeration stops when every sampler's unexplored valid mass is below
``bound`` (or after ``max_nodes``, which the result reports); nothing is hidden:
``seq_validity + invalid_mass + unexplored_mass = 1`` per sampler.

:func:`sample` is the Monte Carlo counterpart: batched cached decoding with explicit keys,
every sample classified, Wilson intervals that the exact values must fall in.

Not yet here: the ``oracle_rank`` sampler, reuse of the prompt's KV cache across nodes,
per-step validity along each answer's path, oracle samplers in :func:`sample`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import sys

import numpy as np

from calibjax import errors, truncation
from calibjax.tasks import Task
from calibjax.validity import ValidityIndex, token_bytes


@dataclasses.dataclass(frozen=True)
class SamplerResult:
  """Exact answer distribution of one sampler. ``answer_probs[i]`` is P_S(answers[i]);
  ``conditional`` = P_S(a | valid); ``kl_to_target`` = KL(target ‖ conditional) (inf when a
  target answer has probability 0); ``coverage[N]`` = E[#distinct valid answers in N
  samples] / |A| = Σ_a (1 − (1 − P_S(a))^N) / |A|."""
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


@dataclasses.dataclass(frozen=True)
class ExactResult:
  task: str
  prompt: str
  answers: tuple[str, ...]
  nodes_expanded: int
  bound: float
  bound_reached: bool
  samplers: tuple[SamplerResult, ...]


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


def _summary(name, probs, invalid, unexplored, task, coverage_n) -> SamplerResult:
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
      coverage={int(k): float(np.sum(1 - (1 - probs) ** k) / n) for k in coverage_n})


def _sampler_probs(logits: np.ndarray, valid: np.ndarray, sampler: truncation.Sampler):
  """p_S over the vocabulary for each row: truncated, renormalised softmax(z / T)."""
  keep = np.asarray(truncation.truncate_chain(logits, sampler, valid_mask=valid).keep)
  a = (logits / np.float32(sampler.temperature)).astype(np.float64)
  a = np.where(keep, a, -np.inf)
  a -= a.max(axis=-1, keepdims=True)
  p = np.exp(a)
  return p / p.sum(axis=-1, keepdims=True)


def exact(lm, task: Task, samplers, *, bound: float = 1e-4, coverage_n=(1, 10, 100, 1000),
          prompt: str | None = None, batch_size: int = 16, max_nodes: int = 20_000,
          cache_dir: str | None = None, progress: bool = True) -> ExactResult:
  """Exact answer probabilities of ``task`` under each sampler, by tree enumeration.

  Args:
    lm: a :class:`calibjax.models.LanguageModel`.
    task: a :class:`calibjax.tasks.Task` with a finite answer list.
    samplers: :class:`calibjax.Sampler` objects or their text (``"top_p=0.9,t=1.5"``).
    bound: stop when every sampler's unexplored valid mass is below it.
    prompt: defaults to the task's first prompt.
    max_nodes: a safety cap; ``bound_reached`` says whether the bound was met.

  Returns:
    :class:`ExactResult`, one :class:`SamplerResult` per sampler, in order.
  """
  if task.answers is None:
    raise errors.TaskError(f"{task.source}: the exact engine needs a finite answer list.")
  specs = [s if isinstance(s, truncation.Sampler) else truncation.Sampler.parse(s)
           for s in samplers]
  if not specs:
    raise errors.InputError("exact() needs at least one sampler.")
  tok = lm.tokenizer
  index = ValidityIndex(task, tok.vocab, tok.types, tok.eos_id, cache_dir=cache_dir)
  tbytes = token_bytes(tok.vocab, tok.types)
  prompt = task.prompts[0] if prompt is None else prompt
  prompt_ids = tok.encode(prompt)
  n_s, n_a = len(specs), len(task.answers)
  answer_probs = np.zeros((n_s, n_a))
  invalid = np.zeros(n_s)
  counter = itertools.count()
  heap = [(-1.0, next(counter), (), index.initial_state, b"", np.ones(n_s))]
  queued = np.ones(n_s)
  expanded = 0
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(desc=f"exact {task.name}", unit="node", file=sys.stderr)
  while heap and queued.max() > bound and expanded < max_nodes:
    batch = [heapq.heappop(heap) for _ in range(min(batch_size, len(heap)))]
    for node in batch:
      queued -= node[5]
    rows = [prompt_ids + list(node[2]) for node in batch]
    rows += rows[:1] * (batch_size - len(rows))  # a fixed batch shape: no recompiles
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    logits = np.asarray(lm.prefill(ids, mask, max_new_tokens=1)[0], np.float32)[:len(batch)]
    valid = np.stack([index.mask(node[3], node[4]) for node in batch])
    probs = [_sampler_probs(logits, valid, s) for s in specs]  # each [b, V]
    for i, (_, _, path, state, text, p_node) in enumerate(batch):
      p_tok = np.stack([p[i] for p in probs])  # [S, V]
      invalid += p_node * p_tok[:, ~valid[i]].sum(axis=1)
      for v in np.flatnonzero(valid[i]):
        p_child = p_node * p_tok[:, v]
        if not p_child.any():
          continue
        if v == tok.eos_id:  # valid only after a complete answer (final nodes never expand)
          answer_probs[:, _answer_index(task, text, terminated=False)] += p_child
          continue
        nstate = index.advance(state, v)
        ntext = text + tbytes[v]
        if index.is_final(nstate):
          answer_probs[:, _answer_index(task, ntext, terminated=True)] += p_child
        else:
          heapq.heappush(heap, (-p_child.max(), next(counter), path + (int(v),), nstate, ntext,
                                p_child))
          queued += p_child
    expanded += len(batch)
    if bar:
      bar.update(len(batch))
      bar.set_postfix(unexplored=f"{queued.max():.2e}")
  if bar:
    bar.close()
  # exact, not the running sum (whose rounding drifts): the mass of the nodes left unexpanded
  unexplored = np.sum([node[5] for node in heap], axis=0) if heap else np.zeros(n_s)
  results = tuple(_summary(str(s), answer_probs[k], invalid[k], unexplored[k], task, coverage_n)
                  for k, s in enumerate(specs))
  return ExactResult(task=task.name, prompt=prompt, answers=task.answers,
                     nodes_expanded=expanded, bound=bound,
                     bound_reached=bool(unexplored.max() <= bound), samplers=results)


@dataclasses.dataclass(frozen=True)
class MonteCarloResult:
  """Samples of one sampler and their classification.

  ``texts[i]``: the generated bytes (up to the end of the answer, or all ``max_new_tokens``);
  ``answer[i]``: index into ``answers`` or −1; ``reason[i]``: ``"valid"``, ``"wrong"``
  (a token left the task's language), ``"early_eos"`` or ``"no_terminator"`` (the limit was
  reached). ``counts``: samples per answer; ``seq_validity`` with its Wilson interval
  ``seq_validity_ci`` at ``confidence``; ``answer_ci`` [|A|, 2]: Wilson intervals of P_S(a).
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


def wilson(successes, n: int, confidence: float = 0.99) -> np.ndarray:
  """Wilson score interval(s) ``[..., 2]`` for ``successes`` out of ``n``."""
  from statistics import NormalDist
  z = NormalDist().inv_cdf(0.5 + confidence / 2)
  p = np.asarray(successes, np.float64) / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return np.stack([centre - half, centre + half], axis=-1)


def _classify(task, index, tbytes, eos_id, row):
  state, text = index.initial_state, b""
  for tok in row:
    tok = int(tok)
    if tok == eos_id:
      a = _answer_index(task, text, terminated=False) if task.end_of_sequence else None
      return text, (-1, "early_eos") if a is None else (a, "valid")
    state = index.advance(state, tok)
    if state is None:
      return text + (tbytes[tok] or b""), (-1, "wrong")
    text += tbytes[tok]
    if index.is_final(state):
      return text, (_answer_index(task, text, terminated=True), "valid")
  return text, (-1, "no_terminator")


def sample(lm, task: Task, sampler, n: int, key, *, max_new_tokens: int = 16,
           prompt: str | None = None, batch_size: int = 256, confidence: float = 0.99,
           cache_dir: str | None = None) -> MonteCarloResult:
  """``n`` answers generated with ``sampler`` (explicit ``key``), classified against the task.

  Sampling is tail-faithful: ``jax.random.categorical`` in its high-dynamic-range mode over
  the truncated, temperature-scaled logits (SPEC §7). The same key gives the same samples.
  Samplers that need the valid set (``oracle_set``) are not supported here yet.
  """
  import jax
  import jax.numpy as jnp
  spec = sampler if isinstance(sampler, truncation.Sampler) else truncation.Sampler.parse(sampler)
  if any(r == truncation.ORACLE_SET for r, _ in spec.rules):
    raise errors.InputError("sample(): oracle samplers are not supported yet.")
  if task.answers is None:
    raise errors.TaskError(f"{task.source}: sample() classifies against a finite answer list.")
  tok = lm.tokenizer
  index = ValidityIndex(task, tok.vocab, tok.types, tok.eos_id, cache_dir=cache_dir)
  tbytes = token_bytes(tok.vocab, tok.types)
  prompt_ids = tok.encode(task.prompts[0] if prompt is None else prompt)

  @jax.jit
  def draw(k, z, t):
    keep = truncation.truncate_chain(z, spec, temperature=t).keep
    return jax.random.categorical(k, jnp.where(keep, z / t, -jnp.inf), axis=-1, mode="high")

  rows = []
  for start in range(0, n, batch_size):
    m = min(batch_size, n - start)
    logits, _, cache = lm.prefill(np.tile(prompt_ids, (m, 1)), max_new_tokens=max_new_tokens)
    out = []
    for _ in range(max_new_tokens):
      key, sub = jax.random.split(key)
      nxt = draw(sub, logits, jnp.float32(spec.temperature))
      out.append(nxt)
      logits, _, cache = lm.decode(cache, nxt)
    rows.extend(np.asarray(jnp.stack(out, axis=1)))
  texts, answer, reason = [], [], []
  for row in rows:
    text, (a, why) = _classify(task, index, tbytes, tok.eos_id, row)
    texts.append(text)
    answer.append(a)
    reason.append(why)
  answer = np.asarray(answer)
  counts = np.bincount(answer[answer >= 0], minlength=len(task.answers))
  valid = int(counts.sum())
  return MonteCarloResult(
      sampler=str(spec), answers=task.answers, texts=tuple(texts), answer=answer,
      reason=tuple(reason), counts=counts, seq_validity=valid / n,
      seq_validity_ci=tuple(float(x) for x in wilson(valid, n, confidence)),
      answer_ci=wilson(counts, n, confidence), confidence=confidence)

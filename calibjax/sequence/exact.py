"""Exact sequence-level answer probabilities under samplers (SPEC §6), by tree enumeration.

The valid-prefix tree of a task is expanded best-first by path probability — the largest
over the samplers — in batches of nodes, the model running once per node on top of the
prompt's KV cache and its ancestors' keys and values (:class:`NodeEvaluator`'s tree cache),
and every sampler reusing those logits. A path ends when EOS follows a
complete answer or a token completes the terminator. Enumeration stops when every sampler's
unexplored valid mass is below ``bound`` (or after ``max_nodes``, which the result reports);
nothing is hidden: ``seq_validity + invalid_mass + unexplored_mass = 1`` per sampler.

Compounding (SPEC §6): the per-step validity along each answer's canonical path, and its
product, beside the measured sequence validity.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calibjax import errors
from calibjax.models import prompts
from calibjax.progress import bar as progress_bar
from calibjax.sequence.probabilities import ValidTokenProbs
from calibjax.sequence.tree import BestFirst, NodeEvaluator, Tree, canonical_paths
from calibjax.tasks import Task


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
  prompt: str  # the text the model read (a rendered chat template includes its special tokens)
  prompt_style: str
  answers: tuple[str, ...]
  canonical_paths: tuple[tuple[int, ...], ...]
  nodes_expanded: int
  bound: float
  bound_reached: bool
  samplers: tuple[SamplerResult, ...]


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


def exact(lm, task: Task, samplers, *, bound: float = 1e-4, coverage_n=(1, 10, 100, 1000),
          prompt=None, batch_size: int = 32, max_nodes: int = 50_000,
          max_depth: int = 24, head=None, cache_dir: str | None = None,
          progress: bool = True) -> ExactResult:
  """Exact answer probabilities of ``task`` under each sampler, by tree enumeration.

  Args:
    lm: a :class:`calibjax.models.LanguageModel`.
    task: a :class:`calibjax.tasks.Task` with a finite answer list.
    samplers: :class:`calibjax.Sampler` objects or their text (``"top_p=0.9,t=1.5"``,
      ``"oracle_set,t=2"``, ``"oracle_rank=0.95"``).
    bound: stop when every sampler's unexplored valid mass is below it.
    prompt: a :class:`calibjax.models.prompts.Prompt`, a completion prompt's text, or None:
      the task's first prompt in the ``"auto"`` style (chat when the checkpoint has a chat
      template).
    batch_size: nodes per model call.
    max_nodes: a safety cap; ``bound_reached`` says whether the bound was met.
    max_depth: paths longer than this many tokens stay unexplored (their mass is counted in
      ``unexplored_mass``).
    head: optional recalibration head, a callable ``(hidden [B, d], logits [B, V]) ->
      logits`` (:func:`calibjax.recalibration.bind` / :func:`calibjax.recalibration.load`).
    progress: a progress bar on stderr.

  Returns:
    :class:`ExactResult`, one :class:`SamplerResult` per sampler, in order.
  """
  if task.answers is None:
    raise errors.TaskError(f"{task.source}: the exact engine needs a finite answer list.")
  probabilities = ValidTokenProbs(samplers)
  specs = probabilities.specs
  if not specs:
    raise errors.InputError("exact() needs at least one sampler.")
  tok = lm.tokenizer
  tree = Tree(task, tok, cache_dir)
  prompt = prompts.resolve(lm, task, prompt)
  evaluate = NodeEvaluator(lm, list(prompt.ids), tree, batch_size, max_depth, head)

  def valid_probs(nodes):
    logits, _, valid = evaluate.forward(nodes)
    return probabilities(logits, valid, nodes)

  n_s, n_a = len(specs), len(task.answers)
  answer_probs = np.zeros((n_s, n_a))
  invalid = np.zeros(n_s)
  step_validity: dict[tuple[int, ...], np.ndarray] = {}
  queue = BestFirst()
  queue.push(tree.root(np.ones(n_s)), 1.0)
  too_deep = np.zeros(n_s)
  queued = np.ones(n_s)
  expanded = 0
  bar = progress_bar(f"exact {task.name}", "node", enabled=progress)
  while len(queue) and queued.max() > bound and expanded < max_nodes:
    batch = queue.pop(batch_size)
    for node in batch:
      queued -= node.mass
    tokens, probs, inv = valid_probs(batch)
    for i, node in enumerate(batch):
      step_validity[node.path] = probs[:, i].sum(axis=-1)
      invalid += node.mass * inv[:, i]
      for c, v in enumerate(tokens[i]):
        if v < 0:
          break
        p_child = node.mass * probs[:, i, c]
        if not p_child.any():
          continue
        if v in tree.eos_ids:  # valid only after a complete answer (final nodes never expand)
          answer_probs[:, tree.answer_index(node.text, terminated=False)] += p_child
          continue
        child = tree.child(node, v, p_child)
        if tree.is_final(child):
          answer_probs[:, tree.answer_index(child.text, terminated=True)] += p_child
        elif len(child.path) >= max_depth:
          too_deep += p_child
        else:
          queue.push(child, p_child.max())
          queued += p_child
    expanded += len(batch)
    bar.update(len(batch))
    bar.set_postfix(unexplored=f"{queued.max():.2e}", refresh=False)
  bar.close()
  # exact, not the running sum (whose rounding drifts): the mass of the nodes left unexpanded
  unexplored = too_deep + sum((node.mass for node in queue), np.zeros(n_s))
  paths = canonical_paths(task, tok)
  steps = _canonical_step_validity(paths, step_validity, tree, valid_probs, batch_size, n_s)
  results = tuple(
      _summary(str(s), answer_probs[k], invalid[k], unexplored[k], task, coverage_n,
               tuple(st[:, k] for st in steps))
      for k, s in enumerate(specs))
  return ExactResult(task=task.name, prompt=prompt.text, prompt_style=prompt.style,
                     answers=task.answers,
                     canonical_paths=tuple(paths), nodes_expanded=expanded, bound=bound,
                     bound_reached=bool(unexplored.max() <= bound), samplers=results)


def _canonical_step_validity(paths, known, tree, valid_probs, batch_size, n_s):
  """Per answer ``[len(path), S]``: each sampler's valid mass at every prefix of the answer's
  canonical path (NaN where the path leaves the task's language). Prefixes the enumeration
  did not expand are evaluated here."""
  todo = {}
  for path in paths:
    for node in tree.prefixes(path, np.zeros(n_s)):
      if node.path not in known:
        todo.setdefault(node.path, node)
  nodes = list(todo.values())
  for start in range(0, len(nodes), batch_size):
    chunk = nodes[start:start + batch_size]
    _, probs, _ = valid_probs(chunk)
    for i, node in enumerate(chunk):
      known[node.path] = probs[:, i].sum(axis=-1)
  nan = np.full(n_s, np.nan)
  return [np.stack([known.get(path[:j], nan) for j in range(len(path))]) for path in paths]

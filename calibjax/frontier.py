"""Validity–diversity frontiers (SPEC §6): every rule's parameter sweep × temperatures, and the
oracle samplers, through the exact engine.

A point is one sampler: ``(seq_validity, coverage@N)``. Per rule the Pareto front keeps the
points no other point of that rule beats on both; the table gives each rule's best coverage@N
among its points with ``seq_validity ≥ level`` and its *oracle gap* there: the best oracle
sampler's (``oracle_set``/``oracle_rank``) coverage at the same level minus the rule's.
The ideal point is ``(1, 1 − (1 − 1/|A|)^N)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calibjax import sequence, truncation
from calibjax.tasks import Task

DEFAULT_VALUES = {
    "top_k": (1, 2, 3, 5, 10, 20, 50, 100),
    "top_p": (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
    "min_p": (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01),
    "typical": (0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
    "epsilon": (0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4),
    "eta": (0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4),
    "top_n_sigma": (0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
}


@dataclasses.dataclass(frozen=True)
class FrontierConfig:
  """Sweeps: each rule in ``rules`` over its :data:`DEFAULT_VALUES` at each temperature, and
  ``oracle_set`` / ``oracle_rank=τ`` at each temperature; or an explicit ``samplers`` list."""
  rules: tuple[str, ...] = truncation.RULES
  temperatures: tuple[float, ...] = (0.7, 1.0, 1.5)
  oracle_taus: tuple[float, ...] = (0.9, 0.95, 0.99)
  samplers: tuple[str, ...] = ()
  coverage_n: int = 100
  levels: tuple[float, ...] = (0.9, 0.95, 0.99)
  bound: float = 1e-3
  batch_size: int = 32
  prompt_index: int = 0


def frontier_samplers(cfg: FrontierConfig) -> list[str]:
  """The samplers of a frontier run, as text."""
  if cfg.samplers:
    return [str(truncation.Sampler.parse(s)) for s in cfg.samplers]
  out = []
  for t in cfg.temperatures:
    for rule in cfg.rules:
      out += [str(truncation.Sampler(((rule, v),), t)) for v in DEFAULT_VALUES[rule]]
    out.append(str(truncation.Sampler(((truncation.ORACLE_SET, None),), t)))
    out += [str(truncation.Sampler(((truncation.ORACLE_RANK, tau),), t)) for tau in cfg.oracle_taus]
  return out


def family(sampler: str) -> str:
  """The curve a sampler belongs to: its rule (chains joined by '+'), or ``temperature``."""
  rules = truncation.Sampler.parse(sampler).rules
  return "+".join(r for r, _ in rules) or "temperature"


def pareto(points: list[dict], n: int) -> list[dict]:
  """Points not dominated in (seq_validity, coverage@n), by increasing validity."""
  key = lambda p: (p["seq_validity"], p["coverage"][str(n)])
  ordered = sorted(points, key=key, reverse=True)
  front, best = [], -np.inf
  for p in ordered:
    if p["coverage"][str(n)] > best:
      front.append(p)
      best = p["coverage"][str(n)]
  return front[::-1]


def table(points: list[dict], n: int, levels) -> dict:
  """Per family: best coverage@n at ``seq_validity ≥ level`` (None if no point qualifies), the
  sampler reaching it, and the oracle gap (best oracle coverage there minus this one); and
  under ``"most_valid"`` the family's point of highest seq_validity."""
  fams = sorted({p["family"] for p in points})
  oracle = [p for p in points if p["family"] in truncation.ORACLES]

  def best(ps, level):
    ok = [p for p in ps if p["seq_validity"] >= level]
    return max(ok, key=lambda p: p["coverage"][str(n)]) if ok else None

  out = {}
  for f in fams:
    row = {}
    for level in levels:
      b, o = best([p for p in points if p["family"] == f], level), best(oracle, level)
      cov = None if b is None else b["coverage"][str(n)]
      row[f"{level:g}"] = {
          "coverage": cov, "sampler": None if b is None else b["sampler"],
          "oracle_gap": None if (o is None or cov is None) else o["coverage"][str(n)] - cov}
    top = max((p for p in points if p["family"] == f), key=lambda p: p["seq_validity"])
    row["most_valid"] = {"sampler": top["sampler"], "seq_validity": top["seq_validity"],
                         "coverage": top["coverage"][str(n)]}
    out[f] = row
  return out


def frontier_task(lm, task: Task, cfg: FrontierConfig = FrontierConfig(), *, head=None,
                  cache_dir: str | None = None, progress: bool = True) -> dict:
  """The frontier of ``task``: ``{"task", "prompt", "nodes_expanded", "bound_reached",
  "points": [...], "pareto": {family: [...]}, "table": {...}, "ideal": [1, c]}``.

  Each point: ``sampler``, ``family``, ``temperature``, ``seq_validity``, ``invalid_mass``,
  ``unexplored_mass``, ``coverage`` (at 1, 10, ``coverage_n``), ``normalized_entropy``,
  ``effective_answers``, ``kl_to_target``, ``answer_probs``.
  """
  samplers = frontier_samplers(cfg)
  n = cfg.coverage_n
  res = sequence.exact(lm, task, samplers, bound=cfg.bound, batch_size=cfg.batch_size,
                       coverage_n=sorted({1, 10, n}), prompt=task.prompts[cfg.prompt_index],
                       head=head, cache_dir=cache_dir, progress=progress)
  points = [{
      "sampler": r.sampler, "family": family(r.sampler),
      "temperature": truncation.Sampler.parse(r.sampler).temperature,
      "seq_validity": r.seq_validity, "invalid_mass": r.invalid_mass,
      "unexplored_mass": r.unexplored_mass,
      "coverage": {str(k): v for k, v in r.coverage.items()},
      "normalized_entropy": r.normalized_entropy, "effective_answers": r.effective_answers,
      "kl_to_target": r.kl_to_target, "answer_probs": r.answer_probs.tolist()}
      for r in res.samplers]
  fams = sorted({p["family"] for p in points})
  size = len(task.answers)
  return {"task": task.name, "prompt": res.prompt, "answers": list(task.answers),
          "coverage_n": n, "bound": cfg.bound, "nodes_expanded": res.nodes_expanded,
          "bound_reached": res.bound_reached, "points": points,
          "pareto": {f: [p["sampler"] for p in pareto([q for q in points if q["family"] == f], n)]
                     for f in fams},
          "table": table(points, n, cfg.levels),
          "ideal": [1.0, 1.0 - (1.0 - 1.0 / size) ** n]}

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

import jax
import numpy as np

from calibjax import sequence
from calibjax.core import truncation
from calibjax.models import prompts
from calibjax.core.rules import REGISTRY
from calibjax.tasks import Task

@dataclasses.dataclass(frozen=True)
class FrontierConfig:
  """Sweeps: each rule in ``rules`` over its default sweep (``Rule.sweep`` of
  :data:`calibjax.core.rules.REGISTRY`) at each temperature, and
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
  prompt_style: str = "auto"  # see calibjax.models.prompts
  template_kwargs: tuple[tuple[str, object], ...] = ()  # (name, value) for the chat template


def frontier_samplers(cfg: FrontierConfig) -> list[str]:
  """The samplers of a frontier run, as text."""
  if cfg.samplers:
    return [str(truncation.Sampler.parse(s)) for s in cfg.samplers]
  out = []
  for t in cfg.temperatures:
    for rule in cfg.rules:
      out += [str(truncation.Sampler(((rule, v),), t)) for v in REGISTRY[rule].sweep]
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
  prompt = prompts.task_prompt(lm, task, cfg.prompt_style, cfg.prompt_index, cfg.template_kwargs)
  res = sequence.exact(lm, task, samplers, bound=cfg.bound, batch_size=cfg.batch_size,
                       coverage_n=sorted({1, 10, n}), prompt=prompt, head=head,
                       cache_dir=cache_dir, progress=progress)
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
  return {"task": task.name, "prompt": res.prompt, "prompt_style": res.prompt_style,
          "answers": list(task.answers),
          "coverage_n": n, "bound": cfg.bound, "nodes_expanded": res.nodes_expanded,
          "bound_reached": res.bound_reached, "points": points,
          "pareto": {f: [p["sampler"] for p in pareto([q for q in points if q["family"] == f], n)]
                     for f in fams},
          "table": table(points, n, cfg.levels),
          "ideal": [1.0, 1.0 - (1.0 - 1.0 / size) ** n]}


def mc_check(lm, task: Task, item: dict, n: int, seed: int, *, head=None,
             cache_dir: str | None = None) -> list[dict]:
  """Each family's best sampler at seq_validity ≥ 0.95, sampled ``n`` times: the exact
  seq_validity and its Monte Carlo 99% Wilson interval (agreeing within 1e-3 of it), after
  the prompt the exact run read (``item["prompt"]``)."""
  out = []
  style = item.get("prompt_style", "completion")
  prompt = prompts.Prompt(style, item["prompt"], tuple(lm.tokenizer.encode(
      item["prompt"], add_bos=style == "completion")))
  for fam, row in item["table"].items():
    sampler = row.get("0.95", {}).get("sampler")
    if sampler is None:
      continue
    exact = next(p for p in item["points"] if p["sampler"] == sampler)
    mc = sequence.sample(lm, task, sampler, n, jax.random.fold_in(jax.random.key(seed), len(out)),
                         prompt=prompt, head=head, cache_dir=cache_dir)
    lo, hi = mc.seq_validity_ci
    out.append({"family": fam, "sampler": sampler, "exact_seq_validity": exact["seq_validity"],
                "mc_seq_validity": mc.seq_validity, "mc_ci99": [lo, hi],
                "agrees": bool(lo - 1e-3 <= exact["seq_validity"] <= hi + 1e-3)})
  return out


def table_markdown(items: dict, levels) -> str:
  """``table.md``: per task, each family's best coverage@N at each validity level (with its
  oracle gap and sampler) and the highest validity it reaches."""
  lines = ["# Best coverage at a validity level (exact), and the oracle gap", ""]
  for name, item in items.items():
    n = item["coverage_n"]
    lines += [f"## {name} (coverage@{n}; ideal {item['ideal'][1]:.3f}; "
              f"{item['nodes_expanded']} nodes, bound {item['bound']:g}"
              f"{'' if item['bound_reached'] else ' NOT reached'})", "",
              "| family | " + " | ".join(f"validity ≥ {l:g}" for l in levels) +
              " | highest validity reached |", "|---|" + "---|" * (len(levels) + 1)]
    for fam, row in item["table"].items():
      cells = []
      for l in levels:
        c = row[f"{l:g}"]
        if c["coverage"] is None:
          cells.append("–")
        else:
          gap = "" if c["oracle_gap"] is None else f" (gap {c['oracle_gap']:+.3f})"
          cells.append(f"{c['coverage']:.3f}{gap} `{c['sampler']}`")
      top = row["most_valid"]
      cells.append(f"{top['seq_validity']:.3f} (coverage {top['coverage']:.3f}) `{top['sampler']}`")
      lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)

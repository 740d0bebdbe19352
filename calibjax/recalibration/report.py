"""What a recalibration head changes, on held-out tasks: per-step metrics of the positions
along their canonical answer paths, the preservation KL, and sequence-level coverage at a
validity floor (from frontiers run with and without the head).

- :func:`step_metrics`: mean over positions of AUROC (SPEC §1), normalised valid entropy,
  ``KL(u‖q)`` (uniform over the valid tokens against the renormalised valid distribution) and
  valid mass ``p(V)`` (SPEC §2), base model or head.
- :func:`keep_kl`: mean ``KL(p_base‖p_head)`` in nats per position on preservation positions.
- :func:`best_coverage`: a frontier's best coverage@N among the samplers of the heuristic
  families (or of the oracle ones) with ``seq_validity ≥ level``.
- :func:`summarise`: the report: per task the base model's best heuristic sampler, each head's
  best (the same sweep applied to the head's logits) and ``oracle_set`` on the base model; per
  head the relative gain in mean coverage at the floor, with the target check.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from calibjax.core import order, shape, truncation
from calibjax.recalibration import keep_loss
from calibjax.recalibration.training import Positions, dense_targets


def _logits(pos: Positions, embed, head, rows: slice):
  e = jnp.asarray(embed, jnp.float32)
  h = jnp.asarray(pos.hidden[rows])
  z = h @ e.T
  return z if head is None else head(h, z), e.shape[0]


def step_metrics(pos: Positions, embed, head=None, chunk: int = 64) -> dict:
  """Means over task positions ``pos`` of ``auroc``, ``normalized_valid_entropy``,
  ``kl_uniform_to_q`` and ``valid_mass``, with ``head`` (a bound ``(h, z) -> z'``) or without.
  AUROC averages the positions where it is defined (valid and invalid tokens present)."""
  sums = {"auroc": [], "normalized_valid_entropy": [], "kl_uniform_to_q": [], "valid_mass": []}
  for start in range(0, len(pos), chunk):
    rows = slice(start, start + chunk)
    z, vocab = _logits(pos, embed, head, rows)
    valid, _ = dense_targets(jnp.asarray(pos.valid_ids[rows]), jnp.asarray(pos.target[rows]), vocab)
    cap = int(np.max(np.sum(np.asarray(pos.valid_ids[rows]) >= 0, axis=1)))
    o = order.order_stats(z, valid, max_valid=cap)
    s = shape.shape_stats(z, valid)
    sums["auroc"].append(np.asarray(o.auroc))
    sums["normalized_valid_entropy"].append(np.asarray(s.normalized_valid_entropy))
    sums["kl_uniform_to_q"].append(np.asarray(s.kl_target_to_q))
    sums["valid_mass"].append(np.asarray(s.valid_mass))
  out = {k: float(np.nanmean(np.concatenate(v))) for k, v in sums.items()}
  out["positions"] = len(pos)
  return out


def keep_kl(pos: Positions, embed, head, chunk: int = 64) -> float:
  """Mean ``KL(p_base‖p_head)`` (nats per position) over preservation positions."""
  kls = []
  for start in range(0, len(pos), chunk):
    rows = slice(start, start + chunk)
    z, _ = _logits(pos, embed, None, rows)
    zh, _ = _logits(pos, embed, head, rows)
    kls.append(np.asarray(keep_loss(zh, z)[1]))
  return float(np.mean(np.concatenate(kls)))


def best_coverage(item: dict, level: float, *, oracle: bool = False) -> dict | None:
  """The frontier ``item``'s best coverage@N among heuristic (or oracle) samplers with
  ``seq_validity ≥ level``: ``{"sampler", "coverage", "seq_validity"}``, None if none."""
  n = str(item["coverage_n"])
  ok = [p for p in item["points"] if (p["family"] in truncation.ORACLES) == oracle
        and p["seq_validity"] >= level]
  if not ok:
    return None
  p = max(ok, key=lambda p: p["coverage"][n])
  return {"sampler": p["sampler"], "coverage": p["coverage"][n],
          "seq_validity": p["seq_validity"]}


def summarise(frontiers: dict, steps: dict, keep: dict, *, level: float = 0.95,
              target_gain: float = 0.2, keep_limit: float = 0.05) -> dict:
  """The report from ``frontiers[task][model]`` (frontier items; model ``"base"`` or a head
  name), ``steps[model]`` (:func:`step_metrics` on the held-out positions) and
  ``keep[head]`` (:func:`keep_kl`).

  A model's coverage at the floor is its best heuristic sampler's coverage@N among those with
  ``seq_validity ≥ level``, and 0 when none reaches the floor (no valid diversity at that
  level). Each head's ``relative_gain`` compares its mean over the tasks with the base
  model's: the target is ``relative_gain ≥ target_gain`` with ``keep_kl ≤ keep_limit``.
  Per task, ``relative_gain`` is None where the base model's coverage there is 0."""
  heads = [m for m in steps if m != "base"]
  cov = lambda b: 0.0 if b is None else b["coverage"]
  tasks = {}
  for task, runs in frontiers.items():
    base = best_coverage(runs["base"], level)
    row = {"base_best_heuristic": base,
           "oracle_set_base": best_coverage(runs["base"], level, oracle=True)}
    for h in heads:
      b = best_coverage(runs[h], level)
      row[h] = {"best_heuristic": b,
                "relative_gain": cov(b) / cov(base) - 1 if cov(base) > 0 else None}
    tasks[task] = row
  base_mean = float(np.mean([cov(r["base_best_heuristic"]) for r in tasks.values()]))
  verdict = {}
  for h in heads:
    mean = float(np.mean([cov(r[h]["best_heuristic"]) for r in tasks.values()]))
    gain = mean / base_mean - 1 if base_mean > 0 else None
    verdict[h] = {"mean_coverage": mean, "base_mean_coverage": base_mean,
                  "relative_gain": gain, "keep_kl": keep[h],
                  "meets_target": bool(gain is not None and gain >= target_gain
                                       and keep[h] <= keep_limit)}
  return {"level": level, "target": {"relative_gain": target_gain, "keep_kl": keep_limit},
          "step_metrics": steps, "keep_kl": keep, "tasks": tasks, "heads": verdict,
          "target_met": any(v["meets_target"] for v in verdict.values())}


def report_markdown(rep: dict) -> str:
  """``report.md``: the report of :func:`summarise` as tables."""
  lines = [f"# Recalibration heads on held-out tasks (validity ≥ {rep['level']:g})", "",
           "| model | AUROC | normalised valid entropy | KL(u‖q) | valid mass | keep KL |",
           "|---|---|---|---|---|---|"]
  for m, s in rep["step_metrics"].items():
    kl = "" if m == "base" else f"{rep['keep_kl'][m]:.4f}"
    lines.append(f"| {m} | {s['auroc']:.4f} | {s['normalized_valid_entropy']:.4f} | "
                 f"{s['kl_uniform_to_q']:.4f} | {s['valid_mass']:.4f} | {kl} |")
  lines += ["", "coverage@N (sampler) at the validity floor:", "",
            "| task | base heuristic | " + " | ".join(rep["heads"]) + " | oracle_set |",
            "|---|---|" + "---|" * len(rep["heads"]) + "---|"]
  cell = lambda c: "–" if c is None else f"{c['coverage']:.3f} `{c['sampler']}`"
  for task, row in rep["tasks"].items():
    hs = []
    for h in rep["heads"]:
      g = row[h]["relative_gain"]
      hs.append(cell(row[h]["best_heuristic"]) + ("" if g is None else f" ({g:+.0%})"))
    lines.append(f"| {task} | {cell(row['base_best_heuristic'])} | " + " | ".join(hs) +
                 f" | {cell(row['oracle_set_base'])} |")
  lines += ["", "Mean coverage at the floor over the tasks (0 where no sampler reaches it):", "",
            "| head | mean coverage | base | relative gain | keep KL | target |",
            "|---|---|---|---|---|---|"]
  for h, v in rep["heads"].items():
    gain = "–" if v["relative_gain"] is None else f"{v['relative_gain']:+.0%}"
    lines.append(f"| {h} | {v['mean_coverage']:.3f} | {v['base_mean_coverage']:.3f} | {gain} | "
                 f"{v['keep_kl']:.4f} | {'met' if v['meets_target'] else 'not met'} |")
  lines += ["", "target (relative gain ≥ {relative_gain:.0%}, keep KL ≤ {keep_kl}): ".format(
      **rep["target"]) + ("met" if rep["target_met"] else "not met"), ""]
  return "\n".join(lines)

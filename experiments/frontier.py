r"""Validity–diversity frontiers of every truncation rule and the oracle samplers, exact.

Command (repository root, README's environment):

  python -m experiments.frontier --task=us_states --task=integers_1_20 --out=results/frontier

Expected runtime: one to a few minutes per task on 2 CPU cores with the packaged Gemma 3 270M
(defaults: 7 rules × their sweeps × 3 temperatures + oracle_set and oracle_rank, about 150
samplers sharing one tree enumeration; bound 1e-3).
Expected output in ``--out``: ``frontier.json`` (per task: every sampler's seq_validity,
coverage@1/10/N, entropy, KL to the target, answer probabilities; per-family Pareto fronts;
the table below; the ideal point), ``frontier.png`` (one panel per task, drawn from
``frontier.json``), ``table.md`` (each family's best coverage@N at seq_validity ≥ 0.9 / 0.95 /
0.99 and its oracle gap), with ``--mc_samples`` a Monte Carlo check of each family's best
sampler at 0.95 (``mc_check``), ``manifest.json``; ``items/`` for ``--resume``;
``run.json`` records the settings a ``--resume`` must match (it refuses others, naming them).
"""

import os

import jax
from absl import app, flags

from calibjax import errors, frontier, plots, results, sequence, tasks, truncation
from experiments import common

_SAMPLERS = flags.DEFINE_multi_string(
    "samplers", [], "Explicit samplers (e.g. 'top_p=0.9,t=1.5', 'oracle_set,t=2'); "
    "replaces the default sweeps.")
_RULES = flags.DEFINE_list("rules", list(truncation.RULES), "Rules swept by default.")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["0.7", "1", "1.5"], "Temperatures swept.")
_ORACLE_TAUS = flags.DEFINE_list("oracle_taus", ["0.9", "0.95", "0.99"], "oracle_rank τ values.")
_COVERAGE_N = flags.DEFINE_integer("coverage_n", 100, "N of coverage@N.")
_BOUND = flags.DEFINE_float("bound", 1e-3, "Stop when every unexplored valid mass is below.")
_MC_SAMPLES = flags.DEFINE_integer("mc_samples", 0, "Monte Carlo check: samples per checked "
                                   "sampler (0: none).")


def config() -> frontier.FrontierConfig:
  unknown = sorted(set(_RULES.value) - set(truncation.RULES))
  if unknown:
    raise errors.InputError(f"--rules: unknown {unknown}; rules are {list(truncation.RULES)}.")
  for s in _SAMPLERS.value:
    truncation.Sampler.parse(s)  # errors name the offending part
  try:
    return frontier.FrontierConfig(
        rules=tuple(_RULES.value), temperatures=tuple(float(t) for t in _TEMPERATURES.value),
        oracle_taus=tuple(float(t) for t in _ORACLE_TAUS.value), samplers=tuple(_SAMPLERS.value),
        coverage_n=_COVERAGE_N.value, bound=_BOUND.value, batch_size=common.BATCH_SIZE.value)
  except ValueError as e:
    raise app.UsageError(f"--temperatures / --oracle_taus: {e}") from None


def mc_check(lm, task: tasks.Task, item: dict, n: int, seed: int) -> list[dict]:
  """Each family's best sampler at seq_validity ≥ 0.95, sampled ``n`` times: the exact
  seq_validity and its Monte Carlo 99% Wilson interval."""
  out = []
  for fam, row in item["table"].items():
    sampler = row.get("0.95", {}).get("sampler")
    if sampler is None:
      continue
    exact = next(p for p in item["points"] if p["sampler"] == sampler)
    mc = sequence.sample(lm, task, sampler, n, jax.random.fold_in(jax.random.key(seed), len(out)),
                         cache_dir=common.validity_cache())
    lo, hi = mc.seq_validity_ci
    out.append({"family": fam, "sampler": sampler, "exact_seq_validity": exact["seq_validity"],
                "mc_seq_validity": mc.seq_validity, "mc_ci99": [lo, hi],
                "agrees": bool(lo - 1e-3 <= exact["seq_validity"] <= hi + 1e-3)})
  return out


def table_markdown(items: dict, levels) -> str:
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


@common.on_mesh
def run() -> dict:
  """Runs (or resumes) the frontiers and writes every output; returns them by task."""
  cfg = config()
  with common.Run("frontier") as job:
    lm = None
    items = {}
    for task in job.tasks:
      if not job.items.done(task.name):
        lm = lm or common.load_model()
        item = frontier.frontier_task(lm, task, cfg, head=common.load_head(lm),
                                      cache_dir=common.validity_cache())
        if _MC_SAMPLES.value:
          item["mc_check"] = mc_check(lm, task, item, _MC_SAMPLES.value, common.SEED.value)
        job.items.save(task.name, item)
      items[task.name] = job.items.load(task.name)
    results.write_json_atomic(os.path.join(job.out, "frontier.json"), items)
    job.figure(plots.frontier_figure, items, "frontier.png")
    results.write_text_atomic(os.path.join(job.out, "table.md"), table_markdown(items, cfg.levels))
    job.finish(tasks=list(items))
  return items


@common.main
def main():
  run()
  print(f"wrote {common.OUT.value}: frontier.json frontier.png table.md")


if __name__ == "__main__":
  app.run(main)

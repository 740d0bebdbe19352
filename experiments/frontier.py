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

from absl import app, flags

from calibjax import results
from calibjax.analysis import frontier, plots
from . import common, shared_flags

_MC_SAMPLES = flags.DEFINE_integer("mc_samples", 0, "Monte Carlo check: samples per checked "
                                   "sampler (0: none).")


@common.on_mesh
def run() -> dict:
  """Runs (or resumes) the frontiers and writes every output; returns them by task."""
  cfg = shared_flags.frontier_config()
  with common.Run("frontier", groups=("sweep",)) as job:

    def compute(task):
      item = frontier.frontier_task(job.model(), task, cfg, head=job.head(),
                                    cache_dir=job.validity_cache)
      if _MC_SAMPLES.value:
        item["mc_check"] = frontier.mc_check(job.model(), task, item, _MC_SAMPLES.value,
                                             shared_flags.SEED.value, head=job.head(),
                                             cache_dir=job.validity_cache)
      return item

    items = {task.name: job.item(task.name, lambda: compute(task)) for task in job.tasks}
    results.write_json_atomic(os.path.join(job.out, "frontier.json"), items)
    job.figure(plots.frontier_figure, items, "frontier.png")
    results.write_text_atomic(os.path.join(job.out, "table.md"),
                              frontier.table_markdown(items, cfg.levels))
    job.finish(tasks=list(items), prompts={k: v["prompt"] for k, v in items.items()})
  return items


@common.main
def main():
  run()
  print(f"wrote {shared_flags.OUT.value}: frontier.json frontier.png table.md")


def cli():
  """``calibjax-frontier``: the installed command of ``python -m experiments.frontier``."""
  app.run(main)


if __name__ == "__main__":
  cli()

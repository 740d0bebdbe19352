r"""Token-level diagnostics of a model on tasks, at every valid-prefix tree node above a floor.

Command (repository root, README's environment):

  python -m experiments.diagnose --task=us_states --task=integers_1_20 --out=results/diagnose

Expected runtime: about a minute per task on 2 CPU cores with the packaged Gemma 3 270M
(defaults: floor 1e-3, at most 400 positions), plus the model's first load.
Expected output in ``--out``: ``positions.jsonl`` (one record per tree node: task, path, text,
path_prob, order and shape metrics, group masses per temperature, precision/recall/validity
per cutoff), ``summary.json`` (per task: path-weighted means, the root record),
``shape.png`` and ``order.png`` (the paper's two figures, drawn from ``summary.json``),
``report.md`` (the findings in numbers), ``manifest.json``; ``items/`` holds each finished
task, so ``--resume`` continues an interrupted run; ``run.json`` records the settings a ``--resume`` must match (it refuses others, naming them).
"""

import os

from absl import app, flags

from calibjax import results
from calibjax.analysis import diagnostics, plots
from . import common, shared_flags

_FLOOR = flags.DEFINE_float("floor", 1e-3, "Visit tree nodes with path probability >= floor.")
_MAX_NODES = flags.DEFINE_integer("max_nodes", 400, "At most this many nodes per task.")
_TEMPERATURES = flags.DEFINE_list(
    "shape_temperatures", [f"{t:g}" for t in diagnostics.PAPER_TEMPERATURES],
    "Shape-figure temperatures (default: the paper's).")
_FREQUENT = flags.DEFINE_integer(
    "frequent_top_m", 2, "Shape figure: the top-m valid tokens at T=1 are 'valid & frequent' "
    "(the paper's figure); 0: the valid tokens over-represented against the task's target.")
_CUTOFFS = flags.DEFINE_list("cutoffs", ["1", "2", "4", "8", "16", "32", "64", "128", "256",
                                         "512", "1024", "4096"], "Order-figure cutoff ranks.")


def config() -> diagnostics.DiagnoseConfig:
  try:
    return diagnostics.DiagnoseConfig(
        floor=_FLOOR.value, max_nodes=_MAX_NODES.value,
        temperatures=tuple(float(t) for t in _TEMPERATURES.value),
        frequent_top_m=_FREQUENT.value,
        cutoffs=tuple(int(c) for c in _CUTOFFS.value), batch_size=shared_flags.BATCH_SIZE.value,
        prompt_style=shared_flags.PROMPT_STYLE.value,
        template_kwargs=shared_flags.template_kwargs())
  except ValueError as e:
    raise app.UsageError(f"--shape_temperatures / --cutoffs: {e}") from None


@common.on_mesh
def run() -> dict:
  """Runs (or resumes) the diagnostics and writes every output; returns the summaries."""
  cfg = config()
  with common.Run("diagnose") as job:
    items = {task.name: job.item(task.name, lambda: diagnostics.diagnose_task(
        job.model(), task, cfg, head=job.head(), cache_dir=job.validity_cache))
             for task in job.tasks}
    out = job.out
    records = [{"task": name, **node} for name, item in items.items() for node in item["nodes"]]
    results.write_text_atomic(os.path.join(out, "positions.jsonl"), results.jsonl(records))
    summaries = {name: {"prompt": item["prompt"], "prompt_style": item["prompt_style"],
                        **item["summary"]} for name, item in items.items()}
    results.write_json_atomic(os.path.join(out, "summary.json"), summaries)
    job.figure(plots.shape_figure, summaries, "shape.png")
    job.figure(plots.order_figure, summaries, "order.png")
    results.write_text_atomic(os.path.join(out, "report.md"),
                              diagnostics.report_markdown(summaries))
    job.finish(tasks=list(items), prompts={k: v["prompt"] for k, v in items.items()})
  return summaries


@common.main
def main():
  run()
  print(f"wrote {shared_flags.OUT.value}: positions.jsonl summary.json shape.png order.png "
        "report.md")


def cli():
  """``calibjax-diagnose``: the installed command of ``python -m experiments.diagnose``."""
  app.run(main)


if __name__ == "__main__":
  cli()

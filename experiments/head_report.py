r"""The held-out report of recalibration heads: each head against the base model on tasks
whose answers no training task shares.

Command (repository root, README's environment; heads from ``experiments.train_head``):

  python -m experiments.head_report --task=us_states --task=rainbow_colors \
      --head_dirs=low_rank=results/heads/low_rank/head --temperatures=0.7,1 --bound=5e-3 \
      --out=results/heads

Expected runtime: the frontier of each task once per model (base and each head), one to a
few minutes each on 2 CPU cores with the packaged Gemma 3 270M, plus the positions.
Expected output in ``--out``: ``report.json`` (per-step AUROC, normalised valid entropy,
KL(u‖q), valid mass on the tasks' canonical-path positions, base and each head; preservation
KL per head; per task the best coverage@N at seq_validity ≥ 0.95 of the base model's
heuristic samplers, of each head's, and of oracle_set; the relative gain and the target
check), ``report.md``, ``coverage.png``, ``frontiers.json``, ``manifest.json``; ``items/`` for
``--resume``; ``run.json`` records the settings a ``--resume`` must match (it refuses others, naming them).
The frontier sweeps take the same flags as ``experiments.frontier`` (``--samplers``,
``--rules``, ``--temperatures``, ``--oracle_taus``, ``--coverage_n``, ``--bound``).
"""

import os

import jax
from absl import app, flags

from calibjax import errors, recalibration, results
from calibjax.analysis import frontier, plots
from calibjax.recalibration import report as head_report, training as ht
from . import common, shared_flags

_HEAD_DIRS = flags.DEFINE_multi_string("head_dirs", [], "name=path of a trained head "
                                       "(the head/ folder of experiments.train_head).")
_LEVEL = flags.DEFINE_float("level", 0.95, "Sequence-validity floor of the comparison.")


def heads(lm) -> dict:
  """The ``--head_dirs`` heads, bound to ``lm`` (name → ``(h, z) -> z'``)."""
  out = {}
  for item in _HEAD_DIRS.value:
    name, sep, path = item.partition("=")
    if not sep or not name or name == "base":
      raise errors.InputError(f"--head_dirs: write name=path (name not 'base'), got {item!r}.")
    out[name] = recalibration.load(path, lm)
  if not out:
    raise errors.InputError("--head_dirs names no head.")
  return out


@common.on_mesh
def run() -> dict:
  cfg = shared_flags.frontier_config()
  paths = tuple(item.partition("=")[2] for item in _HEAD_DIRS.value)
  with common.Run("head_report", groups=("sweep",), heads=paths) as job:
    lm = job.model()
    models = {"base": None, **heads(lm)}
    embed = lm.embedding()
    frontiers = {task.name: {name: job.item(f"{task.name}.{name}", lambda: frontier.frontier_task(
        lm, task, cfg, head=head, cache_dir=job.validity_cache)) for name, head in models.items()}
                 for task in job.tasks}

    def positions():
      pos = ht.concat([ht.task_positions(lm, t, batch_size=shared_flags.BATCH_SIZE.value,
                                         prompt_style=shared_flags.PROMPT_STYLE.value,
                                         template_kwargs=shared_flags.template_kwargs(),
                                         cache_dir=job.validity_cache) for t in job.tasks])
      keep = ht.keep_positions(lm, jax.random.key(shared_flags.SEED.value))
      return {"steps": {n: head_report.step_metrics(pos, embed, h) for n, h in models.items()},
              "keep": {n: head_report.keep_kl(keep, embed, h) for n, h in models.items() if h}}

    positions = job.item("positions", positions)
    rep = head_report.summarise(frontiers, positions["steps"], positions["keep"],
                                level=_LEVEL.value)
    out = job.out
    results.write_json_atomic(os.path.join(out, "report.json"), rep)
    results.write_json_atomic(os.path.join(out, "frontiers.json"), frontiers)
    results.write_text_atomic(os.path.join(out, "report.md"), head_report.report_markdown(rep))
    job.figure(plots.heads_figure, rep, "coverage.png")
    job.finish(tasks=[t.name for t in job.tasks], heads=list(models)[1:],
               prompts=common.prompt_texts(lm, job.tasks))
  return rep


@common.main
def main():
  rep = run()
  print(f"wrote {shared_flags.OUT.value}: report.json report.md coverage.png frontiers.json "
        f"(target {'met' if rep['target_met'] else 'not met'})")


def cli():
  """``calibjax-head-report``: the installed command of ``python -m experiments.head_report``."""
  app.run(main)


if __name__ == "__main__":
  cli()

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
The frontier sweeps take ``experiments.frontier``'s flags.
"""

import os

import jax
from absl import app, flags

from calibjax import errors, frontier, head_report, head_training as ht, plots, recalibration
from calibjax import results
from experiments import common
from experiments import frontier as frontier_binary

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


def report_markdown(rep: dict) -> str:
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


@common.on_mesh
def run() -> dict:
  cfg = frontier_binary.config()
  paths = tuple(item.partition("=")[2] for item in _HEAD_DIRS.value)
  with common.Run("head_report", uses=("frontier",), heads=paths) as job:
    lm = common.load_model()
    models = {"base": None, **heads(lm)}
    embed = lm.embedding()
    frontiers = {}
    for task in job.tasks:
      frontiers[task.name] = {}
      for name, head in models.items():
        key = f"{task.name}.{name}"
        if not job.items.done(key):
          job.items.save(key, frontier.frontier_task(lm, task, cfg, head=head,
                                                     cache_dir=common.validity_cache()))
        frontiers[task.name][name] = job.items.load(key)
    if not job.items.done("positions"):
      pos = ht.concat([ht.task_positions(lm, t, batch_size=common.BATCH_SIZE.value,
                                         cache_dir=common.validity_cache()) for t in job.tasks])
      keep = ht.keep_positions(lm, jax.random.key(common.SEED.value))
      job.items.save("positions", {
          "steps": {n: head_report.step_metrics(pos, embed, h) for n, h in models.items()},
          "keep": {n: head_report.keep_kl(keep, embed, h) for n, h in models.items() if h}})
    positions = job.items.load("positions")
    rep = head_report.summarise(frontiers, positions["steps"], positions["keep"],
                                level=_LEVEL.value)
    out = job.out
    results.write_json_atomic(os.path.join(out, "report.json"), rep)
    results.write_json_atomic(os.path.join(out, "frontiers.json"), frontiers)
    results.write_text_atomic(os.path.join(out, "report.md"), report_markdown(rep))
    job.figure(plots.heads_figure, rep, "coverage.png")
    job.finish(tasks=[t.name for t in job.tasks], heads=list(models)[1:])
  return rep


@common.main
def main():
  rep = run()
  print(f"wrote {common.OUT.value}: report.json report.md coverage.png frontiers.json "
        f"(target {'met' if rep['target_met'] else 'not met'})")


if __name__ == "__main__":
  app.run(main)

r"""Train a recalibration head on the train-split tasks (the base model frozen), evaluating on
the eval-split tasks.

Command (repository root, README's environment):

  python -m experiments.train_head --task=all --head_kind=low_rank --out=results/heads/low_rank

(the defaults — rank 4, AdamW 1e-3, 200 steps, λ_keep = 10 — are the measured configuration of
BUILD_NOTES.md; with rank 8, 3e-3 and λ_keep = 1 the head memorised the train tasks).

Expected runtime: minutes on 2 CPU cores with the packaged Gemma 3 270M (positions of every
train/eval task's canonical answer paths, one forward each; each step recomputes the logits
of its batch from the hidden states, 335 MFLOP per position).
Expected output in ``--out``: ``data/{train,eval,keep}.npz`` (cached positions: hidden
states, valid ids, targets), ``metrics.jsonl`` (loss parts per step, ``eval_*`` every
``--eval_every``), ``checkpoints/step_N`` (``--max_to_keep`` of them), ``head/`` (the trained
head: pass it to ``diagnose``/``frontier``/``sample`` as ``--head``), ``manifest.json``.
``--resume`` continues from the newest intact checkpoint (a partial one, e.g. from a run killed
inside a save, is skipped and named) with the losses an uninterrupted run has; ``run.json``
records the settings it must be resumed with.
"""

import os

import jax
from absl import app, flags

from calibjax import errors, progress, recalibration
from calibjax.recalibration import training as ht
from . import common, shared_flags

_KIND = flags.DEFINE_enum("head_kind", "low_rank", sorted(recalibration.HEADS), "Head type.")
_RANK = flags.DEFINE_integer("rank", 4, "Rank of the low-rank head.")
_STEPS = flags.DEFINE_integer("steps", 200, "Optimisation steps.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate.")
_LAMBDA_VALID = flags.DEFINE_float("lambda_valid", 1.0, "Weight of -log p(V).")
_LAMBDA_SHAPE = flags.DEFINE_float("lambda_shape", 1.0, "Weight of KL(r||q).")
_LAMBDA_KEEP = flags.DEFINE_float("lambda_keep", 10.0, "Weight of KL(p_base||p_head).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Evaluate every this many steps.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 100, "Checkpoint period (steps).")
_MAX_TO_KEEP = flags.DEFINE_integer("max_to_keep", 3, "Checkpoints kept.")


def positions(lm, out: str, todo, cache_dir: str) -> dict:
  """Train/eval task positions of the tasks ``todo`` and preservation positions, computed
  once into ``out/data``."""
  split = {s: [t for t in todo if t.split == s] for s in ("train", "eval")}
  if not split["train"]:
    raise errors.InputError("--task selects no train-split task; try --task=all.")
  data = {}
  for name in ("train", "eval", "keep"):
    path = os.path.join(out, "data", f"{name}.npz")
    if not os.path.exists(path):
      if name == "keep":
        pos = ht.keep_positions(lm, jax.random.key(shared_flags.SEED.value))
      elif split[name]:
        tasks = progress.bar(f"{name} positions", "task", iterable=split[name])
        pos = ht.concat([ht.task_positions(lm, t, batch_size=shared_flags.BATCH_SIZE.value,
                                           prompt_style=shared_flags.PROMPT_STYLE.value,
                                           template_kwargs=shared_flags.template_kwargs(),
                                           cache_dir=cache_dir) for t in tasks])
      else:
        continue
      ht.save_positions(path, pos)  # (process 0 writes; every process keeps its own)
      data[name] = pos
    else:
      data[name] = ht.load_positions(path)
  return data


@common.on_mesh
def run() -> list[dict]:
  with common.Run("train_head") as job:
    lm = job.model()
    data = positions(lm, job.out, job.tasks, job.validity_cache)
    cfg = ht.TrainConfig(
        steps=_STEPS.value, batch_size=shared_flags.BATCH_SIZE.value, learning_rate=_LR.value,
        weights=recalibration.LossWeights(_LAMBDA_VALID.value, _LAMBDA_SHAPE.value,
                                          _LAMBDA_KEEP.value),
        eval_every=_EVAL_EVERY.value, checkpoint_every=_CHECKPOINT_EVERY.value,
        max_to_keep=_MAX_TO_KEEP.value, seed=shared_flags.SEED.value)
    embed = lm.embedding()
    head = recalibration.create(_KIND.value, embed.shape[1], rank=_RANK.value,
                                seed=shared_flags.SEED.value)
    records = ht.train(head, embed, data["train"], data["keep"], data.get("eval"), cfg,
                       job.out, resume=shared_flags.RESUME.value)
    recalibration.save(os.path.join(job.out, "head"), head, _KIND.value, rank=_RANK.value)
    job.finish(positions={k: len(v) for k, v in data.items()},
               final=records[-1] if records else None,
               prompts=common.prompt_texts(lm, job.tasks))
  return records


@common.main
def main():
  records = run()
  if records:
    print(f"step {records[-1]['step']}: loss {records[-1]['loss']:.4f}")


def cli():
  """``calibjax-train-head``: the installed command of ``python -m experiments.train_head``."""
  app.run(main)


if __name__ == "__main__":
  cli()

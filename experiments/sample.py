r"""Monte Carlo generation for one sampler: raw samples and sequence metrics.

Command (repository root, README's environment):

  python -m experiments.sample --task=us_states --sampler=top_p=0.9,t=1.5 --n=1000 \
      --batch_size=256 --out=results/sample

Expected runtime: about a minute per 1,000 samples on 2 CPU cores with the packaged Gemma 3
270M (batches of ``--batch_size`` samples, up to 16 new tokens, a batch stopping when every
sample in it is decided).
Expected output in ``--out``: ``samples.jsonl`` (per task and sample: text, answer or null,
reason: valid / wrong / early_eos / no_terminator), ``metrics.json`` (per task: seq_validity
with its 99% Wilson interval, distinct answers and empirical coverage, the answer histogram
with intervals), ``manifest.json``; ``items/`` holds finished batches (each with its own key,
``fold_in(key(seed), batch)``), so ``--resume`` continues an interrupted run with the same
samples; ``run.json`` records the settings a ``--resume`` must match (it refuses others, naming them).
"""

import os

import jax
import numpy as np
from absl import app, flags

from calibjax import results, sequence
from calibjax.models import prompts
from calibjax.core import truncation
from . import common, shared_flags

_SAMPLER = flags.DEFINE_string("sampler", "t=1", "The sampler, e.g. 'top_p=0.9,t=1.5'.")
_N = flags.DEFINE_integer("n", 1000, "Samples per task.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "Decoding limit per sample.")


@common.on_mesh
def run() -> dict:
  spec = str(truncation.Sampler.parse(_SAMPLER.value))
  with common.Run("sample") as job:
    batch, n = shared_flags.BATCH_SIZE.value, _N.value
    per_task, records = {}, []
    for task in job.tasks:

      def draw(b, start):  # batch b: its own key, so a resumed run draws the same samples
        prompt = prompts.task_prompt(job.model(), task, shared_flags.PROMPT_STYLE.value,
                                     template_kwargs=shared_flags.template_kwargs())
        mc = sequence.sample(job.model(), task, spec, min(batch, n - start),
                             jax.random.fold_in(jax.random.key(shared_flags.SEED.value), b),
                             max_new_tokens=_MAX_NEW_TOKENS.value, batch_size=batch,
                             prompt=prompt, head=job.head(), cache_dir=job.validity_cache,
                             progress=False)
        return {"prompt": prompt.text, "texts": [t.decode("utf-8", "replace") for t in mc.texts],
                "answers": [None if a < 0 else int(a) for a in mc.answer],
                "reasons": list(mc.reason)}

      items = [job.item(f"{task.name}-{b:05d}", lambda: draw(b, start))
               for b, start in enumerate(range(0, n, batch))]
      texts = [t for item in items for t in item["texts"]]
      answers = [a for item in items for a in item["answers"]]
      reasons = [r for item in items for r in item["reasons"]]
      records += [{"task": task.name, "text": t, "answer": None if a is None else task.answers[a],
                   "reason": r} for t, a, r in zip(texts, answers, reasons)]
      mc = sequence.summarise(spec, task.answers, texts,
                              np.array([-1 if a is None else a for a in answers]), reasons)
      per_task[task.name] = {"sampler": spec, "prompt": items[0]["prompt"], **sequence.record(mc)}
    results.write_text_atomic(os.path.join(job.out, "samples.jsonl"), results.jsonl(records))
    results.write_json_atomic(os.path.join(job.out, "metrics.json"), per_task)
    job.finish(tasks=list(per_task), prompts={k: v["prompt"] for k, v in per_task.items()})
  return per_task


@common.main
def main():
  for name, m in run().items():
    lo, hi = m["seq_validity_ci99"]
    print(f"{name}: seq_validity {m['seq_validity']:.3f} [{lo:.3f}, {hi:.3f}], "
          f"{m['distinct_answers']} distinct answers")


def cli():
  """``calibjax-sample``: the installed command of ``python -m experiments.sample``."""
  app.run(main)


if __name__ == "__main__":
  cli()

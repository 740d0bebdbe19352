"""Training recalibration heads with optax on cached positions of a frozen model.

A position is what the losses need and nothing more: the model's final (normed) hidden state
``h [d]`` — its logits are ``h Eᵀ`` with the tied output embedding ``E``, recomputed in the
step instead of stored (1 MiB per position at V = 262,144) — and, for task positions, the
valid token ids with the target weights over them (:class:`Positions`).

:func:`train` runs a jitted AdamW step (warm-up + cosine schedule, global-norm clipping) on
batches drawn in a fixed order from ``seed`` and the epoch, evaluates every ``eval_every``
steps, appends metrics to ``metrics.jsonl``, and saves ``(params, optimiser state)`` every
``checkpoint_every`` steps through the one checkpoint module, keeping ``max_to_keep``. With
``resume`` it restarts from the newest complete checkpoint and, the data order and keys being
functions of the step, reproduces the losses an uninterrupted run would have had.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from calibjax import errors, results
from calibjax.models import checkpoint
from calibjax.recalibration import LossWeights, keep_loss, task_loss


@struct.dataclass
class Positions:
  """``hidden [N, d]``; task positions also ``valid_ids [N, C]`` (−1 padding) and
  ``target [N, C]`` (non-negative weights over those ids); preservation positions have
  neither."""
  hidden: np.ndarray
  valid_ids: np.ndarray | None = None
  target: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.hidden)

  def take(self, rows) -> "Positions":
    pick = lambda x: None if x is None else x[rows]
    return Positions(self.hidden[rows], pick(self.valid_ids), pick(self.target))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 500
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup: int = 20
  weight_decay: float = 1e-4
  clip: float = 1.0
  weights: LossWeights = LossWeights()
  eval_every: int = 50
  checkpoint_every: int = 100
  max_to_keep: int = 3
  seed: int = 0


def _dense(ids, target, vocab):
  """Valid mask and target weights ``[B, V]`` from padded ids ``[B, C]``."""
  rows = jnp.arange(ids.shape[0])[:, None]
  safe = jnp.where(ids >= 0, ids, 0)
  valid = jnp.zeros((ids.shape[0], vocab), bool).at[rows, safe].max(ids >= 0)
  weights = jnp.zeros((ids.shape[0], vocab), jnp.float32).at[rows, safe].add(
      jnp.where(ids >= 0, target, 0.0))
  return valid, weights


def losses(head, embed, task: Positions, keep: Positions | None, weights: LossWeights):
  """``(total, metrics)`` of a head on a batch of task positions and preservation positions."""
  e = jnp.asarray(embed, jnp.float32)
  z = task.hidden @ e.T
  valid, target = _dense(task.valid_ids, task.target, e.shape[0])
  total, parts = task_loss(head(task.hidden, z, e), valid, target, weights)
  metrics = {"task_loss": total, "neg_log_valid_mass": jnp.mean(parts["neg_log_valid_mass"]),
             "kl_target_to_q": jnp.mean(parts["kl_target_to_q"])}
  if keep is not None:
    zk = keep.hidden @ e.T
    kl_total, kl = keep_loss(head(keep.hidden, zk, e), zk, weights)
    total = total + kl_total
    metrics["keep_kl"] = jnp.mean(kl)
  metrics["loss"] = total
  return total, metrics


def _batch(data: Positions, step: int, size: int, seed: int) -> Positions:
  """Rows of ``step``'s batch: epochs of a permutation drawn from ``(seed, epoch)``."""
  per_epoch = max(len(data) // size, 1)
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(data))
  rows = np.resize(order[k * size:(k + 1) * size], size)  # small sets wrap around
  return data.take(rows)


def _checkpoints(folder: str) -> list[int]:
  if not os.path.isdir(folder):
    return []
  return sorted(int(n[5:]) for n in os.listdir(folder) if n.startswith("step_"))


def train(head: nnx.Module, embed, train_data: Positions, keep_data: Positions | None,
          eval_data: Positions | None, cfg: TrainConfig, out_dir: str, *,
          resume: bool = False, log=print) -> list[dict]:
  """Trains ``head`` in place (the base model stays frozen: only ``embed`` is read).

  Writes ``out_dir/metrics.jsonl`` (one record per step, plus ``eval_*`` every
  ``eval_every``) and ``out_dir/checkpoints/step_N``. Returns the metric records.

  Raises:
    CheckpointError: ``resume`` found only damaged checkpoints.
  """
  graph, params = nnx.split(head, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup, 1),
                                                max(cfg.steps, cfg.warmup + 1))
  opt = optax.chain(optax.clip_by_global_norm(cfg.clip),
                    optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = opt.init(params)
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  metrics_path = os.path.join(out_dir, "metrics.jsonl")
  records, start = [], 0
  if resume and _checkpoints(ckpt_dir):
    start = _checkpoints(ckpt_dir)[-1]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, opt_state))
    (params, opt_state), _ = checkpoint.load(os.path.join(ckpt_dir, f"step_{start}"),
                                             lambda files: abstract)
    with open(metrics_path) as f:
      records = [r for r in map(json.loads, f) if r["step"] <= start]
  elif os.path.exists(metrics_path) or _checkpoints(ckpt_dir):
    raise errors.InputError(f"{out_dir} holds a training run: pass resume=True to continue it.")

  def loss_fn(p, task, keep):
    return losses(nnx.merge(graph, p), embed, task, keep, cfg.weights)

  @jax.jit
  def step_fn(p, s, task, keep):
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p, task, keep)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, m

  evaluate = jax.jit(lambda p, task: loss_fn(p, task, None)[1])
  as_jax = lambda d: None if d is None else jax.tree.map(jnp.asarray, d)
  for step in range(start + 1, cfg.steps + 1):
    task = as_jax(_batch(train_data, step - 1, cfg.batch_size, cfg.seed))
    keep = None if keep_data is None else as_jax(
        _batch(keep_data, step - 1, cfg.batch_size, cfg.seed + 1))
    params, opt_state, m = step_fn(params, opt_state, task, keep)
    record = {"step": step, **{k: float(v) for k, v in m.items()}}
    if eval_data is not None and step % cfg.eval_every == 0:
      em = evaluate(params, as_jax(eval_data))
      record.update({f"eval_{k}": float(v) for k, v in em.items()})
    records.append(record)
    if "eval_loss" in record:
      log(json.dumps(record))
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
      results.write_text_atomic(metrics_path, results.jsonl(records))
      checkpoint.save(os.path.join(ckpt_dir, f"step_{step}"), (params, opt_state), {})
      for old in _checkpoints(ckpt_dir)[:-cfg.max_to_keep]:
        shutil.rmtree(os.path.join(ckpt_dir, f"step_{old}"))
      log(f"step {step}: checkpoint saved")
  nnx.update(head, params)
  return records

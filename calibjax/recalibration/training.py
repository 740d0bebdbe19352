"""Training recalibration heads with optax on cached positions of a frozen model.

A position is what the losses need and nothing more: the model's final (normed) hidden state
``h [d]`` — its logits are ``h Eᵀ`` with the output embedding ``E``, recomputed in the
step instead of stored (1 MiB per position at V = 262,144) — and, for task positions, the
valid token ids with the target weights over them (:class:`Positions`).

:func:`train` runs a jitted AdamW step (warm-up + cosine schedule, global-norm clipping) on
batches drawn in a fixed order from ``seed`` and the epoch, evaluates every ``eval_every``
steps, appends metrics to ``metrics.jsonl``, and saves ``(params, optimiser state)`` every
``checkpoint_every`` steps through the one checkpoint module, keeping ``max_to_keep``. With
``resume`` it restarts from the newest intact checkpoint (a partial or corrupt newer one, e.g.
from a run killed inside a save, is skipped and named in the log) and, the data order and keys being
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
from calibjax.models.prompts import task_prompt
from calibjax.models.language_model import pad_rows
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


def dense_targets(ids, target, vocab):
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
  valid, target = dense_targets(task.valid_ids, task.target, e.shape[0])
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
    CheckpointError: ``resume`` found checkpoints, but none intact.
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
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, opt_state))
    damaged = []
    for start in reversed(_checkpoints(ckpt_dir)):  # newest intact one
      try:
        (params, opt_state), _ = checkpoint.load(os.path.join(ckpt_dir, f"step_{start}"),
                                                 lambda files: abstract)
        break
      except errors.CheckpointError as e:
        damaged.append(str(e))
    else:
      raise errors.CheckpointError(f"{ckpt_dir}: no intact checkpoint to resume from: "
                                   + " ".join(damaged))
    if damaged:
      log(f"resuming from step {start}, the newest intact checkpoint; skipped: "
          + " ".join(damaged))
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


GENERIC_PROMPTS = (
    "The weather today is", "In 1969, the first", "A simple recipe for bread:",
    "def fibonacci(n):", "Dear Sir or Madam,", "The history of the Roman Empire",
    "Photosynthesis is the process", "Once upon a time, in a small village,",
    "The stock market closed", "How to change a bicycle tyre:",
    "The theory of relativity states", "My favourite film is")


def _check_logits_are_projections(lm) -> None:
  """Positions store hidden states and recompute the logits as ``h Eᵀ``: not the model's
  logits when it soft-caps them (Gemma 2)."""
  if lm.config.final_softcap is not None:
    raise errors.InputError(f"{lm.name}: recalibration heads recompute the logits as h Eᵀ; a "
                            f"model that soft-caps them ({lm.config.family}) is not supported.")


def task_positions(lm, task, *, prompt_index: int = 0, prompt_style: str = "auto",
                   template_kwargs=(), batch_size: int = 32,
                   cache_dir: str | None = None) -> Positions:
  """One position per prefix of the task's canonical answer paths (SPEC §6 compounding
  paths) after the task's prompt (``prompt_style``, ``template_kwargs``: see
  :mod:`calibjax.models.prompts`): the
  hidden state there, the valid tokens, and the target pushed down the paths — each valid
  token's weight is the target mass of the answers whose canonical path continues with it
  (other valid tokens: 0)."""
  from calibjax.sequence.tree import NodeEvaluator, Tree, canonical_paths
  _check_logits_are_projections(lm)
  tok = lm.tokenizer
  tree = Tree(task, tok, cache_dir)
  paths = canonical_paths(task, tok)
  following: dict[tuple, dict[int, float]] = {}
  for path, w in zip(paths, task.weights):
    for j in range(len(path)):
      step = following.setdefault(path[:j], {})
      step[path[j]] = step.get(path[j], 0.0) + w
  nodes = {}
  for path in paths:
    for node in tree.prefixes(path, np.zeros(1)):
      nodes.setdefault(node.path, node)
  nodes = [nodes[p] for p in sorted(nodes, key=lambda p: (len(p), p))]
  prompt = task_prompt(lm, task, prompt_style, prompt_index, template_kwargs)
  evaluate = NodeEvaluator(lm, list(prompt.ids), tree,
                           batch_size=batch_size, max_depth=max(map(len, paths)) + 1)
  hidden, ids, target = [], [], []
  for start in range(0, len(nodes), batch_size):
    chunk = nodes[start:start + batch_size]
    _, h, valid = evaluate.forward(chunk)
    for i, node in enumerate(chunk):
      v = np.flatnonzero(valid[i])
      w = np.array([following[node.path].get(int(t), 0.0) for t in v], np.float32)
      if not w.sum() > 0:
        raise errors.TaskError(f"{task.source}: the canonical continuation of {node.text!r} "
                               "is not a valid token there.")
      hidden.append(np.asarray(h[i]))
      ids.append(v)
      target.append(w)
  width = max(map(len, ids))
  pad = lambda rows, fill: np.stack([np.pad(r, (0, width - len(r)), constant_values=fill)
                                     for r in rows])
  return Positions(np.stack(hidden).astype(np.float32), pad(ids, -1).astype(np.int32),
                   pad(target, 0.0).astype(np.float32))


def keep_positions(lm, key, *, prompts=GENERIC_PROMPTS, new_tokens: int = 16) -> Positions:
  """Hidden states along the model's own generations (T = 1 samples) after generic prompts:
  where a head must leave the distribution as it was."""
  _check_logits_are_projections(lm)
  ids, mask = pad_rows([lm.tokenizer.encode(p) for p in prompts])
  logits, hidden, cache = lm.prefill(ids, mask, max_new_tokens=new_tokens)
  out = [np.asarray(hidden)]
  for _ in range(new_tokens - 1):
    key, sub = jax.random.split(key)
    token = jax.random.categorical(sub, logits, axis=-1)
    logits, hidden, cache = lm.decode(cache, token)
    out.append(np.asarray(hidden))
  return Positions(np.concatenate(out).astype(np.float32))


def concat(parts: list[Positions]) -> Positions:
  """Task positions of several tasks in one set (valid ids padded to the widest)."""
  width = max(p.valid_ids.shape[1] for p in parts)
  pad = lambda x, fill: np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)
  return Positions(np.concatenate([p.hidden for p in parts]),
                   np.concatenate([pad(p.valid_ids, -1) for p in parts]),
                   np.concatenate([pad(p.target, 0.0) for p in parts]))


def save_positions(path: str, pos: Positions) -> None:
  """``pos`` as an ``.npz`` file, written atomically."""
  results.write_atomic(path, lambda f: np.savez(
      f, **{k: v for k, v in dataclasses.asdict(pos).items() if v is not None}))


def load_positions(path: str) -> Positions:
  with np.load(path) as data:
    return Positions(**{k: data[k] for k in data.files})

"""Recalibration heads: exact identity at initialisation, gradients against finite
differences on a tiny model, a loss that falls to near its minimum on a tiny task, training
that resumes bit for bit, positions along canonical paths, heads inside the engines."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from calibjax import recalibration as rc
from calibjax.models import LanguageModel
from calibjax.testing import tiny


@pytest.fixture(scope="module")
def positions():
  """Hidden states, logits and the output embedding at 6 positions of a tiny model, with a
  valid set of 4 tokens per position and a uniform target on it."""
  model = tiny.model(seed=1)
  lm = LanguageModel(model, tiny.tokenizer(), "tiny")
  ids = np.random.default_rng(0).integers(4, 260, (6, 5))
  z, h, _ = lm.prefill(ids, max_new_tokens=1)
  valid = np.zeros(z.shape, bool)
  for i in range(6):
    valid[i, np.random.default_rng(i).choice(z.shape[1], 4, replace=False)] = True
  return h, z, jnp.asarray(model.embed[...]), jnp.asarray(valid)


def make(name, hidden, seed=0):
  cls = rc.HEADS[name]
  return cls(hidden, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", sorted(rc.HEADS))
def test_identity_at_initialisation(positions, name):
  h, z, embed, _ = positions
  head = make(name, h.shape[-1])
  np.testing.assert_array_equal(np.asarray(head(h, z, embed)), np.asarray(z))
  z_inf = z.at[:, :3].set(-jnp.inf)  # masked logits stay masked, no NaN
  np.testing.assert_array_equal(np.asarray(head(h, z_inf, embed)), np.asarray(z_inf))


@pytest.mark.parametrize("name", sorted(rc.HEADS))
def test_gradients_match_finite_differences(positions, name):
  h, z, embed, valid = positions
  head = make(name, h.shape[-1])
  graph, params = nnx.split(head, nnx.Param)
  # move off the identity so every parameter has a gradient
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)

  def loss(p):
    zz = nnx.merge(graph, p)(h, z, embed)
    return rc.task_loss(zz, valid, jnp.ones_like(z))[0] + rc.keep_loss(zz, z)[0]

  grad = jax.grad(loss)(params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    d = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    eps = 1e-2
    plus = loss(jax.tree.map(lambda p, v: p + eps * v, params, d))
    minus = loss(jax.tree.map(lambda p, v: p - eps * v, params, d))
    fd = float(plus - minus) / (2 * eps)
    an = float(sum(jnp.sum(g * v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d))))
    assert an == pytest.approx(fd, rel=2e-2, abs=2e-3), (name, an, fd)


def test_task_loss_hand_values():
  """Two tokens valid with target (3/4, 1/4), p = (.5, .25, .25): −log p(V) = log(4/3),
  q = (2/3, 1/3), KL(r‖q) = 3/4 log(9/8) + 1/4 log(3/4)."""
  z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  valid = jnp.array([[True, True, False]])
  loss, parts = rc.task_loss(z, valid, jnp.array([[3.0, 1.0, 0.0]]), rc.LossWeights(2.0, 1.0))
  kl = 0.75 * np.log(9 / 8) + 0.25 * np.log(3 / 4)
  assert float(parts["kl_target_to_q"][0]) == pytest.approx(kl, abs=1e-6)
  assert float(loss) == pytest.approx(2 * np.log(4 / 3) + kl, abs=1e-6)


def test_low_rank_head_learns_a_tiny_task(positions):
  """Loss from its base value to within 5% of it (its minimum is 0: all mass on the valid
  tokens, spread as the target), with the output embedding frozen."""
  h, z, embed, valid = positions
  head = make("low_rank", h.shape[-1])
  graph, params = nnx.split(head, nnx.Param)
  target = jnp.ones_like(z)

  def loss(p):
    return rc.task_loss(nnx.merge(graph, p)(h, z, embed), valid, target)[0]

  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05))
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, value

  first = float(loss(params))
  for _ in range(300):
    params, state, value = step(params, state)
  assert first > 1.0 and float(loss(params)) < 0.05 * first, (first, float(loss(params)))


def _positions_data(positions):
  from calibjax.recalibration.training import Positions
  h, z, _, valid = positions
  ids = np.stack([np.flatnonzero(v) for v in np.asarray(valid)]).astype(np.int32)
  ids[:, -1] = -1  # padding is ignored
  return Positions(np.asarray(h), ids, np.ones(ids.shape, np.float32)), Positions(np.asarray(h))


def test_training_resumes_with_identical_losses(positions, tmp_path):
  from calibjax import errors
  from calibjax.recalibration.training import TrainConfig, train
  _, _, embed, _ = positions
  task, keep = _positions_data(positions)
  cfg = TrainConfig(steps=12, batch_size=4, checkpoint_every=4, max_to_keep=2, eval_every=4,
                    learning_rate=0.05)
  head = make("low_rank", task.hidden.shape[1])
  whole = train(head, embed, task, keep, task, cfg, str(tmp_path / "a"), log=lambda m: None)
  assert whole[-1]["loss"] < whole[0]["loss"] and "eval_loss" in whole[3]

  def dies_after_8(message):
    if message == "step 8: checkpoint saved":
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train(make("low_rank", task.hidden.shape[1]), embed, task, keep, task, cfg,
          str(tmp_path / "b"), log=dies_after_8)
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_4", "step_8"]
  with pytest.raises(errors.InputError, match="resume"):
    train(make("low_rank", task.hidden.shape[1]), embed, task, keep, task, cfg, str(tmp_path / "b"))
  resumed_head = make("low_rank", task.hidden.shape[1])
  resumed = train(resumed_head, embed, task, keep, task, cfg, str(tmp_path / "b"), resume=True,
                  log=lambda m: None)
  assert resumed == whole  # every loss of every step, bit for bit
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_12", "step_8"]
  np.testing.assert_array_equal(np.asarray(resumed_head.u[...]), np.asarray(head.u[...]))
  # killed inside the save of step 12 (no marker yet): never used; the resume falls back to
  # the newest intact checkpoint (step 8), says so, and still reproduces every loss
  marker = tmp_path / "b" / "checkpoints" / "step_12" / "COMPLETE"
  marker.unlink()
  said = []
  again = train(make("low_rank", task.hidden.shape[1]), embed, task, keep, task, cfg,
                str(tmp_path / "b"), resume=True, log=said.append)
  assert again == whole
  assert any("step_12" in m and "COMPLETE" in m and "step 8" in m for m in said), said
  # with no intact checkpoint at all, resuming is an error, never a silent fresh start
  for step in ("step_8", "step_12"):
    (tmp_path / "b" / "checkpoints" / step / "COMPLETE").unlink()
  with pytest.raises(errors.CheckpointError, match="no intact checkpoint"):
    train(make("low_rank", task.hidden.shape[1]), embed, task, keep, task, cfg,
          str(tmp_path / "b"), resume=True)


@pytest.fixture(scope="module")
def tiny_lm():
  return LanguageModel(tiny.model(seed=2), tiny.tokenizer(), "tiny")


def tiny_task():
  from calibjax import tasks
  return tasks.from_dict({"name": "tiny_heads", "description": "", "prompts": ["ab"],
                          "answers": ["ab", "b", "ba"], "target": {"ab": 2, "b": 1, "ba": 1},
                          "terminators": ["\n"]})


def test_task_positions_follow_the_canonical_paths(tiny_lm):
  from calibjax import sequence
  from calibjax.recalibration.training import task_positions
  task = tiny_task()
  pos = task_positions(tiny_lm, task, batch_size=4)
  paths = sequence.canonical_paths(task, tiny_lm.tokenizer)
  prefixes = sorted({p[:j] for p in paths for j in range(len(p))}, key=lambda p: (len(p), p))
  assert len(pos) == len(prefixes)
  prompt = tiny_lm.tokenizer.encode("ab")
  weights = dict(zip(task.answers, task.weights))
  for i, prefix in enumerate(prefixes):
    _, h, _ = tiny_lm.prefill(np.array([prompt + list(prefix)]))
    np.testing.assert_allclose(pos.hidden[i], np.asarray(h[0]), atol=2e-5)
    through = sum(weights[a] for a, p in zip(task.answers, paths) if p[:len(prefix)] == prefix)
    assert pos.target[i].sum() == pytest.approx(through)
    ids = pos.valid_ids[i][pos.valid_ids[i] >= 0]
    following = {p[len(prefix)] for p in paths if p[:len(prefix)] == prefix}
    assert following <= set(ids.tolist())


def test_heads_plug_into_the_engines(tiny_lm, tmp_path):
  """An identity head leaves exact answer probabilities unchanged; a trained one moves them
  towards the target; saved and loaded, it gives the same numbers."""
  from calibjax.recalibration import training as ht
  from calibjax import sequence
  task = tiny_task()
  embed = tiny_lm.embedding()
  base = sequence.exact(tiny_lm, task, ["t=1"], bound=1e-4, progress=False).samplers[0]
  ident = rc.bind(rc.create("low_rank", embed.shape[1]), embed)
  same = sequence.exact(tiny_lm, task, ["t=1"], bound=1e-4, head=ident, progress=False).samplers[0]
  np.testing.assert_array_equal(same.answer_probs, base.answer_probs)
  head = rc.create("low_rank", embed.shape[1], rank=4)
  pos = ht.task_positions(tiny_lm, task, batch_size=4)
  keep = ht.keep_positions(tiny_lm, jax.random.key(0), new_tokens=4)
  ht.train(head, embed, pos, keep, pos, ht.TrainConfig(steps=150, batch_size=8, eval_every=50,
                                                        checkpoint_every=150, learning_rate=0.05),
           str(tmp_path / "run"), log=lambda m: None)
  tuned = sequence.exact(tiny_lm, task, ["t=1"], bound=1e-4, head=rc.bind(head, embed),
                         progress=False).samplers[0]
  assert tuned.seq_validity > 0.9 > base.seq_validity
  assert tuned.kl_to_target < base.kl_to_target
  folder = str(tmp_path / "head")
  rc.save(folder, head, "low_rank", rank=4)
  loaded = sequence.exact(tiny_lm, task, ["t=1"], bound=1e-4, head=rc.load(folder, tiny_lm),
                          progress=False).samplers[0]
  np.testing.assert_array_equal(loaded.answer_probs, tuned.answer_probs)

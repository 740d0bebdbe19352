"""The NNX decoder (Gemma 3 configuration) on tiny random checkpoints: cache, padding, window,
dtype."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from calibjax import errors
from calibjax.models import LanguageModel
from calibjax.models.decoder import FULL, DecoderConfig, KVCache
from calibjax.testing import tiny


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(tiny.model(), tiny.tokenizer(), "tiny")


def full(model, ids):
  ids = jnp.asarray(ids)
  return np.asarray(model(ids, jnp.ones(ids.shape, bool), KVCache.empty(model.cfg, *ids.shape))[0])


def test_cached_decoding_equals_full_forward(lm):
  ids = np.random.default_rng(0).integers(4, 260, (3, 12))
  want = np.asarray(lm.logits(ids))
  logits, _, cache = lm.prefill(ids[:, :5], max_new_tokens=7)
  np.testing.assert_allclose(np.asarray(logits), want[:, 4], atol=2e-5)
  for t in range(5, 12):
    logits, hidden, cache = lm.decode(cache, ids[:, t])
    np.testing.assert_allclose(np.asarray(logits), want[:, t], atol=2e-5, err_msg=f"step {t}")
  assert hidden.shape == (3, tiny.CONFIG.hidden)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_each_row_its_unpadded_result(lm, side):
  rng = np.random.default_rng(1)
  rows = [rng.integers(4, 260, n) for n in (9, 4, 7)]
  ids = np.zeros((3, 9), np.int64)
  mask = np.zeros((3, 9), bool)
  for i, r in enumerate(rows):
    sl = slice(9 - len(r), 9) if side == "left" else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, True
  got = np.asarray(lm.logits(ids, mask))
  last, _, cache = lm.prefill(ids, mask)
  for i, r in enumerate(rows):
    want = np.asarray(lm.logits(r[None]))[0]
    np.testing.assert_allclose(got[i][mask[i]], want, atol=2e-5, err_msg=f"row {i}")
    np.testing.assert_allclose(np.asarray(last[i]), want[-1], atol=2e-5)
  # decoding continues each row from its own last position
  nxt = np.array([5, 6, 7])
  step, _, _ = lm.decode(cache, nxt)
  for i, r in enumerate(rows):
    want = np.asarray(lm.logits(np.append(r, nxt[i])[None]))[0, -1]
    np.testing.assert_allclose(np.asarray(step[i]), want, atol=2e-5, err_msg=f"row {i}")


def test_greedy_in_one_call_equals_step_by_step(lm):
  ids = np.random.default_rng(4).integers(4, 260, (3, 6))
  logits, _, cache = lm.prefill(ids, max_new_tokens=8)
  want = []
  for _ in range(8):
    token = np.asarray(logits).argmax(-1)
    want.append(token)
    logits, _, cache = lm.decode(cache, token)
  np.testing.assert_array_equal(lm.greedy(ids, new_tokens=8), np.stack(want, axis=1))


def test_extend_continues_a_shared_prefix_and_leaves_it_unchanged(lm):
  rng = np.random.default_rng(2)
  prompt = rng.integers(4, 260, 6)
  paths = [rng.integers(4, 260, n) for n in (1, 4, 3)]
  _, _, cache = lm.prefill(prompt[None], max_new_tokens=8)
  ids = np.zeros((3, 4), np.int64)
  mask = np.zeros((3, 4), bool)
  for i, p in enumerate(paths):
    ids[i, :len(p)], mask[i, :len(p)] = p, True
  before = np.asarray(cache.layers[0][0])
  for _ in range(2):  # the prefix cache is reusable
    logits, hidden = lm.extend(cache, ids, mask)
    for i, p in enumerate(paths):
      want = np.asarray(lm.logits(np.concatenate([prompt, p])[None]))[0, -1]
      np.testing.assert_allclose(np.asarray(logits[i]), want, atol=2e-5, err_msg=f"row {i}")
  np.testing.assert_array_equal(np.asarray(cache.layers[0][0]), before)
  assert hidden.shape == (3, tiny.CONFIG.hidden)
  with pytest.raises(errors.InputError, match="free cache slots"):
    lm.extend(cache, np.ones((1, 9), np.int64))
  # repeat(): one prompt, many rows, each decoding on its own
  rows = lm.repeat(cache, 3)
  step, _, _ = lm.decode(rows, ids[:, 0])
  for i in range(3):
    want = np.asarray(lm.logits(np.append(prompt, ids[i, 0])[None]))[0, -1]
    np.testing.assert_allclose(np.asarray(step[i]), want, atol=2e-5)


def test_branch_runs_a_tree_one_token_per_node(lm):
  """Each node's token on the prompt's cache and the keys and values its ancestors' calls
  returned: the logits of the whole path run after the prompt, at depths 0-6 (past the
  sliding window of 5), with padding slots inside the rows."""
  rng = np.random.default_rng(3)
  c = tiny.CONFIG
  prompt = rng.integers(4, 260, 5)
  _, _, cache = lm.prefill(prompt[:-1][None], max_new_tokens=16)
  tree = {(): None}  # path -> the keys and values of its last token (prompt[-1] at the root)
  base = len(prompt) - 1  # the position of prompt[-1]
  for depth in range(7):
    nodes = [p for p in tree if len(p) == depth]
    width = depth + depth % 2  # odd depths: one padding slot first in every row
    kv = np.zeros((len(nodes), width, c.layers, 2, c.kv_heads, c.head_dim), np.float32)
    pos = np.full(kv.shape[:2], -1)
    for i, p in enumerate(nodes):
      for j in range(depth):
        kv[i, j + width - depth], pos[i, j + width - depth] = tree[p[:j]], base + j
    tokens = [p[-1] if p else prompt[-1] for p in nodes]
    logits, hidden, own = lm.branch(cache, kv, pos, tokens)
    for i, p in enumerate(nodes):
      want = np.asarray(lm.logits(np.concatenate([prompt, p]).astype(int)[None]))[0, -1]
      np.testing.assert_allclose(np.asarray(logits[i]), want, atol=3e-5, err_msg=str(p))
      tree[p] = np.asarray(own[i])
      for t in rng.choice(np.arange(4, 260), 1 + (depth < 2), replace=False):
        tree[p + (int(t),)] = None
  assert hidden.shape == (len(nodes), c.hidden) and len(tree) > 20
  with pytest.raises(errors.ShapeMismatchError, match="path_kv"):
    lm.branch(cache, kv[:, :, :1], pos, tokens)
  with pytest.raises(errors.InputError, match="free cache slots"):
    lm.branch(cache, np.zeros((1, 40) + kv.shape[2:]), np.zeros((1, 40)), [5])


def test_sliding_window_limits_what_a_local_layer_sees():
  cfg = dataclasses.replace(tiny.CONFIG, layers=1, sliding_window=4)  # one local layer
  m = tiny.model(cfg=cfg)
  a = np.random.default_rng(2).integers(4, 260, (1, 10))
  b = a.copy()
  b[0, :3] = 7  # tokens 0-2 lie outside the window of positions >= 6
  la, lb = full(m, a), full(m, b)
  np.testing.assert_allclose(la[0, 6:], lb[0, 6:], atol=1e-6)
  assert np.abs(la[0, 3:6] - lb[0, 3:6]).max() > 1e-3  # inside the window it matters
  # a global layer sees everything
  g = tiny.model(cfg=dataclasses.replace(cfg, layer_types=(FULL,) * cfg.layers))
  assert np.abs(full(g, a)[0, 9] - full(g, b)[0, 9]).max() > 1e-3


def test_bfloat16_option_is_close_to_float32(lm):
  ids = np.random.default_rng(3).integers(4, 260, (2, 8))
  m32 = tiny.model()
  import jax
  from flax import nnx
  graph, state = nnx.split(m32)
  m16 = nnx.merge(graph, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
  ids_j = jnp.asarray(ids)
  cache = KVCache.empty(m16.cfg, 2, 8, jnp.bfloat16)
  l16 = np.asarray(m16(ids_j, jnp.ones(ids.shape, bool), cache)[0])
  assert l16.dtype == np.float32  # logits are always float32
  l32 = full(m32, ids)
  assert np.abs(l16 - l32).max() < 0.05 * np.abs(l32).max()


def test_bad_inputs(lm):
  with pytest.raises(errors.InputError, match="token ids"):
    lm.logits(np.array([[1, 99999]]))
  with pytest.raises(errors.InputError, match=r"int \[B, T\]"):
    lm.logits(np.array([1, 2]))
  with pytest.raises(errors.ShapeMismatchError, match="mask"):
    lm.logits(np.array([[1, 2]]), np.ones((1, 3), bool))
  _, _, cache = lm.prefill(np.array([[2, 5]]), max_new_tokens=4)
  for t in range(4):
    _, _, cache = lm.decode(cache, np.array([5]))
  with pytest.raises(errors.InputError, match="cache is full"):
    lm.decode(cache, np.array([5]))


def test_config_round_trips_through_json_and_scales_queries():
  import json
  cfg = tiny.CONFIG
  assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert [i for i in range(cfg.layers) if cfg.layer_types[i] == FULL] == [5]
  assert cfg.scaling == pytest.approx(0.25)


@pytest.mark.parametrize("base", [10_000.0, 1_000_000.0])
def test_rope_inverse_frequencies_on_any_cpu(base):
  """``1 / base^(2i/hd)`` with each power the float32 nearest its 60-digit value (NumPy's own
  float32 pow is one ulp off for 23 of 128 powers on some CPUs, which moved the golden
  test's log-probabilities past the sliding window from 1.7e-3 to 3.9e-3)."""
  from decimal import Decimal, getcontext
  from calibjax.models.decoder import base_inv_freq
  getcontext().prec = 60
  exponents = np.arange(0, 256, 2, dtype=np.float32) / np.float32(256)
  powers = np.array([float(Decimal(base) ** Decimal(float(e))) for e in exponents], np.float32)
  np.testing.assert_array_equal(base_inv_freq(base, 256), np.float32(1) / powers)

"""Sharding on the 8 fake CPU devices of conftest: batch-sharded array-core functions equal the
single-device numbers; vocabulary-sharded ops equal the unsharded ones; meshes from flags."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import calibjax as cj
import calibjax_kernels as kernels
from calibjax import errors
from calibjax.core import sharding
from tests.helpers import random_case

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _rows(batch=16, vocab=2048, seed=0):
  z, m = random_case(np.random.default_rng(seed), batch, vocab, n_valid=30, ties=True,
                     neg_inf=0.02)
  m[0] = False
  m[1] = True
  z[2] = -np.inf
  z[3, : vocab // 2] = -np.inf
  labels = np.argmax(z + np.random.default_rng(seed).gumbel(size=z.shape), axis=-1)
  return z, m, labels


ARRAY_CORE = {
    "order_stats": lambda z, m, y: cj.order_stats(z, m, max_valid=64),
    "shape_stats": lambda z, m, y: cj.shape_stats(z, m, 0.8),
    "row_stats": lambda z, m, y: cj.row_stats(z, m, temperature=1.3),
    "truncate_sweep": lambda z, m, y: cj.truncate(z, "top_p", cj.sweep([0.5, 0.9, 1.0]),
                                                  valid_mask=m),
    "truncate_min_p": lambda z, m, y: cj.truncate(z, "min_p", 0.1, temperature=1.5,
                                                  valid_mask=m),
    "truncate_chain": lambda z, m, y: cj.truncate_chain(z, "top_k=20,typical=0.9,t=1.2",
                                                        valid_mask=m),
    "oracle_cutoff": lambda z, m, y: cj.oracle_cutoff(z, m, tau=0.9, max_valid=64),
    "cutoff_curve": lambda z, m, y: cj.cutoff_curve(z, m, jnp.array([1, 5, 50]),
                                                    max_cutoff=64),
    "group_masses": lambda z, m, y: cj.group_masses(z, m, jnp.array([0.5, 1.0, 2.0])),
    "top_label_ece": lambda z, m, y: cj.top_label_ece(z, y),
    "proper_scores": lambda z, m, y: cj.proper_scores(z, y),
}


def _leaves_equal(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


@pytest.mark.parametrize("kind,in_context", [
    (jax.sharding.AxisType.Auto, True), (jax.sharding.AxisType.Explicit, True),
    (jax.sharding.AxisType.Explicit, False)])
def test_batch_sharded_array_core_equals_single_device(kind, in_context):
  """Inputs placed on P("data", None) as JAX users place them; with the mesh set
  (``jax.set_mesh``) or not: the inputs' own sharding is enough (Explicit axes used to
  raise "0th dimension of all xs should be replicated" without ``set_mesh``), called
  directly and under the caller's jit."""
  z, m, y = _rows()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *[None] * (x.ndim - 1))))
  context = (lambda: jax.set_mesh(mesh)) if in_context else contextlib.nullcontext
  for name, fn in ARRAY_CORE.items():
    want = jax.jit(fn)(z, m, y)
    with context():
      _leaves_equal(want, jax.jit(fn)(put(z), put(m), put(y)), name)
      if not in_context:  # the public functions' own jit
        _leaves_equal(want, fn(put(z), put(m), put(y)), name)
  with jax.set_mesh(mesh):  # row functions run data-parallel: results stay split by row
    out = jax.jit(ARRAY_CORE["order_stats"])(put(z), put(m), put(y))
  assert out.auroc.sharding.spec[0] == "data"


@pytest.mark.parametrize("in_context", [True, False])
def test_batch_sharded_kernels_agree(in_context):
  """The Pallas path under a data mesh: each device runs the kernel on its rows (the mesh
  set, or only named by the inputs' Explicit sharding)."""
  z, m, _ = _rows()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  context = (lambda: jax.set_mesh(mesh)) if in_context else contextlib.nullcontext
  fns = {"row_stats": lambda z, m: cj.row_stats(z, m, implementation="pallas"),
         "truncate": lambda z, m: cj.truncate(z, "top_k", cj.sweep([1, 8]), valid_mask=m,
                                              implementation="pallas"),
         "order_stats": lambda z, m: cj.order_stats(z, m, max_valid=64,
                                                    implementation="pallas")}
  for name, fn in fns.items():
    want = jax.jit(fn)(z, m)
    with context():  # with the mesh set: under the caller's jit; without: eager
      got = (jax.jit(fn) if in_context else fn)(put(z), put(m))
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      x, y = np.asarray(x), np.asarray(y)
      if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        np.testing.assert_array_equal(x, y, err_msg=name)
      else:  # kernel sums: the same up to float32 summation order (block shapes differ)
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("spec", ["model:8", "data:2,model:4"])
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_vocabulary_sharded_ops_equal_unsharded(spec, implementation):
  z, m, _ = _rows(8, 4096, seed=1)
  m[4] = False
  m[4, 100] = True
  t = np.linspace(0.5, 2.0, 8).astype(np.float32)
  mesh = sharding.make_mesh(spec)
  close = lambda a, b, what: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=5e-6,
                                                       atol=2e-6, err_msg=what)
  want = cj.row_stats(z, m, temperature=t)
  got = sharding.row_stats(z, m, t, mesh=mesh, implementation=implementation)
  for name, a, b in zip(want._fields, want, got):
    close(a, b, name)
  bare = sharding.row_stats(z, None, t, mesh=mesh, implementation=implementation)
  close(want.entropy, bare.entropy, "entropy without mask")

  slots = sharding.top_valid(z, m, 64, mesh=mesh)
  small = np.sum(m, axis=1) < 64  # rows whose valid logits all fit
  want_slots = np.sort(np.where(m, z, np.inf), axis=1)[:, :64]
  np.testing.assert_array_equal(np.asarray(slots)[small], want_slots[small])
  np.testing.assert_array_equal(np.asarray(slots)[1], np.sort(z[1])[-64:])  # the largest 64

  top = np.max(z, axis=1)
  with np.errstate(invalid="ignore"):
    total = np.sum(np.exp((z - top[:, None]) / t[:, None]), axis=1)
  consts = np.stack([t, top, total], axis=1)
  want = kernels.valid_rank_counts_reference(z, want_slots, consts)
  got = sharding.valid_rank_counts(z, want_slots, consts, mesh=mesh,
                                   implementation=implementation)
  np.testing.assert_array_equal(got.gt, want.gt)
  np.testing.assert_array_equal(got.eq, want.eq)
  close(want.gt_mass[3:], got.gt_mass[3:], "gt_mass")

  a = z / t[:, None]
  top_a = np.max(a, axis=1)
  with np.errstate(invalid="ignore"):
    total_a = np.sum(np.exp(a - top_a[:, None]), axis=1)
  consts = np.stack([t, top_a, total_a] + [np.zeros(8)] * 3, axis=1).astype(np.float32)
  th = np.sort(np.random.default_rng(2).normal(size=(8, 6)), axis=1).astype(np.float32)
  want = kernels.threshold_stats_reference(z, m, consts, th)
  got = sharding.threshold_stats(z, m, consts, th, mesh=mesh, implementation=implementation)
  np.testing.assert_array_equal(got.count, want.count)
  np.testing.assert_array_equal(got.valid_count, want.valid_count)
  close(want.mass[3:], got.mass[3:], "mass")


def test_vocabulary_sharding_uses_less_memory_per_device():
  """Compiled memory analysis: the vocabulary-sharded row statistics at [256, 262144] hold
  an eighth of the logits per device."""
  shape = (256, 262144)
  mesh = sharding.make_mesh("model:8")
  tiles = NamedSharding(mesh, P(None, "model"))
  args = (jax.ShapeDtypeStruct(shape, jnp.float32, sharding=tiles),
          jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=tiles),
          jax.ShapeDtypeStruct(shape[:1], jnp.float32))
  sharded = sharding.peak_bytes(
      lambda z, m, t: sharding.row_stats(z, m, t, mesh=mesh, implementation="xla"), *args)
  single = sharding.peak_bytes(lambda z, m, t: cj.row_stats(z, m, temperature=t),
                               *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
  assert sharded * 6 < single, (sharded, single)


def test_mesh_flags():
  assert sharding.parse_mesh("data:4,model:2") == {"data": 4, "model": 2}
  assert sharding.make_mesh("data:8").shape == {"data": 8}
  for bad, msg in [("data=8", "cannot read"), ("rows:8", "unknown axis"),
                   ("data:2,data:4", "repeated"), ("", "names no axis")]:
    with pytest.raises(errors.InputError, match=msg):
      sharding.parse_mesh(bad)
  with pytest.raises(errors.InputError, match="needs 6 devices"):
    sharding.make_mesh("data:6")
  with pytest.raises(errors.InputError, match="'model' mesh axis"):
    sharding.row_stats(np.zeros((8, 16)), None, np.ones(8), mesh=sharding.make_mesh("data:8"))
  with pytest.raises(errors.ShapeMismatchError, match="8 equal shards"):
    sharding.row_stats(np.zeros((8, 12)), None, np.ones(8), mesh=sharding.make_mesh("model:8"))


# --- the model and the engines over a mesh ----------------------------------------------------

def test_model_weights_load_sharded_and_compute_the_same(tmp_path):
  from calibjax import models
  from calibjax.testing import tiny
  path = str(tmp_path / "tiny.gguf")
  tiny.write_gguf(path, tiny.model(seed=3))
  mesh = sharding.make_mesh("data:4,model:2")
  plain = models.load(path, cache_dir=str(tmp_path / "c0"), progress=False)
  converted = models.load(path, cache_dir=str(tmp_path / "c1"), progress=False, mesh=mesh)
  restored = models.load(path, cache_dir=str(tmp_path / "c1"), progress=False, mesh=mesh)
  spec = lambda lm, *keys: functools.reduce(lambda s, k: s[k], keys, lm._state).get_value(
      ).sharding.spec
  for lm in (converted, restored):  # FSDP over data, tensor parallel over model
    assert spec(lm, "blocks", 0, "attn", "q_proj") == P("data", "model")
    assert spec(lm, "blocks", 0, "attn", "o_proj") == P("model", "data")
    assert spec(lm, "blocks", 0, "mlp", "down") == P("model", "data")
    assert spec(lm, "embed") == P(None, "data")  # 265 tokens do not split over 2
    assert spec(lm, "final_norm", "weight") == P()
  ids = np.random.default_rng(0).integers(0, 265, size=(4, 7))
  np.testing.assert_allclose(restored.logits(ids), plain.logits(ids), rtol=1e-5, atol=2e-5)
  np.testing.assert_array_equal(restored.greedy(ids, None, 6), plain.greedy(ids, None, 6))


@pytest.fixture(scope="module")
def small_lm():
  from tests.helpers import TASK, SmallTokenizer
  import dataclasses
  from calibjax.models import LanguageModel
  from calibjax.testing import tiny
  cfg = dataclasses.replace(tiny.CONFIG, vocab_size=len(SmallTokenizer.vocab))
  model = tiny.model(seed=7, cfg=cfg)
  model.embed[...] = model.embed[...] * 0.3
  return LanguageModel(model, SmallTokenizer(), "small"), TASK


def test_exact_engine_data_parallel_equals_one_device(small_lm):
  """Nodes spread over data:8, one node per device, give exactly the single-device numbers
  of one node per call. (On CPU a float32 forward over a batch of 8 differs from 8 forwards
  of 1 by ~1e-5: matrix blocking depends on the batch; sharding adds nothing to that.)"""
  from calibjax import sequence
  lm, task = small_lm
  samplers = ["t=1", "top_k=3,t=0.7", "oracle_set", "oracle_rank=0.9,t=1.3"]
  one = sequence.exact(lm, task, samplers, bound=1e-3, batch_size=1, progress=False)
  with jax.set_mesh(sharding.make_mesh("data:8")):
    eight = sequence.exact(lm, task, samplers, bound=1e-3, batch_size=8, progress=False)
  assert one.nodes_expanded == eight.nodes_expanded
  for a, b in zip(one.samplers, eight.samplers, strict=True):
    for f in ("answer_probs", "seq_validity", "invalid_mass", "path_validity"):
      np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)),
                                    err_msg=f"{a.sampler}.{f}")
    for x, y in zip(a.step_validity, b.step_validity, strict=True):
      np.testing.assert_array_equal(x, y, err_msg=f"{a.sampler}.step_validity")


def test_monte_carlo_same_keys_same_samples_on_a_mesh(small_lm):
  from calibjax import sequence
  lm, task = small_lm
  key = jax.random.key(4)
  one = sequence.sample(lm, task, "top_p=0.9,t=1.2", 64, key, batch_size=16, progress=False)
  with jax.set_mesh(sharding.make_mesh("data:8")):
    eight = sequence.sample(lm, task, "top_p=0.9,t=1.2", 64, key, batch_size=16,
                            progress=False)
  assert one.texts == eight.texts and one.reason == eight.reason

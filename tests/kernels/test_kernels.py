"""Pallas kernels (interpret mode on CPU), both variants: parity with their references and with
float64 NumPy, TPU and GPU lowering, and the public functions giving the same numbers with
implementation="pallas"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibjax as cj
import calibjax_kernels as kernels
from calibjax import errors
from calibjax.core import dispatch
from tests.helpers import random_case

TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-6}  # inputs are upcast exactly: same tolerance
# the TPU variant at its default blocks; the GPU one with ragged row blocks (4 rows)
VARIANTS = {"grid": {}, "loop": {"variant": "loop", "block_rows": 4}}


def _case(rng, batch, vocab, dtype=jnp.float32):
  """Logits with -inf entries, an all -inf row, a row with no valid and one with all valid."""
  z, m = random_case(rng, batch, vocab, n_valid=min(60, vocab), neg_inf=0.01)
  z[0, : vocab // 2] = -np.inf
  m[1] = False
  m[2] = True
  z[3] = -np.inf
  z = np.array(jnp.asarray(z, dtype).astype(jnp.float32))  # the values the kernel sees
  t = rng.uniform(0.5, 2.0, batch).astype(np.float32)
  return z, m, t


def _row_stats_f64(z, m, t):
  """Float64 NumPy truth: max, logsumexp, entropy, valid mass, valid entropy."""
  a = z.astype(np.float64) / t[:, None]

  def stats(x):
    mx = np.max(x, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      safe = np.where(np.isfinite(mx), mx, 0.0)[:, None]
      lse = mx + np.log(np.sum(np.exp(x - safe), axis=1))
      p = np.exp(x - lse[:, None])
      h = -np.sum(np.where(p > 0, p * (x - lse[:, None]), 0.0), axis=1)
    return mx, lse, np.where(np.isfinite(lse), h, np.nan)

  mx, lse, h = stats(a)
  _, lse_v, h_v = stats(np.where(m, a, -np.inf))
  with np.errstate(invalid="ignore"):
    return mx, lse, h, np.exp(lse_v - lse), h_v


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, what
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch,vocab", [(39, 32001), (8, 262144)])
def test_row_stats_matches_reference_and_float64(variant, dtype, batch, vocab):
  rng = np.random.default_rng(vocab + batch)
  z, m, t = _case(rng, batch, vocab, dtype)
  zd = jnp.asarray(z, dtype)
  kw = VARIANTS[variant]
  got = kernels.row_stats(zd, m, t, interpret=True, **kw)
  ref = kernels.row_stats_reference(zd, m, t)
  truth = _row_stats_f64(z, m, t)
  for name, g, r, want in zip(got._fields, got, ref, truth):
    _close(g, r, TOL[dtype] * 4, f"{name} vs reference")
    _close(g, want, 1e-5, f"{name} vs float64")
  assert np.isnan(got.valid_entropy[1]) and got.valid_mass[1] == 0  # no valid token
  assert got.valid_mass[2] == pytest.approx(1.0, abs=1e-6)          # all valid
  assert got.logsumexp[3] == -np.inf and np.isnan(got.entropy[3])   # no finite logit
  bare = kernels.row_stats(zd, None, t, interpret=True, **kw)
  assert bare.valid_mass is None
  np.testing.assert_array_equal(bare.logsumexp, got.logsumexp)


def _consts(z, t, score):
  a = z.astype(np.float32) / t[:, None]
  top = np.max(a, axis=1)
  with np.errstate(invalid="ignore"):
    total = np.sum(np.exp(a - top[:, None]), axis=1)
  zero = np.zeros_like(top)
  c = {"logit": (zero, zero, zero), "typical": (top, np.log(total), np.log(total) / 2),
       "valid_or_top": (top, zero, zero)}[score]
  return np.stack([t, top, total, *c], axis=1).astype(np.float32), a


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("score", kernels.SCORES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_threshold_stats_matches_reference(variant, score, dtype):
  rng = np.random.default_rng(7)
  z, m, t = _case(rng, 36, 32001, dtype)
  consts, a = _consts(z, t, score)
  # thresholds: some of each row's own scores (ties at the cut), and extremes
  ref0 = kernels.threshold_stats_reference(z, m, consts, np.zeros((36, 1)), score=score)
  th = rng.normal(size=(36, 11)).astype(np.float32) * 3
  th[:, 0], th[:, 1] = -np.inf, np.inf
  th[:, 2] = np.where(np.isfinite(a[:, 5]), a[:, 5], 0.0)
  if score == "valid_or_top":
    th[:, 3:6] = [0.5, 1.0, 1.5]
  zd = jnp.asarray(z, dtype)
  got = kernels.threshold_stats(zd, m, consts, th, score=score, interpret=True,
                                **VARIANTS[variant])
  ref = kernels.threshold_stats_reference(zd, m, consts, th, score=score)
  for name, g, r in zip(got._fields, got, ref):
    if name.endswith("count"):
      assert g.dtype == jnp.int32
      np.testing.assert_array_equal(g, r, err_msg=name)
    else:
      _close(g, r, 2e-6, name)
  alive = np.sum(a > -np.inf, axis=1)
  np.testing.assert_array_equal(got.count[:, 0], alive)  # θ = -inf keeps every live token
  assert ref0.count.shape == (36, 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_threshold_stats_full_vocabulary_and_no_mask(variant):
  rng = np.random.default_rng(8)
  z, m, t = _case(rng, 8, 262144)
  consts, a = _consts(z, t, "logit")
  th = np.sort(rng.normal(size=(8, 32)).astype(np.float32) * 4, axis=1)
  got = kernels.threshold_stats(z, None, consts, th, interpret=True, **VARIANTS[variant])
  ref = kernels.threshold_stats_reference(z, None, consts, th)
  np.testing.assert_array_equal(got.count, ref.count)
  _close(got.mass, ref.mass, 2e-6, "mass")
  assert got.valid_count is None
  # float64 truth for the counts
  want = np.sum((a[:, None, :] >= th[:, :, None]) & (a[:, None, :] > -np.inf), axis=-1)
  np.testing.assert_array_equal(got.count, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch,vocab", [(33, 32001), (8, 262144)])
def test_valid_rank_counts_matches_reference_and_numpy(variant, dtype, batch, vocab):
  rng = np.random.default_rng(9)
  z, m = random_case(rng, batch, vocab, n_valid=20, ties=True, neg_inf=0.05)
  z = np.array(jnp.asarray(z, dtype).astype(jnp.float32))
  z[0] = -np.inf
  slots = np.sort(np.where(m, z, np.inf), axis=1)[:, :32]  # valid logits ascending, +inf padded
  t = rng.uniform(0.5, 2.0, batch).astype(np.float32)
  top = np.max(z, axis=1)
  with np.errstate(invalid="ignore"):
    total = np.sum(np.exp((z - top[:, None]) / t[:, None]), axis=1)
  consts = np.stack([t, top, total], axis=1)
  got = kernels.valid_rank_counts(jnp.asarray(z, dtype), slots, consts, interpret=True,
                                  **VARIANTS[variant])
  ref = kernels.valid_rank_counts_reference(jnp.asarray(z, dtype), slots, consts)
  np.testing.assert_array_equal(got.gt, ref.gt)
  np.testing.assert_array_equal(got.eq, ref.eq)
  _close(got.gt_mass[1:], ref.gt_mass[1:], 2e-6, "gt_mass")
  _close(got.eq_mass[1:], ref.eq_mass[1:], 2e-6, "eq_mass")
  for b in (1, batch - 1):  # NumPy truth, one row at a time
    want_gt = np.sum(z[b][None, :] > slots[b][:, None], axis=1)
    want_eq = np.sum(z[b][None, :] == slots[b][:, None], axis=1)
    np.testing.assert_array_equal(got.gt[b], want_gt)
    np.testing.assert_array_equal(got.eq[b], want_eq)
  assert np.all(got.gt[:, -1][~np.isfinite(slots[:, -1])] == 0)  # +inf padding slots


def _realistic_ops(dtype, b=256, v=262144):
  """Every kernel with abstract arguments at [256, 262144], 32 thresholds, 64 slots."""
  z = jax.ShapeDtypeStruct((b, v), dtype)
  mask = jax.ShapeDtypeStruct((b, v), jnp.bool_)
  row = lambda n: jax.ShapeDtypeStruct((b, n), jnp.float32)
  return {
      "row_stats": (kernels.row_stats, (z, mask, jax.ShapeDtypeStruct((b,), jnp.float32))),
      "threshold_stats": (kernels.threshold_stats, (z, mask, row(6), row(32))),
      "valid_rank_counts": (kernels.valid_rank_counts, (z, row(64), row(3))),
  }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_tpu(dtype):
  """Mosaic lowering of every kernel (grid variant) at the realistic shape, on this CPU."""
  for name, (op, args) in _realistic_ops(dtype).items():
    exported = jax.export.export(jax.jit(op), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module(), name


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_gpu(dtype):
  """Triton lowering of every kernel (loop variant) for an H200 at the realistic shape, on
  this CPU (an abstract device stands in for the GPU)."""
  h200 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H200", num_cores=None, platform="gpu"))
  triton = "__gpu$xla.gpu.triton"
  with jax.sharding.use_abstract_mesh(h200):
    for name, (op, args) in _realistic_ops(dtype).items():
      loop = functools.partial(op, variant="loop")
      exported = jax.export.export(jax.jit(loop), platforms=["cuda"], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call(triton)])(*args)
      assert exported.mlir_module().count(triton) == 1, name


# --- the public functions: "xla" and "pallas" give the same numbers -------------------------

def _same(a, b, what):
  for f in a.__dataclass_fields__ if hasattr(a, "__dataclass_fields__") else a._fields:
    x, y = getattr(a, f), getattr(b, f)
    if x is None:
      assert y is None, f"{what}.{f}"
      continue
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer) or f.startswith(("kept_valid",
                                                                            "kept_count")):
      if f != "kept_valid_entropy":
        np.testing.assert_array_equal(x, y, err_msg=f"{what}.{f}")
        continue
    _close(y, x, 3e-6, f"{what}.{f}")


@pytest.fixture(params=["grid", pytest.param("loop", marks=pytest.mark.slow)])
def kernel_variant(request, monkeypatch):
  """The public functions' "pallas" path with each kernel variant (the GPU one interpreted:
  ``-m slow``; its driver is checked op by op above, its blocks are the grid variant's)."""
  monkeypatch.setitem(dispatch.VARIANT, "cpu", request.param)
  return request.param


SWEEPS = {"top_k": [1, 3, 40], "top_p": [0.3, 0.9, 1.0], "min_p": [0.0, 0.05, 1.0],
          "typical": [0.2, 0.95, 1.0], "epsilon": [1e-5, 3e-4], "eta": [1e-5, 3e-4],
          "top_n_sigma": [0.5, 1.5, 3.0]}


@pytest.mark.parametrize("rule", list(SWEEPS) + ["oracle_set"])
def test_truncate_same_with_pallas(rule, kernel_variant):
  rng = np.random.default_rng(11)
  z, m = random_case(rng, 6, 3001, n_valid=25, ties=rule == "top_k", neg_inf=0.02)
  z = z.reshape(2, 3, -1)
  m = m.reshape(2, 3, -1)
  m[0, 1] = False
  z[1, 2] = -np.inf
  # a sweep with the valid mask, one value without: each compile here costs ~2 s
  cases = [(None, m)] if rule == "oracle_set" else [(cj.sweep(SWEEPS[rule]), m),
                                                    (SWEEPS[rule][1], None)]
  for p, mask in cases:
    a = cj.truncate(z, rule, p, temperature=0.7, valid_mask=mask)
    b = cj.truncate(z, rule, p, temperature=0.7, valid_mask=mask, implementation="pallas")
    _same(a, b, f"{rule}({p})")


def test_order_and_oracle_same_with_pallas(kernel_variant):
  rng = np.random.default_rng(12)
  z, m = random_case(rng, 12, 4001, n_valid=30, ties=True, neg_inf=0.02)
  m[0] = False
  m[1] = True
  m[2, :] = False
  m[2, :3] = True
  z[3] = -np.inf
  kw = dict(max_valid=40)
  _same(cj.order_stats(z, m, **kw), cj.order_stats(z, m, implementation="pallas", **kw), "order")
  np.testing.assert_array_equal(
      cj.recall_at_precision(z, m, 0.4, **kw),
      cj.recall_at_precision(z, m, 0.4, implementation="pallas", **kw))
  for objective in ("validity", "f1", "precision"):
    a = cj.oracle_cutoff(z, m, objective, 0.8, 0.7, **kw)
    b = cj.oracle_cutoff(z, m, objective, 0.8, 0.7, implementation="pallas", **kw)
    _same(a, b, f"oracle[{objective}]")
  a = cj.truncate_chain(z, "oracle_rank=0.8,t=0.7", valid_mask=m, **kw)
  b = cj.truncate_chain(z, "oracle_rank=0.8,t=0.7", valid_mask=m, implementation="pallas", **kw)
  _same(a, b, "truncate_chain(oracle_rank)")


def test_row_stats_public_same_and_exact(kernel_variant):
  rng = np.random.default_rng(13)
  z, m, t = _case(rng, 6, 5001)
  a = cj.row_stats(z.reshape(2, 3, -1), m.reshape(2, 3, -1), temperature=t.reshape(2, 3))
  b = cj.row_stats(z.reshape(2, 3, -1), m.reshape(2, 3, -1), temperature=t.reshape(2, 3),
                   implementation="pallas")
  _same(a, b, "row_stats")
  for got, want in zip(a, _row_stats_f64(z, m, t)):
    _close(np.asarray(got).ravel(), want, 1e-5, "row_stats vs float64")
  s = cj.shape_stats(z[4:], m[4:], temperature=t[4:, None][:, 0])
  _close(a.valid_mass[1, 1:], s.valid_mass, 1e-6, "valid mass vs shape_stats")
  _close(a.valid_entropy[1, 1:], s.valid_entropy, 1e-5, "valid entropy vs shape_stats")


def test_dispatch_choices_and_errors():
  assert dispatch.resolve(None) == "xla"  # CPU: kernels only interpret here
  assert dispatch.resolve("pallas") == "pallas"
  with pytest.raises(errors.InputError, match="implementation must be one of"):
    cj.truncate(np.zeros(4), "top_k", 1, implementation="triton")
  with pytest.raises(errors.InputError, match="implementation must be one of"):
    cj.row_stats(np.zeros(4), implementation="cuda")
  with pytest.raises(errors.ShapeMismatchError, match="temperature"):
    cj.row_stats(np.zeros((2, 4)), temperature=np.ones(3))


def test_block_shapes_are_checked():
  with pytest.raises(ValueError, match="multiple of 128"):
    kernels.row_stats(jnp.zeros((8, 1024)), None, jnp.ones(8), block_vocab=100, interpret=True)
  with pytest.raises(ValueError, match="multiple of 8"):
    kernels.row_stats(jnp.zeros((64, 1024)), None, jnp.ones(64), block_rows=12, interpret=True)
  with pytest.raises(ValueError, match="power of 2"):
    kernels.row_stats(jnp.zeros((8, 1024)), None, jnp.ones(8), variant="loop", block_vocab=384,
                      interpret=True)
  with pytest.raises(ValueError, match="power of 2"):
    kernels.valid_rank_counts(jnp.zeros((8, 1024)), jnp.zeros((8, 2)), jnp.ones((8, 3)),
                              variant="loop", block_rows=3, interpret=True)
  with pytest.raises(ValueError, match="variant must be one of"):
    kernels.row_stats(jnp.zeros((8, 1024)), None, jnp.ones(8), variant="warp", interpret=True)


def test_grid_variant_is_refused_on_gpu(monkeypatch):
  """Its accumulation relies on the vocabulary blocks running in order, which a GPU grid does
  not guarantee: compiled on a GPU it would race."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="races on GPU"):
    kernels.row_stats(jnp.zeros((8, 1280)), None, jnp.ones(8))

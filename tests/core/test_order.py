"""Order metrics (SPEC §1) against float64 NumPy references and by their properties."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import calibjax as cj
from calibjax.testing import references as ref
from tests.helpers import random_case

FIELDS = ref.ORDER_FIELDS
METHODS = ("threshold", "sort")


def assert_order_matches(z, m, method="threshold", **kw):
  got = cj.order_stats(z, m, method=method, **kw)
  want = ref.order_stats(z, m)
  for f in FIELDS:
    np.testing.assert_allclose(np.asarray(getattr(got, f)), want[f], rtol=2e-6, atol=2e-6,
                               err_msg=f)
  np.testing.assert_array_equal(np.asarray(got.n_valid), m.sum(-1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ties,neg_inf", [(False, 0.0), (True, 0.0), (True, 0.2), (False, 0.3)])
def test_matches_numpy_reference(method, ties, neg_inf):
  z, m = random_case(np.random.default_rng(0), 12, 37, ties=ties, neg_inf=neg_inf)
  assert_order_matches(z, m, method)


@pytest.mark.parametrize("n_valid", [0, 1, 36, 37])
def test_extreme_valid_counts(n_valid):
  z, m = random_case(np.random.default_rng(1), 4, 37, n_valid=n_valid, ties=True)
  s = cj.order_stats(z, m)
  defined = 0 < n_valid < 37
  assert bool(np.all(np.asarray(s.defined) == defined))
  assert bool(np.all(np.asarray(s.has_valid) == (n_valid > 0)))
  assert bool(np.all(np.asarray(s.has_invalid) == (n_valid < 37)))
  if defined:
    assert_order_matches(z, m)
  else:
    assert np.all(np.isnan(np.asarray(s.auroc)))


def test_v_equals_one():
  for valid in (True, False):
    s = cj.order_stats(np.array([[0.5]], np.float32), np.array([[valid]]))
    assert np.isnan(float(s.auroc[0])) and not bool(s.defined[0])


def test_brute_force_pairs_small():
  rng = np.random.default_rng(2)
  for _ in range(20):
    z, m = random_case(rng, 1, 9, ties=True, neg_inf=0.1)
    if not 0 < m.sum() < 9:
      continue
    v, u = z[0][m[0]], z[0][~m[0]]
    pairs = (v[:, None] > u[None, :]) + 0.5 * (v[:, None] == u[None, :])
    assert float(cj.order_stats(z, m).auroc[0]) == pytest.approx(pairs.mean(), abs=1e-6)


def test_hand_computed_example():
  z = np.array([4.0, 3.0, 3.0, 2.0, 1.0], np.float32)
  m = np.array([True, False, True, True, False])
  s = cj.order_stats(z, m)
  # valid 4, 3, 2 vs invalid 3, 1: (1 + 1) + (.5 + 1) + (0 + 1) = 4.5 of 6 pairs
  assert float(s.auroc) == pytest.approx(0.75)
  assert float(s.clean_head) == 1.0           # only the 4 is above every invalid token
  assert float(s.k_all_valid) == 4.0          # z >= 2
  assert float(s.margin) == pytest.approx(-1.0)  # 2 - 3
  # best tie-closed cutoff: {z >= 2}: tp 3, k 4 -> F1 = 6 / 7
  assert float(s.best_f1) == pytest.approx(6 / 7)
  # midrank precisions: 4 -> 1/1; 3 -> (1 + 1)/(1 + 1.5); 2 -> 3/4
  assert float(s.average_precision) == pytest.approx((1 + 2 / 2.5 + 3 / 4) / 3)


def test_full_vocabulary_rows():
  rng = np.random.default_rng(3)
  z, m = random_case(rng, 2, 262144, n_valid=50)
  m[1, rng.choice(262144, 3000, replace=False)] = True  # 3000+ valid: the binary-search path
  assert_order_matches(z, m)


def test_tiny_and_huge_logits():
  rng = np.random.default_rng(4)
  z, m = random_case(rng, 3, 64, n_valid=10)
  for scale in (1e-30, 1e30):
    assert_order_matches((z * scale).astype(np.float32), m)


def test_nonfinite_rows_flagged_not_raised():
  z, m = random_case(np.random.default_rng(5), 3, 16, n_valid=4)
  z[0, 3] = np.nan
  z[1, 5] = np.inf
  z[2] = -np.inf
  s = cj.order_stats(z, m)
  assert not np.any(np.asarray(s.finite))
  assert np.all(np.isnan(np.asarray(s.auroc)))


def test_bf16_is_upcast():
  z, m = random_case(np.random.default_rng(6), 4, 50, n_valid=7)
  zb = jnp.asarray(z, jnp.bfloat16)
  got = cj.order_stats(zb, m)
  want = ref.order_stats(np.asarray(zb.astype(jnp.float32)), m)
  np.testing.assert_allclose(np.asarray(got.auroc), want["auroc"], atol=1e-6)


def test_capacity_under_jit():
  z, m = random_case(np.random.default_rng(7), 3, 40, n_valid=5)
  m[2, :20] = True
  f = jax.jit(lambda z, m: cj.order_stats(z, m, max_valid=8))
  s = f(z, m)
  np.testing.assert_array_equal(np.asarray(s.capacity_ok), [True, True, False])
  assert np.isnan(float(s.auroc[2]))
  np.testing.assert_allclose(np.asarray(s.auroc[:2]), ref.order_stats(z[:2], m[:2])["auroc"],
                             atol=1e-6)
  # without max_valid under jit every row fits
  s = jax.jit(cj.order_stats)(z, m)
  np.testing.assert_allclose(np.asarray(s.auroc), ref.order_stats(z, m)["auroc"], atol=1e-6)


def test_recall_at_precision_matches_reference_and_does_not_retrace():
  z, m = random_case(np.random.default_rng(8), 6, 30, ties=True)
  f = jax.jit(chex.assert_max_traces(
      lambda z, m, tau: cj.recall_at_precision(z, m, tau, max_valid=30), n=1))
  for tau in (0.0, 0.3, 0.5, 0.9, 1.0):
    want = ref.recall_at_precision(z, m, tau)
    np.testing.assert_allclose(np.asarray(f(z, m, jnp.float32(tau))), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cj.recall_at_precision(z, m, tau)), want, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_cutoff_curve_matches_reference(ties):
  z, m = random_case(np.random.default_rng(9), 5, 41, n_valid=9, ties=ties, neg_inf=0.1)
  cut = np.array([1, 2, 3, 5, 8, 13, 21, 41])
  for t in (0.5, 1.0, 3.0):
    got = cj.cutoff_curve(z, m, cut, temperature=t)
    want = ref.cutoff_curve(z, m, cut, temperature=t)
    for f in ("precision", "recall", "validity"):
      np.testing.assert_allclose(np.asarray(getattr(got, f)), want[f], rtol=1e-5, atol=1e-6,
                                 err_msg=f)


def test_cutoff_curve_ties_past_the_selected_block():
  # the 4th value is tied with tokens beyond max_cutoff: counts must come from the whole row
  z = np.array([[5.0, 4.0, 3.0] + [1.0] * 10], np.float32)
  m = np.zeros_like(z, bool)
  m[0, [0, 3, 4]] = True
  got = cj.cutoff_curve(z, m, np.array([4]), max_cutoff=4)
  assert float(got.precision[0, 0]) == pytest.approx((1 + 1 * 2 / 10) / 4)


def test_cutoff_curve_no_retrace_for_temperature():
  z, m = random_case(np.random.default_rng(10), 2, 30, n_valid=5)
  f = jax.jit(chex.assert_max_traces(
      lambda z, m, t: cj.cutoff_curve(z, m, jnp.arange(1, 6), t, max_cutoff=5), n=1))
  for t in (0.5, 1.0, 2.0):
    np.testing.assert_allclose(np.asarray(f(z, m, jnp.float32(t)).validity),
                               ref.cutoff_curve(z, m, range(1, 6), t)["validity"], rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  z = np.zeros((2, 5), np.float32)
  with pytest.raises(cj.errors.ShapeMismatchError, match=r"\(2, 4\).*\(2, 5\)"):
    cj.order_stats(z, np.zeros((2, 4), bool))
  with pytest.raises(cj.errors.InputError, match="bool"):
    cj.order_stats(z, np.zeros((2, 5), np.int32))
  with pytest.raises(cj.errors.InputError, match="cutoffs"):
    cj.cutoff_curve(z, np.zeros((2, 5), bool), [0, 3])


# Logits on a grid of quarters (many ties) plus -inf, so integer shifts are exact in float32.
logit_rows = hnp.arrays(np.float32, st.integers(2, 24),
                        elements=st.integers(-80, 80).map(lambda i: i / 4) | st.just(-np.inf))


@settings(max_examples=40, deadline=None)
@given(logit_rows, st.data())
def test_permutation_and_shift_invariance(z, data):
  m = data.draw(hnp.arrays(bool, z.shape))
  perm = data.draw(st.permutations(range(z.size)))
  shift = np.float32(data.draw(st.integers(-5, 5)))
  base = cj.order_stats(z, m)
  permuted = cj.order_stats(z[list(perm)], m[list(perm)])
  shifted = cj.order_stats(z + shift, m)
  for other in (permuted, shifted):
    for f in FIELDS:
      np.testing.assert_allclose(np.asarray(getattr(other, f)), np.asarray(getattr(base, f)),
                                 atol=1e-6, err_msg=f)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.floats(-3, 3, width=32))
def test_all_tied_counts_halves(n_valid, n_invalid, value):
  z = np.full(n_valid + n_invalid, value, np.float32)
  m = np.arange(z.size) < n_valid
  s = cj.order_stats(z, m)
  assert float(s.auroc) == pytest.approx(0.5)
  assert float(s.clean_head) == 0 and float(s.margin) == 0
  assert float(s.average_precision) == pytest.approx((n_valid + 1) / (z.size + 1), rel=1e-6)


@pytest.mark.parametrize("vocab,n_valid", [(1000, 2), (1000, 3), (5000, 20), (300, 2)])
def test_blocked_selection_of_valid_logits(vocab, n_valid):
  """Valid tokens crowded into one block, in the ragged last block, and spread out."""
  rng = np.random.default_rng(11)
  z, _ = random_case(rng, 3, vocab, ties=False)
  m = np.zeros_like(z, bool)
  m[0, 130:130 + n_valid] = True                  # one block
  m[1, vocab - n_valid:] = True                   # ragged tail block
  m[2, rng.choice(vocab, n_valid, replace=False)] = True
  z[2, m[2]] = -np.inf                            # valid tokens with probability 0
  assert_order_matches(z, m)


@pytest.mark.parametrize("ties", [False, True])
def test_rows_with_few_valid_tokens_count_in_fewer_slots(ties):
  """A row whose valid logits fit 16 or 64 slots is counted in those and padded to the
  capacity: every count and mass equals the sort reference's, for rows on both sides of
  each size (n = 15 | 16, 63 | 64), -inf logits included; the masses equal float64 sums."""
  from calibjax.core.ranks import valid_ranks
  rng = np.random.default_rng(7)
  sizes = (0, 1, 15, 16, 40, 63, 64, 200)
  z, m = random_case(rng, len(sizes), 400, ties=ties, neg_inf=0.05)
  m[:] = False
  for row, n in enumerate(sizes):
    m[row, rng.choice(400, n, replace=False)] = True
  z, m = jnp.asarray(z), jnp.asarray(m)
  t = jnp.full(len(sizes), 0.7)
  got = valid_ranks(z, m, 256, "threshold", t)
  want = valid_ranks(z, m, 256, "sort", t)
  for f in ("s", "n_valid", "gt_all", "eq_all", "gt_val", "eq_val", "capacity_ok"):
    np.testing.assert_array_equal(np.asarray(getattr(got, f)), np.asarray(getattr(want, f)),
                                  err_msg=f)
  for f in ("p_slot", "p_max"):
    np.testing.assert_allclose(np.asarray(getattr(got, f)), np.asarray(getattr(want, f)),
                               rtol=1e-5, err_msg=f)
  z64 = np.asarray(z, np.float64) / 0.7
  p = np.exp(z64 - z64.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  s = np.asarray(got.s, np.float64)[:, :, None] / 0.7
  for f, kept in (("gt_mass", z64[:, None] > s), ("eq_mass", z64[:, None] == s)):
    np.testing.assert_allclose(np.asarray(getattr(got, f)), (kept * p[:, None]).sum(-1),
                               rtol=1e-5, atol=1e-12, err_msg=f)

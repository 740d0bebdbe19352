"""Shape metrics and group masses (SPEC §2) against float64 NumPy references and properties."""

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


def assert_shape_matches(z, m, temperature=1.0, target=None, rtol=2e-5):
  got = cj.shape_stats(z, m, temperature, target)
  want = ref.shape_stats(z, m, temperature, target)
  for f in ref.SHAPE_FIELDS:
    np.testing.assert_allclose(np.asarray(getattr(got, f)), want[f], rtol=rtol, atol=1e-6,
                               err_msg=f)


@pytest.mark.parametrize("temperature", [1e-3, 0.5, 1.0, 2.5, 100.0])
@pytest.mark.parametrize("ties,neg_inf", [(False, 0.0), (True, 0.3)])
def test_matches_numpy_reference(temperature, ties, neg_inf):
  z, m = random_case(np.random.default_rng(0), 10, 33, ties=ties, neg_inf=neg_inf)
  m[:, 0] |= z[:, 0] > -np.inf  # at least one valid token with mass in most rows
  assert_shape_matches(z, m, temperature, rtol=1e-4 if temperature == 1e-3 else 2e-5)


def test_target_weights():
  rng = np.random.default_rng(1)
  z, m = random_case(rng, 6, 20, n_valid=7)
  target = rng.random(20).astype(np.float32) + 0.1
  assert_shape_matches(z, m, 1.3, target)


def test_target_zero_weight_gives_infinite_kl():
  z = np.zeros(4, np.float32)
  m = np.array([True, True, False, False])
  s = cj.shape_stats(z, m, target=np.array([1.0, 0.0, 1.0, 1.0]))
  assert float(s.kl_q_to_target) == np.inf
  assert np.isfinite(float(s.kl_target_to_q))


def test_full_vocabulary_rows():
  z, m = random_case(np.random.default_rng(2), 2, 262144, n_valid=50)
  assert_shape_matches(z, m, 1.0, rtol=1e-4)


def test_edge_cases():
  # one valid token; no valid token; V = 1; all valid
  z = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32)
  m = np.array([[False, True, False], [False, False, False], [True, True, True]])
  s = cj.shape_stats(z, m)
  np.testing.assert_allclose(np.asarray(s.normalized_valid_entropy[0]), 1.0)
  assert float(s.valid_entropy[0]) == 0.0 and float(s.effective_valid[0]) == 1.0
  assert float(s.valid_mass[1]) == 0.0 and np.isnan(float(s.valid_entropy[1]))
  assert float(s.invalid_mass[2]) == 0.0 and float(s.neg_log_valid_mass[2]) == 0.0
  assert_shape_matches(z, m)
  one = cj.shape_stats(np.array([[3.0]], np.float32), np.array([[True]]))
  assert float(one.valid_mass[0]) == 1.0 and float(one.kl_target_to_p[0]) == 0.0


def test_nonfinite_and_bad_temperature():
  z = np.array([[0.0, np.nan], [0.0, 1.0]], np.float32)
  s = cj.shape_stats(z, np.array([True, False]))
  assert not bool(s.finite[0]) and np.isnan(float(s.valid_mass[0]))
  assert bool(s.finite[1])
  with pytest.raises(cj.errors.InputError, match="temperature"):
    cj.shape_stats(z, np.array([True, False]), temperature=0.0)
  f = jax.jit(lambda t: cj.shape_stats(z[1:], np.array([True, False]), t).valid_mass)
  assert np.isnan(float(f(jnp.float32(-1.0))[0]))  # inside jit: NaN, no raise


def test_no_retrace_for_new_temperature():
  z, m = random_case(np.random.default_rng(3), 3, 17, n_valid=4)
  f = jax.jit(chex.assert_max_traces(lambda z, m, t: cj.shape_stats(z, m, t), n=1))
  for t in (0.3, 1.0, 7.0):
    np.testing.assert_allclose(np.asarray(f(z, m, jnp.float32(t)).valid_entropy),
                               ref.shape_stats(z, m, t)["valid_entropy"], rtol=2e-5)


@pytest.mark.parametrize("top_m", [None, 1, 3])
def test_group_masses_match_reference(top_m):
  z, m = random_case(np.random.default_rng(4), 5, 29, n_valid=6, ties=True)
  temps = np.array([0.1, 0.5, 0.8, 1, 1.5, 2.5, 3, 5, 10, 20], np.float32)
  got = cj.group_masses(z, m, temps, top_m=top_m)
  want = ref.group_masses(z, m, temps, top_m=top_m)
  for f in ("over", "under", "invalid"):
    np.testing.assert_allclose(np.asarray(getattr(got, f)), want[f], rtol=1e-5, atol=1e-7,
                               err_msg=f)


def test_group_masses_temperature_limits():
  z = np.array([3.0, 2.0, 1.0, 0.0, -1.0], np.float32)
  m = np.array([True, True, False, False, True])
  g = cj.group_masses(z, m, np.array([1e-3, 1e4], np.float32), top_m=1)
  np.testing.assert_allclose(np.asarray(g.over[0]), 1.0, atol=1e-6)  # T -> 0: argmax only
  # T -> inf: uniform over the vocabulary
  np.testing.assert_allclose(
      [float(g.over[1]), float(g.under[1]), float(g.invalid[1])], [0.2, 0.4, 0.4], atol=1e-3)


probs = hnp.arrays(np.float32, st.integers(2, 30), elements=st.floats(-30, 30, width=32))


@settings(max_examples=50, deadline=None)
@given(probs, st.data(), st.floats(0.05, 20))
def test_kl_decomposition_and_mass_conservation(z, data, t):
  m = data.draw(hnp.arrays(bool, z.shape).filter(lambda a: a.any()))
  s = cj.shape_stats(z, m, t)
  assert float(s.kl_target_to_p) == pytest.approx(
      float(s.kl_target_to_q) + float(s.neg_log_valid_mass), rel=1e-4, abs=1e-4)
  assert float(s.valid_mass) + float(s.invalid_mass) == pytest.approx(1.0, abs=1e-5)
  g = cj.group_masses(z, m, jnp.array([0.1, t, 10.0]))
  np.testing.assert_allclose(np.asarray(g.over + g.under + g.invalid), 1.0, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(probs, st.data())
def test_permutation_and_shift_invariance(z, data):
  m = data.draw(hnp.arrays(bool, z.shape))
  perm = list(data.draw(st.permutations(range(z.size))))
  base = cj.shape_stats(z, m, 1.7)
  for other in (cj.shape_stats(z[perm], m[perm], 1.7), cj.shape_stats(z + 3.0, m, 1.7)):
    for f in ref.SHAPE_FIELDS:
      np.testing.assert_allclose(np.asarray(getattr(other, f)), np.asarray(getattr(base, f)),
                                 rtol=1e-4, atol=1e-5, err_msg=f)


def test_group_masses_no_retrace_for_new_temperatures():
  z, m = random_case(np.random.default_rng(5), 2, 19, n_valid=5)
  f = jax.jit(chex.assert_max_traces(lambda z, m, t: cj.group_masses(z, m, t).over, n=1))
  for temps in ([0.5, 1.0], [2.0, 9.0], [0.1, 0.2]):
    t = jnp.asarray(temps, jnp.float32)
    np.testing.assert_allclose(np.asarray(f(z, m, t)), ref.group_masses(z, m, temps)["over"],
                               rtol=1e-5, atol=1e-7)

"""Calibration error (SPEC §3) against float64 NumPy references and a calibrated simulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibjax as cj
from calibjax.testing import references as ref

ECE = ("ece_l1", "ece_l2", "ece_max")


def assert_reliability(got, want, atol=2e-6):
  np.testing.assert_allclose(np.asarray(got.count), want["count"])
  for f in ECE:
    np.testing.assert_allclose(float(getattr(got, f)), want[f], atol=atol, err_msg=f)


def sample_labels(key, logits, temperature=1.0):
  return np.asarray(jax.random.categorical(key, jnp.asarray(logits) / temperature, axis=-1,
                                           mode="high"))


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_top_label_matches_reference(binning):
  rng = np.random.default_rng(0)
  z = (rng.standard_normal((300, 40)) * 2).astype(np.float32)
  y = rng.integers(0, 40, 300)
  assert_reliability(cj.top_label_ece(z, y, n_bins=10, binning=binning),
                     ref.top_label_ece(z, y, 10, binning))


def test_mass_bins_are_tie_safe():
  # 60 positions with only 3 distinct confidences: equal confidences share one bin
  with np.errstate(divide="ignore"):
    z = np.repeat(np.log(np.array([[.5, .5, 0, 0], [.7, .1, .1, .1], [.9, .1, 0, 0]])), 20, 0)
  y = np.zeros(60, int)
  r = cj.top_label_ece(z.astype(np.float32), y, n_bins=7, binning="mass")
  counts = np.asarray(r.count)
  assert sorted(counts[counts > 0].tolist()) == [20, 20, 20]
  assert_reliability(r, ref.top_label_ece(z, y, 7, "mass"))


def test_top_ties_share_credit():
  z = np.array([[1.0, 1.0, 0.0]], np.float32)  # label 0 tied at the top with token 1
  r = cj.top_label_ece(z, np.array([0]), n_bins=2)
  assert float(np.nansum(np.asarray(r.mean_outcome))) == pytest.approx(0.5)


def test_proper_scores_match_reference():
  rng = np.random.default_rng(1)
  z = (rng.standard_normal((5, 7, 30)) * 3).astype(np.float32)
  y = rng.integers(0, 30, (5, 7))
  s = cj.proper_scores(z, y)
  lp = ref._log_softmax(z)
  p = np.exp(lp)
  onehot = np.eye(30)[y]
  np.testing.assert_allclose(np.asarray(s.brier), ((p - onehot) ** 2).sum(-1), atol=1e-5)
  np.testing.assert_allclose(np.asarray(s.nll), -np.take_along_axis(lp, y[..., None], -1)[..., 0],
                             rtol=1e-5)


def test_full_ece_matches_reference():
  rng = np.random.default_rng(2)
  z = (rng.standard_normal((50, 1000)) * 4).astype(np.float32)
  y = rng.integers(0, 1000, 50)
  got = cj.full_ece(z, y, n_bins=9, p_min=1e-6)
  assert_reliability(got, ref.full_ece(z, y, 9, 1e-6))
  assert float(np.sum(np.asarray(got.count))) == 50 * 1000


def test_distributional_matches_reference():
  rng = np.random.default_rng(3)
  z = (rng.standard_normal((20, 500)) * 3).astype(np.float32)
  target = (rng.random((20, 500)) < 0.05) * rng.random((20, 500))
  target[:, 0] += 1.0
  got = cj.distributional_calibration(z, target, n_bins=11, p_min=1e-7)
  want = ref.distributional_calibration(z, target, 11, 1e-7)
  assert_reliability(got.reliability, want)
  np.testing.assert_allclose(np.asarray(got.tv), want["tv"], atol=1e-6)
  np.testing.assert_allclose(np.asarray(got.kl_target_to_p), want["kl_target_to_p"], rtol=1e-5)


def test_calibrated_forecaster_within_finite_sample_bias():
  """Labels drawn from p itself: E[outcome | conf] = conf in every bin, so the only error is
  sampling noise, E|gap_b| <= sqrt(Var_b / n_b) <= 1 / (2 sqrt(n_b)). A forecaster at the
  wrong temperature must exceed that bound."""
  rng = np.random.default_rng(4)
  z = (rng.standard_normal((4000, 50)) * 2).astype(np.float32)
  y = sample_labels(jax.random.key(0), z)
  r = cj.top_label_ece(z, y, n_bins=10)
  counts = np.asarray(r.count)
  w = counts / counts.sum()
  bound = np.sum(w[counts > 0] / (2 * np.sqrt(counts[counts > 0])))
  assert float(r.ece_l1) <= bound
  y_hot = sample_labels(jax.random.key(1), z, temperature=2.0)
  assert float(cj.top_label_ece(z, y_hot, n_bins=10).ece_l1) > 3 * bound


def test_bad_inputs():
  z = np.zeros((3, 4), np.float32)
  with pytest.raises(cj.errors.ShapeMismatchError, match=r"\(2,\)"):
    cj.top_label_ece(z, np.array([0, 1]))
  with pytest.raises(cj.errors.InputError, match=r"position \(1,\) has 4"):
    cj.full_ece(z, np.array([0, 4, 1]))
  with pytest.raises(cj.errors.InputError, match="integer"):
    cj.proper_scores(z, np.array([0.0, 1.0, 2.0]))
  with pytest.raises(cj.errors.InputError, match=r"row \(1,\)"):
    cj.distributional_calibration(z, np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))

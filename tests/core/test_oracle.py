"""Oracle cutoffs and oracle gaps (SPEC §5) against a float64 brute force."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibjax as cj
from calibjax.testing import references as ref
from tests.helpers import random_case

FIELDS = ("r_star", "recall", "precision", "validity", "f1", "p_star", "epsilon_star",
          "min_p_star")


@pytest.mark.parametrize("objective,tau", [("validity", 0.95), ("validity", 0.6),
                                           ("precision", 0.5), ("f1", 0.0)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("method", ["threshold", "sort"])
def test_matches_brute_force(objective, tau, ties, method):
  z, m = random_case(np.random.default_rng(0), 8, 30, n_valid=7, ties=ties, neg_inf=0.1)
  for t in (0.5, 2.0):
    got = cj.oracle_cutoff(z, m, objective, tau, t, method=method)
    want = ref.oracle_cutoff(z, m, objective, tau, t)
    for i, w in enumerate(want):
      assert bool(got.feasible[i]) == w["feasible"], i
      if not w["feasible"]:
        continue
      for f in FIELDS:
        np.testing.assert_allclose(float(getattr(got, f)[i]), w[f], rtol=2e-5, atol=1e-7,
                                   err_msg=f"row {i} {f}")


def test_oracle_parameters_reproduce_the_cutoff():
  """top_k = k*, top_p = P*, min_p = a*, epsilon = ε* each keep exactly the oracle set."""
  z, m = random_case(np.random.default_rng(1), 6, 200, n_valid=15)
  o = cj.oracle_cutoff(z, m, tau=0.5, temperature=1.3)
  for rule, param in (("top_k", o.k_star), ("top_p", o.p_star * (1 - 1e-6)),
                      ("min_p", o.min_p_star * (1 - 1e-6)), ("epsilon", o.epsilon_star * (1 - 1e-6))):
    keep = cj.truncate(z, rule, param, temperature=1.3, valid_mask=m)
    np.testing.assert_array_equal(np.asarray(keep.kept_count), np.asarray(o.r_star), err_msg=rule)


def test_infeasible_and_undefined_rows():
  z = np.array([[5.0, 4.0, 3.0, 0.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
  m = np.array([[False, False, False, True], [True] * 4, [False] * 4])
  o = cj.oracle_cutoff(z, m, tau=0.99)
  assert not bool(o.feasible[0]) and float(o.r_star[0]) == 4.0  # smallest cutoff with a valid
  assert not bool(o.defined[1]) and not bool(o.defined[2])
  assert np.isnan(float(o.recall[1]))


def test_no_retrace_for_tau_and_temperature():
  z, m = random_case(np.random.default_rng(2), 3, 40, n_valid=6)
  f = jax.jit(chex.assert_max_traces(
      lambda z, m, tau, t: cj.oracle_cutoff(z, m, "validity", tau, t, max_valid=6).r_star, n=1))
  for tau, t in ((0.9, 1.0), (0.5, 2.0), (0.99, 0.7)):
    want = [w.get("r_star", np.nan) for w in ref.oracle_cutoff(z, m, "validity", tau, t)]
    got = np.asarray(f(z, m, jnp.float32(tau), jnp.float32(t)))
    feas = [w["feasible"] for w in ref.oracle_cutoff(z, m, "validity", tau, t)]
    np.testing.assert_allclose(got[feas], np.asarray(want)[feas])


def test_oracle_gap():
  z, m = random_case(np.random.default_rng(3), 20, 100, n_valid=10)
  z = np.where(m, z + 3.0, z)  # valid tokens ranked higher, but not perfectly
  values = np.linspace(0.05, 1.0, 32)
  g = cj.oracle_gap(z, m, "top_p", values, tau=0.3)
  tr = cj.truncate(z, "top_p", cj.sweep(values), valid_mask=m, return_keep=False)
  np.testing.assert_allclose(g.mean_recall, np.asarray(tr.recall).mean(axis=1), rtol=1e-6)
  feasible = g.mean_validity >= 0.3
  assert g.best_recall == pytest.approx(g.mean_recall[feasible].max())
  o = cj.oracle_cutoff(z, m, tau=0.3)
  assert g.oracle_recall == pytest.approx(float(np.asarray(o.recall).mean()), rel=1e-6)
  assert g.positions == 20


def test_oracle_gap_hand_computed():
  """Two positions whose valid sets (2 and 6 tokens, logits 5, 4.9, …) sit above invalid
  tokens (logit 3): one k cannot fit both. top_k = 2 is the best global value at τ = .99 (k = 3..6
  lets too much invalid mass into the first position); the oracle keeps each valid set."""
  z = np.full((2, 20), 3.0, np.float32)
  m = np.zeros((2, 20), bool)
  m[0, :2] = m[1, :6] = True
  z[0, :2] = [5.0, 4.9]
  z[1, :6] = [5.0, 4.9, 4.8, 4.7, 4.6, 4.5]
  g = cj.oracle_gap(z, m, "top_k", np.arange(1, 21), tau=0.99)
  assert g.best_value == 2 and g.best_recall == pytest.approx((1 + 2 / 6) / 2)
  assert g.oracle_recall == pytest.approx(1.0) and g.oracle_validity == pytest.approx(1.0)
  assert g.recall_gap == pytest.approx(1 - (1 + 2 / 6) / 2)
  with pytest.raises(cj.errors.InputError, match="objective"):
    cj.oracle_cutoff(z, m, objective="recall")


def test_oracle_gap_f1_when_a_value_keeps_no_valid_token():
  """top_k = 1 keeps only the (invalid) top token of row 0: recall 0 there. F1 per value is
  computed from the row's valid count (Truncation.n_valid), never from kept_valid / recall
  (0/0), so every F1 is finite and the best k is the hand-computed one."""
  z = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]], np.float32)
  m = np.array([[False, True, True, False, False], [True, True, False, False, False]])
  g = cj.oracle_gap(z, m, "top_k", np.arange(1, 6), objective="f1")
  # F1(k) = 2·kept_valid / (k + n_valid): row 0: 0, 2/4, 4/5, 4/6, 4/7; row 1: 2/3, 1, 4/5, ...
  want = np.mean([[0, 2 / 4, 4 / 5, 4 / 6, 4 / 7], [2 / 3, 1, 4 / 5, 4 / 6, 4 / 7]], axis=0)
  np.testing.assert_allclose(g.mean_f1, want, rtol=1e-6)
  assert g.best_index == 2 and g.best_value == 3
  tr = cj.truncate(z, "top_k", 1, valid_mask=m)
  np.testing.assert_array_equal(np.asarray(tr.n_valid), [2, 2])


@pytest.mark.parametrize("ties", [False, True])
def test_oracle_rank_sampler_keeps_the_oracle_cutoff(ties):
  """``oracle_rank=τ`` keeps exactly the brute-force r* tokens (tie-closed, z ≥ z*); rows
  where no cutoff is feasible keep the smallest cutoff holding a valid token."""
  z, m = random_case(np.random.default_rng(3), 8, 30, n_valid=7, ties=ties, neg_inf=0.1)
  for tau, t in ((0.95, 0.5), (0.6, 2.0)):
    got = cj.truncate_chain(z, f"oracle_rank={tau},t={t}", valid_mask=m)
    want = ref.oracle_cutoff(z, m, "validity", tau, t)
    o = cj.oracle_cutoff(z, m, "validity", tau, t)
    for i, w in enumerate(want):
      keep = np.asarray(got.keep[i])
      np.testing.assert_array_equal(keep, np.asarray(z[i]) >= float(o.z_star[i]), err_msg=i)
      if w["feasible"]:
        assert keep.sum() == w["r_star"], i
        assert float(got.validity[i]) == pytest.approx(w["validity"], rel=2e-5)


def test_oracle_rank_is_a_sampler_of_its_own():
  s = cj.Sampler.parse("oracle_rank,t=2")
  assert s.rules == (("oracle_rank", 0.95),) and str(s) == "oracle_rank=0.95,t=2"
  with pytest.raises(cj.errors.InputError, match="cannot be chained"):
    cj.Sampler.parse("oracle_rank=0.9,top_p=0.9")
  with pytest.raises(cj.errors.InputError, match="oracle_rank"):
    cj.Sampler.parse("oracle_rank=1.5")
  with pytest.raises(cj.errors.InputError, match="valid_mask"):
    cj.truncate_chain(np.zeros((2, 5)), "oracle_rank")
  # a fully valid row: the cutoff is undefined and everything is kept
  keep = cj.truncate_chain(np.log([[.5, .3, .2]]), "oracle_rank", valid_mask=np.ones((1, 3), bool)).keep
  assert np.asarray(keep).all()


@pytest.mark.parametrize("t", [0.7, 1.3])
def test_oracle_rank_keeps_its_cut_token(t):
  """``oracle_rank`` keeps every token with ``z ≥ z*``, the cut token included: XLA's ``z / T``
  over a row differs from ``z* / T`` by an ulp for some logits (one here: 0.32550383 / 1.3),
  which dropped the cut's own valid token (validity 0 reported)."""
  rng = np.random.default_rng(5)
  z = (rng.standard_normal((6, 3001)) * 3).astype(np.float32)
  m = np.zeros(z.shape, bool)
  for b, n in enumerate([8, 7, 9, 1, 2, 8]):
    m[b, rng.choice(z.shape[1], n, replace=False)] = True
    z[b, m[b]] += 4
  for tau in (0.5, 0.9):
    o = cj.oracle_cutoff(z, m, "validity", tau, t, max_valid=16)
    tr = cj.truncate_chain(z, f"oracle_rank={tau},t={t}", valid_mask=m, max_valid=16)
    keep, z_star = np.asarray(tr.keep), np.asarray(o.z_star)
    assert np.asarray(o.defined).all()
    assert keep[z >= z_star[:, None]].all(), (tau, t)
    assert (keep.sum(-1) >= np.asarray(o.r_star)).all() and (np.asarray(tr.validity) > 0).all()

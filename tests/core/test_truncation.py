"""Truncation rules and chains (SPEC §4) against float64 NumPy references and properties."""

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

PARAMS = {"top_k": [1, 3, 10, 40], "top_p": [0.1, 0.5, 0.9, 0.99, 1.0],
          "min_p": [0.0, 0.05, 0.3, 1.0], "epsilon": [0.0, 0.001, 0.02, 0.5],
          "eta": [0.0, 0.0009, 0.02, 0.3], "typical": [0.2, 0.6, 0.95, 1.0],
          "top_n_sigma": [0.0, 0.5, 1.0, 3.0]}
STATS = ("kept_count", "kept_mass", "kept_valid", "kept_invalid", "precision", "recall",
         "validity", "kept_valid_entropy")


def assert_same_keep(got, want, msg=""):
  got = np.asarray(got)
  bad = np.argwhere(got != want)
  assert bad.size == 0, f"{msg}: {len(bad)} tokens differ, first at {bad[:3].tolist()}"


@pytest.mark.parametrize("rule", sorted(PARAMS))
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 100.0])
def test_rules_match_numpy_reference(rule, temperature):
  z, m = random_case(np.random.default_rng(0), 6, 40, n_valid=8, neg_inf=0.1)
  for param in PARAMS[rule]:
    got = cj.truncate(z, rule, param, temperature=temperature, valid_mask=m)
    want = ref.truncate(z, rule, param, temperature, m)
    assert_same_keep(got.keep, want, f"{rule}={param} T={temperature}")
    stats = ref.truncation_stats(want, z, m, temperature)
    for f in STATS:
      np.testing.assert_allclose(np.asarray(getattr(got, f)), stats[f], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{rule}={param} {f}")


@pytest.mark.parametrize("rule", sorted(PARAMS))
def test_ties_are_kept_and_results_order_free(rule):
  z, m = random_case(np.random.default_rng(1), 5, 30, n_valid=6, ties=True, neg_inf=0.1)
  perm = np.random.default_rng(2).permutation(30)
  for param in PARAMS[rule]:
    got = np.asarray(cj.truncate(z, rule, param, valid_mask=m).keep)
    assert_same_keep(got, ref.truncate(z, rule, param, 1.0, m), f"{rule}={param}")
    permuted = np.asarray(cj.truncate(z[:, perm], rule, param).keep)
    assert_same_keep(permuted, got[:, perm], f"{rule}={param} permuted")
    # a tie group is kept whole: kept values never equal dropped values
    for row, kr in zip(z, got):
      assert not set(row[kr]) & set(row[~kr]), f"{rule}={param} split a tie"


@pytest.mark.parametrize("rule", sorted(PARAMS))
def test_edge_rows(rule):
  param = PARAMS[rule][1]
  all_equal = np.zeros((1, 7), np.float32)
  assert np.asarray(cj.truncate(all_equal, rule, param).keep).all()
  one = cj.truncate(np.array([[2.0]], np.float32), rule, param)
  assert bool(one.keep[0, 0]) and float(one.kept_mass[0]) == 1.0
  z = np.array([[0.0, -np.inf, 1.0, -np.inf], [-np.inf] * 4, [0.0, np.nan, 1.0, 2.0]],
               np.float32)
  r = cj.truncate(z, rule, param)
  keep = np.asarray(r.keep)
  assert not keep[0, 1] and not keep[0, 3] and keep[0, 2]   # -inf never, top-1 always
  assert keep[1].all() and not bool(r.finite[1])             # all -inf: everything, flagged
  assert not bool(r.finite[2]) and np.isnan(float(r.kept_mass[2]))


def test_top1_always_kept_even_when_rule_would_drop_it():
  z = np.log(np.array([[0.4, 0.35, 0.25]], np.float32))
  assert np.asarray(cj.truncate(z, "epsilon", 0.9).keep).tolist() == [[True, False, False]]
  assert np.asarray(cj.truncate(z, "top_p", 1e-9).keep).tolist() == [[True, False, False]]


@pytest.mark.parametrize("rule", ["top_k", "top_p", "typical", "min_p", "eta"])
def test_sweep_equals_per_value_calls(rule):
  z, m = random_case(np.random.default_rng(3), 4, 300, n_valid=20, ties=rule == "top_k")
  values = PARAMS[rule] * 8  # 32+ values, repeated ones included
  s = cj.truncate(z, rule, cj.sweep(values), valid_mask=m)
  assert s.keep.shape == (len(values), 4, 300)
  for i, v in enumerate(values):
    one = cj.truncate(z, rule, v, valid_mask=m)
    np.testing.assert_array_equal(np.asarray(s.keep[i]), np.asarray(one.keep))
    for f in ("threshold", "kept_count", "kept_valid"):
      np.testing.assert_array_equal(np.asarray(getattr(s, f)[i]), np.asarray(getattr(one, f)))
    # histograms over S + 1 cells (sweep) vs 2 cells (one value): float32 summation order;
    # the entropy log(Σp) − Σp·log p / Σp amplifies it by cancellation (measured 1.6e-6)
    for f, rtol in (("kept_mass", 1e-6), ("validity", 1e-6), ("kept_valid_entropy", 5e-6)):
      np.testing.assert_allclose(np.asarray(getattr(s, f)[i]), np.asarray(getattr(one, f)),
                                 rtol=rtol, atol=1e-7)


def test_per_row_params_and_no_retrace():
  z, m = random_case(np.random.default_rng(4), 3, 50, n_valid=5)
  per_row = np.array([0.3, 0.6, 0.9], np.float32)
  got = cj.truncate(z, "top_p", per_row)
  assert_same_keep(got.keep, ref.truncate(z, "top_p", per_row), "per-row")
  f = jax.jit(chex.assert_max_traces(
      lambda z, p, t: cj.truncate(z, "top_p", p, temperature=t).keep, n=1))
  for p, t in ((0.5, 1.0), (0.9, 2.0), (0.7, 0.5)):
    assert_same_keep(f(z, jnp.float32(p), jnp.float32(t)), ref.truncate(z, "top_p", p, t), "jit")


@pytest.mark.parametrize("rules", [
    [("top_k", 50), ("top_p", 0.9)], [("min_p", 0.05), ("top_p", 0.8), ("top_k", 5)],
    [("typical", 0.9), ("eta", 0.001)], [("top_n_sigma", 1.0), ("epsilon", 0.01)],
    [("top_p", 0.95), ("oracle_set", None)]])
def test_chains_match_reference(rules):
  z, m = random_case(np.random.default_rng(5), 6, 80, n_valid=10)
  for t in (0.7, 1.5):
    got = cj.truncate_chain(z, rules, temperature=t, valid_mask=m)
    want = ref.truncate_chain(z, rules, t, m)
    assert_same_keep(got.keep, want, f"{rules} T={t}")
    stats = ref.truncation_stats(want, z, m, t)
    np.testing.assert_allclose(np.asarray(got.validity), stats["validity"], rtol=2e-5)
  # the order given does not matter: the fixed order applies
  np.testing.assert_array_equal(
      np.asarray(cj.truncate_chain(z, rules[::-1], valid_mask=m).keep),
      np.asarray(cj.truncate_chain(z, rules, valid_mask=m).keep))


def test_oracle_set_rule():
  z, m = random_case(np.random.default_rng(6), 3, 20, n_valid=4)
  m[2] = False
  r = cj.truncate(z, "oracle_set", valid_mask=m)
  np.testing.assert_array_equal(np.asarray(r.keep[:2]), m[:2])
  assert np.asarray(r.keep[2]).sum() == 1 and np.asarray(r.keep[2])[np.argmax(z[2])]
  np.testing.assert_allclose(np.asarray(r.validity[:2]), 1.0)
  with pytest.raises(cj.errors.InputError, match="valid_mask"):
    cj.truncate(z, "oracle_set")


def test_sampler_spec_parse_and_errors():
  s = cj.Sampler.parse("top_p=0.9, t=1.5, top_k=50")
  assert s.rules == (("top_k", 50.0), ("top_p", 0.9)) and s.temperature == 1.5
  assert cj.Sampler.parse(str(s)) == s
  assert cj.Sampler.parse("oracle_set,t=2").rules == (("oracle_set", None),)
  for text, match in [("top_q=0.9", "unknown item 'top_q'"), ("top_p=abc", "not a number"),
                      ("top_p", "needs a value"), ("top_p=1.5", r"top_p parameters"),
                      ("top_k=2.5", "integers"), ("t=0", "temperature"),
                      ("top_p=0.5,top_p=0.6", "once"), ("top_p=0.9,,t=1", "empty item"),
                      ("top_p=0.9,", "empty item"), (",t=1", "empty item")]:
    with pytest.raises(cj.errors.InputError, match=match):
      cj.Sampler.parse(text)


def test_bad_params():
  z = np.zeros((2, 5), np.float32)
  with pytest.raises(cj.errors.InputError, match="unknown rule"):
    cj.truncate(z, "top_q", 0.5)
  with pytest.raises(cj.errors.InputError, match=r"\(0, 1\]"):
    cj.truncate(z, "top_p", cj.sweep([0.5, 0.0]))
  with pytest.raises(cj.errors.ShapeMismatchError, match="per-row"):
    cj.truncate(z, "top_p", np.array([0.5, 0.6, 0.7]))


# Logits on a grid of quarters (ties) plus -inf, so integer shifts are exact in float32.
grid_rows = hnp.arrays(np.float32, st.integers(1, 40),
                       elements=st.integers(-40, 40).map(lambda i: i / 4) | st.just(-np.inf))


@settings(max_examples=40, deadline=None)
@given(grid_rows, st.sampled_from(sorted(PARAMS)), st.data())
def test_permutation_and_shift_invariance(z, rule, data):
  param = data.draw(st.sampled_from(PARAMS[rule]))
  perm = list(data.draw(st.permutations(range(z.size))))
  shift = np.float32(data.draw(st.integers(-8, 8)))
  keep = np.asarray(cj.truncate(z[None], rule, param).keep[0])
  np.testing.assert_array_equal(np.asarray(cj.truncate(z[perm][None], rule, param).keep[0]),
                                keep[perm])
  np.testing.assert_array_equal(np.asarray(cj.truncate((z + shift)[None], rule, param).keep[0]),
                                keep)
  assert keep.any()


def test_top_token_is_kept_when_rules_share_one_compiled_function():
  """Regression: with several rules in one jit, XLA recomputed a row's log-normaliser in two
  fusions with different rounding, and a cut clamped to max(x) then kept no token at all."""
  z = jnp.asarray(np.random.default_rng(5).normal(0, 3, (32, 50_000)), jnp.float32)

  @jax.jit
  def both(z):
    k = cj.truncate(z, "top_k", cj.sweep([1, 2, 5, 100]), temperature=1.5, return_keep=False)
    e = cj.truncate(z, "epsilon", cj.sweep([0.9, 0.5, 0.01]), temperature=1.5, return_keep=False)
    return k.kept_count, e.kept_count

  k, e = both(z)
  assert np.all(np.asarray(e) >= 1) and np.all(np.asarray(k) >= 1)


def test_logit_threshold_carries_a_cut_to_the_logit_exactly():
  """``x = (a − c₁) − c₂ ≥ θ ⟺ a ≥ θ_a`` token for token, in NumPy's float32 (IEEE) arithmetic,
  at cuts equal to tokens' own scores (ties), one ulp beside them, ±inf and out of range; and
  θ_a is the smallest such float (the float below it fails the cut)."""
  from calibjax.core.rules import logit_threshold
  rng = np.random.default_rng(21)
  base = rng.normal(0, 4, 400).astype(np.float32)
  a = np.concatenate([base, np.nextafter(base, np.float32(np.inf)),
                      np.nextafter(base, np.float32(-np.inf)), [-np.inf]]).astype(np.float32)
  for c1, c2 in ((np.float32(7.123), np.float32(3.3001)), (np.float32(-0.37), np.float32(11.9)),
                 (np.float32(0), np.float32(0))):
    x = (a - c1) - c2
    finite = x[np.isfinite(x)]
    theta = np.concatenate([finite[:60], np.nextafter(finite[60:120], np.float32(np.inf)),
                            np.nextafter(finite[120:180], np.float32(-np.inf)),
                            [-np.inf, np.inf, np.float32(1e30), np.float32(-1e30)]])
    theta = theta.astype(np.float32)
    consts = (c1, c2, np.float32(0)) if c1 or c2 else (np.float32(0),) * 3
    got = np.asarray(logit_threshold(jnp.asarray(theta), tuple(
        jnp.asarray(c) if c1 or c2 else c for c in consts)))
    np.testing.assert_array_equal(x[None, :] >= theta[:, None], a[None, :] >= got[:, None])
    below = np.nextafter(got, np.float32(-np.inf))
    ok = np.isfinite(got) & (got > -np.inf)
    assert np.all((below[ok] - c1) - c2 < theta[ok])

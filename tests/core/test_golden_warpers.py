"""Golden equality with the PyTorch `generate()` warpers of `transformers`.

`tests/data/warper_golden.npz` was made by `experiments/peers/torch_warpers.py golden` in the
peer environment (torch 2.13.0 CPU, transformers 5.24.0; see BUILD_NOTES.md). 216 tie-free
cases (3 logit families × 6 rules × 4 parameters × 3 temperatures, 8 rows of 1,000 tokens)
and 72 cases with ties.
"""

import os

import numpy as np
import pytest

import calibjax as cj
from calibjax.testing import references as ref

DATA = np.load(os.path.join(os.path.dirname(__file__), os.pardir, "data", "warper_golden.npz"))
CASES = [k.split("/")[1:] for k in DATA.files if k.startswith("keep/")]


def golden(fam, rule, value, temperature):
  z = DATA[f"logits/{fam}"]
  hf = np.unpackbits(DATA[f"keep/{fam}/{rule}/{value}/{temperature}"], axis=-1)
  return z, hf[:, :z.shape[-1]].astype(bool)


def ours(z, rule, value, temperature):
  return np.asarray(cj.truncate(z, rule, float(value), temperature=float(temperature)).keep)


def boundary_gap(z, rule, value, temperature, theirs, mine):
  """How far (float64) the peer's differing row is from the rule's cut."""
  a = ref._scaled(z, float(temperature))
  p = np.exp(a - ref._logsumexp(a))
  if rule in ("top_p", "typical"):
    return abs(p[theirs].sum() - float(value)), abs(p[mine].sum() - float(value))
  diff = theirs ^ mine
  return float(np.max(np.abs(np.log(p[diff]) - np.log(p[mine].min())))), 0.0


def test_tie_free_masks_equal_the_peer_except_counted_boundary_cases():
  boundary = []
  tie_free = [c for c in CASES if c[0] != "ties"]
  assert len(tie_free) == 216
  for fam, rule, value, t in tie_free:
    z, hf = golden(fam, rule, value, t)
    mine = ours(z, rule, value, t)
    # calibjax equals exact (float64) arithmetic on every case
    np.testing.assert_array_equal(mine, ref.truncate(z, rule, float(value), float(t)),
                                  err_msg=f"{fam} {rule}={value} T={t} vs float64")
    for row in np.flatnonzero((hf != mine).any(axis=-1)):
      gap, _ = boundary_gap(z[row], rule, value, t, hf[row], mine[row])
      boundary.append((fam, rule, value, t, int(row), gap))
  # Every disagreement is a float32 boundary case of the peer: its kept mass misses the
  # target by less than 1e-6, or the differing token sits within 1e-6 (log) of the cut.
  for case in boundary:
    assert case[-1] < 1e-6, case
  # Counted, not hidden: measured 1 of 216 (gauss, typical=0.95, T=0.7: the peer's float32
  # cumulative sum reaches 0.95 at a kept mass of 0.9499996).
  assert len(boundary) <= 2, boundary


@pytest.mark.parametrize("rule", ["top_k", "top_p", "min_p", "typical", "epsilon", "eta"])
def test_ties_differ_only_by_whole_tie_groups(rule):
  """With ties the peer may keep part of a tie group (sort order decides); calibjax keeps
  every token equal to the cut (SPEC §4). So calibjax ⊇ peer, and each extra token is tied
  with a token the peer kept."""
  for fam, r, value, t in CASES:
    if fam != "ties" or r != rule:
      continue
    z, hf = golden(fam, r, value, t)
    mine = ours(z, r, value, t)
    assert not (hf & ~mine).any(), (r, value, t)
    for row in range(z.shape[0]):
      extra = mine[row] & ~hf[row]
      assert set(z[row][extra]) <= set(z[row][hf[row]]), (r, value, t, row)


def boundary_cases(rule, n=24, vocab=6000):
  """Tie-free rows and τ placed within 1e-8 (float64) of a cumulative mass of the rule's
  order: the kept count is decided by the 9th significant digit, below float32 resolution
  (float32(0.95) alone is 1.2e-8 off)."""
  rng = np.random.default_rng({"top_p": 11, "typical": 12}[rule])
  for _ in range(n):
    z = (rng.normal(size=vocab) * rng.uniform(1, 4)).astype(np.float32)
    t = float(rng.choice([0.7, 1.0, 1.5]))
    a = ref._scaled(z, t)
    p = np.exp(a - ref._logsumexp(a))
    if rule == "top_p":
      order = np.argsort(-a, kind="stable")
    else:
      order = np.argsort(np.abs(-np.log(p) + (p * np.log(p)).sum()), kind="stable")
    cum = np.cumsum(p[order])
    k = int(np.searchsorted(cum, rng.uniform(0.2, 0.99)))
    yield z, t, float(cum[k] + rng.choice([-1, 1]) * rng.uniform(1e-10, 1e-8))


@pytest.mark.parametrize("rule", ["top_p", "typical"])
def test_boundary_decisions_equal_float64(rule):
  """SPEC §4: cuts whose cumulative mass lies within 1e-8 of τ are decided by exact
  arithmetic (double-float re-decision near the cut), as float64 decides them. Float32 alone
  gets a good share of them wrong (counted, so the cases have teeth)."""
  float32_wrong = 0
  for z, t, tau in boundary_cases(rule):
    want = ref.truncate(z[None], rule, tau, t)[0]
    mine = np.asarray(cj.truncate(z[None], rule, tau, temperature=t).keep)[0]
    np.testing.assert_array_equal(mine, want, err_msg=f"{rule}={tau!r} T={t}")
    sweep = cj.truncate(z[None], rule, cj.sweep([0.5, tau, 0.9]), temperature=t)
    np.testing.assert_array_equal(np.asarray(sweep.keep)[1, 0], want)
    # float32 all the way (p, cumulative sums, τ), sorted as the reference sorts
    a = (z / np.float32(t))
    p = np.exp(a - a.max()).astype(np.float32)
    p /= p.sum(dtype=np.float32)
    score = -a if rule == "top_p" else np.abs(-np.log(p) + (p * np.log(p)).sum(dtype=np.float32))
    cum = np.cumsum(p[np.argsort(score, kind="stable")], dtype=np.float32)
    float32_wrong += int(np.sum(cum < np.float32(tau)) + 1 != want.sum())
  print(f"{rule}: float32 alone decides {float32_wrong} of 24 boundary cases wrongly")
  assert float32_wrong >= 3, float32_wrong

"""The held-out report's arithmetic: best coverage at a validity floor, gains, the target
check, and per-step metrics against a direct computation."""

import numpy as np
import pytest

from calibjax.core import order, shape
from calibjax.recalibration import report as hr
from calibjax.recalibration.training import Positions


def _item(points):
  return {"coverage_n": 100, "points": [
      {"sampler": s, "family": f, "seq_validity": v, "coverage": {"100": c}}
      for s, f, v, c in points]}


BASE = _item([("top_k=1,t=1", "top_k", 0.99, 0.1), ("top_k=5,t=1", "top_k", 0.96, 0.4),
              ("top_p=0.9,t=1", "top_p", 0.80, 0.9), ("oracle_set,t=1", "oracle_set", 1.0, 0.8),
              ("min_p=0.1,t=1", "min_p", 0.95, 0.3)])
HEAD = _item([("top_k=1,t=1", "top_k", 0.99, 0.2), ("top_k=5,t=1", "top_k", 0.97, 0.5),
              ("top_p=0.9,t=1", "top_p", 0.94, 0.95), ("oracle_set,t=1", "oracle_set", 1.0, 0.9)])


def test_best_coverage_at_a_level():
  assert hr.best_coverage(BASE, 0.95) == {"sampler": "top_k=5,t=1", "coverage": 0.4,
                                          "seq_validity": 0.96}
  assert hr.best_coverage(BASE, 0.95, oracle=True)["sampler"] == "oracle_set,t=1"
  assert hr.best_coverage(BASE, 0.5)["coverage"] == 0.9   # the floor includes top_p
  assert hr.best_coverage(BASE, 0.999) is None


def test_summary_gain_and_target():
  steps = {"base": {"auroc": 0.9}, "h": {"auroc": 0.95}}
  rep = hr.summarise({"t": {"base": BASE, "h": HEAD}}, steps, {"h": 0.01})
  assert rep["tasks"]["t"]["h"]["relative_gain"] == pytest.approx(0.5 / 0.4 - 1)
  assert rep["heads"]["h"]["meets_target"] and rep["target_met"]
  # a task where nothing reaches the floor counts 0 for both; one where only the head does
  none = _item([("t=1", "temperature", 0.5, 0.9)])
  rep = hr.summarise({"t": {"base": BASE, "h": HEAD}, "u": {"base": none, "h": none},
                      "v": {"base": none, "h": HEAD}}, steps, {"h": 0.01})
  assert rep["heads"]["h"]["base_mean_coverage"] == pytest.approx(0.4 / 3)
  assert rep["heads"]["h"]["mean_coverage"] == pytest.approx(1.0 / 3)
  assert rep["heads"]["h"]["relative_gain"] == pytest.approx(1.0 / 0.4 - 1)
  assert rep["tasks"]["v"]["h"]["relative_gain"] is None
  rep = hr.summarise({"t": {"base": BASE, "h": HEAD}}, steps, {"h": 0.2})  # keep KL too high
  assert not rep["target_met"]
  rep = hr.summarise({"t": {"base": BASE, "h": HEAD}}, steps, {"h": 0.0}, target_gain=0.3)
  assert not rep["target_met"]


def test_step_metrics_match_a_direct_computation():
  rng = np.random.default_rng(0)
  vocab, d, n = 300, 16, 20
  embed = rng.normal(size=(vocab, d)).astype(np.float32)
  hidden = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.full((n, 6), -1)
  for i in range(n):
    k = rng.integers(1, 7)
    ids[i, :k] = rng.choice(vocab, k, replace=False)
  pos = Positions(hidden, ids, np.where(ids >= 0, 1.0, 0.0).astype(np.float32))
  z = hidden @ embed.T
  valid = np.zeros((n, vocab), bool)
  for i in range(n):
    valid[i, ids[i][ids[i] >= 0]] = True
  got = hr.step_metrics(pos, embed, chunk=7)
  o, s = order.order_stats(z, valid), shape.shape_stats(z, valid)
  assert got["auroc"] == pytest.approx(float(np.nanmean(o.auroc)), rel=1e-6)
  assert got["valid_mass"] == pytest.approx(float(np.mean(s.valid_mass)), rel=1e-5)
  assert got["kl_uniform_to_q"] == pytest.approx(float(np.mean(s.kl_target_to_q)), rel=1e-5)
  scaled = hr.step_metrics(pos, embed, lambda h, z: z * 0.5)  # a flatter distribution
  assert scaled["normalized_valid_entropy"] > got["normalized_valid_entropy"]
  assert hr.keep_kl(pos, embed, lambda h, z: z) == pytest.approx(0.0, abs=1e-6)
  assert hr.keep_kl(pos, embed, lambda h, z: z * 0.5) > 0.01

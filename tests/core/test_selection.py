"""Sort-free selection helpers against float64 NumPy sums."""

import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.core import selection


@pytest.mark.parametrize("joint_cells", [8192, 1])  # one joint histogram; one per score
def test_joint_threshold_stats_equals_float64_sums(monkeypatch, joint_cells):
  """Two scores with unsorted, repeated thresholds drawn from their own values (ties at
  every cut), −inf (dead) tokens, a threshold below and above everything."""
  monkeypatch.setattr(selection, "_JOINT_CELLS", joint_cells)
  rng = np.random.default_rng(3)
  v = 5000
  a = np.round(rng.standard_normal(v) * 4, 1).astype(np.float32)
  a[rng.random(v) < 0.1] = -np.inf
  alive = a > -np.inf
  x = np.where(alive, -np.abs(a - 1.5), -np.inf).astype(np.float32)
  w = rng.random(v).astype(np.float32) * alive
  part = rng.random(v) < 0.3
  th_a = np.concatenate([rng.choice(a[alive], 9), [a[alive][0]] * 2, [-np.inf, np.inf]])
  th_x = np.concatenate([rng.choice(x[alive], 6), [np.float32(-1e30)]]).astype(np.float32)
  got = selection.joint_threshold_stats((jnp.asarray(a), jnp.asarray(x)), jnp.asarray(alive),
                                        (jnp.asarray(th_a), jnp.asarray(th_x)),
                                        jnp.asarray(w), jnp.asarray(part))
  for score, th, (off, on) in zip((a, x), (th_a, th_x), got):
    kept = alive[None] & (score[None] >= th[:, None])
    for side, sums in ((~part, off), (part, on)):
      want = (kept & side[None]) @ w.astype(np.float64)
      np.testing.assert_allclose(np.asarray(sums), want, rtol=2e-6, atol=1e-9)

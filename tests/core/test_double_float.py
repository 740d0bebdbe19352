"""Double-float arithmetic against float64 NumPy, inside jitted computations (where XLA may
fuse products into sums or turn divisions into products)."""

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.core import double_float as df


def value(pair):
  return np.asarray(pair[0], np.float64) + np.asarray(pair[1], np.float64)


def test_divide_is_correctly_rounded():
  """As IEEE float32 division (NumPy): XLA's own z / t on CPU is 1 ulp off for ~10%."""
  rng = np.random.default_rng(0)
  z = (rng.normal(size=(4, 5000)) * 5).astype(np.float32)
  for t in (0.7, 1.3, 3.0, 1e-3):
    want = z / np.float32(t)
    got = jax.jit(lambda z, t: jax.lax.map(lambda r: df.divide(r, t), z))(z, jnp.float32(t))
    np.testing.assert_array_equal(np.asarray(got), want)
  assert np.asarray(df.divide(np.float32([-np.inf, 1.0]), 2.0)).tolist() == [-np.inf, 0.5]


def test_exp_sum_product_and_compare_against_float64():
  rng = np.random.default_rng(1)
  a = (rng.normal(size=20000) * 15).astype(np.float32)
  top = a.max()

  @jax.jit
  def run(a):
    d = df.two_sum(a / jnp.float32(1.0), -top)  # a fused producer: still exact
    e = df.exp_nonpositive(d)
    return d, e, df.total(e)

  d, e, s = run(a)
  exact_d = a.astype(np.float64) - np.float64(top)
  np.testing.assert_array_equal(value(d), exact_d)  # two_sum is error-free
  want = np.exp(exact_d)
  ok = exact_d > -50  # below, the low part is subnormal (values < 2e-22 of the top)
  np.testing.assert_allclose(value(e)[ok], want[ok], rtol=1e-11)
  assert np.all(value(e)[exact_d < -87] == 0)
  assert abs(value(s) - want.sum()) <= 1e-12 * want.sum()
  x, y = rng.normal(size=100), rng.normal(size=100)
  np.testing.assert_allclose(value(jax.jit(df.mul)(df.split(x), df.split(y))), x * y,
                             rtol=1e-13)
  np.testing.assert_allclose(value(jax.jit(df.add)(df.split(x), df.split(y))), x + y,
                             rtol=1e-13)
  hi, lo = df.split(0.95)
  nudged = (hi, np.nextafter(lo, np.float32(1)))  # 0.95 + 8e-16: far below float32 resolution
  assert value(df.add(nudged, (-hi, -lo))) == float(np.nextafter(lo, np.float32(1))) - float(lo)
  assert abs(value(df.split(0.95)) - 0.95) < 1e-15  # float32(0.95) alone is 1.2e-8 off

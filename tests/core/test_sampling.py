"""The two-stage categorical draw: the distribution of one Gumbel-max over the whole row."""

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.core import sampling


def test_frequencies_match_the_softmax_across_blocks_and_padding():
  """300 tokens in blocks of 64 (the last one padded): 50,000 draws of each of two rows,
  every token's count within 5 standard deviations of n·p, and a chi-square far from its
  tail."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 300)).astype(np.float32) * 1.5
  logits[1, 40:200] = -np.inf  # a whole block and parts of two others never drawn
  n = 50_000
  draw = jax.jit(lambda k: sampling.categorical(k, jnp.repeat(jnp.asarray(logits), n, axis=0),
                                                block=64))
  tokens = np.asarray(draw(jax.random.key(3))).reshape(2, n)
  for row in range(2):
    z = logits[row].astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(tokens[row], minlength=300)
    assert counts[p == 0].sum() == 0
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sd + 1e-9)
    live = p > 0
    chi2 = np.sum((counts[live] - n * p[live]) ** 2 / (n * p[live]))
    dof = live.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_the_tail_is_reached_and_draws_repeat_with_the_key():
  """Logits of −200 (probabilities far below float32's reach after exp) are drawn as evenly as
  any; a row with one finite logit always gives it; the same key gives the same draws."""
  z = np.full((3, 2048), -np.inf, np.float32)
  z[0, [5, 700, 2047]] = -200.0  # three equal tail tokens in three blocks
  z[1, 1999] = -1e4
  z[2] = np.linspace(-50, 0, 2048)
  keys = jax.random.split(jax.random.key(0), 3000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sampling.categorical(k, jnp.asarray(z))))(keys))
  counts = np.bincount(draws[:, 0], minlength=2048)[[5, 700, 2047]]
  assert counts.sum() == 3000 and counts.min() > 850
  assert (draws[:, 1] == 1999).all()
  assert np.array_equal(draws, np.asarray(jax.vmap(lambda k: sampling.categorical(
      k, jnp.asarray(z)))(keys)))
  other = np.asarray(sampling.categorical(jax.random.key(1), jnp.asarray(z)))
  assert other.shape == (3,) and other.dtype == np.int32

"""The gated delta rule and the causal convolution of Gated DeltaNet layers against a float64
NumPy recurrence, token by token (the definition), for every chunking."""

import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.models import delta_rule


def recurrence(q, k, v, g, beta, state):
  """float64, one token at a time: S ← e^g S; S += k (β (v − Sᵀk))ᵀ; o = Sᵀq."""
  q, k, v, g, beta, s = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, state))
  out = np.zeros(v.shape)
  s = s.copy()
  for t in range(q.shape[1]):
    s *= np.exp(g[:, t])[..., None, None]
    delta = beta[:, t, :, None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", s, k[:, t]))
    s += np.einsum("bhk,bhv->bhkv", k[:, t], delta)
    out[:, t] = np.einsum("bhkv,bhk->bhv", s, q[:, t])
  return out, s


def inputs(t, seed=0, b=2, h=3, dk=8, dv=5):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(rng.normal(size=(b, t, h, dk))) * dk ** -0.5
  k = unit(rng.normal(size=(b, t, h, dk)))
  v = rng.normal(size=(b, t, h, dv))
  g = -rng.uniform(0.0, 0.3, size=(b, t, h))
  beta = rng.uniform(0.05, 1.0, size=(b, t, h))
  state = rng.normal(size=(b, h, dk, dv)) * 0.3
  return [x.astype(np.float32) for x in (q, k, v, g, beta, state)]


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_rule_equals_the_recurrence(chunk):
  q, k, v, g, beta, s = inputs(37)  # 37: the last chunk is padded for every chunk size but 1
  out, state = delta_rule.gated_delta_rule(q, k, v, g, beta, s, chunk)
  want, want_state = recurrence(q, k, v, g, beta, s)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(state), want_state, atol=2e-5)


def test_two_calls_carry_the_state_and_idle_tokens_change_nothing():
  q, k, v, g, beta, s = inputs(30, seed=1)
  first = delta_rule.gated_delta_rule(q[:, :11], k[:, :11], v[:, :11], g[:, :11], beta[:, :11],
                                      s, 8)
  second = delta_rule.gated_delta_rule(q[:, 11:], k[:, 11:], v[:, 11:], g[:, 11:], beta[:, 11:],
                                       first[1], 8)
  whole = delta_rule.gated_delta_rule(q, k, v, g, beta, s, 8)
  np.testing.assert_allclose(np.concatenate([first[0], second[0]], 1), whole[0], atol=2e-5)
  np.testing.assert_allclose(second[1], whole[1], atol=2e-5)
  idle = [x.copy() for x in (g, beta)]
  for x in idle:
    x[:, 5:9] = 0  # tokens 5-8 idle (padding): decay 1, no write
  keep = np.r_[0:5, 9:30]
  with_idle = delta_rule.gated_delta_rule(q, k, v, idle[0], idle[1], s, 8)
  without = delta_rule.gated_delta_rule(q[:, keep], k[:, keep], v[:, keep], g[:, keep],
                                        beta[:, keep], s, 8)
  np.testing.assert_allclose(np.asarray(with_idle[0])[:, keep], without[0], atol=2e-5)
  np.testing.assert_allclose(with_idle[1], without[1], atol=2e-5)


def test_causal_convolution_and_its_tail():
  rng = np.random.default_rng(2)
  x, tail, w = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 3, 3)), rng.normal(size=(4, 3))
  got = np.asarray(delta_rule.causal_conv(jnp.asarray(x), jnp.asarray(tail), jnp.asarray(w)))
  xs = np.concatenate([tail, x], 1)
  want = np.stack([sum(w[j] * xs[:, t + j] for j in range(4)) for t in range(6)], 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # row 0: real tokens 0-4 (one right pad): its last 3 real inputs; row 1: one real token
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  new = np.asarray(delta_rule.conv_tail(jnp.asarray(x), jnp.asarray(tail), jnp.asarray(mask)))
  np.testing.assert_allclose(new[0], x[0, 2:5], rtol=1e-6)
  np.testing.assert_allclose(new[1], np.concatenate([tail[1, 1:], x[1, :1]]), rtol=1e-6)
  none = np.asarray(delta_rule.conv_tail(jnp.asarray(x), jnp.asarray(tail),
                                         jnp.zeros((2, 6), bool)))
  np.testing.assert_allclose(none, tail.astype(np.float32), rtol=1e-6)

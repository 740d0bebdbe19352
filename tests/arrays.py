"""Shared generators of adversarial logits and masks for the tests."""

import numpy as np


def random_case(rng, batch, vocab, n_valid=None, ties=False, neg_inf=0.0):
  """Logits ``[batch, vocab]`` and a mask with ``n_valid`` valid tokens per row (random if
  None). ``ties`` draws small integers (many ties); ``neg_inf`` is the share of -inf logits."""
  if ties:
    z = rng.integers(-3, 4, size=(batch, vocab)).astype(np.float32)
  else:
    z = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
  if neg_inf:
    z[rng.random((batch, vocab)) < neg_inf] = -np.inf
  m = np.zeros((batch, vocab), bool)
  for b in range(batch):
    k = rng.integers(0, vocab + 1) if n_valid is None else n_valid
    m[b, rng.choice(vocab, size=k, replace=False)] = True
  return z, m

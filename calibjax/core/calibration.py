"""Calibration error (SPEC §3): classic (against observed next tokens) and distributional
(against a target distribution over the vocabulary).

Every binned estimate returns a :class:`Reliability` (the reliability-diagram data and the
ℓ1/ℓ2/ℓ∞ errors), never only a scalar. Whole-vocabulary pair statistics are accumulated one
position at a time (``lax.map``), so memory never holds more than one ``[V]`` row of
temporaries per position.

Bins:
- top-label ``"width"``: ``n_bins`` equal-width bins on [0, 1];
- top-label ``"mass"``: equal-count bins whose cuts are confidence values, so equal
  confidences always share a bin (tie-safe; some bins may then be empty);
- pair-level (full ECE, distributional): bin 0 is ``[0, p_min)``, then ``n_bins - 1``
  log-spaced bins from ``p_min`` to 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from calibjax import errors
from calibjax.core import inputs, pytree
from calibjax.core.rows import map_rows, on_input_mesh, replicate


@pytree.dataclass
class Reliability:
  """Reliability-diagram data and calibration errors.

  Fields:
    edges: ``[n_bins + 1]`` bin edges (for ``"mass"`` bins: the cut values, min and max).
    count: ``[n_bins]`` items per bin (positions, or (position, token) pairs).
    mean_prob: ``[n_bins]`` mean forecast probability in the bin (NaN if empty).
    mean_outcome: ``[n_bins]`` mean outcome (accuracy, label frequency or target probability).
    ece_l1: ``Σ_b w_b |mean_outcome_b − mean_prob_b|`` with ``w_b = count_b / Σ count``;
    ece_l2: ``sqrt(Σ_b w_b (…)²)``; ece_max: the largest gap over non-empty bins.
  """
  edges: jax.Array
  count: jax.Array
  mean_prob: jax.Array
  mean_outcome: jax.Array
  ece_l1: jax.Array
  ece_l2: jax.Array
  ece_max: jax.Array


def _reliability(edges, count, sum_prob, sum_outcome) -> Reliability:
  nonempty = count > 0
  safe = jnp.where(nonempty, count, 1.0)
  mean_p = jnp.where(nonempty, sum_prob / safe, jnp.nan)
  mean_o = jnp.where(nonempty, sum_outcome / safe, jnp.nan)
  gap = jnp.where(nonempty, jnp.abs(mean_o - mean_p), 0.0)
  w = count / jnp.sum(count)
  return Reliability(edges=edges, count=count, mean_prob=mean_p, mean_outcome=mean_o,
                     ece_l1=jnp.sum(w * gap), ece_l2=jnp.sqrt(jnp.sum(w * gap * gap)),
                     ece_max=jnp.max(gap))


def _log_edges(n_bins, p_min):
  return jnp.concatenate([jnp.zeros(1), jnp.logspace(np.log10(p_min), 0.0, n_bins)])


def _log_bin(log_p, n_bins, p_min):
  """Bin of each probability (given as log p) among :func:`_log_edges`."""
  step = -np.log(p_min) / (n_bins - 1)
  k = jnp.floor((log_p - np.log(p_min)) / step).astype(jnp.int32) + 1
  return jnp.clip(jnp.where(log_p < np.log(p_min), 0, k), 0, n_bins - 1)


def _prepare(logits, labels, temperature):
  z, _ = inputs.prepare(logits, temperature=temperature)
  y = jnp.asarray(labels)
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise errors.InputError(f"labels must be integer token ids, got dtype {y.dtype}.")
  if y.shape != z.shape[:-1]:
    raise errors.ShapeMismatchError(
        f"labels of shape {y.shape} must match the leading shape of logits {z.shape}.")
  if not isinstance(y, jax.core.Tracer):
    bad = np.argwhere((np.asarray(y) < 0) | (np.asarray(y) >= z.shape[-1]))
    if bad.size:
      pos = tuple(int(i) for i in bad[0])
      raise errors.InputError(f"labels must lie in [0, V={z.shape[-1]}); position {pos} has "
                              f"{int(np.asarray(y)[pos])} ({len(bad)} bad positions).")
  return (z.reshape(-1, z.shape[-1]), y.reshape(-1).astype(jnp.int32),
          jnp.asarray(temperature, jnp.float32))


def _log_softmax_rows(fn, z, *rows_args, temperature):
  """``fn(log_softmax(z_i / T), *args_i)`` for each row i, one row at a time (no [N, V]
  temporaries)."""
  # the temperature travels with every row: a shard_map may not close over arrays on an
  # Explicit mesh
  t_rows = jnp.broadcast_to(temperature, z.shape[:1])
  return map_rows(lambda zr, tr, *a: fn(jax.nn.log_softmax(zr / tr), *a), z, t_rows,
                  *rows_args, batch_shape=z.shape[:1])


def _top_row(log_p, y):
  top = jnp.max(log_p)
  at_top = log_p == top
  return jnp.exp(top), at_top[y] / jnp.sum(at_top)  # ties at the top share the credit


@functools.partial(jax.jit, static_argnames=("n_bins", "binning"))
def _top_label(z, y, t, n_bins, binning):
  conf, correct = replicate(_log_softmax_rows(_top_row, z, y, temperature=t))
  n = conf.shape[0]
  if binning == "width":
    edges = jnp.linspace(0.0, 1.0, n_bins + 1)
    b = jnp.clip(jnp.floor(conf * n_bins).astype(jnp.int32), 0, n_bins - 1)
  else:
    srt = jnp.sort(conf)
    cuts = srt[(jnp.arange(1, n_bins) * n) // n_bins]
    b = jnp.searchsorted(cuts, conf, side="right")  # equal values -> same bin
    edges = jnp.concatenate([srt[:1], cuts, srt[-1:]])
  seg = lambda x: jax.ops.segment_sum(x, b, num_segments=n_bins)
  return _reliability(edges, seg(jnp.ones_like(conf)), seg(conf), seg(correct))


@on_input_mesh
def top_label_ece(logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 15,
                  binning: str = "width", temperature: ArrayLike = 1.0) -> Reliability:
  """Top-label calibration of ``p = softmax(z / T)`` against observed next tokens.

  Confidence is ``max_v p_v``; the outcome is 1 if the label is the top token. When several
  tokens tie at the top, the outcome is ``1 / #tied`` for a label among them (the expected
  accuracy of a random tie-break), so results do not depend on token order.

  Args:
    logits: ``[..., V]``; labels: int ``[...]`` in ``[0, V)``.
    n_bins: number of bins; binning: ``"width"`` or ``"mass"`` (tie-safe equal-count).

  Returns:
    :class:`Reliability` over positions.

  Example:
    >>> r = top_label_ece(jnp.log(jnp.array([[.8, .2], [.6, .4]])), jnp.array([0, 1]), n_bins=5)
    >>> float(r.ece_l1)  # bin [.8,1): conf .8 acc 1; bin [.6,.8): conf .6 acc 0 -> (.2+.6)/2
    0.4...
  """
  if binning not in ("width", "mass"):
    raise errors.InputError(f"binning must be 'width' or 'mass', got {binning!r}.")
  if n_bins < 1:
    raise errors.InputError(f"n_bins must be >= 1, got {n_bins}.")
  return _top_label(*_prepare(logits, labels, temperature), int(n_bins), binning)


@pytree.dataclass
class ProperScores:
  """Per-position proper scores: ``brier = Σ_v (p_v − [v = y])²``, ``nll = −log p_y``."""
  brier: jax.Array
  nll: jax.Array


def _proper_row(log_p, y):
  p = jnp.exp(log_p)
  return jnp.sum(p * p) - 2 * p[y] + 1, -log_p[y]


_proper = jax.jit(lambda z, y, t: _log_softmax_rows(_proper_row, z, y, temperature=t))


@on_input_mesh
def proper_scores(logits: ArrayLike, labels: ArrayLike,
                  temperature: ArrayLike = 1.0) -> ProperScores:
  """Brier score and negative log-likelihood per position (fields of shape ``[...]``).

  Example:
    >>> s = proper_scores(jnp.log(jnp.array([.5, .5])), jnp.array(0))
    >>> float(s.brier), float(s.nll)   # (.5-1)² + .5² = .5 ; log 2
    (0.5, 0.693...)
  """
  shape = jnp.asarray(labels).shape
  brier, nll = _proper(*_prepare(logits, labels, temperature))
  return ProperScores(brier=brier.reshape(shape), nll=nll.reshape(shape))


def _pair_sums(log_p, outcome, n_bins, p_min):
  """Per-bin count, Σ p and Σ outcome over the tokens of one position."""
  b = _log_bin(log_p, n_bins, p_min)
  cols = jnp.stack([jnp.ones_like(log_p), jnp.exp(log_p), outcome], axis=-1)
  return jax.ops.segment_sum(cols, b, num_segments=n_bins)


@functools.partial(jax.jit, static_argnames=("n_bins", "p_min"))
def _full(z, y, t, n_bins, p_min):
  hit = lambda yy: (jnp.arange(z.shape[-1]) == yy).astype(jnp.float32)
  sums = _log_softmax_rows(lambda lp, yy: _pair_sums(lp, hit(yy), n_bins, p_min), z, y,
                           temperature=t).sum(0)
  return _reliability(_log_edges(n_bins, p_min), sums[:, 0], sums[:, 1], sums[:, 2])


def _check_bins(n_bins, p_min):
  if n_bins < 2 or not 0 < p_min < 1:
    raise errors.InputError(f"need n_bins >= 2 and 0 < p_min < 1, got {n_bins}, {p_min}.")


@on_input_mesh
def full_ece(logits: ArrayLike, labels: ArrayLike, *, n_bins: int = 17, p_min: float = 1e-8,
             temperature: ArrayLike = 1.0) -> Reliability:
  """Calibration over every (position, token) pair: forecast ``p_v``, outcome ``[v = y]``.

  Pairs are binned by ``p`` into ``[0, p_min)`` and ``n_bins − 1`` log-spaced bins up to 1
  (default: half-decade bins from 1e-8); counts are pairs, so ``Σ count = N·V``.

  Example:
    >>> r = full_ece(jnp.zeros((4, 8)), jnp.arange(4))   # p = 1/8 everywhere, 1 in 8 hits
    >>> float(r.ece_l1)
    0.0
  """
  _check_bins(n_bins, p_min)
  return _full(*_prepare(logits, labels, temperature), int(n_bins), float(p_min))


@pytree.dataclass
class DistributionalCalibration:
  """Calibration of ``p`` against a target distribution ``r`` on the vocabulary.

  ``reliability``: pairs binned by ``p`` (as in :func:`full_ece`), outcome = ``r``;
  ``tv``: ``[...]`` per-position ``TV(p, r)``; ``kl_target_to_p``: ``[...]`` ``KL(r ‖ p)``.
  """
  reliability: Reliability
  tv: jax.Array
  kl_target_to_p: jax.Array


@functools.partial(jax.jit, static_argnames=("n_bins", "p_min"))
def _distributional(z, w, t, n_bins, p_min):
  def row(lp, wr):
    r = wr / jnp.sum(wr)
    log_r = jnp.log(r)
    kl = jnp.sum(jnp.where(r > 0, r * (log_r - lp), 0.0))
    return _pair_sums(lp, r, n_bins, p_min), 0.5 * jnp.sum(jnp.abs(jnp.exp(lp) - r)), kl
  sums, tv, kl = _log_softmax_rows(row, z, w, temperature=t)
  sums = sums.sum(0)
  rel = _reliability(_log_edges(n_bins, p_min), sums[:, 0], sums[:, 1], sums[:, 2])
  return DistributionalCalibration(reliability=rel, tv=tv, kl_target_to_p=kl)


@on_input_mesh
def distributional_calibration(logits: ArrayLike, target: ArrayLike, *, n_bins: int = 17,
                               p_min: float = 1e-8,
                               temperature: ArrayLike = 1.0) -> DistributionalCalibration:
  """Calibration error of the model against a target distribution (SPEC §3).

  Args:
    logits: ``[..., V]``.
    target: non-negative weights ``[..., V]`` (or broadcastable), normalised per position;
      e.g. the task's target over answers pushed onto next tokens, zero on invalid tokens.

  Returns:
    :class:`DistributionalCalibration`; ``reliability.ece_l1 = Σ_b w_b |mean p − mean r|``.

  Example:
    >>> d = distributional_calibration(jnp.log(jnp.array([[.5, .5, 0.]])), jnp.array([1., 1, 0]))
    >>> float(d.tv[0]), float(d.reliability.ece_l1)
    (0.0, 0.0)
  """
  _check_bins(n_bins, p_min)
  z, _ = inputs.prepare(logits, temperature=temperature)
  w = inputs.as_weights(target, z.shape)
  if not isinstance(w, jax.core.Tracer):
    bad = np.argwhere(~np.all(np.asarray(w) >= 0, axis=-1) | ~(np.asarray(w).sum(-1) > 0))
    if bad.size:
      raise errors.InputError(f"target rows must be non-negative with positive sum; row "
                              f"{tuple(int(i) for i in bad[0])} is not.")
  vocab = z.shape[-1]
  out = _distributional(z.reshape(-1, vocab), w.reshape(-1, vocab),
                        jnp.asarray(temperature, jnp.float32), int(n_bins), float(p_min))
  lead = z.shape[:-1]
  return out.replace(tv=out.tv.reshape(lead), kl_target_to_p=out.kl_target_to_p.reshape(lead))

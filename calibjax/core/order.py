"""Order calibration (SPEC §1): are valid tokens ranked above invalid ones?

Tokens are ranked by logit, descending. Rank-based quantities count ties as halves
(Mann–Whitney); threshold quantities (``best_f1``, ``recall_at_precision``, ``k_all_valid``)
use tie-closed cutoffs ``{u : z_u ≥ t}``. Nothing depends on token order. Definitions that
SPEC leaves open are fixed in ``docs/semantics.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from calibjax import errors
from calibjax.core import dispatch, inputs, pytree
from calibjax.core.ranks import METHODS, ValidRanks, valid_ranks
from calibjax.core.rows import map_rows, on_input_mesh


@pytree.dataclass
class OrderStats:
  """Order metrics per row (shape ``[...]``, the logits' leading shape).

  Float fields are NaN where ``defined`` is False. Fields:
    auroc: ``P(z_v > z_u) + ½ P(z_v = z_u)``, v valid, u invalid.
    order_error: ``1 - auroc``.
    average_precision: mean over valid v of the precision at v's rank; a tie group of size
      ``e`` with ``e_v`` valid members counts ``(e - 1) / 2`` tokens and ``(e_v - 1) / 2``
      valid tokens above each member (midranks).
    best_f1: max F1 over tie-closed cutoffs.
    clean_head: number of valid tokens strictly above every invalid token.
    k_all_valid: size of the tie-closed top-k set that keeps every valid token.
    margin: ``min valid z - max invalid z`` (0 when both are -inf).
    n_valid: int32 number of valid tokens (always defined).
    finite: no NaN/+inf logit and at least one logit > -inf.
    has_valid / has_invalid: ``n_valid > 0`` / ``n_valid < V``.
    capacity_ok: the row's valid count fits ``max_valid`` (always True when not given).
    defined: all four flags.
  """
  auroc: jax.Array
  order_error: jax.Array
  average_precision: jax.Array
  best_f1: jax.Array
  clean_head: jax.Array
  k_all_valid: jax.Array
  margin: jax.Array
  n_valid: jax.Array
  finite: jax.Array
  has_valid: jax.Array
  has_invalid: jax.Array
  capacity_ok: jax.Array
  defined: jax.Array


def _prepare(logits, valid_mask, max_valid, method):
  """Normalised logits and mask, and the slot capacity."""
  if method not in METHODS:
    raise errors.InputError(f"method must be one of {METHODS}, got {method!r}.")
  z, m = inputs.prepare(logits, valid_mask, mask_required=True)
  return z, m, inputs.capacity(m, max_valid)


def _slot_stats(r: ValidRanks, vocab: int):
  """Per-slot tie-closed cutoff counts: TP (valid kept) and k (kept) at threshold s_j."""
  real = jnp.arange(r.s.shape[-1]) < r.n_valid[..., None]
  tp = r.gt_val + r.eq_val
  k = r.gt_all + r.eq_all
  return real, tp.astype(jnp.float32), k.astype(jnp.float32)


def _flags(r: ValidRanks, vocab: int):
  finite = r.finite
  has_valid = r.n_valid > 0
  has_invalid = r.n_valid < vocab
  return finite, has_valid, has_invalid, finite & has_valid & has_invalid & r.capacity_ok


@functools.partial(jax.jit, static_argnames=("cap", "method", "implementation"))
def _order_stats(z, m, cap, method, implementation):
  vocab = z.shape[-1]
  r = valid_ranks(z, m, cap, method, implementation=implementation)
  finite, has_valid, has_invalid, defined = _flags(r, vocab)
  real, tp, k = _slot_stats(r, vocab)
  n = r.n_valid.astype(jnp.float32)
  n_inv = vocab - n
  gt_inv = (r.gt_all - r.gt_val).astype(jnp.float32)
  eq_inv = (r.eq_all - r.eq_val).astype(jnp.float32)
  below_inv = n_inv[..., None] - gt_inv - eq_inv
  total = lambda x: jnp.sum(jnp.where(real, x, 0.0), axis=-1)
  auroc = total(below_inv + 0.5 * eq_inv) / (n * n_inv)
  mid_valid = r.gt_val + 0.5 * (r.eq_val + 1)
  mid_all = r.gt_all + 0.5 * (r.eq_all + 1)
  ap = total(mid_valid / mid_all) / n
  best_f1 = jnp.max(jnp.where(real, 2 * tp / (k + n[..., None]), -jnp.inf), axis=-1)
  clean = total(((gt_inv == 0) & (eq_inv == 0)).astype(jnp.float32))
  s0 = r.s[..., 0]
  margin = jnp.where(s0 == r.max_invalid, 0.0, s0 - r.max_invalid)
  nan = lambda x: jnp.where(defined, x, jnp.nan)
  return OrderStats(
      auroc=nan(auroc), order_error=nan(1 - auroc), average_precision=nan(ap),
      best_f1=nan(best_f1), clean_head=nan(clean), k_all_valid=nan(k[..., 0]),
      margin=nan(margin), n_valid=r.n_valid, finite=finite, has_valid=has_valid,
      has_invalid=has_invalid, capacity_ok=r.capacity_ok, defined=defined)


@on_input_mesh
def order_stats(logits: ArrayLike, valid_mask: ArrayLike, *, max_valid: int | None = None,
                method: str = "threshold", implementation: str | None = None) -> OrderStats:
  """Order metrics of SPEC §1 for every row of ``logits [..., V]``.

  Args:
    logits: ``[..., V]`` logits (any float dtype; upcast to float32). ``-inf`` is legal.
    valid_mask: bool ``[..., V]`` (or broadcastable to it), True for valid tokens.
    max_valid: static bound on valid tokens per row. ``None`` reads it from a concrete mask;
      under ``jit`` pass it, or every row is provisioned for ``V`` valid tokens (slow).
      Rows above it get ``capacity_ok = False`` and NaN metrics.
    method: ``"threshold"`` (sort-free, default) or ``"sort"`` (reference; same numbers).
    implementation: ``"xla"``, ``"pallas"`` (counts from :mod:`calibjax_kernels.valid_rank_counts`)
      or None (best for the backend), see :mod:`calibjax.core.dispatch`; the same numbers.

  Returns:
    :class:`OrderStats` with fields of shape ``[...]``. NaN/+inf rows, rows with no valid or
    no invalid token give NaN metrics and a False flag; nothing raises for values.

  Raises:
    ShapeMismatchError: mask and logits disagree. InputError: non-bool mask, bad method.

  Example:
    >>> s = order_stats(jnp.array([3.0, 2.0, 1.0, 0.0]), jnp.array([True, False, True, False]))
    >>> float(s.auroc)   # pairs (3>2, 3>0, 1<2, 1>0) -> 3/4
    0.75
  """
  z, m, cap = _prepare(logits, valid_mask, max_valid, method)
  return _order_stats(z, m, cap, method, dispatch.resolve(implementation))


@functools.partial(jax.jit, static_argnames=("cap", "method", "implementation"))
def _recall_at_precision(z, m, tau, cap, method, implementation):
  r = valid_ranks(z, m, cap, method, implementation=implementation)
  *_, defined = _flags(r, z.shape[-1])
  real, tp, k = _slot_stats(r, z.shape[-1])
  ok = real & (tp >= jnp.asarray(tau, jnp.float32)[..., None] * k)
  best = jnp.max(jnp.where(ok, tp, 0.0), axis=-1) / r.n_valid
  return jnp.where(defined, best, jnp.nan)


@on_input_mesh
def recall_at_precision(logits: ArrayLike, valid_mask: ArrayLike, tau: ArrayLike, *,
                        max_valid: int | None = None, method: str = "threshold",
                        implementation: str | None = None) -> jax.Array:
  """``max {recall(t) : precision(t) ≥ τ}`` over tie-closed cutoffs ``{z ≥ t}``; 0 if none.

  ``tau`` is a scalar or an array broadcastable to the leading shape ``[...]``; a new value
  does not recompile. Returns float32 ``[...]``, NaN where the order metrics are undefined
  (see :func:`order_stats` for the other arguments).

  Example:
    >>> float(recall_at_precision(jnp.array([3.0, 2.0, 1.0]), jnp.array([True, False, True]), 0.6))
    1.0
  """
  z, m, cap = _prepare(logits, valid_mask, max_valid, method)
  return _recall_at_precision(z, m, tau, cap, method, dispatch.resolve(implementation))


@pytree.dataclass
class CutoffCurve:
  """Precision / recall / validity of the top-r set, per row and cutoff (``[..., R]``).

  ``threshold`` is the r-th largest logit. When that logit is tied across the cutoff, the
  tied tokens count fractionally (the expectation over random tie-breaking), so the numbers
  never depend on token order. ``validity`` = ``p(valid ∩ top r) / p(top r)`` at the given
  temperature.
  """
  cutoffs: jax.Array
  threshold: jax.Array
  precision: jax.Array
  recall: jax.Array
  validity: jax.Array


def _row_curve(z, m, r, temperature, k):
  # descending; materialised: XLA otherwise fused top_k into the tie count over the row
  # below (20x slower: 0.6 s for 16 rows of 262,144)
  d, idx = jax.lax.optimization_barrier(jax.lax.top_k(z, k))
  dv = jnp.take(m, idx).astype(jnp.float32)
  a = z / temperature
  lse = jax.nn.logsumexp(a)
  pd = jnp.exp(d / temperature - lse)
  cum = lambda x: jnp.concatenate([jnp.zeros(1), jnp.cumsum(x)])
  cv, cm, cvm = cum(dv), cum(pd), cum(pd * dv)
  r = jnp.clip(r, 1, k)
  t = jnp.take(d, r - 1)
  gt = jnp.searchsorted(-d, -t, side="left")
  end = jnp.searchsorted(-d, -t, side="right")
  # The last listed value may continue past the list: count its ties over the whole row.
  last = d[k - 1]
  tie_all = jnp.sum(z == last, dtype=jnp.float32)
  tie_val = jnp.sum((z == last) & m, dtype=jnp.float32)
  at_end = t == last
  eq_all = jnp.where(at_end, tie_all, (end - gt).astype(jnp.float32))
  eq_val = jnp.where(at_end, tie_val, jnp.take(cv, end) - jnp.take(cv, gt))
  pt = jnp.exp(t / temperature - lse)
  frac = (r - gt) / eq_all
  kept_valid = jnp.take(cv, gt) + frac * eq_val
  kept_mass = jnp.take(cm, gt) + frac * eq_all * pt
  kept_vmass = jnp.take(cvm, gt) + frac * eq_val * pt
  n = jnp.sum(m, dtype=jnp.float32)
  return t, kept_valid / r, kept_valid / n, kept_vmass / kept_mass


@functools.partial(jax.jit, static_argnames=("k",))
def _cutoff_curve(z, m, cutoffs, temperature, k):
  batch = z.shape[:-1]
  r = jnp.broadcast_to(cutoffs, batch + cutoffs.shape[-1:])
  t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), batch)
  thr, prec, rec, val = map_rows(lambda *x: _row_curve(*x, k), z, m, r, t, batch_shape=batch)
  finite = inputs.row_finite(z)[..., None]
  nan = lambda x: jnp.where(finite, x, jnp.nan)
  return CutoffCurve(cutoffs=r, threshold=nan(thr), precision=nan(prec), recall=nan(rec),
                     validity=nan(val))


@on_input_mesh
def cutoff_curve(logits: ArrayLike, valid_mask: ArrayLike, cutoffs: ArrayLike,
                 temperature: ArrayLike = 1.0, *, max_cutoff: int | None = None) -> CutoffCurve:
  """Precision, recall and validity of the top-``r`` set for each requested cutoff ``r``.

  ``precision(r) = #valid in top r / r``, ``recall(r) = #valid in top r / n_val``,
  ``validity(r) = p(valid ∩ top r) / p(top r)`` with ``p = softmax(z / T)``.

  Args:
    logits: ``[..., V]``; valid_mask: bool ``[..., V]``.
    cutoffs: int ``[R]`` (shared by all rows) or ``[..., R]``, each in ``[1, V]``.
    temperature: scalar or ``[...]``, > 0; a new value does not recompile.
    max_cutoff: static bound on the cutoffs. ``None`` reads it from concrete cutoffs (else
      ``V``). Only the top ``max_cutoff`` logits are selected (``top_k``), never a full sort.

  Returns:
    :class:`CutoffCurve` with fields ``[..., R]``; NaN for non-finite rows; ``recall`` is NaN
    for rows without valid tokens.

  Example:
    >>> c = cutoff_curve(jnp.array([3.0, 2.0, 1.0]), jnp.array([True, False, True]), [1, 2, 3])
    >>> c.precision.tolist(), c.recall.tolist()
    ([1.0, 0.5, 0.6666666865348816], [0.5, 0.5, 1.0])
  """
  z, m = inputs.prepare(logits, valid_mask, temperature=temperature, mask_required=True)
  vocab = z.shape[-1]
  r = jnp.asarray(cutoffs)
  if r.ndim < 1 or not jnp.issubdtype(r.dtype, jnp.integer):
    raise errors.InputError(f"cutoffs must be an int array [R] or [..., R], got {r.dtype} "
                            f"of shape {r.shape}.")
  if not isinstance(r, jax.core.Tracer):
    bad = np.asarray(r)[(np.asarray(r) < 1) | (np.asarray(r) > vocab)]
    if bad.size:
      raise errors.InputError(f"cutoffs must lie in [1, V={vocab}], got {bad[:5].tolist()}.")
    if max_cutoff is None:
      max_cutoff = int(np.max(np.asarray(r)))
  k = vocab if max_cutoff is None else min(vocab, 1 << (int(max_cutoff) - 1).bit_length())
  return _cutoff_curve(z, m, r.astype(jnp.int32), temperature, k)

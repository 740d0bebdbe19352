"""How far the best single global parameter of a rule falls short of the per-position oracle
(SPEC §5): a host-side analysis over truncation sweeps."""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.typing import ArrayLike

from calibjax import errors
from calibjax.core import oracle, truncation


@dataclasses.dataclass(frozen=True)
class OracleGap:
  """A rule's best single global parameter against the per-position oracle (means over the
  rows where both are defined).

  ``values`` and ``mean_recall``/``mean_validity``/``mean_precision``/``mean_f1`` ``[S]``
  describe the sweep; ``best_*`` the best global value (NaN if none meets the constraint);
  ``oracle_*`` the per-position oracle cutoffs; ``recall_gap = oracle_recall − best_recall``.
  """
  rule: str
  objective: str
  tau: float
  values: np.ndarray
  mean_recall: np.ndarray
  mean_validity: np.ndarray
  mean_precision: np.ndarray
  mean_f1: np.ndarray
  best_index: int
  best_value: float
  best_recall: float
  best_validity: float
  oracle_recall: float
  oracle_validity: float
  recall_gap: float
  positions: int


def oracle_gap(logits: ArrayLike, valid_mask: ArrayLike, rule: str, values, *,
               objective: str = "validity", tau: float = 0.95,
               temperature: float = 1.0) -> OracleGap:
  """How far the best single parameter of ``rule`` falls short of the per-position oracle.

  The rule is evaluated at every value of ``values`` in one sweep over all positions
  ``[..., V]``; the global value is chosen on position means (max mean recall subject to mean
  validity (or precision) ≥ τ; or max mean F1), and compared with the means of
  :func:`oracle_cutoff`. A host-side helper: returns NumPy values.
  """
  if rule not in truncation.RULES:
    raise errors.InputError(f"oracle_gap needs a rule of {truncation.RULES}, got {rule!r}.")
  tr = truncation.truncate(logits, rule, truncation.sweep(values), temperature=temperature,
                           valid_mask=valid_mask, return_keep=False)
  orc = oracle.oracle_cutoff(logits, valid_mask, objective, tau, temperature)
  rows = np.asarray(orc.defined).ravel()
  if not rows.any():
    raise errors.InputError("oracle_gap: no position has both valid and invalid tokens.")
  flat = lambda x: np.asarray(x, np.float64).reshape(len(np.asarray(tr.recall)), -1)[:, rows]
  recall, validity, precision = flat(tr.recall), flat(tr.validity), flat(tr.precision)
  n_valid = flat(tr.n_valid)
  f1 = 2 * flat(tr.kept_valid) / (flat(tr.kept_count) + n_valid)
  means = [x.mean(axis=1) for x in (recall, validity, precision, f1)]
  if objective == "f1":
    score = means[3]
  else:
    constraint = means[1] if objective == "validity" else means[2]
    score = np.where(constraint >= tau, means[0], -np.inf)
  best = int(np.argmax(score))
  ok = np.isfinite(score[best])
  pick = lambda x: float(x[best]) if ok else float("nan")
  o_recall = float(np.asarray(orc.recall).ravel()[rows].mean())
  return OracleGap(
      rule=rule, objective=objective, tau=float(tau), values=np.asarray(values, np.float64),
      mean_recall=means[0], mean_validity=means[1], mean_precision=means[2], mean_f1=means[3],
      best_index=best if ok else -1, best_value=pick(np.asarray(values, np.float64)),
      best_recall=pick(means[0]), best_validity=pick(means[1]), oracle_recall=o_recall,
      oracle_validity=float(np.asarray(orc.validity).ravel()[rows].mean()),
      recall_gap=o_recall - pick(means[0]), positions=int(rows.sum()))

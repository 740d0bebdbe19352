"""Oracle cutoffs (SPEC §5): the best any rank cutoff could do, knowing the valid set.

Candidate cutoffs are tie-closed, ``{u : z_u ≥ s_j}`` at each valid logit ``s_j``: every
objective here improves only when a valid token enters, so its optimum is at one of them.
They are read off the sort-free valid-rank counts of :mod:`calibjax.core.ranks` (with masses), so
no vocabulary is sorted. Among equally good cutoffs the smallest is chosen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from calibjax import errors
from calibjax.core import dispatch, inputs, pytree
from calibjax.core.ranks import valid_ranks
from calibjax.core.rows import on_input_mesh

OBJECTIVES = ("validity", "f1", "precision")


@pytree.dataclass
class OracleCutoff:
  """The oracle rank cutoff per row (``[...]``; NaN where ``defined`` is False).

  Fields:
    r_star: size of the chosen tie-closed cutoff (= ``k_star``, the top-k parameter there).
    z_star: its logit: the cutoff keeps exactly the tokens with ``z ≥ z_star``.
    p_star: ``p(top r*)``, the top-p parameter that selects it; min_p_star:
      ``p_(r*) / p_(1)``; epsilon_star: ``p_(r*)`` (``p_(r*)``: the probability of the last kept
      token).
    recall, precision, validity, f1, kept_valid, kept_invalid, kept_mass: of that cutoff.
    feasible: some cutoff meets the constraint (``validity``/``precision`` objectives);
      otherwise the smallest cutoff holding a valid token is reported.
    defined: finite row with valid and invalid tokens, within ``max_valid``.
  """
  r_star: jax.Array
  z_star: jax.Array
  k_star: jax.Array
  p_star: jax.Array
  min_p_star: jax.Array
  epsilon_star: jax.Array
  recall: jax.Array
  precision: jax.Array
  validity: jax.Array
  f1: jax.Array
  kept_valid: jax.Array
  kept_invalid: jax.Array
  kept_mass: jax.Array
  feasible: jax.Array
  defined: jax.Array


@functools.partial(jax.jit, static_argnames=("cap", "method", "objective", "implementation"))
def _oracle(z, m, tau, temperature, cap, method, objective, implementation):
  r = valid_ranks(z, m, cap, method, temperature, implementation)
  cap_slots = r.s.shape[-1]
  real = jnp.arange(cap_slots) < r.n_valid[..., None]
  n = r.n_valid[..., None].astype(jnp.float32)
  tp = (r.gt_val + r.eq_val).astype(jnp.float32)
  k = (r.gt_all + r.eq_all).astype(jnp.float32)
  mass = r.gt_mass + r.eq_mass
  p_valid = jnp.where(real, r.p_slot, 0.0)
  vmass = jnp.cumsum(p_valid[..., ::-1], axis=-1)[..., ::-1]  # valid mass at or above slot
  # tied valid slots share a cutoff: take the tie group's first slot
  lo = r.n_valid[..., None] - r.gt_val - r.eq_val
  vmass = jnp.take_along_axis(vmass, jnp.minimum(lo, cap_slots - 1), axis=-1)
  recall, precision, validity = tp / n, tp / k, vmass / mass
  f1 = 2 * tp / (k + n)
  tau = jnp.asarray(tau, jnp.float32)[..., None]
  if objective == "f1":
    score, ok = f1, real
  else:
    ok = real & ((validity if objective == "validity" else precision) >= tau)
    score = recall
  score = jnp.where(ok, score, -jnp.inf)
  best = cap_slots - 1 - jnp.argmax(score[..., ::-1], axis=-1)  # ties: the smallest cutoff
  feasible = jnp.any(ok, axis=-1)
  j = jnp.where(feasible, best, jnp.maximum(r.n_valid - 1, 0))[..., None]
  at = lambda x: jnp.take_along_axis(x, j, axis=-1)[..., 0]
  defined = r.finite & (r.n_valid > 0) & (r.n_valid < z.shape[-1]) & r.capacity_ok
  nan = lambda x: jnp.where(defined, x, jnp.nan)
  return OracleCutoff(
      r_star=nan(at(k)), z_star=nan(at(r.s)), k_star=nan(at(k)), p_star=nan(at(mass)),
      min_p_star=nan(at(r.p_slot) / r.p_max), epsilon_star=nan(at(r.p_slot)),
      recall=nan(at(recall)), precision=nan(at(precision)), validity=nan(at(validity)),
      f1=nan(at(f1)), kept_valid=nan(at(tp)), kept_invalid=nan(at(k - tp)),
      kept_mass=nan(at(mass)), feasible=feasible & defined, defined=defined)


@on_input_mesh
def oracle_cutoff(logits: ArrayLike, valid_mask: ArrayLike, objective: str = "validity",
                  tau: ArrayLike = 0.95, temperature: ArrayLike = 1.0, *,
                  max_valid: int | None = None, method: str = "threshold",
                  implementation: str | None = None) -> OracleCutoff:
  """The tie-closed rank cutoff ``r*`` that maximises an objective, per row.

  Objectives: ``"validity"`` — max recall subject to validity ≥ τ (default); ``"f1"`` — max
  F1; ``"precision"`` — max recall subject to precision ≥ τ. Validity is under
  ``softmax(z / T)``. ``tau``/``temperature``: scalars or ``[...]``; new values do not
  recompile. ``max_valid``/``method``/``implementation``: as in :func:`calibjax.order_stats`.

  Example:
    >>> o = oracle_cutoff(jnp.log(jnp.array([.4, .3, .2, .1])),
    ...                   jnp.array([True, False, True, False]), tau=0.6)
    >>> float(o.r_star), float(o.recall), float(o.validity)   # {.4,.3,.2}: 6/9 valid mass
    (3.0, 1.0, 0.666...)
  """
  if objective not in OBJECTIVES:
    raise errors.InputError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
  z, m = inputs.prepare(logits, valid_mask, temperature=temperature, mask_required=True)
  return _oracle(z, m, tau, temperature, inputs.capacity(m, max_valid), method, objective,
                 dispatch.resolve(implementation))


def validity_cutoffs(z: jax.Array, m: jax.Array, taus: jax.Array, temperature: float,
                     max_valid: int, implementation: str | None = None) -> OracleCutoff:
  """:func:`oracle_cutoff` with the validity objective for several τ at once: fields
  ``[S, ...]`` for ``taus [S]``, the valid ranks counted once for all of them (they do not
  depend on τ). For callers under ``jit``: ``z``/``m`` already normalised
  (:mod:`calibjax.core.inputs`); ``max_valid`` as in :func:`oracle_cutoff`."""
  cap, impl = inputs.capacity(m, max_valid), dispatch.resolve(implementation)
  return jax.vmap(lambda tau: _oracle(z, m, tau, temperature, cap, "threshold", "validity",
                                      impl))(taus)

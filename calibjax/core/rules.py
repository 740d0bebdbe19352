"""The truncation rules (SPEC §4), one :class:`Rule` each: its name, parameter range, score,
cut and default sweeps — the one registry that :func:`calibjax.truncate`, the sequence
engine, ``frontier`` and the benchmark read.

Every rule is a cut ``x_v ≥ θ`` on a per-token score ``x`` of ``a = z / T`` (tie-inclusive):

====================  ===================  =============================================
rule                  score ``x``          cut ``θ``
====================  ===================  =============================================
``top_k`` (k ≥ 1)     ``a``                the k-th largest ``a`` (radix selection)
``top_p`` (P ∈ (0,1]) ``a``                largest ``a`` value with ``p(a ≥ θ) ≥ P``
``min_p`` (α ∈ [0,1]) ``log p``            ``log α + log max p``
``epsilon`` (ε)       ``log p``            ``min(log ε, log max p)``
``eta`` (ε)           ``log p``            ``min(log ε, ½ log ε − H(p), log max p)``
``typical`` (τ)       ``−|−log p − H(p)|`` shortest most-typical prefix with mass ≥ τ
``top_n_sigma`` (n)   ``a``                ``max a − n·σ(a)``, σ over finite logits
``oracle_set``        valid mask           keep exactly the valid set
``oracle_rank`` (τ)   ``a``                the oracle cutoff ``r*`` (SPEC §5), found by
                                           :func:`calibjax.oracle_cutoff`
====================  ===================  =============================================

The cut is clamped so that the most probable token (the most typical one for ``typical``; ties
included) is always kept. ``top_k``, ``top_p`` and ``typical`` find their cut with
:func:`calibjax.core.selection.select`, whose answer is always one of the row's own values.

To add a rule: write its cut (``(a, m, params, params_lo, exact_a) -> Cut``, one row, ``S``
parameter values), give it a :class:`Rule` in :data:`REGISTRY` and, if the kernels must
recompute its score, a score in :mod:`calibjax_kernels.threshold_stats`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.core import double_float, selection


class Cut(NamedTuple):
  """One row's cut: score ``x [V]``, cuts ``θ [S]``, the reported thresholds ``[S]`` and the
  constants ``(c₁, c₂, c₃)`` from which :mod:`calibjax_kernels.threshold_stats` recomputes
  ``x`` bit for bit (with the rule's ``score``)."""
  x: jax.Array
  theta: jax.Array
  threshold: jax.Array
  consts: tuple


def softmax_parts(a):
  """Row max, Σ exp(a − max), its log, and p; p = e / Σe keeps 1/ulp accuracy when |a| is
  large (small T), where exp(a − lse) would carry the rounding of lse."""
  top = jnp.max(a)
  e = jnp.exp(a - top)
  total = jnp.sum(e)
  # computed once: XLA may otherwise recompute a reduction in two fusions with different
  # summation orders, and a cut clamped to max(x) would then miss the top token
  return jax.lax.optimization_barrier((top, total, jnp.log(total), e / total))


def logit_threshold(theta, consts):
  """For a rule whose score is ``"logit"`` (``x = (a − c₁) − c₂`` in float32, ``consts =
  (c₁, c₂, c₃)`` of its :class:`Cut`): the smallest float32 ``θ_a`` with ``(θ_a − c₁) − c₂ ≥
  θ``, per cut ``θ [S]``. Each float32 operation is non-decreasing in ``a``, so ``x_v ≥ θ ⟺
  a_v ≥ θ_a`` token for token (ties and rounding at the cut included): cuts of different
  rules on the same ``a`` can then share one pass over the row. Found by bisection on the
  float keys (32 steps over ``[S]``, nothing over the row); ``θ`` itself when ``x = a``."""
  if all(isinstance(c, np.floating) and c == 0 for c in consts[:2]):
    return theta
  score = lambda c: (c - consts[0]) - consts[1]
  lo = jnp.full(theta.shape, selection.float_key(jnp.float32(-jnp.inf)))
  hi = jnp.full(theta.shape, selection.float_key(jnp.float32(jnp.inf)))

  def halve(_, bounds):  # invariant: score(hi) ≥ θ (or hi = +inf), score(lo) < θ
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    up = score(selection.key_float(mid)) >= theta
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)
  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  low_ok = score(jnp.float32(-jnp.inf)) >= theta  # θ = −inf: every token
  return jnp.where(low_ok, -jnp.inf, selection.key_float(hi))


# A float32 cumulative mass this close to its target is re-decided in double-float arithmetic.
# The histograms' float32 masses were measured at most 2.0e-7 from float64 (flat and
# heavy-tailed rows of 262,144 tokens, 32 targets each; BUILD_NOTES): a 20x margin.
NEAR = 4e-6


def select_value(x, weights, targets, alive):
  """Largest value of ``x`` with weight at or above it ≥ target, clamped to the alive
  tokens' range (an unreachable target keeps every alive token; the top is always kept).
  Also whether each float32 decision is near (:data:`NEAR`) its target."""
  key, above, at_or_above = selection.select(selection.float_key(x), weights, targets,
                                             with_masses=True)
  lowest = selection.float_key(jnp.min(jnp.where(alive, x, jnp.inf)))
  highest = selection.float_key(jnp.max(jnp.where(alive, x, -jnp.inf)))
  near = ((at_or_above - targets < NEAR) | (targets - above < NEAR)) & jnp.isfinite(targets)
  return selection.key_float(jnp.clip(key, lowest, highest)), near


# Relative error bound of XLA's float32 exp (measured at most 1.35 ulp on [-87, 0]): 4 ulp.
_EXP_ERROR = 4 * 2.0 ** -24


def exact_mass_cut(x, a, alive, theta, near, target):
  """The cuts ``θ_s`` re-decided exactly where ``near``: the largest value ``c`` of ``x``
  with ``Σ_{x ≥ c} p ≥ P_s``, ``p ∝ exp(a)`` for the correctly rounded ``a = z / T`` (a
  callable: computed here only), ``P_s = target`` a double-float pair. Starting from the
  float32 cut, it steps one value up or down while that is wrong.

  Each comparison ``M(c) ≥ P·S`` is first made with float32 ``exp`` summed exactly
  (double-float sums) and settled when its margin exceeds what the exps' rounding
  (:data:`_EXP_ERROR`) can move; the few that it cannot settle are made again with every
  ``exp`` in double-float too (:mod:`calibjax.core.double_float`, ~1e-13 relative)."""
  a = a()
  top = jnp.max(jnp.where(alive, a, -jnp.inf))
  d = double_float.two_sum(jnp.where(alive, a, top), -top)
  e32 = (jnp.where(alive, jnp.exp(d[0]), 0.0), jnp.zeros_like(d[0]))
  up = lambda c: jnp.min(jnp.where(alive & (x > c), x, jnp.inf))
  down = lambda c: jnp.max(jnp.where(alive & (x < c), x, -jnp.inf))

  def walk(c, p, e, whole, error):
    """The cut from ``c`` with masses ``e`` (total ``whole``); and whether some comparison
    was within ``error`` (relative) of its target."""
    need = double_float.mul(p, whole)

    def verdict(c):  # (c too low, c too high, unsure), from M(c) and M(next value up)
      kept = alive & (x[None, :] >= jnp.stack([c, up(c)])[:, None])
      m = double_float.total(tuple(jnp.where(kept, part, 0.0) for part in e))
      gap = double_float.add(m, (-need[0], -need[1]))[0]
      unsure = jnp.any(jnp.abs(gap) <= error * (m[0] + need[0]) + 1e-30 * whole[0])
      enough = gap >= 0
      return enough[1] & jnp.isfinite(up(c)), ~enough[0] & jnp.isfinite(down(c)), unsure

    def step(state):
      c, (low, high, unsure), seen = state
      c = jnp.where(low, up(c), jnp.where(high, down(c), c))
      v = verdict(c)
      return c, v, seen | v[2]

    first = verdict(c)
    c, _, unsure = jax.lax.while_loop(lambda s: s[1][0] | s[1][1], step, (c, first, first[2]))
    return c, unsure

  def each(e, error, todo, theta):
    """Walks the cuts ``todo`` with masses ``e``: (cuts, unsure flags)."""
    whole = double_float.total(e)
    return jax.lax.map(lambda args: jax.lax.cond(
        args[1], lambda c: walk(c, args[2:], e, whole, error),
        lambda c: (c, jnp.zeros((), bool)), args[0]), (theta, todo, *target))

  theta, unsure = each(e32, _EXP_ERROR, near, theta)

  def exact():  # every exp in double-float, once per row, for the unsettled cuts
    e = tuple(jnp.where(alive, part, 0.0) for part in double_float.exp_nonpositive(d))
    return each(e, 0.0, unsure, theta)[0]
  return jax.lax.cond(jnp.any(unsure), exact, lambda: theta)


def mass_cut(x, exact_a, alive, p, params, params_lo):
  """``top_p`` / ``typical``: the largest ``x`` value whose kept mass reaches ``P``; float32
  selection, then an exact re-decision of the rows' near cuts (only when some cut is near)."""
  # P = 1 (τ = 1) keeps every token of positive probability: exact, whatever float32 sums do
  # (a P just below 1 that float32 rounds to 1 has a negative remainder: decided exactly).
  targets = jnp.where((params >= 1.0) & (params_lo >= 0.0), jnp.inf, params)
  theta, near = select_value(x, p, targets, alive)
  return jax.lax.cond(
      jnp.any(near),
      lambda: exact_mass_cut(x, exact_a, alive, theta, near, (targets, params_lo)),
      lambda: theta)


def _row(a):
  """What every cut starts from: max, log Σ exp(a − max), p, the alive tokens, and
  ``θ ↦ p(θ)`` for cuts on ``a``."""
  top, _, log_total, p = softmax_parts(a)
  return top, log_total, p, a > -jnp.inf, lambda theta: jnp.exp(theta - top - log_total)


_ZERO = np.float32(0.0)
_PLAIN = (_ZERO, _ZERO, _ZERO)  # the kernels' score "logit": x = (a - 0) - 0 = a


def _top_k(a, m, params, params_lo, exact_a):
  _, _, _, alive, as_prob = _row(a)
  theta, _ = select_value(a, alive.astype(jnp.float32), params, alive)
  return Cut(a, theta, as_prob(theta), _PLAIN)


def _top_p(a, m, params, params_lo, exact_a):
  _, _, p, alive, as_prob = _row(a)
  theta = mass_cut(a, exact_a, alive, p, params, params_lo)
  return Cut(a, theta, as_prob(theta), _PLAIN)


def _top_n_sigma(a, m, params, params_lo, exact_a):
  top, _, _, alive, as_prob = _row(a)
  n_alive = jnp.sum(alive)
  mean = jnp.sum(jnp.where(alive, a, 0.0)) / n_alive
  sigma = jnp.sqrt(jnp.sum(jnp.where(alive, (a - mean) ** 2, 0.0)) / n_alive)
  theta = jnp.minimum(top - params * sigma, top)
  return Cut(a, theta, as_prob(theta), _PLAIN)


def _typical(a, m, params, params_lo, exact_a):
  top, log_total, p, alive, _ = _row(a)
  log_p = a - top - log_total
  entropy = -jnp.sum(jnp.where(alive, p * log_p, 0.0))
  x = jax.lax.optimization_barrier(jnp.where(alive, -jnp.abs(-log_p - entropy), -jnp.inf))
  theta = mass_cut(x, exact_a, alive, p, params, params_lo)
  return Cut(x, theta, -theta, (top, log_total, entropy))


def _oracle_rank(a, m, params, params_lo, exact_a):
  """``params``: the oracle cutoff on ``a``, found by :func:`calibjax.truncate_chain`."""
  top, _, _, _, as_prob = _row(a)
  theta = jnp.minimum(params, top)
  return Cut(a, theta, as_prob(theta), _PLAIN)


def _oracle_set(a, m, params, params_lo, exact_a):
  top, _, _, alive, _ = _row(a)
  x = m.astype(jnp.float32) + 0.5 * (a == top)  # valid: >= 1; top tokens: 0.5 or 1.5
  theta = jnp.where(jnp.any(m & alive), 1.0, 0.5) * jnp.ones_like(params)
  return Cut(x, theta, jnp.full_like(params, jnp.nan), (top, _ZERO, _ZERO))


# Probability cuts are compared in log space (log p = a − max − log Σe): exact where float32
# probabilities would round distinct tokens onto the cut (e.g. min_p = 1).
def _log_cut(x, log_theta, reported_shift, consts):
  x = jax.lax.optimization_barrier(x)
  theta = jnp.minimum(log_theta, jnp.max(x))
  return Cut(x, theta, jnp.exp(theta - reported_shift), consts)


def _min_p(a, m, params, params_lo, exact_a):
  top, log_total, _, _, _ = _row(a)
  return _log_cut(a - top, jnp.log(params), log_total, (top, _ZERO, _ZERO))


def _epsilon(a, m, params, params_lo, exact_a):
  top, log_total, _, _, _ = _row(a)
  return _log_cut(a - top - log_total, jnp.log(params), 0.0, (top, log_total, _ZERO))


def _eta(a, m, params, params_lo, exact_a):
  top, log_total, p, alive, _ = _row(a)
  x = a - top - log_total
  entropy = -jnp.sum(jnp.where(alive, p * x, 0.0))
  log_theta = jnp.minimum(jnp.log(params), 0.5 * jnp.log(params) - entropy)
  return _log_cut(x, log_theta, 0.0, (top, log_total, _ZERO))


@dataclasses.dataclass(frozen=True)
class Rule:
  """A truncation rule.

  ``low``/``high`` (with ``closed``: whether each end is included) bound the parameter
  (``integer``: whole numbers only; no range: the rule takes no parameter); ``default``: the
  value when none is written (``oracle_rank`` alone means τ = 0.95); ``score``: how
  :mod:`calibjax_kernels.threshold_stats` recomputes ``x``; ``cut``: the row function
  ``(a [V], m [V] | None, params [S], params_lo [S], exact_a) -> Cut`` (``params +
  params_lo``: each parameter to double-float precision; ``exact_a()``: the correctly
  rounded ``a``); ``sweep``: the values a frontier evaluates (tight to loose); ``example``
  and ``dense``: the truncation benchmark's single value and 32-value sweep; ``sequence``: the
  sequence benchmark's 8 values; ``oracle``: the rule needs the valid set."""
  name: str
  cut: Callable
  low: float | None = None
  high: float | None = None
  closed: tuple[bool, bool] = (True, True)
  integer: bool = False
  default: float | None = None
  score: str = "logit"
  sweep: tuple[float, ...] = ()
  example: float | None = None
  dense: tuple[float, ...] = ()
  sequence: tuple[float, ...] = ()
  oracle: bool = False

  @property
  def takes_value(self) -> bool:
    return self.low is not None

  def span(self) -> str:
    lo, hi = self.closed
    return f"{'[' if lo else '('}{self.low:g}, {self.high:g}{']' if hi else ')'}"

  def bad_values(self, value) -> list[float]:
    """The entries of ``value`` (host numbers) outside the rule's range, at most four."""
    v = np.asarray(value, np.float64)
    lo, hi = self.closed
    ok = ((v >= self.low) if lo else (v > self.low)) & ((v <= self.high) if hi else
                                                        (v < self.high)) & ~np.isnan(v)
    if self.integer:
      ok &= v == np.round(v)
    return v[~ok].ravel()[:4].tolist()


def _grid(kind, lo, hi):
  space = np.linspace if kind == "lin" else np.geomspace
  return tuple(float(v) for v in space(lo, hi, 32))


REGISTRY: dict[str, Rule] = {r.name: r for r in (
    Rule("top_k", _top_k, 1, math.inf, (True, False), integer=True,
         sweep=(1, 2, 3, 5, 10, 20, 50, 100), example=50,
         dense=tuple(float(k) for k in np.arange(1, 33) ** 2),
         sequence=(1, 2, 4, 8, 16, 32, 64, 128)),
    Rule("top_p", _top_p, 0, 1, (False, True), sweep=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
         example=0.9, dense=_grid("lin", 0.5, 0.99),
         sequence=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)),
    Rule("min_p", _min_p, 0, 1, sweep=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01), example=0.1,
         dense=_grid("geom", 1e-3, 0.5), sequence=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001)),
    Rule("typical", _typical, 0, 1, (False, True), score="typical",
         sweep=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99), example=0.9, dense=_grid("lin", 0.5, 0.99),
         sequence=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)),
    Rule("epsilon", _epsilon, 0, 1, (True, False), sweep=(0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4),
         example=3e-4, dense=_grid("geom", 1e-5, 1e-2),
         sequence=(0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)),
    Rule("eta", _eta, 0, 1, (True, False), sweep=(0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4),
         example=3e-4, dense=_grid("geom", 1e-5, 1e-2),
         sequence=(0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)),
    Rule("top_n_sigma", _top_n_sigma, 0, math.inf, (True, False),
         sweep=(0.5, 1.0, 1.5, 2.0, 3.0, 4.0), example=1.0, dense=_grid("lin", 0.25, 4.0),
         sequence=(0.5, 1, 1.5, 2, 3, 4, 6, 8)),
    Rule("oracle_set", _oracle_set, score="valid_or_top", oracle=True),
    Rule("oracle_rank", _oracle_rank, 0, 1, (False, True), default=0.95, oracle=True,
         sequence=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999)),
)}

# The sampling rules in their fixed application order (the ``generate()`` order); the oracles.
RULES = tuple(name for name, r in REGISTRY.items() if not r.oracle)
ORACLE_SET, ORACLE_RANK, TOP_K = "oracle_set", "oracle_rank", "top_k"
ORACLES = (ORACLE_SET, ORACLE_RANK)

"""Truncation samplers (SPEC §4): which tokens a rule keeps, exactly, without sorting.

Order of operations: ``z → a = z / T → rule → renormalise → sample``. Every rule is a cut
``x_v ≥ θ`` on a per-token score ``x`` (tie-inclusive), and ``-inf`` logits are never kept
(unless the whole row is ``-inf``: then everything is kept and ``finite`` is False):

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
``oracle_rank`` (τ)   ``a``                the oracle cutoff ``r*`` (SPEC §5): max recall
                                           with validity ≥ τ (default 0.95)
====================  ===================  =============================================

The cut is clamped so that the most probable token (the most typical one for ``typical``; ties
included) is always kept. ``top_k``, ``top_p`` and ``typical`` find their cut with
:func:`calibjax.selection.select`, whose answer is always one of the row's own values, so a
sweep of many parameter values costs three histogram passes, not one search per value.
Chains apply rules in the fixed order of :data:`RULES` (the ``generate()`` order), each on
the previous rule's survivors renormalised. Per-rule tie behaviour and the ``threshold``
reported are listed in ``docs/semantics.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.typing import ArrayLike

from calibjax import dispatch, double_float, errors, inputs, selection
from calibjax.rowwise import map_rows, on_input_mesh

RULES = ("top_k", "top_p", "min_p", "typical", "epsilon", "eta", "top_n_sigma")
ORACLE_SET = "oracle_set"
ORACLE_RANK = "oracle_rank"
ORACLES = (ORACLE_SET, ORACLE_RANK)
_RANGES = {  # (low, high, low inclusive, high inclusive)
    "top_k": (1, math.inf, True, False), "top_p": (0, 1, False, True),
    "min_p": (0, 1, True, True), "typical": (0, 1, False, True),
    "epsilon": (0, 1, True, False), "eta": (0, 1, True, False),
    "top_n_sigma": (0, math.inf, True, False), ORACLE_RANK: (0, 1, False, True)}


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Parameter values evaluated in one call; results gain a leading ``[S]`` axis."""
  values: tuple[float, ...]


def sweep(values: Iterable[float]) -> Sweep:
  """Marks ``values`` as a sweep for :func:`truncate` (e.g. ``sweep(np.linspace(.5, 1, 32))``)."""
  vals = tuple(float(v) for v in np.asarray(list(values), np.float64).ravel())
  if not vals:
    raise errors.InputError("a sweep needs at least one value.")
  return Sweep(vals)


def check_param(rule: str, value) -> None:
  """Raises :class:`InputError` if a concrete ``value`` is outside the rule's range."""
  if rule == ORACLE_SET:
    return
  if rule not in _RANGES:
    raise errors.InputError(f"unknown rule {rule!r}; rules are {RULES + ORACLES}.")
  if isinstance(value, jax.core.Tracer) or value is None:
    if value is None:
      raise errors.InputError(f"rule {rule!r} needs a parameter.")
    return
  v = np.asarray(value, np.float64)
  lo, hi, lo_in, hi_in = _RANGES[rule]
  ok = (v >= lo if lo_in else v > lo) & (v <= hi if hi_in else v < hi) & ~np.isnan(v)
  if rule == "top_k":
    ok &= v == np.round(v)
  if not np.all(ok):
    bad = v[~ok].ravel()[:4].tolist()
    span = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
    kind = "integers in " if rule == "top_k" else ""
    raise errors.InputError(f"{rule} parameters must be {kind}{span}; got {bad}.")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler: temperature and a chain of truncation rules — the one spec type of calibjax.

  ``rules`` are ``(name, parameter)`` pairs, stored in the fixed application order of
  :data:`RULES` (``oracle_set`` last); a rule appears at most once. ``oracle_rank`` (the
  per-position oracle cutoff) stands alone: it is the best any cutoff could do, not a step.
  Text form (``Sampler.parse`` / ``str``): comma-separated ``name=value`` items and ``t=T``,
  e.g. ``"top_p=0.9,t=1.5"``, ``"min_p=0.1"``, ``"oracle_set,t=2"``, ``"oracle_rank=0.95"``
  (``oracle_rank`` alone means τ = 0.95).
  """
  rules: tuple[tuple[str, float | None], ...] = ()
  temperature: float = 1.0

  def __post_init__(self):
    seen = [r for r, _ in self.rules]
    if len(set(seen)) != len(seen):
      raise errors.InputError(f"a rule may appear once in a chain, got {seen}.")
    for rule, value in self.rules:
      check_param(rule, value)
      if rule != ORACLE_SET and not np.ndim(value) == 0:
        raise errors.InputError(f"chain parameters are scalars; {rule} got {value!r} "
                                "(use truncate() with sweep() for sweeps).")
    if ORACLE_RANK in seen and len(seen) > 1:
      raise errors.InputError(f"oracle_rank is a cutoff of its own and cannot be chained with "
                              f"{[r for r in seen if r != ORACLE_RANK]}.")
    inputs.check_temperature(self.temperature)
    order = RULES + ORACLES
    canon = tuple(sorted(((r, None if r == ORACLE_SET else float(v)) for r, v in self.rules),
                         key=lambda rv: order.index(rv[0])))
    object.__setattr__(self, "rules", canon)

  @classmethod
  def parse(cls, text: str) -> "Sampler":
    """Parses ``"top_p=0.9,t=1.5"``-style text; errors name the offending item."""
    rules, temperature = [], 1.0
    items = [s.strip() for s in text.split(",")] if text.strip() else []
    if "" in items:
      raise errors.InputError(f"sampler {text!r}: empty item (two commas in a row, or a comma "
                              "at an end).")
    for item in items:
      m = re.fullmatch(r"([a-z_]+)(?:=(.+))?", item)
      if not m:
        raise errors.InputError(f"sampler {text!r}: cannot read item {item!r}.")
      name, value = m.groups()
      if name in ("t", "temperature"):
        if value is None:
          raise errors.InputError(f"sampler {text!r}: {item!r} needs a value, e.g. t=1.5.")
        temperature = _number(text, item, value)
      elif name == ORACLE_SET:
        if value is not None:
          raise errors.InputError(f"sampler {text!r}: oracle_set takes no value.")
        rules.append((name, None))
      elif name == ORACLE_RANK:
        rules.append((name, 0.95 if value is None else _number(text, item, value)))
      elif name in RULES:
        if value is None:
          raise errors.InputError(f"sampler {text!r}: {name} needs a value, e.g. {name}=0.9.")
        rules.append((name, _number(text, item, value)))
      else:
        raise errors.InputError(f"sampler {text!r}: unknown item {name!r}; known: "
                                f"{', '.join(RULES + ORACLES + ('t',))}.")
    return cls(tuple(rules), temperature)

  def __str__(self) -> str:
    items = [r if v is None else f"{r}={v:g}" for r, v in self.rules]
    return ",".join(items + [f"t={self.temperature:g}"])


def _number(text, item, value):
  try:
    return float(value)
  except ValueError:
    raise errors.InputError(f"sampler {text!r}: {item!r} is not a number.") from None


@struct.dataclass
class Truncation:
  """What a rule keeps, per row (``[...]``; sweeps add a leading ``[S]``).

  Fields:
    keep: bool ``[..., V]`` (None when ``return_keep=False``).
    threshold: the rule's cut — a probability for every rule but ``typical`` (its cut on
      ``|−log p − H|``) and ``oracle_set`` (NaN); see ``docs/semantics.md``.
    kept_count: tokens kept (float32, exact); kept_mass: their mass under ``softmax(z / T)``.
    kept_valid / kept_invalid: valid / invalid tokens kept; n_valid: valid tokens in the row
      (kept or not); precision = kept_valid / kept_count; recall = kept_valid / n_valid;
      validity = p(kept ∩ valid) / p(kept);
      kept_valid_entropy: entropy of the kept valid tokens' renormalised distribution.
      (None without ``valid_mask``.)
    finite: the row has no NaN/+inf and some logit > -inf.
  """
  keep: jax.Array | None
  threshold: jax.Array
  kept_count: jax.Array
  kept_mass: jax.Array
  kept_valid: jax.Array | None
  kept_invalid: jax.Array | None
  n_valid: jax.Array | None
  precision: jax.Array | None
  recall: jax.Array | None
  validity: jax.Array | None
  kept_valid_entropy: jax.Array | None
  finite: jax.Array


def _softmax_parts(a):
  """Row max, Σ exp(a − max), its log, and p; p = e / Σe keeps 1/ulp accuracy when |a| is
  large (small T), where exp(a − lse) would carry the rounding of lse."""
  top = jnp.max(a)
  e = jnp.exp(a - top)
  total = jnp.sum(e)
  # computed once: XLA may otherwise recompute a reduction in two fusions with different
  # summation orders, and a cut clamped to max(x) would then miss the top token
  return jax.lax.optimization_barrier((top, total, jnp.log(total), e / total))


# A float32 cumulative mass this close to its target is re-decided in double-float arithmetic.
# The histograms' float32 masses were measured at most 2.0e-7 from float64 (flat and
# heavy-tailed rows of 262,144 tokens, 32 targets each; BUILD_NOTES): a 20x margin.
NEAR = 4e-6


def _select_value(x, weights, targets, alive):
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


def _exact_mass_cut(x, a, alive, theta, near, target):
  """The cuts ``θ_s`` re-decided exactly where ``near``: the largest value ``c`` of ``x``
  with ``Σ_{x ≥ c} p ≥ P_s``, ``p ∝ exp(a)`` for the correctly rounded ``a = z / T`` (a
  callable: computed here only), ``P_s = target`` a double-float pair. Starting from the
  float32 cut, it steps one value up or down while that is wrong.

  Each comparison ``M(c) ≥ P·S`` is first made with float32 ``exp`` summed exactly
  (double-float sums) and settled when its margin exceeds what the exps' rounding
  (:data:`_EXP_ERROR`) can move; the few that it cannot settle are made again with every
  ``exp`` in double-float too (:mod:`calibjax.double_float`, ~1e-13 relative)."""
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


def _mass_cut(x, exact_a, alive, p, params, params_lo):
  """``top_p`` / ``typical``: the largest ``x`` value whose kept mass reaches ``P``; float32
  selection, then an exact re-decision of the rows' near cuts (only when some cut is near)."""
  # P = 1 (τ = 1) keeps every token of positive probability: exact, whatever float32 sums do
  # (a P just below 1 that float32 rounds to 1 has a negative remainder: decided exactly).
  targets = jnp.where((params >= 1.0) & (params_lo >= 0.0), jnp.inf, params)
  theta, near = _select_value(x, p, targets, alive)
  return jax.lax.cond(
      jnp.any(near),
      lambda: _exact_mass_cut(x, exact_a, alive, theta, near, (targets, params_lo)),
      lambda: theta)


def _score(rule):
  """The :mod:`kernels.threshold_stats` score that recomputes ``rule``'s ``x`` from ``a``."""
  return {"typical": "typical", ORACLE_SET: "valid_or_top"}.get(rule, "logit")


def _cut(rule, a, m, params, params_lo, exact_a):
  """Score ``x [V]``, cuts ``θ [S]``, reported thresholds ``[S]`` and the constants
  ``(c₁, c₂, c₃)`` from which :mod:`kernels.threshold_stats` recomputes ``x`` bit for bit
  (score :func:`_score`) of ``rule`` on ``a``. ``params + params_lo`` is each parameter to
  double-float precision and ``exact_a()`` the correctly rounded ``a`` (``-inf`` where ``a``
  is): the mass targets of ``top_p`` and ``typical`` near a cut are decided with them.

  Scores derived from ``a`` pass an optimisation barrier before a cut is taken from them, so
  the comparisons ``x ≥ θ`` see the very values ``θ`` was clamped to."""
  top, _, log_total, p = _softmax_parts(a)
  alive = a > -jnp.inf
  as_prob = lambda theta: jnp.exp(theta - top - log_total)
  zero = jnp.zeros((), jnp.float32)
  plain = (zero, zero, zero)  # x = (a - 0) - 0 = a
  if rule == "top_k":
    theta, _ = _select_value(a, alive.astype(jnp.float32), params, alive)
    return a, theta, as_prob(theta), plain
  if rule == "top_p":
    theta = _mass_cut(a, exact_a, alive, p, params, params_lo)
    return a, theta, as_prob(theta), plain
  if rule == "top_n_sigma":
    n_alive = jnp.sum(alive)
    mean = jnp.sum(jnp.where(alive, a, 0.0)) / n_alive
    sigma = jnp.sqrt(jnp.sum(jnp.where(alive, (a - mean) ** 2, 0.0)) / n_alive)
    theta = jnp.minimum(top - params * sigma, top)
    return a, theta, as_prob(theta), plain
  if rule == "typical":
    log_p = a - top - log_total
    entropy = -jnp.sum(jnp.where(alive, p * log_p, 0.0))
    x = jax.lax.optimization_barrier(jnp.where(alive, -jnp.abs(-log_p - entropy), -jnp.inf))
    theta = _mass_cut(x, exact_a, alive, p, params, params_lo)
    return x, theta, -theta, (top, log_total, entropy)
  if rule == ORACLE_RANK:  # params: the oracle cutoff on a, found by truncate_chain
    theta = jnp.minimum(params, top)
    return a, theta, as_prob(theta), plain
  if rule == "oracle_set":
    x = m.astype(jnp.float32) + 0.5 * (a == top)  # valid: >= 1; top tokens: 0.5 or 1.5
    theta = jnp.where(jnp.any(m & alive), 1.0, 0.5) * jnp.ones_like(params)
    return x, theta, jnp.full_like(params, jnp.nan), (top, zero, zero)
  # Probability cuts are compared in log space (log p = a − max − log Σe): exact where
  # float32 probabilities would round distinct tokens onto the cut (e.g. min_p = 1).
  if rule == "min_p":
    consts = (top, zero, zero)
    x, log_theta = a - top, jnp.log(params)
  elif rule == "epsilon":
    consts = (top, log_total, zero)
    x, log_theta = a - top - log_total, jnp.log(params)
  elif rule == "eta":
    consts = (top, log_total, zero)
    x = a - top - log_total
    entropy = -jnp.sum(jnp.where(alive, p * x, 0.0))
    log_theta = jnp.minimum(jnp.log(params), 0.5 * jnp.log(params) - entropy)
  else:
    raise errors.InputError(f"unknown rule {rule!r}; rules are {RULES + ORACLES}.")
  x = jax.lax.optimization_barrier(x)
  theta = jnp.minimum(log_theta, jnp.max(x))
  return x, theta, jnp.exp(theta if rule != "min_p" else theta - log_total), consts


def _sums(x, theta, alive, p, m):
  """Threshold sums of one row (XLA): count, mass and, with a mask, valid count, valid mass
  and valid ``Σ p log p`` of ``{alive, x ≥ θ_s}``, each ``[S]``."""
  cols = [jnp.ones_like(p), p]
  if m is not None:
    pv = jnp.where(m, p, 0.0)
    cols += [m.astype(jnp.float32), pv, jnp.where(pv > 0, pv * jnp.log(pv), 0.0)]
  return selection.threshold_stats(x, alive, theta, tuple(cols))


def _fields(sums, n_valid):
  """Fields of :class:`Truncation` from the threshold sums (``n_valid``: None without mask)."""
  count, mass = sums[0], sums[1]
  out = dict(kept_count=count, kept_mass=mass)
  if n_valid is not None:
    _, _, n_kept_valid, vmass, vplogp = sums
    out.update(kept_valid=n_kept_valid, kept_invalid=count - n_kept_valid,
               n_valid=jnp.broadcast_to(n_valid, count.shape).astype(jnp.float32),
               precision=n_kept_valid / count, recall=n_kept_valid / n_valid,
               validity=vmass / mass, kept_valid_entropy=jnp.log(vmass) - vplogp / vmass)
  return out


def _flags(a):
  """(finite, any token alive) of one row of scaled logits."""
  return jnp.isfinite(jnp.max(a)), jnp.any(a > -jnp.inf)


def _finish_row(out, finite, alive_any, n):
  """All -inf rows keep everything; NaN statistics for non-finite rows; flags."""
  if "keep" in out:
    out["keep"] = out["keep"] | ~alive_any
  bad = lambda v: jnp.where(finite, v, jnp.nan)
  out = {k: (v if k == "keep" else bad(v)) for k, v in out.items()}
  out["finite"] = jnp.broadcast_to(finite, (n,))
  return out


def _n_valid(m):
  return None if m is None else jnp.sum(m)


def _row_truncate(z, m, t, params, rule, keep):
  a = z / t
  params, params_lo = params[:, 0], params[:, 1]
  x, theta, reported, _ = _cut(rule, a, m, params, params_lo,
                               lambda: double_float.divide(z, t))
  p = _softmax_parts(a)[-1]
  alive = a > -jnp.inf
  out = _fields(_sums(x, theta, alive, p, m), _n_valid(m))
  if keep:
    out["keep"] = (x[None, :] >= theta[:, None]) & alive
  out["threshold"] = reported
  return _finish_row(out, *_flags(a), params.shape[0])


def _row_cut(z, m, t, params, rule, keep):
  """The XLA half of the Pallas path: cuts, the kernel's per-row constants and keep masks."""
  a = z / t
  x, theta, reported, consts = _cut(rule, a, m, params[:, 0], params[:, 1],
                                   lambda: double_float.divide(z, t))
  top, total, _, _ = _softmax_parts(a)
  finite, alive_any = _flags(a)
  out = dict(theta=theta, threshold=reported, consts=jnp.stack([t, top, total, *consts]),
             finite=finite, alive_any=alive_any)
  if m is not None:
    out["n_valid"] = _n_valid(m)
  if keep:
    out["keep"] = (x[None, :] >= theta[:, None]) & (a > -jnp.inf)
  return out


def _truncate_pallas(z, m, t, params, rule, keep):
  """Cuts per row (XLA), then every threshold sum of every row in one kernel pass."""
  rows = math.prod(z.shape[:-1])
  flat = lambda v: v.reshape((rows,) + v.shape[z.ndim - 1:])
  args = [flat(z), flat(t), flat(params)] + ([] if m is None else [flat(m)])
  cut = map_rows(lambda zr, tr, pr, *mr: _row_cut(zr, mr[0] if mr else None, tr, pr, rule, keep),
                 *args, batch_shape=(rows,))
  sums = dispatch.threshold_stats(flat(z), None if m is None else flat(m), cut["consts"],
                                  cut["theta"], score=_score(rule))
  sums = [v.astype(jnp.float32) for v in sums if v is not None]

  def assemble(sums_row, c):
    out = _fields(sums_row, c.get("n_valid"))
    if keep:
      out["keep"] = c["keep"]
    out["threshold"] = c["threshold"]
    return _finish_row(out, c["finite"], c["alive_any"], params.shape[-2])

  out = jax.vmap(assemble)(sums, cut)
  return jax.tree.map(lambda v: v.reshape(z.shape[:-1] + v.shape[1:]), out)


def _row_chain(z, m, t, params, rules, keep):
  a0 = z / t
  a = a0
  for (rule, _), param in zip(rules, params):
    survivors = a > -jnp.inf
    x, theta, *_ = _cut(rule, a, m, param[None, 0], param[None, 1], lambda: jnp.where(
        survivors, double_float.divide(z, t), -jnp.inf))
    a = jnp.where((x >= theta[0]) & (a > -jnp.inf), a, -jnp.inf)
  p = _softmax_parts(a0)[-1]
  alive0 = a0 > -jnp.inf
  kept = (a > -jnp.inf).astype(jnp.float32)
  out = _fields(_sums(kept, jnp.ones(1), alive0, p, m), _n_valid(m))
  if keep:
    out["keep"] = (kept[None, :] >= 1.0) & alive0
  out["threshold"] = jnp.full((1,), jnp.nan)
  return _finish_row(out, *_flags(a0), 1)


@functools.partial(jax.jit, static_argnames=("row_fn", "spec", "keep", "squeeze"))
def _run(z, m, t, params, row_fn, spec, keep, squeeze):
  """``row_fn`` over every row (or, for ``"pallas"``, the batched kernel path); ``params``
  ``[..., S, 2]``: each parameter as a double-float pair (float32 value, remainder)."""
  batch = z.shape[:-1]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), batch)
  if row_fn == "pallas":
    out = _truncate_pallas(z, m, t, params, spec, keep)
  else:
    args = (z, t, params) if m is None else (z, m, t, params)
    fn = (lambda zr, tr, pr: row_fn(zr, None, tr, pr, spec, keep)) if m is None else (
        lambda zr, mr, tr, pr: row_fn(zr, mr, tr, pr, spec, keep))
    out = map_rows(fn, *args, batch_shape=batch)
  lead = len(batch)
  move = (lambda v: v[..., 0] if v.ndim == lead + 1 else v[..., 0, :]) if squeeze else (
      lambda v: jnp.moveaxis(v, lead, 0))
  out = {k: move(v) for k, v in out.items()}
  fields = {f.name: out.get(f.name) for f in dataclasses.fields(Truncation)}
  return Truncation(**fields)


@on_input_mesh
def truncate(logits: ArrayLike, rule: str, params: ArrayLike | Sweep | None = None, *,
             temperature: ArrayLike = 1.0, valid_mask: ArrayLike | None = None,
             return_keep: bool = True, implementation: str | None = None) -> Truncation:
  """Applies one truncation rule to every row of ``logits [..., V]``.

  Args:
    logits: ``[..., V]`` (upcast to float32; ``-inf`` legal, never kept).
    rule: one of :data:`RULES` or ``"oracle_set"`` (needs ``valid_mask``; no parameter).
    params: a scalar, a per-row array ``[...]``, or :func:`sweep` values (adds a leading
      ``[S]`` axis to every field). New values do not recompile.
    temperature: scalar or ``[...]``, > 0, applied first.
    valid_mask: optional bool ``[..., V]``; adds the validity fields.
    return_keep: False drops the ``[.., V]`` masks (e.g. for large sweeps).
    implementation: ``"xla"``, ``"pallas"`` or None (best for the backend), see
      :mod:`calibjax.dispatch`. With ``"pallas"`` the cuts are found as with ``"xla"`` and the
      statistics of all rows and sweep values come from one :mod:`kernels.threshold_stats`
      pass: the same keep masks and counts, sums equal to float32 summation order.

  Returns:
    :class:`Truncation`. Rows with NaN/+inf logits: NaN statistics, ``finite = False``.

  Raises:
    InputError: unknown rule, parameter out of range (concrete values), bad temperature.

  Example:
    >>> r = truncate(jnp.log(jnp.array([.5, .3, .15, .05])), "top_p", 0.8)
    >>> r.keep.tolist(), float(r.kept_mass)
    ([True, True, False, False], 0.8...)
  """
  if rule == ORACLE_RANK:
    raise errors.InputError("oracle_rank depends on the valid set of each row: use "
                            "truncate_chain(logits, 'oracle_rank=0.95', valid_mask=...).")
  check_param(rule, params.values if isinstance(params, Sweep) else params)
  row_fn = "pallas" if dispatch.resolve(implementation) == "pallas" else _row_truncate
  z, m = inputs.prepare(logits, valid_mask, temperature=temperature,
                        mask_required=rule == ORACLE_SET)
  batch = z.shape[:-1]
  if isinstance(params, Sweep):
    values = jnp.broadcast_to(_pairs(params.values), batch + (len(params.values), 2))
  else:
    p = _pairs(0.0 if params is None else params)
    if not inputs.broadcasts_to(p.shape[:-1], batch):
      raise errors.ShapeMismatchError(
          f"per-row params of shape {p.shape[:-1]} do not match the rows of logits {z.shape}.")
    values = jnp.broadcast_to(p, batch + (2,))[..., None, :]
  return _run(z, m, temperature, values, row_fn, rule, bool(return_keep),
              not isinstance(params, Sweep))


def _pairs(values) -> jax.Array:
  """Parameters as ``[..., 2]`` double-float pairs: host numbers keep their float64 value
  (τ = 0.95 is not float32(0.95) for the mass targets); jax arrays are float32 already."""
  if isinstance(values, jax.Array):
    v = values.astype(jnp.float32)
    return jnp.stack([v, jnp.zeros_like(v)], axis=-1)
  return jnp.stack([jnp.asarray(part) for part in double_float.split(values)], axis=-1)


@on_input_mesh
def truncate_chain(logits: ArrayLike, sampler: Sampler | str | Sequence[tuple[str, float]], *,
                   temperature: ArrayLike | None = None, valid_mask: ArrayLike | None = None,
                   return_keep: bool = True, max_valid: int | None = None) -> Truncation:
  """Applies a chain of rules (a :class:`Sampler` or ``[(rule, param), ...]``).

  Rules run in the fixed order of :data:`RULES`, each on the survivors of the previous one,
  renormalised. ``temperature`` overrides the sampler's. Statistics (``kept_mass``,
  ``validity``, …) refer to the final kept set under ``softmax(z / T)``; ``threshold`` is NaN.
  ``oracle_rank=τ`` keeps each row's oracle cutoff (:func:`calibjax.oracle_cutoff`, validity
  objective, at this temperature; every token where it is undefined); ``max_valid`` bounds
  the valid tokens per row for it, as in :func:`calibjax.order_stats` (needed under ``jit``).

  Example:
    >>> r = truncate_chain(jnp.log(jnp.array([.5, .3, .15, .05])), [("top_p", .95), ("top_k", 2)])
    >>> r.keep.tolist()
    [True, True, False, False]
  """
  s = (Sampler.parse(sampler) if isinstance(sampler, str) else
       sampler if isinstance(sampler, Sampler) else Sampler(tuple(sampler)))
  t = s.temperature if temperature is None else temperature
  z, m = inputs.prepare(logits, valid_mask, temperature=t,
                        mask_required=any(r in ORACLES for r, _ in s.rules))
  if s.rules and s.rules[0][0] == ORACLE_RANK:
    from calibjax import oracle  # oracle uses this module
    o = oracle.oracle_cutoff(z, m, "validity", s.rules[0][1], t, max_valid=max_valid)
    t_rows = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:-1])
    params = _pairs(jnp.where(o.defined, o.z_star / t_rows, -jnp.inf)[..., None])
  else:
    params = _pairs([0.0 if v is None else v for _, v in s.rules])
    params = jnp.broadcast_to(params, z.shape[:-1] + params.shape)
  return _run(z, m, t, params, _row_chain, tuple(s.rules), bool(return_keep), True)

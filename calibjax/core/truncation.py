"""Truncation samplers (SPEC §4): which tokens a rule keeps, exactly, without sorting.

Order of operations: ``z → a = z / T → rule → renormalise → sample``. Every rule is a cut
``x_v ≥ θ`` on a per-token score ``x`` (tie-inclusive; the rules, their scores and cuts:
:mod:`calibjax.core.rules`), and ``-inf`` logits are never kept (unless the whole row is
``-inf``: then everything is kept and ``finite`` is False). A sweep of many parameter values of
one rule costs three histogram passes, not one search per value. Chains apply rules in the
fixed order of :data:`RULES` (the ``generate()`` order), each on the previous rule's survivors
renormalised. Per-rule tie behaviour and the ``threshold`` reported are listed in
``docs/semantics.md``.
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
from jax.typing import ArrayLike

from calibjax import errors
from calibjax.core import dispatch, double_float, inputs, oracle, pytree, selection
from calibjax.core.rows import map_rows, on_input_mesh
from calibjax.core.rules import ORACLE_RANK, ORACLE_SET, ORACLES, REGISTRY, RULES, softmax_parts


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
  if rule not in REGISTRY:
    raise errors.InputError(f"unknown rule {rule!r}; rules are {RULES + ORACLES}.")
  spec = REGISTRY[rule]
  if not spec.takes_value:
    return
  if value is None:
    raise errors.InputError(f"rule {rule!r} needs a parameter.")
  if isinstance(value, jax.core.Tracer):
    return
  bad = spec.bad_values(value)
  if bad:
    kind = "integers in " if spec.integer else ""
    raise errors.InputError(f"{rule} parameters must be {kind}{spec.span()}; got {bad}.")


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
      if REGISTRY[rule].takes_value and not np.ndim(value) == 0:
        raise errors.InputError(f"chain parameters are scalars; {rule} got {value!r} "
                                "(use truncate() with sweep() for sweeps).")
    if ORACLE_RANK in seen and len(seen) > 1:
      raise errors.InputError(f"oracle_rank is a cutoff of its own and cannot be chained with "
                              f"{[r for r in seen if r != ORACLE_RANK]}.")
    inputs.check_temperature(self.temperature)
    order = RULES + ORACLES
    canon = tuple(sorted(((r, float(v) if REGISTRY[r].takes_value else None)
                          for r, v in self.rules), key=lambda rv: order.index(rv[0])))
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
      elif name in REGISTRY:
        spec = REGISTRY[name]
        if not spec.takes_value:
          if value is not None:
            raise errors.InputError(f"sampler {text!r}: {name} takes no value.")
          rules.append((name, None))
        elif value is None and spec.default is None:
          raise errors.InputError(f"sampler {text!r}: {name} needs a value, e.g. {name}=0.9.")
        else:
          rules.append((name, spec.default if value is None else _number(text, item, value)))
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


@pytree.dataclass
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
  x, theta, reported, _ = REGISTRY[rule].cut(a, m, params, params_lo,
                                              lambda: double_float.divide(z, t))
  p = softmax_parts(a)[-1]
  alive = a > -jnp.inf
  out = _fields(_sums(x, theta, alive, p, m), _n_valid(m))
  if keep:
    out["keep"] = (x[None, :] >= theta[:, None]) & alive
  out["threshold"] = reported
  return _finish_row(out, *_flags(a), params.shape[0])


def _row_cut(z, m, t, params, rule, keep):
  """The XLA half of the Pallas path: cuts, the kernel's per-row constants and keep masks."""
  a = z / t
  x, theta, reported, consts = REGISTRY[rule].cut(a, m, params[:, 0], params[:, 1],
                                                  lambda: double_float.divide(z, t))
  top, total, _, _ = softmax_parts(a)
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
  sums = dispatch.op("threshold_stats", "pallas")(flat(z), None if m is None else flat(m),
                                                  cut["consts"],
                                  cut["theta"], score=REGISTRY[rule].score)
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
  if rules and rules[0][0] == ORACLE_RANK:
    # its parameter is the cut logit z*: the cut is that token's own a = z / T (XLA's division
    # over a vector may differ from z* / T by an ulp, which would drop the cut token)
    params = params.at[0, 0].set(jnp.max(jnp.where(z == params[0, 0], a0, -jnp.inf)))
  a = a0
  for (rule, _), param in zip(rules, params):
    survivors = a > -jnp.inf
    x, theta, *_ = REGISTRY[rule].cut(a, m, param[None, 0], param[None, 1], lambda: jnp.where(
        survivors, double_float.divide(z, t), -jnp.inf))
    a = jnp.where((x >= theta[0]) & (a > -jnp.inf), a, -jnp.inf)
  p = softmax_parts(a0)[-1]
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
      :mod:`calibjax.core.dispatch`. With ``"pallas"`` the cuts are found as with ``"xla"`` and the
      statistics of all rows and sweep values come from one :mod:`calibjax_kernels.threshold_stats`
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
                   return_keep: bool = True, max_valid: int | None = None,
                   implementation: str | None = None) -> Truncation:
  """Applies a chain of rules (a :class:`Sampler` or ``[(rule, param), ...]``).

  Rules run in the fixed order of :data:`RULES`, each on the survivors of the previous one,
  renormalised. ``temperature`` overrides the sampler's. Statistics (``kept_mass``,
  ``validity``, …) refer to the final kept set under ``softmax(z / T)``; ``threshold`` is NaN.
  ``oracle_rank=τ`` keeps each row's oracle cutoff (:func:`calibjax.oracle_cutoff`, validity
  objective, at this temperature; every token where it is undefined); ``max_valid`` bounds
  the valid tokens per row for it, as in :func:`calibjax.order_stats` (needed under ``jit``),
  and ``implementation`` counts its valid ranks (:mod:`calibjax.core.dispatch`); the chain's
  cuts and sums are XLA row functions.

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
    o = oracle.oracle_cutoff(z, m, "validity", s.rules[0][1], t, max_valid=max_valid,
                             implementation=implementation)
    params = _pairs(jnp.where(o.defined, o.z_star, -jnp.inf)[..., None])  # z*: see _row_chain
  else:
    params = _pairs([0.0 if v is None else v for _, v in s.rules])
    params = jnp.broadcast_to(params, z.shape[:-1] + params.shape)
  return _run(z, m, t, params, _row_chain, tuple(s.rules), bool(return_keep), True)

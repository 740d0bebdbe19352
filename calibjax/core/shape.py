"""Shape calibration (SPEC §2): how probability mass is spread over the valid tokens.

With ``p = softmax(z / T)``, valid set ``V`` and ``q = p|_V`` renormalised, everything comes
from one exp pass per row (valid logits shifted by the valid maximum, the others by the row
maximum, so ``q`` stays exact when ``p(V)`` underflows at small T) and a few sums, one row at
a time so a 262,144-token row stays in cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

import calibjax_kernels as kernels
from calibjax import errors
from calibjax.core import dispatch, inputs, pytree
from calibjax.core.rows import map_rows, on_input_mesh


@pytree.dataclass
class ShapeStats:
  """Shape metrics per row (``[...]``). NaN where ``defined`` is False (no valid token or a
  non-finite row), except ``valid_mass``/``invalid_mass`` which stay defined for finite rows.

  Fields:
    valid_mass / invalid_mass: ``p(V)`` and ``1 - p(V)`` (each summed directly).
    valid_entropy: ``H(q)`` in nats; normalized_valid_entropy: ``H(q) / log n_val`` (1 when
      ``n_val = 1``); effective_valid: ``exp H(q)``; inverse_simpson: ``1 / Σ q²``.
    kl_target_to_q: ``KL(r ‖ q)``; kl_q_to_target: ``KL(q ‖ r)``; tv_to_target: ``TV(q, r)``.
    kl_target_to_p: ``KL(r ‖ p)``, computed on its own; equals
      ``kl_target_to_q + neg_log_valid_mass`` (SPEC §2 decomposition).
    neg_log_valid_mass: ``-log p(V)``.
    finite, has_valid, defined: per-row flags.
  """
  valid_mass: jax.Array
  invalid_mass: jax.Array
  valid_entropy: jax.Array
  normalized_valid_entropy: jax.Array
  effective_valid: jax.Array
  inverse_simpson: jax.Array
  kl_target_to_q: jax.Array
  kl_q_to_target: jax.Array
  tv_to_target: jax.Array
  kl_target_to_p: jax.Array
  neg_log_valid_mass: jax.Array
  finite: jax.Array
  has_valid: jax.Array
  defined: jax.Array


def _lse(x, where):
  return jax.nn.logsumexp(jnp.where(where, x, -jnp.inf))


def _xlogy_sum(x, y):
  """``Σ x·y`` with ``0·(±inf) = 0`` (entropy and KL convention)."""
  return jnp.sum(jnp.where(x > 0, x * y, 0.0))


def _row_shape(z, m, w, temperature):
  """One exp pass: valid logits shifted by the valid maximum, invalid ones by the row maximum
  (so q stays exact when p(V) underflows at small T), then a few sums."""
  top, top_val = jnp.max(z), jnp.max(jnp.where(m, z, -jnp.inf))
  x = (z - jnp.where(m, top_val, top)) / temperature
  e = jnp.exp(x)
  s_val = jnp.sum(jnp.where(m, e, 0.0))
  s_inv = jnp.sum(jnp.where(m, 0.0, e))
  log_s_val = jnp.log(s_val)
  log_val = (top_val - top) / temperature + log_s_val  # log Σ_V exp((z - top) / T)
  log_all = jnp.logaddexp(log_val, jnp.log(s_inv))
  q = jnp.where(m, e / s_val, 0.0)
  log_q = x - log_s_val
  entropy = log_s_val - _xlogy_sum(q, x)
  n = jnp.sum(m, dtype=jnp.float32)
  if w is None:  # uniform target on the valid set: closed forms
    r = jnp.where(m, 1.0 / n, 0.0)
    r_log_r = -jnp.log(n)
    q_log_r = -jnp.log(n)
  else:
    w = jnp.where(m, w, 0.0)
    r = w / jnp.sum(w)
    log_r = jnp.log(r)
    r_log_r = _xlogy_sum(r, log_r)
    q_log_r = _xlogy_sum(q, log_r)
  r_log_q = _xlogy_sum(r, log_q)
  return dict(
      valid_mass=jnp.exp(log_val - log_all), invalid_mass=jnp.exp(jnp.log(s_inv) - log_all),
      valid_entropy=entropy,
      normalized_valid_entropy=jnp.where(n > 1, entropy / jnp.log(n), 1.0),
      effective_valid=jnp.exp(entropy), inverse_simpson=s_val * s_val / jnp.sum(e * e * m),
      kl_target_to_q=r_log_r - r_log_q, kl_q_to_target=-entropy - q_log_r,
      tv_to_target=0.5 * jnp.sum(jnp.abs(q - r)),
      kl_target_to_p=r_log_r - _xlogy_sum(r, x + (log_val - log_s_val) - log_all),
      neg_log_valid_mass=log_all - log_val,
      finite=jnp.isfinite(top) & (temperature > 0), has_valid=n > 0)  # = row_finite


@jax.jit
def _shape_stats(z, m, w, temperature):
  batch = z.shape[:-1]
  t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), batch)
  if w is None:
    out = map_rows(lambda zr, mr, tr: _row_shape(zr, mr, None, tr), z, m, t, batch_shape=batch)
  else:
    out = map_rows(_row_shape, z, m, w, t, batch_shape=batch)
  finite, has_valid = out.pop("finite"), out.pop("has_valid")
  defined = finite & has_valid
  masses = ("valid_mass", "invalid_mass")
  out = {k: jnp.where(defined | (finite & (k in masses)), v, jnp.nan) for k, v in out.items()}
  return ShapeStats(**out, finite=finite, has_valid=has_valid, defined=defined)


def _target_weights(target, shape):
  """None (uniform over the valid set) or non-negative weights broadcast to ``shape``."""
  if target is None:
    return None
  w = inputs.as_weights(target, shape)
  if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(w >= 0)):
    raise errors.InputError("target weights must be non-negative.")
  return w


@on_input_mesh
def shape_stats(logits: ArrayLike, valid_mask: ArrayLike, temperature: ArrayLike = 1.0,
                target: ArrayLike | None = None) -> ShapeStats:
  """Shape metrics of SPEC §2 for every row of ``logits [..., V]``.

  ``p = softmax(z / T)``, ``q = p`` restricted to the valid set and renormalised, ``r`` the
  target: ``target`` weights ``[..., V]`` restricted to the valid set and renormalised, or the
  uniform distribution on the valid set when ``target`` is None. Then
  ``KL(r ‖ p) = KL(r ‖ q) + (−log p(V))`` holds per row.

  Args:
    logits: ``[..., V]`` (upcast to float32; ``-inf`` legal).
    valid_mask: bool ``[..., V]`` or broadcastable.
    temperature: scalar or ``[...]``, > 0 (a new value does not recompile).
    target: optional non-negative weights ``[..., V]`` or broadcastable (e.g. ``[V]``).

  Returns:
    :class:`ShapeStats` with fields ``[...]``. Rows with NaN/+inf logits or ``T ≤ 0`` inside
    jit: NaN and ``finite = False``; rows without valid tokens: ``valid_mass = 0`` and NaN
    elsewhere. A target with zero weight on a valid token that ``q`` covers gives
    ``kl_q_to_target = inf`` (and ``kl_target_to_q = inf`` the other way round).

  Raises:
    ShapeMismatchError / InputError for mismatched shapes, non-positive concrete
    temperatures and negative concrete targets.

  Example:
    >>> s = shape_stats(jnp.log(jnp.array([0.5, 0.25, 0.25])), jnp.array([True, True, False]))
    >>> float(s.valid_mass), float(s.effective_valid)   # q = (2/3, 1/3)
    (0.75, 1.8898...)
  """
  z, m = inputs.prepare(logits, valid_mask, temperature=temperature, mask_required=True)
  return _shape_stats(z, m, _target_weights(target, z.shape), temperature)


RowStats = kernels.RowStats


@functools.partial(jax.jit, static_argnames=("implementation",))
def row_stats_flat(z, m, t, implementation):
  """:func:`row_stats` of normalised inputs (``implementation`` resolved); under jit."""
  batch, vocab = z.shape[:-1], z.shape[-1]
  flat = lambda x: None if x is None else x.reshape(-1, vocab)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), batch).reshape(-1)
  out = dispatch.op("row_stats", implementation)(flat(z), flat(m), t)
  return jax.tree.map(lambda v: v.reshape(batch), out)


@on_input_mesh
def row_stats(logits: ArrayLike, valid_mask: ArrayLike | None = None, *,
              temperature: ArrayLike = 1.0, implementation: str | None = None) -> RowStats:
  """Max, logsumexp and entropy of ``a = z / T`` per row (and, with ``valid_mask``, the valid
  mass ``p(V)`` and the valid entropy ``H(q)``) — the one-pass token diagnostic.

  Args:
    logits: ``[..., V]`` (upcast to float32; ``-inf`` legal).
    valid_mask: optional bool ``[..., V]`` or broadcastable.
    temperature: scalar or ``[...]``, > 0.
    implementation: ``"xla"``, ``"pallas"`` or None (best for the backend), see
      :mod:`calibjax.core.dispatch`; both give the same numbers (to float32 summation order).

  Returns:
    ``RowStats(max, logsumexp, entropy, valid_mass, valid_entropy)``, fields ``[...]``
    (the last two None without a mask). A row with no finite logit: ``logsumexp = -inf``,
    NaN entropy; no valid token: ``valid_mass = 0``, NaN valid entropy.

  Example:
    >>> s = row_stats(jnp.log(jnp.array([0.5, 0.25, 0.25])), jnp.array([True, True, False]))
    >>> float(s.valid_mass), round(float(s.entropy), 4)   # H = 1.5 log 2
    (0.75, 1.0397)
  """
  impl = dispatch.resolve(implementation)
  z, m = inputs.prepare(logits, valid_mask, temperature=temperature)
  t = jnp.asarray(temperature, jnp.float32)
  if not inputs.broadcasts_to(t.shape, z.shape[:-1]):
    raise errors.ShapeMismatchError(
        f"temperature of shape {t.shape} does not match the rows of logits {z.shape}.")
  return row_stats_flat(z, m, t, impl)


@pytree.dataclass
class GroupMasses:
  """Masses of three token groups per temperature: fields ``[n_T, ...]``, summing to 1.

  ``over``: valid tokens over-represented at T = 1 (``q_v > r_v``), or the top-m valid tokens
  by logit (ties at the m-th kept) when ``top_m`` is given; ``under``: the other valid tokens;
  ``invalid``: invalid tokens. ``temperatures`` echoes the grid.
  """
  temperatures: jax.Array
  over: jax.Array
  under: jax.Array
  invalid: jax.Array


def _row_groups(z, m, w, temps, top_m):
  if top_m is None:
    log_q = z - _lse(z, m)
    w = jnp.where(m, w, 0.0)
    over = m & (jnp.exp(log_q) * jnp.sum(w) > w)  # q_v > r_v at T = 1
  else:
    kth = jax.lax.top_k(jnp.where(m, z, -jnp.inf), min(top_m, z.shape[-1]))[0][-1]
    over = m & (z >= kth)
  top = jnp.max(z)

  def at(t):
    e = jnp.exp((z - top) / t)
    tot = jnp.sum(e)
    return (jnp.sum(jnp.where(over, e, 0.0)) / tot,
            jnp.sum(jnp.where(m & ~over, e, 0.0)) / tot,
            jnp.sum(jnp.where(m, 0.0, e)) / tot)

  return jax.lax.map(at, temps)


@functools.partial(jax.jit, static_argnames=("top_m",))
def _group_masses(z, m, w, temps, top_m):
  batch = z.shape[:-1]
  # the temperatures travel with every row: a shard_map may not close over arrays on an
  # Explicit mesh
  over, under, invalid = map_rows(
      lambda zr, mr, wr, tr: _row_groups(zr, mr, wr, tr, top_m), z, m, w,
      jnp.broadcast_to(temps, batch + temps.shape), batch_shape=batch)
  finite = inputs.row_finite(z)
  fix = lambda x: jnp.where(finite, jnp.moveaxis(x, len(batch), 0), jnp.nan)
  return GroupMasses(temperatures=temps, over=fix(over), under=fix(under), invalid=fix(invalid))


@on_input_mesh
def group_masses(logits: ArrayLike, valid_mask: ArrayLike, temperatures: ArrayLike,
                 target: ArrayLike | None = None, top_m: int | None = None) -> GroupMasses:
  """Mass of the over-represented valid, other valid and invalid tokens at each temperature.

  The paper's shape figure. Groups are fixed once (at T = 1, against the target ``r`` as in
  :func:`shape_stats`, or as the top-``m`` valid tokens), then for each ``T`` in
  ``temperatures`` the masses of ``softmax(z / T)`` on the three groups are returned.

  Args:
    logits: ``[..., V]``; valid_mask: bool ``[..., V]``.
    temperatures: ``[n_T]`` array of temperatures > 0 (new values do not recompile).
    target: optional weights as in :func:`shape_stats`.
    top_m: static int; when given, ``over`` is the top-m valid tokens instead.

  Returns:
    :class:`GroupMasses` with fields ``[n_T, ...]``; NaN for non-finite rows.

  Example:
    >>> g = group_masses(jnp.log(jnp.array([0.6, 0.2, 0.2])), jnp.array([True, True, False]),
    ...                  jnp.array([1.0, 100.0]))
    >>> g.over.tolist()     # token 0 is over-represented (q = .75 > r = .5)
    [0.600000..., 0.335...]
  """
  z, m = inputs.prepare(logits, valid_mask, temperature=temperatures, mask_required=True,
                        temperature_name="temperatures")
  temps = jnp.asarray(temperatures, jnp.float32)
  if temps.ndim != 1:
    raise errors.InputError(f"temperatures must be a 1-D array, got shape {temps.shape}.")
  if top_m is not None and int(top_m) < 1:
    raise errors.InputError(f"top_m must be >= 1, got {top_m}.")
  w = _target_weights(target, z.shape)
  w = jnp.ones(z.shape, jnp.float32) if w is None else w
  return _group_masses(z, m, w, temps, None if top_m is None else int(top_m))

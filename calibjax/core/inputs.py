"""Input normalisation shared by every array-core function.

Logits of any float dtype are upcast to float32 before any arithmetic (SPEC §0); masks must be
boolean and broadcast to the logits' shape. Shape problems raise at trace time (they are
static), value problems (NaN / +inf logits) never raise inside jit: they become a per-row
``finite`` flag. :func:`check_logits` is the host-side check that raises instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from calibjax import errors


def as_logits(logits: ArrayLike, name: str = "logits") -> jax.Array:
  """Returns ``logits`` as a float32 array of rank ≥ 1 (bf16/fp16/ints upcast)."""
  dtype = getattr(logits, "dtype", None) or np.asarray(logits).dtype
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise errors.InputError(f"{name} must be a real array, got dtype {dtype}.")
  z = jnp.asarray(logits, dtype=jnp.float32)
  if z.ndim < 1 or z.shape[-1] < 1:
    raise errors.InputError(
        f"{name} must have shape [..., V] with V >= 1, got shape {z.shape}.")
  return z


def broadcasts_to(shape_from: tuple[int, ...], shape: tuple[int, ...]) -> bool:
  """Whether an array of ``shape_from`` broadcasts to exactly ``shape``."""
  try:
    return jnp.broadcast_shapes(tuple(shape_from), tuple(shape)) == tuple(shape)
  except ValueError:
    return False


def as_mask(valid_mask: ArrayLike, shape: tuple[int, ...],
            name: str = "valid_mask") -> jax.Array:
  """Returns a bool mask broadcast to ``shape``; raises if it cannot be."""
  m = jnp.asarray(valid_mask)
  if m.dtype != jnp.bool_:
    raise errors.InputError(
        f"{name} must be a bool array (True = valid token), got dtype {m.dtype}.")
  if not broadcasts_to(m.shape, shape):
    raise errors.ShapeMismatchError(
        f"{name} of shape {m.shape} does not match logits of shape {tuple(shape)} "
        "(it must have the same shape, or broadcast to it, with the same vocabulary size).")
  return jnp.broadcast_to(m, shape)


def as_weights(target: ArrayLike, shape: tuple[int, ...], name: str = "target") -> jax.Array:
  """Returns float32 non-negative weights broadcast to ``shape`` (a target over tokens)."""
  r = jnp.asarray(target, dtype=jnp.float32)
  if not broadcasts_to(r.shape, shape):
    raise errors.ShapeMismatchError(
        f"{name} of shape {r.shape} does not match logits of shape {tuple(shape)}.")
  return jnp.broadcast_to(r, shape)


def check_temperature(temperature, name: str = "temperature") -> None:
  """Raises :class:`InputError` unless a concrete temperature (or grid) is finite and > 0.
  Traced values pass: inside jit a bad temperature gives NaN results instead."""
  if isinstance(temperature, jax.core.Tracer):
    return
  t = np.asarray(temperature, dtype=np.float64)
  if not np.all(np.isfinite(t) & (t > 0)):
    raise errors.InputError(f"{name} must be finite and > 0, got {t.ravel()[:8].tolist()}.")


def prepare(logits: ArrayLike, valid_mask: ArrayLike | None = None, *,
            temperature: ArrayLike | None = None, mask_required: bool = False,
            temperature_name: str = "temperature") -> tuple[jax.Array, jax.Array | None]:
  """The one entry check of the array core's public functions: float32 logits
  (:func:`as_logits`), the valid mask broadcast to them (:func:`as_mask`; None when absent and
  not ``mask_required``) and a temperature (or grid) that is finite and > 0
  (:func:`check_temperature`) when one is given.

  Raises:
    InputError / ShapeMismatchError: the problem and the shapes or values involved.
  """
  z = as_logits(logits)
  if valid_mask is None and mask_required:
    raise errors.InputError("valid_mask is required here (bool [..., V], True = valid).")
  m = None if valid_mask is None else as_mask(valid_mask, z.shape)
  if temperature is not None:
    check_temperature(temperature, temperature_name)
  return z, m


def row_finite(z: jax.Array) -> jax.Array:
  """Per-row flag ``[...]``: no NaN, no +inf, and at least one logit above -inf.

  One reduction: the row maximum is finite exactly then (``max`` propagates NaN)."""
  return jnp.isfinite(jnp.max(z, axis=-1))


def check_logits(logits: ArrayLike, name: str = "logits") -> None:
  """Host-side check: raises :class:`NonFiniteLogitsError` naming the first bad rows.

  Use it at entry points that receive logits from outside (files, models, users) before the
  jitted core, which would otherwise return NaN results with ``finite = False``.

  Example:
    >>> check_logits(np.array([[0.0, np.nan]]))
    Traceback (most recent call last):
    calibjax.errors.NonFiniteLogitsError: logits of shape (1, 2) has 1 bad rows: row (0,): token 1 is nan. ...
  """
  z = np.asarray(jax.device_get(logits), dtype=np.float32)
  if z.ndim < 1 or z.shape[-1] < 1:
    raise errors.InputError(f"{name} must have shape [..., V] with V >= 1, got {z.shape}.")
  bad = np.isnan(z) | (z == np.inf)
  all_neg_inf = np.all(z == -np.inf, axis=-1)
  if not bad.any() and not all_neg_inf.any():
    return
  rows = np.argwhere(bad.any(axis=-1) | all_neg_inf)
  lines = []
  for row in rows[:5]:
    row = tuple(int(i) for i in row)
    if all_neg_inf[row]:
      lines.append(f"row {row}: every logit is -inf (no token has probability > 0)")
    else:
      tok = int(np.argmax(bad[row]))
      lines.append(f"row {row}: token {tok} is {z[row][tok]}")
  more = f" (and {len(rows) - 5} more rows)" if len(rows) > 5 else ""
  raise errors.NonFiniteLogitsError(
      f"{name} of shape {z.shape} has {len(rows)} bad rows{more}: " + "; ".join(lines) +
      ". NaN and +inf logits are invalid; -inf is allowed for tokens with probability 0.")


def capacity(valid_mask: jax.Array, max_valid: int | None) -> int:
  """Static number of slots for the valid logits of one row (a power of two, > max_valid).

  With a concrete mask and ``max_valid=None`` the largest valid count is read from the mask;
  under tracing without ``max_valid`` every row may be fully valid, so the whole vocabulary is
  provisioned (correct, but as slow as a full sort). Rows with more valid tokens than
  ``max_valid`` are reported by the ``capacity_ok`` flag and get NaN results.
  """
  vocab = valid_mask.shape[-1]
  if max_valid is None:
    if isinstance(valid_mask, jax.core.Tracer):
      max_valid = vocab
    else:
      max_valid = int(np.max(np.sum(np.asarray(valid_mask), axis=-1), initial=0))
  max_valid = min(max(int(max_valid), 1), vocab)
  return 1 << max_valid.bit_length()  # > max_valid: one slot stays +inf as a sentinel

"""Double-float arithmetic: a value as an unevaluated sum ``hi + lo`` of two float32 numbers
(about 48 significant bits), from error-free transformations — for the few decisions that
float32 cannot settle (SPEC §4: a cumulative mass within float32 rounding of a top-p or
typical τ), on every backend, without float64.

Pairs ``(hi, lo)`` are normalised (``|lo| ≤ ulp(hi) / 2``), so that the sign of a
difference is the sign of its ``hi``. Rounding is IEEE round-to-nearest. XLA does not
reassociate float arithmetic, but the CPU backend contracts a product and a sum into one
fused multiply-add, which would feed a sum the unrounded product while the correction term
sees the rounded one: every operand of an error-free transformation passes an optimisation
barrier first (tested against float64 NumPy, inside larger jitted computations too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DD = tuple  # (hi, lo)

_SPLIT = np.float32(4097.0)  # 2^12 + 1: Dekker's split of a 24-bit significand
_EXP_STEPS = 64               # exp(r) reduced by a table of 2^(j/64)
_HALVING_DOWN_TO = 256  # total(): vectorised halving, then a variadic reduction
_LN2_64 = np.log(2.0) / _EXP_STEPS


def _parts(value: float, n: int, bits: int) -> list[np.float32]:
  """``value`` as ``n`` float32 parts, the first with ``bits`` significant bits."""
  head = np.float32(value)
  m, e = np.frexp(np.float64(head))
  head = np.float32(np.ldexp(np.round(np.ldexp(m, bits)), e - bits))
  out, rest = [head], np.float64(value) - np.float64(head)
  for _ in range(n - 1):
    out.append(np.float32(rest))
    rest -= np.float64(out[-1])
  return out


# ln2/64 in three parts; the first has 10 bits, so n·C1 is exact for |n| < 2^14 (|d| < 151)
_C1, _C2, _C3 = _parts(_LN2_64, 3, 10)
_TABLE = np.exp2(np.arange(_EXP_STEPS) / _EXP_STEPS)
_TABLE_HI = _TABLE.astype(np.float32)
_TABLE_LO = (_TABLE - _TABLE_HI.astype(np.float64)).astype(np.float32)


# Operands of error-free transformations are materialised first: a product (or a division,
# which XLA may turn into a product) must not be fused into the sum that consumes it.
_fixed = jax.lax.optimization_barrier


def split(value) -> DD:
  """A host number (float64) as a normalised pair of float32 NumPy arrays."""
  v = np.asarray(value, np.float64)
  hi = v.astype(np.float32)
  return hi, (v - hi.astype(np.float64)).astype(np.float32)


def two_sum(a, b, fixed: bool = True) -> DD:
  """``a + b`` exactly (Knuth); ``fixed=False`` when neither operand holds a product."""
  if fixed:
    a, b = _fixed((a, b))
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a, b, fixed: bool = True) -> DD:
  """``a + b`` exactly when ``|a| ≥ |b|`` (or a = 0)."""
  if fixed:
    a, b = _fixed((a, b))
  s = a + b
  return s, b - (s - a)


def _split(a) -> DD:
  c = _fixed(_SPLIT * a)
  hi = c - (c - a)
  return hi, a - hi


def two_prod(a, b) -> DD:
  """``a · b`` exactly (Dekker, no FMA needed)."""
  p = _fixed(a * b)
  ah, al = _split(a)
  bh, bl = _split(b)
  return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def divide(a, b) -> jax.Array:
  """``a / b`` correctly rounded to float32, as IEEE division (and PyTorch, and NumPy)
  gives it. XLA may compute a division by a broadcast scalar as a product with its
  reciprocal (on CPU 1 ulp off for ~10% of elements): the quotient is corrected with its
  exact residual ``a − q·b``."""
  a = jnp.asarray(a, jnp.float32)
  b = _fixed(jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape))
  q = a / b
  ph, pl = two_prod(q, b)
  r = (a - ph) - pl  # exact: q·b is within an ulp of a
  return jnp.where(jnp.isfinite(q) & (b != 0), q + r / b, q)


def add(x: DD, y: DD, fixed: bool = True) -> DD:
  s, e = two_sum(x[0], y[0], fixed)
  return _fast_two_sum(s, e + (x[1] + y[1]), fixed)


def mul(x: DD, y: DD) -> DD:
  p, e = two_prod(x[0], y[0])
  return _fast_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def total(x: DD) -> DD:
  """Σ over the last axis in double-float: vectorised pairwise halving down to 256 terms,
  then one variadic reduction. Few kernels on purpose: only sums follow the one barrier on
  the input, and each compiled kernel costs the process memory mappings (Linux allows
  65,530; a test worker that compiles hundreds of programs hits that)."""
  hi, lo = _fixed(x)
  n = hi.shape[-1]
  size = 1 << max(n - 1, 0).bit_length()
  pad = [(0, 0)] * (hi.ndim - 1) + [(0, size - n)]
  hi, lo = jnp.pad(hi, pad), jnp.pad(lo, pad)
  while size > _HALVING_DOWN_TO:
    size //= 2
    hi, lo = add((hi[..., :size], lo[..., :size]), (hi[..., size:], lo[..., size:]))
  zero = jnp.zeros((), hi.dtype)
  return jax.lax.reduce((hi, lo), (zero, zero), lambda x, y: add(x, y, False), (hi.ndim - 1,))


def exp_nonpositive(d: DD) -> DD:
  """``exp(d)`` for ``d = hi + lo ≤ 0`` to about 1e-13 relative; 0 below ``-87`` (where
  float32 ``exp`` is 0 or subnormal too).

  ``d = n·ln2/64 + r`` (``r`` exact in double-float), ``exp(r)`` by its Taylor series on
  ``|r| ≤ ln2/128``, times the table value ``2^((n mod 64)/64)`` and ``2^(n div 64)``."""
  dh, dl = d
  live = dh > -87.0
  dh = jnp.where(live, dh, 0.0)
  dl = jnp.where(live, dl, 0.0)
  n = jnp.round(dh * np.float32(1 / _LN2_64))
  t = dh - n * _C1                                   # exact
  ph, pl = two_prod(n, _C2)
  rh, rl = two_sum(t, -ph)
  rh, rl = _fast_two_sum(rh, rl - pl - n * _C3 + dl)
  q = rh * rh * (0.5 + rh * (np.float32(1 / 6) + rh * (np.float32(1 / 24) +
                                                       rh * np.float32(1 / 120))))
  eh, el = two_sum(np.float32(1.0), rh)
  e = _fast_two_sum(eh, el + (rl + q + rh * rl))
  ni = n.astype(jnp.int32)
  j = jnp.mod(ni, _EXP_STEPS)
  e = mul(e, (jnp.asarray(_TABLE_HI)[j], jnp.asarray(_TABLE_LO)[j]))
  # times 2^k (k ≥ -126: a normal float32 built from its bits; exp2 would round)
  k = jnp.floor_divide(ni, _EXP_STEPS)
  scale = jax.lax.bitcast_convert_type((k + 127) << 23, jnp.float32)
  return jnp.where(live, e[0] * scale, 0.0), jnp.where(live, e[1] * scale, 0.0)

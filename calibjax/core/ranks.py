"""Valid-rank counting: where each valid token sits in the whole-vocabulary ranking.

For one row of logits ``z [V]`` with valid mask ``m``, the valid logits sorted ascending are
``s_0 ≤ … ≤ s_{n-1}`` (``n = n_val``, padded with ``+inf`` to a static capacity ``C``). For
every slot ``j`` this module returns

- ``gt_all[j] = #{u : z_u > s_j}`` and ``eq_all[j] = #{u : z_u = s_j}`` (all tokens), and
- ``gt_val[j]``, ``eq_val[j]``: the same counts among valid tokens,

from which every order metric of SPEC §1 follows (see :mod:`calibjax.core.order`).

Two methods compute the same integers:

- ``"threshold"`` (default, sort-free): only the ``n`` valid logits are sorted (``top_k`` on the
  masked row, blocked); every logit is located among them (broadcast comparisons for small ``C``, a
  binary search of ``log2 C`` steps otherwise), and one histogram over the ``C`` slots gives
  all counts. Cost ``O(V·min(C, log C))`` per row, no sort of the vocabulary.
- ``"sort"``: the readable reference — sort the whole row and binary-search each valid logit
  in it. ``O(V log V)``; XLA's CPU sort makes it seconds for ``[64, 262144]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from calibjax.core import dispatch, inputs, pytree
from calibjax.core.rows import map_rows
from calibjax.core.selection import histogram, top_values

METHODS = ("threshold", "sort")


@pytree.dataclass
class ValidRanks:
  """Per-row valid-rank counts; slots ``j >= n_valid`` are padding (``s = +inf``)."""
  s: jax.Array          # [..., C] float32, valid logits ascending, +inf padded
  n_valid: jax.Array    # [...] int32
  gt_all: jax.Array     # [..., C] int32, tokens strictly above s_j
  eq_all: jax.Array     # [..., C] int32, tokens equal to s_j (s_j's own token included)
  gt_val: jax.Array     # [..., C] int32, valid tokens strictly above s_j
  eq_val: jax.Array     # [..., C] int32, valid tokens equal to s_j
  max_invalid: jax.Array  # [...] float32, largest invalid logit (-inf if none)
  capacity_ok: jax.Array  # [...] bool, n_valid fits the C - 1 slots
  finite: jax.Array     # [...] bool, see inputs.row_finite
  # With a temperature (else None), masses under p = softmax(z / T):
  gt_mass: jax.Array | None = None   # [..., C] mass of tokens strictly above s_j
  eq_mass: jax.Array | None = None   # [..., C] mass of tokens equal to s_j
  p_slot: jax.Array | None = None    # [..., C] probability of a token with logit s_j
  p_max: jax.Array | None = None     # [...] largest probability


def _sorted_valid(z: jax.Array, m: jax.Array, cap: int):
  """Valid logits of one row ascending in ``cap`` slots (``+inf`` padded), and their count.

  Exact while ``n < cap``; larger rows are flagged by ``capacity_ok``."""
  n = jnp.sum(m, dtype=jnp.int32)
  k = min(cap - 1, z.shape[-1])
  top = top_values(jnp.where(m, z, -jnp.inf), k)  # a valid -inf equals the fill
  j = jnp.arange(cap)
  s = jnp.where(j < n, jnp.take(top, jnp.clip(n - 1 - j, 0, k - 1)), jnp.inf)
  return s, n


def _locate(s: jax.Array, z: jax.Array):
  """For each logit z: ``#{j : s_j < z}`` and whether z equals some ``s_j``.

  ``s`` is sorted, of size ``C = 2^b``, its last slot ``+inf`` (so the count is ≤ C − 1).
  Up to 128 slots: sums of broadcast comparisons, one vectorised pass with no gathers;
  above: a branch-free binary search of ``b`` gather steps. (CPU, ``[64, 262144]``, C = 64:
  the comparisons make the whole order metric ~2.5x faster.)
  """
  cap = s.shape[-1]
  if cap <= 128:
    below = sum((s[j] < z).astype(jnp.int32) for j in range(cap - 1))
    at_or_below = sum((s[j] <= z).astype(jnp.int32) for j in range(cap - 1))
    return below, at_or_below > below
  below = jnp.zeros(z.shape, jnp.int32)
  step = cap // 2
  while step >= 1:
    cand = below + step
    below = jnp.where(jnp.take(s, cand - 1) < z, cand, below)
    step //= 2
  return below, jnp.take(s, below) == z


def _softmax(z, temperature):
  top = jnp.max(z)
  e = jnp.exp((z - top) / temperature)
  total = jnp.sum(e)
  prob = lambda v: jnp.exp((v - top) / temperature) / total
  return e / total, prob


def _slot_sums(s, z, weights):
  """Per slot of ``s`` (``C`` slots, last ``+inf``): ``(Σ w over z_u > s_j, Σ w over z_u =
  s_j)`` for each weight column (None: counts), each token located once."""
  cap = s.shape[-1]
  b, tied = _locate(s, z)
  # One histogram over 2C cells: cell b (not tied to s_b) or C + b (tied). Few slots: most
  # tokens share cell 0 (below every valid logit), which histogram() splits; at 512 slots
  # its copies cost more than they save (measured on real rows: 95 vs 130 ms)
  cell = b + cap * tied
  lo = jnp.searchsorted(s, s, side="left")
  hi = jnp.searchsorted(s, s, side="right")
  out = []
  for w in weights:
    hist = (histogram(cell, 2 * cap, w) if cap <= 64 else
            jnp.bincount(cell, weights=w, length=2 * cap))
    above = jnp.cumsum((hist[:cap] + hist[cap:])[::-1])[::-1]  # above[k] = Σ_{b_u >= k}
    out.append((jnp.take(jnp.append(above, 0), hi),           # z_u > s_j  <=>  b_u >= hi_j
                jnp.take(hist[cap:], jnp.clip(lo, 0, cap - 1))))
  return out


# A row whose valid logits fit fewer slots is selected and counted in those (fewer top values,
# comparisons instead of a binary search; on real rows most nodes have a handful of valid
# tokens), the rest padded.
_FEWER_SLOTS = (16, 64)


def _row_threshold(z, m, cap, temperature):
  n = jnp.sum(m, dtype=jnp.int32)
  p, prob = _softmax(z, temperature) if temperature is not None else (None, None)
  weights = (None,) if temperature is None else (None, p)

  def in_slots(c):  # slots from c on are padding (+inf): they repeat slot c - 1's sums
    def run():
      s = _sorted_valid(z, m, c)[0]
      grow = lambda x, fill: jnp.concatenate([x, jnp.broadcast_to(fill, (cap - c,))])
      sums = jax.tree.map(lambda x: grow(x, x[-1]), _slot_sums(s, z, weights))
      return grow(s, jnp.inf), sums
    return run
  sizes = [c for c in _FEWER_SLOTS if c < cap] + [cap]
  # the fewest slots holding the n valid logits and a +inf
  s, sums = jax.lax.switch(sum((n >= c).astype(jnp.int32) for c in sizes[:-1]),
                           [in_slots(c) for c in sizes])
  lo = jnp.searchsorted(s, s, side="left")
  hi = jnp.searchsorted(s, s, side="right")
  out = _finish(z, m, s, n, *sums[0], lo, hi)
  if temperature is None:
    return out
  gt_mass, eq_mass = sums[1]
  return out.replace(gt_mass=gt_mass, eq_mass=eq_mass, p_slot=prob(s), p_max=jnp.max(p))


def _row_sort(z, m, cap, temperature):
  s, n = _sorted_valid(z, m, cap)
  zs = jnp.sort(z)
  left = jnp.searchsorted(zs, s, side="left")
  right = jnp.searchsorted(zs, s, side="right")
  lo = jnp.searchsorted(s, s, side="left")
  hi = jnp.searchsorted(s, s, side="right")
  out = _finish(z, m, s, n, z.shape[-1] - right, right - left, lo, hi)
  if temperature is None:
    return out
  p, prob = _softmax(z, temperature)
  mass_above = jnp.append(jnp.cumsum(jnp.sort(p)[::-1])[::-1], 0.0)  # Σ p of sorted[i:]
  return out.replace(gt_mass=jnp.take(mass_above, right),
                     eq_mass=jnp.take(mass_above, left) - jnp.take(mass_above, right),
                     p_slot=prob(s), p_max=jnp.max(p))


def _finish(z, m, s, n, gt_all, eq_all, lo, hi):
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  return ValidRanks(
      s=s, n_valid=n, gt_all=i32(gt_all), eq_all=i32(eq_all), gt_val=i32(n - hi),
      eq_val=i32(hi - lo), max_invalid=jnp.max(jnp.where(m, -jnp.inf, z)),
      capacity_ok=n < s.shape[-1], finite=inputs.row_finite(z))


def _pallas(z, m, cap, temperature):
  """Valid logits per row (XLA), then every count and mass in one kernel pass."""
  batch, vocab = z.shape[:-1], z.shape[-1]
  z2, m2 = z.reshape(-1, vocab), m.reshape(-1, vocab)
  rows = (z2.shape[0],)
  t = jnp.broadcast_to(jnp.asarray(1.0 if temperature is None else temperature, jnp.float32),
                       batch).reshape(rows)

  def row(zr, mr, tr):  # the valid logits, and (T, top, total) for the kernel's p
    top = jnp.max(zr)
    return *_sorted_valid(zr, mr, cap), jnp.stack([tr, top, jnp.sum(jnp.exp((zr - top) / tr))])

  s, n, consts = map_rows(row, z2, m2, t, batch_shape=rows)
  c = dispatch.op("valid_rank_counts", "pallas")(z2, s, consts)
  lo = jax.vmap(lambda x: jnp.searchsorted(x, x, side="left"))(s)
  hi = jax.vmap(lambda x: jnp.searchsorted(x, x, side="right"))(s)
  out = jax.vmap(_finish)(z2, m2, s, n, c.gt, c.eq, lo, hi)
  if temperature is not None:
    t, top, total = (consts[:, i:i + 1] for i in range(3))
    out = out.replace(gt_mass=c.gt_mass, eq_mass=c.eq_mass, p_max=1.0 / total[:, 0],
                      p_slot=jnp.exp((s - top) / t) / total)
  return jax.tree.map(lambda v: v.reshape(batch + v.shape[1:]), out)


def valid_ranks(z: jax.Array, m: jax.Array, cap: int, method: str = "threshold",
                temperature: jax.Array | None = None,
                implementation: str = "xla") -> ValidRanks:
  """Valid-rank counts of float32 logits ``z [..., V]`` with bool mask ``m [..., V]``.

  ``cap`` (a power of two) slots hold the valid logits; rows with ``n_valid >= cap`` have
  ``capacity_ok = False`` and meaningless counts. Inputs must already be normalised
  (:mod:`calibjax.core.inputs`). With ``temperature`` (``[...]``), the mass fields are filled.
  ``implementation="pallas"`` (a resolved :mod:`calibjax.core.dispatch` choice) counts with
  :mod:`calibjax_kernels.valid_rank_counts` for ``method="threshold"``; ``"sort"`` is always XLA.
  """
  if implementation == "pallas" and method == "threshold":
    return _pallas(z, m, cap, temperature)
  row = {"threshold": _row_threshold, "sort": _row_sort}[method]
  batch = z.shape[:-1]
  if temperature is None:
    return map_rows(lambda zr, mr: row(zr, mr, cap, None), z, m, batch_shape=batch)
  t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), batch)
  return map_rows(lambda zr, mr, tr: row(zr, mr, cap, tr), z, m, t, batch_shape=batch)

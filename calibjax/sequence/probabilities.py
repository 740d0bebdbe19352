"""Every sampler's probability of each valid next token, at a batch of tree nodes, from one
pass over each row: single rules that share a rule and a temperature run as one sweep (one
score and cut per row for all their values), and only the valid tokens' own probabilities are
gathered (no ``[B, V]`` keep mask). ``oracle_rank``'s τ values at a temperature share one
count of the valid ranks (:func:`calibjax.core.oracle.validity_cutoffs`) and then cut like a
single rule; chains take the general :func:`calibjax.truncate_chain` path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from calibjax import errors
from calibjax.core import double_float, oracle, selection, truncation
from calibjax.core.rows import map_rows
from calibjax.core.rules import (ORACLE_RANK, ORACLE_SET, ORACLES, REGISTRY, RULES, TOP_K,
                                 logit_threshold, softmax_parts)
from calibjax.models.language_model import bucket


def as_samplers(samplers) -> tuple[truncation.Sampler, ...]:
  """:class:`calibjax.Sampler` objects from samplers or their text."""
  return tuple(s if isinstance(s, truncation.Sampler) else truncation.Sampler.parse(s)
               for s in samplers)


def _groups(specs):
  """Samplers grouped for evaluation: single rules (oracles included) sharing a rule and a
  temperature (one sweep), and every chain on its own; single rules of one temperature
  next to each other (their cuts share a pass over the row)."""
  groups: dict = {}
  for k, s in enumerate(specs):
    rule = s.rules[0][0] if len(s.rules) == 1 else None
    if rule in RULES or rule in ORACLES:
      groups.setdefault((rule, s.temperature), []).append(k)
    else:
      groups[(None, k)] = [k]
  first = {}
  for rule, t in groups:
    first.setdefault(t if rule is not None else None, len(first))
  return dict(sorted(groups.items(), key=lambda g: first[g[0][1] if g[0][0] else None]))


def _oracle_rank_cuts(z, m, specs, cap):
  """``oracle_rank``'s cutoff logits ``z*`` ``[..., R]`` (−inf where the oracle is undefined:
  every token kept, as in :func:`calibjax.truncate_chain`), for its samplers in
  :func:`_groups` order; ``[..., 0]`` when there are none."""
  cuts = [jnp.zeros(z.shape[:-1] + (0,), jnp.float32)]
  for (rule, t), members in _groups(specs).items():
    if rule == ORACLE_RANK:
      o = oracle.validity_cutoffs(z, m, jnp.asarray([specs[k].rules[0][1] for k in members],
                                                    jnp.float32), t, cap)
      cuts.append(jnp.moveaxis(jnp.where(o.defined, o.z_star, -jnp.inf), 0, -1))
  return jnp.concatenate(cuts, axis=-1)


# top_k values up to this are cut at the k-th largest of the row's largest values (a blocked
# top_k: ~5 vs ~37 ms per 32 rows of 262,144 for the radix selection of select_value)
_TOP_VALUES = 1024


def kth_largest(a, alive, ks):
  """``top_k``'s cut for each static ``k`` in ``ks``: the k-th largest alive value of ``a``
  (multiplicities counted), clamped to the alive range as
  :func:`calibjax.core.rules.select_value` clamps it (every alive token when fewer)."""
  top = selection.top_values(a, min(max(ks), a.shape[-1]))
  lowest = jnp.min(jnp.where(alive, a, jnp.inf))
  kth = jnp.take(top, jnp.asarray([min(k, top.shape[0]) - 1 for k in ks]))
  kth = jnp.where(jnp.asarray([k <= top.shape[0] for k in ks]), kth, lowest)
  return jnp.clip(kth, lowest, jnp.max(a))


def _row_valid_probs(z, m, idx, real, cuts, specs):
  """One row: each sampler's probability ``[C]`` of the tokens ``idx`` (``real`` marks the
  valid ones, which are the whole valid set) and its invalid mass ``[]``; ``cuts``: the
  row's ``oracle_rank`` parameters (:func:`_oracle_rank_cuts`).

  At each temperature, every rule whose score is the logit or a shift of it (all but
  ``typical`` and ``oracle_set``) has its cuts carried to cuts on ``a = z / T``
  (:func:`calibjax.core.rules.logit_threshold`, exact); one joint histogram
  (:func:`calibjax.core.selection.joint_threshold_stats`) counts the kept valid and invalid
  masses of every cut of the temperature, on ``a`` and on ``typical``'s score."""
  out, bad = [None] * len(specs), [None] * len(specs)
  by_temperature: dict = {}
  for (rule, t), members in _groups(specs).items():
    if rule is not None:
      by_temperature.setdefault(t, []).append((rule, members))
  n_cuts = 0
  for t, groups in by_temperature.items():
    # one a for every consumer, IEEE's quotient (SPEC: softmax(z / T)): XLA computes z / T
    # as z · (1/T) in some fusions (an ulp off for 10-33% of tokens), and a cut carried to a
    # must meet the same a
    a = jax.lax.optimization_barrier(double_float.divide(z, t))
    p = softmax_parts(a)[-1]
    alive = a > -jnp.inf
    p_idx = jnp.where(real, jnp.take(p, idx), 0.0)
    cut_on = []  # (members, score x, cuts θ on x): the rules' masses, one joint pass
    on_a = []  # (members, cuts on a): the logit-score rules share the score a
    for rule, members in groups:
      values = [specs[k].rules[0][1] for k in members]
      if rule == ORACLE_SET:  # softmax over the valid logits (never underflows)
        a_idx = jnp.where(real, jnp.take(a, idx), -jnp.inf)
        e = jnp.exp(a_idx - jnp.max(a_idx))
        for k in members:
          out[k], bad[k] = e / jnp.sum(e), jnp.zeros(())
        continue
      if rule == ORACLE_RANK:  # the cut: z*'s own token's a (XLA's z / T over a vector may
        z_star = cuts[n_cuts:n_cuts + len(members)]  # differ from z* / T by an ulp)
        n_cuts += len(members)
        on_cut = real[None, :] & (jnp.take(z, idx)[None, :] == z_star[:, None])
        hi = jnp.max(jnp.where(on_cut, jnp.take(a, idx)[None, :], -jnp.inf), axis=-1)
        lo = jnp.zeros(len(members), jnp.float32)
      elif rule == TOP_K and max(values) <= _TOP_VALUES:  # read off the row's largest a
        on_a.append((members, kth_largest(a, alive, [int(v) for v in values])))
        continue
      else:
        hi, lo = map(jnp.asarray, double_float.split(values))
      x, theta, _, consts = REGISTRY[rule].cut(a, m, hi, lo, lambda: a)
      if REGISTRY[rule].score == "logit":
        on_a.append((members, logit_threshold(theta, consts)))
      else:
        cut_on.append((members, x, theta))
    if on_a:
      cut_on.insert(0, (sum((mb for mb, _ in on_a), []), a,
                        jnp.concatenate([th for _, th in on_a])))
    if not cut_on:
      continue
    sums = selection.joint_threshold_stats(tuple(x for _, x, _ in cut_on), alive,
                                           tuple(th for _, _, th in cut_on), p, ~m)
    for (members, x, theta), (kept_valid, kept_invalid) in zip(cut_on, sums):
      kept = kept_valid + kept_invalid
      keep = (jnp.take(x, idx)[None, :] >= theta[:, None]) & jnp.take(alive, idx) & real
      probs = jnp.where(keep, p_idx / kept[:, None], 0.0)
      for j, k in enumerate(members):
        out[k], bad[k] = probs[j], kept_invalid[j] / kept[j]
  return out, bad


@functools.partial(jax.jit, static_argnames=("specs", "cap"))
def _valid_token_probs(z, m, idx, real, live, specs, cap):
  """Every sampler's probability of the valid tokens ``idx [B, C]`` (``real`` marks them;
  C covers each row's whole valid set): ``[S, B, C]``, and each sampler's invalid mass
  ``[S, B]``; single rules give zeros at the rows that are not ``live`` (a batch's spare
  rows), skipped."""
  def row(*args):
    run = lambda: _row_valid_probs(*args[:-1], specs)
    zeros = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(run))
    return jax.lax.cond(args[-1], run, zeros)
  rows, bad = map_rows(row, z, m, idx, real, _oracle_rank_cuts(z, m, specs, cap), live,
                       batch_shape=z.shape[:-1])
  for (rule, k), members in _groups(specs).items():
    if rule is None:  # chains: the general path
      tr = truncation.truncate_chain(z, specs[k], valid_mask=m, max_valid=cap)
      a = z / specs[k].temperature
      log_p = a - jax.scipy.special.logsumexp(a, axis=-1, keepdims=True)
      keep = jnp.take_along_axis(tr.keep, idx, axis=-1) & real
      rows[k] = jnp.where(keep, jnp.exp(jnp.take_along_axis(log_p, idx, axis=-1))
                          / tr.kept_mass[..., None], 0.0)
      bad[k] = 1.0 - tr.validity
  return jnp.stack(rows), jnp.stack(bad)


# (samplers, logits shape) -> the valid-set capacities compiled for them in this process
_COMPILED: dict[tuple, set[int]] = {}


class ValidTokenProbs:
  """Each sampler's probabilities of the valid tokens at a batch of nodes, compiled for a
  valid-set capacity that only grows, starting from the smallest one already compiled for the
  same samplers that holds the batch: a compile of ~100 samplers costs ~16 s on 2 cores, a
  larger capacity ~0.15 s per batch (so a frontier's later tasks reuse its first's)."""

  def __init__(self, samplers):
    self.specs = as_samplers(samplers)
    self.cap = 8

  def __call__(self, logits, valid: np.ndarray, nodes):
    """``(valid token ids [b, C] with -1 padding, each sampler's probabilities of them
    [S, b, C] (0 at the padding), invalid mass [S, b])`` for the first ``b = len(nodes)``
    rows of ``logits [B, V]`` and their masks ``valid [B, V]``."""
    n = len(nodes)
    tokens = [np.flatnonzero(v) for v in valid]
    need = bucket(max(map(len, tokens)), minimum=8)
    compiled = _COMPILED.setdefault((self.specs, logits.shape), set())
    self.cap = max(self.cap, min((c for c in compiled if c >= need), default=need))
    compiled.add(self.cap)
    idx = np.stack([np.pad(t, (0, self.cap - len(t)), constant_values=-1) for t in tokens])
    probs, invalid = _valid_token_probs(
        logits, jnp.asarray(valid), jnp.asarray(np.maximum(idx, 0)),
        jnp.asarray(idx >= 0), jnp.arange(len(idx)) < n, self.specs, self.cap)
    probs = np.asarray(probs, np.float64)[:, :n]
    invalid = np.asarray(invalid, np.float64)[:, :n]
    bad = ~(np.isfinite(probs).all(axis=2) & np.isfinite(invalid))
    if bad.any():
      k, i = np.argwhere(bad)[0]
      raise errors.NonFiniteLogitsError(
          f"sampler {self.specs[k]} gives non-finite probabilities at the node after "
          f"{nodes[i].text!r} (token path {list(nodes[i].path)}); are the model's logits finite?")
    return idx[:n], probs, np.maximum(invalid, 0.0)

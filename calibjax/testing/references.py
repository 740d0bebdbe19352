"""Float64 NumPy references of the metrics, written straight from SPEC.md with full sorts.

Slow and simple on purpose: the tests compare the JAX array core against these, and
``experiments/benchmark.py`` times them as the baseline. One row at a time; every function
takes ``[..., V]`` NumPy arrays and returns a dict of ``[...]`` arrays.
"""

from __future__ import annotations

import numpy as np

ORDER_FIELDS = ("auroc", "order_error", "average_precision", "best_f1", "clean_head",
                "k_all_valid", "margin")
SHAPE_FIELDS = ("valid_mass", "invalid_mass", "valid_entropy", "normalized_valid_entropy",
                "effective_valid", "inverse_simpson", "kl_target_to_q", "kl_q_to_target",
                "tv_to_target", "kl_target_to_p", "neg_log_valid_mass")


def _rows(fn, *arrays):
  lead = arrays[0].shape[:-1]
  flat = [np.broadcast_to(a, arrays[0].shape).reshape(-1, arrays[0].shape[-1]) for a in arrays]
  outs = [fn(*row) for row in zip(*flat)]
  return {k: np.array([o[k] for o in outs]).reshape(lead + np.shape(outs[0][k]))
          for k in outs[0]}


def _order_row(z, m):
  z = z.astype(np.float64)
  n, vocab = int(m.sum()), z.size
  if n == 0 or n == vocab or not np.all(np.isfinite(z) | (z == -np.inf)) or np.all(z == -np.inf):
    return {k: np.nan for k in ORDER_FIELDS}
  val, inv = np.sort(z[m]), np.sort(z[~m])
  zs = np.sort(z)
  below = np.searchsorted(inv, val, "left")
  ties = np.searchsorted(inv, val, "right") - below
  auroc = (below + 0.5 * ties).sum() / (n * (vocab - n))
  gt_all = vocab - np.searchsorted(zs, val, "right")
  eq_all = np.searchsorted(zs, val, "right") - np.searchsorted(zs, val, "left")
  gt_val = n - np.searchsorted(val, val, "right")
  eq_val = np.searchsorted(val, val, "right") - np.searchsorted(val, val, "left")
  ap = np.mean((gt_val + (eq_val + 1) / 2) / (gt_all + (eq_all + 1) / 2))
  tp, kept = gt_val + eq_val, gt_all + eq_all
  margin = 0.0 if val[0] == inv[-1] else val[0] - inv[-1]
  return dict(auroc=auroc, order_error=1 - auroc, average_precision=ap,
              best_f1=np.max(2 * tp / (kept + n)), clean_head=float(np.sum(val > inv[-1])),
              k_all_valid=float(np.sum(z >= val[0])), margin=margin)


def order_stats(logits, valid_mask):
  return _rows(_order_row, np.asarray(logits), np.asarray(valid_mask))


def recall_at_precision(logits, valid_mask, tau):
  def row(z, m):
    z = z.astype(np.float64)
    n = m.sum()
    if n == 0 or n == z.size or not np.all(np.isfinite(z) | (z == -np.inf)):
      return {"r": np.nan}
    best = 0.0
    for t in np.unique(z[m]):
      kept = z >= t
      if (kept & m).sum() >= tau * kept.sum():
        best = max(best, (kept & m).sum() / n)
    return {"r": best}
  return _rows(row, np.asarray(logits), np.asarray(valid_mask))["r"]


def _logsumexp(x):
  top = np.max(x)
  if top == -np.inf:
    return -np.inf
  return top + np.log(np.sum(np.exp(x - top)))


def _xlogy(x, y):
  with np.errstate(invalid="ignore"):
    return np.sum(np.where(x > 0, x * np.where(x > 0, y, 0.0), 0.0))


def _shape_row(z, m, w, temperature):
  a = z.astype(np.float64) / temperature
  lse = _logsumexp(a)
  p = np.exp(a - lse)
  n = m.sum()
  out = dict(valid_mass=p[m].sum(), invalid_mass=p[~m].sum())
  if n == 0:
    return {**{k: np.nan for k in SHAPE_FIELDS}, **out}
  lse_val = _logsumexp(a[m])  # log space: q stays defined when p(V) underflows
  with np.errstate(divide="ignore", invalid="ignore"):
    log_q = np.where(m, a - lse_val, -np.inf)
    q = np.exp(log_q)
    r = np.where(m, w, 0.0) / np.where(m, w, 0.0).sum()
    log_r = np.log(r)
  h = -_xlogy(q, log_q)
  with np.errstate(invalid="ignore"):  # -inf - -inf where both weights are 0 (masked out)
    diffs = (log_r - log_q, log_q - log_r, log_r - (a - lse))
  return dict(
      out, valid_entropy=h, normalized_valid_entropy=h / np.log(n) if n > 1 else 1.0,
      effective_valid=np.exp(h), inverse_simpson=1 / np.sum(q * q),
      kl_target_to_q=_xlogy(r, diffs[0]), kl_q_to_target=_xlogy(q, diffs[1]),
      tv_to_target=0.5 * np.abs(q - r).sum(), kl_target_to_p=_xlogy(r, diffs[2]),
      neg_log_valid_mass=lse - lse_val)


def shape_stats(logits, valid_mask, temperature=1.0, target=None):
  z = np.asarray(logits)
  w = np.ones(z.shape[-1]) if target is None else np.asarray(target, np.float64)
  return _rows(lambda zr, mr, wr: _shape_row(zr, mr, wr, temperature), z,
               np.asarray(valid_mask), w)


def group_masses(logits, valid_mask, temperatures, target=None, top_m=None):
  z = np.asarray(logits)
  w = np.ones(z.shape[-1]) if target is None else np.asarray(target, np.float64)

  def row(zr, m, wr):
    zr = zr.astype(np.float64)
    if top_m is None:
      q = np.where(m, np.exp(zr - _logsumexp(zr[m])), 0.0)
      over = m & (q > np.where(m, wr, 0.0) / np.where(m, wr, 0.0).sum())
    else:
      over = m & (zr >= np.sort(zr[m])[::-1][min(top_m, m.sum()) - 1])
    res = {"over": [], "under": [], "invalid": []}
    for t in temperatures:
      p = np.exp(zr / t - _logsumexp(zr / t))
      res["over"].append(p[over].sum())
      res["under"].append(p[m & ~over].sum())
      res["invalid"].append(p[~m].sum())
    return {k: np.array(v) for k, v in res.items()}

  out = _rows(row, z, np.asarray(valid_mask), w)
  return {k: np.moveaxis(v, -1, 0) for k, v in out.items()}


def cutoff_curve(logits, valid_mask, cutoffs, temperature=1.0):
  """Top-r precision/recall/validity; ties at the cutoff count fractionally."""
  def row(z, m):
    z = z.astype(np.float64)
    p = np.exp(z / temperature - _logsumexp(z / temperature))
    out = {"precision": [], "recall": [], "validity": []}
    zs = np.sort(z)[::-1]
    for r in cutoffs:
      t = zs[r - 1]
      gt, eq = z > t, z == t
      frac = (r - gt.sum()) / eq.sum()
      kv = (gt & m).sum() + frac * (eq & m).sum()
      out["precision"].append(kv / r)
      out["recall"].append(kv / m.sum())
      out["validity"].append((p[gt & m].sum() + frac * p[eq & m].sum()) /
                             (p[gt].sum() + frac * p[eq].sum()))
    return {k: np.array(v) for k, v in out.items()}
  return _rows(row, np.asarray(logits), np.asarray(valid_mask))


def _log_softmax(z, temperature=1.0):
  a = np.asarray(z, np.float64) / temperature
  return a - np.array([_logsumexp(r) for r in a.reshape(-1, a.shape[-1])]).reshape(
      a.shape[:-1] + (1,))


def _ece(bins, prob, outcome, n_bins):
  count = np.bincount(bins, minlength=n_bins).astype(np.float64)
  sp = np.bincount(bins, prob, minlength=n_bins)
  so = np.bincount(bins, outcome, minlength=n_bins)
  ok = count > 0
  gap = np.zeros(n_bins)
  gap[ok] = np.abs(so[ok] / count[ok] - sp[ok] / count[ok])
  w = count / count.sum()
  return dict(count=count, ece_l1=(w * gap).sum(), ece_l2=np.sqrt((w * gap**2).sum()),
              ece_max=gap.max())


def top_label_ece(logits, labels, n_bins=15, binning="width"):
  lp = _log_softmax(logits).reshape(-1, np.shape(logits)[-1])
  y = np.asarray(labels).reshape(-1)
  conf = np.exp(lp.max(-1))
  correct = np.array([(row[t] == row.max()) / np.sum(row == row.max()) for row, t in zip(lp, y)])
  if binning == "width":
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
  else:
    # a position's bin = the number of cut values (equal-count quantiles) at or below it
    cuts = np.sort(conf)[(np.arange(1, n_bins) * len(conf)) // n_bins]
    bins = np.array([np.sum(cuts <= c) for c in conf])
  return _ece(bins, conf, correct, n_bins)


def _log_bins(p, n_bins, p_min):
  edges = np.logspace(np.log10(p_min), 0, n_bins)  # edges[0] = p_min, edges[-1] = 1
  return np.minimum(np.searchsorted(edges, p, side="right"), n_bins - 1)


def full_ece(logits, labels, n_bins=17, p_min=1e-8):
  p = np.exp(_log_softmax(logits)).reshape(-1, np.shape(logits)[-1])
  y = np.asarray(labels).reshape(-1)
  hit = np.zeros_like(p)
  hit[np.arange(len(y)), y] = 1
  return _ece(_log_bins(p.ravel(), n_bins, p_min), p.ravel(), hit.ravel(), n_bins)


def distributional_calibration(logits, target, n_bins=17, p_min=1e-8):
  p = np.exp(_log_softmax(logits)).reshape(-1, np.shape(logits)[-1])
  r = np.broadcast_to(np.asarray(target, np.float64), np.shape(logits)).reshape(p.shape)
  r = r / r.sum(-1, keepdims=True)
  out = _ece(_log_bins(p.ravel(), n_bins, p_min), p.ravel(), r.ravel(), n_bins)
  with np.errstate(divide="ignore"):
    kl = np.sum(np.where(r > 0, r * (np.log(np.where(r > 0, r, 1)) - np.log(p)), 0), -1)
  return dict(out, tv=0.5 * np.abs(p - r).sum(-1), kl_target_to_p=kl)


def _scaled(z, temperature):
  """``z / T`` divided in float32 as the samplers do (SPEC §4 order), then float64."""
  return (np.asarray(z, np.float32) / np.float32(temperature)).astype(np.float64)


def _truncate_row(a, m, rule, param):
  """Keep mask of one rule on float64 scaled logits ``a`` (sort-based, straight from SPEC)."""
  alive = a > -np.inf
  if not alive.any():
    return np.ones_like(alive)
  p = np.exp(a - _logsumexp(a))
  top = a == a.max()
  entropy = -_xlogy(p, np.log(np.where(p > 0, p, 1.0)))
  if rule == "top_k":
    srt = np.sort(a[alive])[::-1]
    keep = a >= srt[min(int(param), srt.size) - 1]
  elif rule == "top_p":
    order = np.argsort(-a[alive], kind="stable")
    cum = np.cumsum(p[alive][order])
    i = min(int(np.sum(cum < param)), order.size - 1)
    keep = a >= a[alive][order][i] if param < 1 else alive  # P = 1: every p > 0
  elif rule == "min_p":
    keep = p >= param * p.max()
  elif rule == "epsilon":
    keep = p >= param
  elif rule == "eta":
    keep = p >= min(param, np.sqrt(param) * np.exp(-entropy))
  elif rule == "top_n_sigma":
    keep = a >= a.max() - param * np.std(a[alive])
  elif rule == "typical":
    with np.errstate(divide="ignore"):
      score = np.where(alive, np.abs(-np.log(p) - entropy), np.inf)
    order = np.argsort(score[alive], kind="stable")
    cum = np.cumsum(p[alive][order])
    i = min(int(np.sum(cum < param)), order.size - 1)
    delta = score[alive][order][i] if param < 1 else np.inf
    keep = score <= delta
    keep |= score == score.min()
  elif rule == "oracle_set":
    keep = m.copy() if (m & alive).any() else top
  elif rule == "oracle_rank":  # max recall with validity >= param; see oracle_cutoff
    if not (m & alive).any() or (m | ~alive).all():
      return alive
    best = oracle_cutoff(a[None], m[None], "validity", param)[0]
    srt = np.sort(a[alive])[::-1]
    cut = srt[int(best["r_star"]) - 1] if best["feasible"] else a[m & alive].max()
    keep = a >= cut
  else:
    raise ValueError(rule)
  if rule not in ("typical", "oracle_set", "oracle_rank"):
    keep = keep | top
  return keep & alive


def truncation_stats(keep, z, m, temperature=1.0):
  """Statistics of kept sets ``keep [..., V]`` (float64), as :class:`Truncation` fields."""
  def row(k, zr, mr):
    a = _scaled(zr, temperature)
    p = np.exp(a - _logsumexp(a))
    kv = k & mr
    vm = p[kv].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
      h = np.log(vm) - np.sum(np.where(p[kv] > 0, p[kv] * np.log(p[kv]), 0)) / vm
    return dict(kept_count=float(k.sum()), kept_mass=p[k].sum(), kept_valid=float(kv.sum()),
                kept_invalid=float((k & ~mr).sum()), precision=kv.sum() / k.sum(),
                recall=kv.sum() / mr.sum() if mr.sum() else np.nan,
                validity=vm / p[k].sum(), kept_valid_entropy=h)
  return _rows(row, np.asarray(keep), np.asarray(z), np.asarray(m))


def truncate(logits, rule, param, temperature=1.0, valid_mask=None):
  """Keep masks ``[..., V]`` of one rule (float64 reference); param scalar or per-row."""
  z = np.asarray(logits)
  m = np.zeros(z.shape, bool) if valid_mask is None else np.asarray(valid_mask)
  prm = np.broadcast_to(np.asarray(0.0 if param is None else param, np.float64)[..., None],
                        z.shape)
  row = lambda zr, mr, pr: {"keep": _truncate_row(_scaled(zr, temperature), mr, rule, pr[0])}
  return _rows(row, z, np.broadcast_to(m, z.shape), prm)["keep"]


_CHAIN_ORDER = ("top_k", "top_p", "min_p", "typical", "epsilon", "eta", "top_n_sigma",
                "oracle_set", "oracle_rank")


def truncate_chain(logits, rules, temperature=1.0, valid_mask=None):
  """Keep masks of a chain, rules applied in the fixed order on renormalised survivors."""
  z = np.asarray(logits)
  m = np.zeros(z.shape, bool) if valid_mask is None else np.asarray(valid_mask)
  rules = sorted(rules, key=lambda rv: _CHAIN_ORDER.index(rv[0]))

  def row(zr, mr):
    a = _scaled(zr, temperature)
    for rule, param in rules:
      a = np.where(_truncate_row(a, mr, rule, param), a, -np.inf)
    return {"keep": a > -np.inf if np.any(zr > -np.inf) else np.ones(a.shape, bool)}
  return _rows(row, z, np.broadcast_to(m, z.shape))["keep"]


def oracle_cutoff(logits, valid_mask, objective="validity", tau=0.95, temperature=1.0):
  """Brute force over every tie-closed cutoff {z >= t} (t any distinct logit), float64."""
  def row(zr, mr):
    a = _scaled(zr, temperature)
    p = np.exp(a - _logsumexp(a))
    n = mr.sum()
    best, best_key = None, None
    for t in np.unique(a):  # ascending: later = smaller cutoff, preferred on ties
      k = a >= t
      tp = (k & mr).sum()
      if tp == 0:
        continue
      st = dict(r_star=float(k.sum()), recall=tp / n, precision=tp / k.sum(),
                validity=p[k & mr].sum() / p[k].sum(), f1=2 * tp / (k.sum() + n),
                p_star=p[k].sum(), epsilon_star=p[a == t][0], min_p_star=p[a == t][0] / p.max())
      if objective == "f1":
        key, ok = st["f1"], True
      else:
        ok = st[objective] >= tau
        key = st["recall"]
      if ok and (best_key is None or key >= best_key):
        best, best_key = st, key
    if best is None:
      return {"feasible": False}
    return {**best, "feasible": True}
  z, m = np.asarray(logits), np.asarray(valid_mask)
  flat_z, flat_m = z.reshape(-1, z.shape[-1]), m.reshape(-1, z.shape[-1])
  return [row(zr, mr) for zr, mr in zip(flat_z, flat_m)]

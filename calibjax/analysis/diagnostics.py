"""Token-level diagnostics along a task's valid-prefix tree (the paper's order and shape views).

At every node of the tree whose path probability under the model (T = 1, no truncation) is at
least ``floor`` — best-first, up to ``max_nodes`` — the next-token distribution is measured
against the valid set at that prefix: order metrics (SPEC §1), shape metrics (SPEC §2),
``group_masses`` over a temperature grid (the shape figure) and precision / recall /
validity of the top-r set for a grid of cutoffs (the order figure). The summary weights
each node by its path probability, so it describes what decoding actually meets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.core import order, shape
from calibjax.core.rows import to_host
from calibjax.models import prompts
from calibjax.progress import bar as progress_bar
from calibjax.sequence.tree import BestFirst, NodeEvaluator, Tree
from calibjax.tasks import Task

SCALARS = ("valid_mass", "auroc", "average_precision", "clean_head", "k_all_valid", "margin",
           "normalized_valid_entropy", "effective_valid", "kl_q_to_target", "n_valid")


PAPER_TEMPERATURES = (0.1, 0.5, 0.8, 1.0, 1.5, 2.5, 3.0, 5.0, 10.0, 20.0)
# The paper's Figure (shape), Llama-3.1-8B-Instruct at the first US-state token:
# temperature -> (valid & frequent, valid & rare, invalid)
PAPER_LLAMA_US_STATES = {1.0: (0.806, 0.193, 0.001), 2.5: (0.465, 0.394, 0.141),
                         5.0: (0.191, 0.268, 0.541)}


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
  """Which nodes (``floor``, ``max_nodes``), the temperature grid of the shape view, the cutoff
  grid of the order view, nodes per model call, and the task prompt used (its index and style:
  ``"auto"``, ``"chat"`` or ``"completion"``, see :mod:`calibjax.models.prompts`).

  The shape view's groups, fixed at T = 1: with ``frequent_top_m = m`` (default 2, the
  paper's figure) "valid & frequent" is the top-m valid tokens by mass, "valid & rare" the
  other valid tokens; with 0, the valid tokens over-represented against the task's target
  (``q > r``) and the others. The third group is the invalid tokens."""
  floor: float = 1e-3
  max_nodes: int = 400
  temperatures: tuple[float, ...] = PAPER_TEMPERATURES
  frequent_top_m: int = 2
  cutoffs: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
  batch_size: int = 16
  prompt_index: int = 0
  prompt_style: str = "auto"
  template_kwargs: tuple[tuple[str, object], ...] = ()  # (name, value) for the chat template


def _metrics(z, m, cfg: DiagnoseConfig):
  """Per-row metric dicts for logits ``z [b, V]`` with valid masks ``m [b, V]``."""
  temps = jnp.asarray(cfg.temperatures, jnp.float32)
  cuts = jnp.asarray(cfg.cutoffs, jnp.int32)
  o = order.order_stats(z, m)
  s = shape.shape_stats(z, m)
  g = shape.group_masses(z, m, temps, top_m=cfg.frequent_top_m or None)
  c = order.cutoff_curve(z, m, cuts, max_cutoff=max(cfg.cutoffs))
  o, s, g, c = jax.tree.map(to_host, (o, s, g, c))  # rows may be split over processes
  rows = []
  for i in range(z.shape[0]):
    rows.append({
        "n_valid": int(o.n_valid[i]), "auroc": float(o.auroc[i]),
        "average_precision": float(o.average_precision[i]), "clean_head": float(o.clean_head[i]),
        "k_all_valid": float(o.k_all_valid[i]), "margin": float(o.margin[i]),
        "valid_mass": float(s.valid_mass[i]),
        "normalized_valid_entropy": float(s.normalized_valid_entropy[i]),
        "effective_valid": float(s.effective_valid[i]), "kl_q_to_target": float(s.kl_q_to_target[i]),
        "group_over": g.over[:, i].tolist(), "group_under": g.under[:, i].tolist(),
        "group_invalid": g.invalid[:, i].tolist(),
        "cutoff_precision": c.precision[i].tolist(), "cutoff_recall": c.recall[i].tolist(),
        "cutoff_validity": c.validity[i].tolist()})
  return rows


def diagnose_task(lm, task: Task, cfg: DiagnoseConfig = DiagnoseConfig(), *, head=None,
                  cache_dir: str | None = None, progress: bool = True) -> dict:
  """Diagnostics of ``lm`` on ``task``: ``{"task", "prompt" (the text the model read),
  "prompt_style", "config", "nodes": [...],
  "summary": {...}}``.

  Each node record: ``path`` (token ids after the prompt), ``text``, ``depth``, ``path_prob``
  and the metrics (:data:`SCALARS`; ``group_over/under/invalid`` per temperature;
  ``cutoff_precision/recall/validity`` per cutoff; cutoffs above the vocabulary size are
  dropped). The summary holds path-probability-weighted
  means of every scalar and curve (over the nodes where each is defined), the root's record,
  and the node count; see :func:`summarise`. ``head``: an optional recalibration head (as in
  :func:`calibjax.sequence.exact`), applied to the model's logits everywhere.
  """
  tok = lm.tokenizer
  vocab = len(tok.vocab)
  cfg = dataclasses.replace(cfg, cutoffs=tuple(c for c in cfg.cutoffs if c <= vocab) or (vocab,))
  tree = Tree(task, tok, cache_dir)
  prompt = prompts.task_prompt(lm, task, cfg.prompt_style, cfg.prompt_index, cfg.template_kwargs)
  evaluate = NodeEvaluator(lm, list(prompt.ids), tree, batch_size=cfg.batch_size, head=head)
  queue = BestFirst()
  queue.push(tree.root(np.ones(1)), 1.0)
  records = []
  bar = progress_bar(f"diagnose {task.name}", "node", cfg.max_nodes, enabled=progress)
  while queue.top() >= cfg.floor and len(records) < cfg.max_nodes:
    batch = queue.pop(min(cfg.batch_size, cfg.max_nodes - len(records)), min_priority=cfg.floor)
    logits, _, valid = evaluate.forward(batch)
    # the whole fixed-size batch (its spare rows repeat the first node): a last, smaller
    # batch would compile every metric again
    rows = _metrics(logits, jnp.asarray(valid), cfg)
    log_p = to_host(jax.nn.log_softmax(logits, axis=-1))
    for node, row, lp, m in zip(batch, rows, log_p, valid):
      records.append({"path": list(node.path), "text": node.text.decode("utf-8", "replace"),
                      "depth": len(node.path), "path_prob": float(node.mass[0]), **row})
      for v in np.flatnonzero(m):
        if v in tree.eos_ids:
          continue
        child = tree.child(node, v, node.mass * np.exp(lp[v]))
        if child.mass[0] >= cfg.floor and not tree.is_final(child):
          queue.push(child, child.mass[0])
    bar.update(len(batch))
  bar.close()
  return {"task": task.name, "prompt": prompt.text, "prompt_style": prompt.style,
          "config": dataclasses.asdict(cfg),
          "nodes": records, "summary": summarise(records, cfg)}


def summarise(records: list[dict], cfg: DiagnoseConfig) -> dict:
  """Path-probability-weighted means of each scalar and curve over the nodes (NaN entries
  skipped), the root record, and counts."""
  w = np.array([r["path_prob"] for r in records])

  def mean(key):
    x = np.array([r[key] for r in records], np.float64)
    ok = np.isfinite(x) if x.ndim == 1 else np.isfinite(x).all(axis=1)
    if not ok.any():
      return float("nan") if x.ndim == 1 else [float("nan")] * x.shape[1]
    avg = np.average(x[ok], axis=0, weights=w[ok])
    return float(avg) if x.ndim == 1 else avg.tolist()

  curves = ("group_over", "group_under", "group_invalid", "cutoff_precision", "cutoff_recall",
            "cutoff_validity")
  return {"nodes": len(records), "floor": cfg.floor, "temperatures": list(cfg.temperatures),
          "frequent_top_m": cfg.frequent_top_m,
          "cutoffs": list(cfg.cutoffs),
          "weighted_mean": {k: mean(k) for k in SCALARS + curves},
          "root": records[0] if records else None,
          "share_auroc_below_1": float(np.mean([r["auroc"] < 1 for r in records
                                                 if np.isfinite(r["auroc"])] or [np.nan]))}


def report_markdown(summaries: dict) -> str:
  """A short report stating the findings of each task's diagnostics in numbers."""
  lines = ["# Diagnostics", ""]
  for task, s in summaries.items():
    m, root = s["weighted_mean"], s["root"]
    temps = s["temperatures"]
    top = s.get("frequent_top_m")
    frequent, rare = ((f"valid & frequent (top {top})", "valid & rare") if top else
                      ("over-represented valid", "under-represented"))
    t1 = temps.index(1.0) if 1.0 in temps else 0
    hi = len(temps) - 1
    cuts = s["cutoffs"]
    lines += [f"## {task}", "",
              f"{s['nodes']} positions of the valid-prefix tree with path probability ≥ "
              f"{s['floor']:g} (averages weighted by path probability).", ""]
    if root is not None:
      lines.append(
          f"- First answer token: {root['n_valid']} valid tokens hold {root['valid_mass']:.1%} "
          f"of the mass; AUROC {root['auroc']:.3f}, every valid token is inside the top "
          f"{root['k_all_valid']:.0f}, the clean head (tokens before the first invalid one) is "
          f"{root['clean_head']:.0f}.")
    lines += [
        f"- Order: mean AUROC {m['auroc']:.3f}, average precision {m['average_precision']:.3f}; "
        f"AUROC < 1 at {s['share_auroc_below_1']:.0%} of positions. Keeping the top "
        f"{cuts[min(4, len(cuts) - 1)]} tokens gives precision "
        f"{m['cutoff_precision'][min(4, len(cuts) - 1)]:.2f}, recall "
        f"{m['cutoff_recall'][min(4, len(cuts) - 1)]:.2f}, validity "
        f"{m['cutoff_validity'][min(4, len(cuts) - 1)]:.2f}.",
        f"- Shape: valid mass {m['valid_mass']:.2f}; normalised valid entropy "
        f"{m['normalized_valid_entropy']:.2f} (1 = uniform over the valid tokens); effective "
        f"valid tokens {m['effective_valid']:.1f} of {m['n_valid']:.0f}; KL(q‖uniform) "
        f"{m['kl_q_to_target']:.2f} nats.",
        f"- Temperature {temps[t1]:g} → {temps[hi]:g}: invalid mass {m['group_invalid'][t1]:.2f} "
        f"→ {m['group_invalid'][hi]:.2f}, {rare} valid mass "
        f"{m['group_under'][t1]:.2f} → {m['group_under'][hi]:.2f}, {frequent} "
        f"{m['group_over'][t1]:.2f} → {m['group_over'][hi]:.2f}.", ""]
    if root is not None:
      lines += _shape_table(task, s, root, frequent, rare)
  return "\n".join(lines)


def _shape_table(task: str, s: dict, root: dict, frequent: str, rare: str) -> list[str]:
  """The first answer token's groups at every temperature, beside the paper's figure."""
  paper = s.get("frequent_top_m") == 2 and task == "us_states"
  head = f"| T | {frequent} | {rare} | invalid |" + (
      " paper (Llama-3.1-8B-Instruct) |" if paper else "")
  lines = ["At the first answer token:", "", head, "|---" * (head.count("|") - 1) + "|"]
  for i, t in enumerate(s["temperatures"]):
    row = (f"| {t:g} | {root['group_over'][i]:.3f} | {root['group_under'][i]:.3f} | "
           f"{root['group_invalid'][i]:.3f} |")
    if paper:
      ref = PAPER_LLAMA_US_STATES.get(t)
      row += (" " + " / ".join(f"{x:.3f}" for x in ref) + " |") if ref else " |"
    lines.append(row)
  return lines + [""]

"""Figures drawn from the JSON results (never from anything else), with matplotlib (Agg).

- :func:`shape_figure`: per task, the path-weighted mass of over-represented valid, other
  valid and invalid tokens against temperature (the paper's shape figure);
- :func:`order_figure`: per task, precision, recall and validity of the top-r set against the
  cutoff r (the paper's order figure);
- :func:`frontier_figure`: per task, seq_validity vs coverage@N for every sampler family, the
  oracle samplers marked, the ideal point starred.

Each returns a ``matplotlib.figure.Figure`` (no pyplot state, any backend); :func:`save`
writes it as a PNG atomically, :func:`png` returns the PNG bytes (for notebooks).
"""

from __future__ import annotations

import io
import math

from calibjax import results


def _panels(n: int, width: float = 4.2, height: float = 3.4):
  from matplotlib.figure import Figure
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(width * cols, height * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:n])


def shape_figure(summaries: dict):
  """``summaries``: ``{task: diagnose summary}`` (``summary.json`` of ``diagnose``)."""
  fig, axes = _panels(len(summaries))
  for ax, (task, s) in zip(axes, summaries.items()):
    m, temps = s["weighted_mean"], s["temperatures"]
    top = s.get("frequent_top_m")
    labels = ([f"valid & frequent (top {top} at T=1)", "valid & rare", "invalid"] if top else
              ["valid, over-represented at T=1", "valid, other", "invalid"])
    ax.stackplot(temps, m["group_over"], m["group_under"], m["group_invalid"], labels=labels,
                 colors=["#2b6cb0", "#90cdf4", "#e53e3e"], alpha=0.85)
    ax.set(xscale="log", xlabel="temperature", ylabel="probability mass", ylim=(0, 1),
           xlim=(min(temps), max(temps)), title=f"{task} ({s['nodes']} positions)")
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()
    ax.axvline(1.0, color="k", lw=0.6, ls=":")
  axes[0].legend(loc="lower left", fontsize=7)
  fig.suptitle("Shape: where the mass goes as temperature rises")
  fig.tight_layout()
  return fig


def order_figure(summaries: dict):
  """Precision / recall / validity of the top-r tokens against r (path-weighted means)."""
  fig, axes = _panels(len(summaries))
  for ax, (task, s) in zip(axes, summaries.items()):
    m, cuts = s["weighted_mean"], s["cutoffs"]
    for key, color in (("cutoff_precision", "#2b6cb0"), ("cutoff_recall", "#38a169"),
                       ("cutoff_validity", "#e53e3e")):
      ax.plot(cuts, m[key], marker="o", ms=3, color=color, label=key.split("_")[1])
    ax.set(xscale="log", xlabel="cutoff rank r (top-r tokens kept)", ylim=(0, 1.02),
           title=f"{task} (AUROC {m['auroc']:.3f})")
  axes[0].legend(loc="lower left", fontsize=7)
  fig.suptitle("Order: are valid tokens ranked above invalid ones?")
  fig.tight_layout()
  return fig


def frontier_figure(frontiers: dict):
  """``frontiers``: ``{task: frontier result}`` (``frontier.json`` of ``frontier``). Each rule
  family: all its points faint, its Pareto front (``pareto`` in the JSON) as a line."""
  import matplotlib
  fig, axes = _panels(len(frontiers), 4.6, 3.8)
  colors = matplotlib.colormaps["tab10"]
  for ax, (task, f) in zip(axes, frontiers.items()):
    n = str(f["coverage_n"])
    by_name = {p["sampler"]: p for p in f["points"]}
    fams = sorted({p["family"] for p in f["points"]})
    for i, fam in enumerate(fams):
      pts = [p for p in f["points"] if p["family"] == fam]
      front = [by_name[s] for s in f["pareto"][fam]]
      xy = lambda ps: ([p["seq_validity"] for p in ps], [p["coverage"][n] for p in ps])
      if fam in ("oracle_set", "oracle_rank"):
        ax.scatter(*xy(pts), marker="D" if fam == "oracle_set" else "s", s=30, zorder=3,
                   color="k" if fam == "oracle_set" else "#805ad5", label=fam)
      else:
        ax.plot(*xy(front), marker="o", ms=3, lw=1.2, color=colors(i % 10), label=fam)
        ax.scatter(*xy(pts), s=6, color=colors(i % 10), alpha=0.3)
    ax.scatter([f["ideal"][0]], [f["ideal"][1]], marker="*", s=160, color="gold",
               edgecolors="k", label="ideal", zorder=4)
    ax.set(xlabel="sequence validity", ylabel=f"expected coverage@{n}", xlim=(0, 1.02),
           ylim=(0, 1.02), title=f"{task} ({len(f['answers'])} answers)")
  axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.suptitle("Validity vs diversity (exact): Pareto front per rule")
  fig.tight_layout()
  return fig


def heads_figure(report: dict):
  """Per held-out task: coverage@N at seq_validity ≥ the report's level — the base model's best
  heuristic sampler, each head's, and oracle_set on the base model (from report.json)."""
  tasks = report["tasks"]
  heads = list(report["heads"])
  fig, axes = _panels(len(tasks), 3.2 + 0.5 * len(heads), 3.4)
  for ax, (task, row) in zip(axes, tasks.items()):
    labels = ["base"] + heads + ["oracle_set"]
    cells = [row["base_best_heuristic"]] + [row[h]["best_heuristic"] for h in heads] + [
        row["oracle_set_base"]]
    values = [0.0 if c is None else c["coverage"] for c in cells]
    ax.bar(range(len(labels)), values, color=["0.55"] + ["C0"] * len(heads) + ["C2"])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(task, fontsize=10)
    ax.set_ylabel(f"coverage at validity ≥ {report['level']:g}")
  fig.tight_layout()
  return fig


def available() -> bool:
  """Whether matplotlib (the ``plots`` extra) is installed."""
  import importlib.util
  return importlib.util.find_spec("matplotlib") is not None


def save(fig, path: str) -> str:
  """Writes ``fig`` as a PNG to ``path`` atomically (process 0 only); returns ``path``."""
  return results.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def png(fig) -> bytes:
  """``fig`` as PNG bytes (``IPython.display.Image(png(fig))`` shows it anywhere)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  return buf.getvalue()

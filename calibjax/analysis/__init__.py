"""What the experiment binaries compute, from the layers below, and how it is shown.

- :mod:`calibjax.analysis.diagnostics` — order and shape metrics along a task's tree;
- :mod:`calibjax.analysis.frontier` — validity–diversity frontiers of every sampler;
- :mod:`calibjax.analysis.plots` — the figures, from the JSON results (matplotlib, loaded
  when a figure is drawn).
"""

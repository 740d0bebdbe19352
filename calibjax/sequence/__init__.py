"""Sequence-level answer probabilities of a task under samplers (SPEC §6–7).

- :mod:`calibjax.sequence.tree` — the valid-prefix tree, best-first order, the model at nodes;
- :mod:`calibjax.sequence.probabilities` — every sampler's valid-token probabilities per node;
- :mod:`calibjax.sequence.exact` — exact answer probabilities by tree enumeration;
- :mod:`calibjax.sequence.monte_carlo` — sampled answers and their Wilson intervals.
"""

from calibjax.sequence.exact import ExactResult, SamplerResult, exact
from calibjax.sequence.monte_carlo import MonteCarloResult, record, sample, summarise, wilson
from calibjax.sequence.probabilities import as_samplers
from calibjax.sequence.tree import BestFirst, Node, NodeEvaluator, Tree, canonical_paths

__all__ = ["ExactResult", "SamplerResult", "exact", "MonteCarloResult", "record", "sample",
           "summarise", "wilson", "as_samplers", "BestFirst", "Node", "NodeEvaluator", "Tree",
           "canonical_paths"]

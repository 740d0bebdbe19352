"""Pallas kernels for the whole-vocabulary hot paths, each beside its plain-jnp reference.

Installed with calibjax under the import name ``calibjax_kernels`` (the folder is
``kernels/``). One module per op, each with its kernel and a ``<op>_reference`` of the same
signature:

- :mod:`calibjax_kernels.row_stats` — max, logsumexp, entropy, valid mass and valid entropy
  of every row in one streaming pass;
- :mod:`calibjax_kernels.threshold_stats` — count and mass (and valid count, mass,
  ``Σ p log p``) of the tokens at or above ``S`` thresholds per row, in one pass;
- :mod:`calibjax_kernels.valid_rank_counts` — tokens above and tied with each valid logit, and
  their mass.

Each is a pure block step run by one driver, :func:`calibjax_kernels.blocks.stream`, as a
``pl.pallas_call`` in two variants: ``"grid"`` (TPU: a (row blocks, vocabulary blocks) grid,
accumulators initialised under ``pl.when``) and ``"loop"`` (GPU through Triton: one program per
row block looping over the vocabulary). The ragged vocabulary tail is masked; no sort, top-k or
cumsum inside a kernel. They depend only on jax, and import Pallas only when a kernel is built
(the references run without it). The array core chooses between a kernel and its reference in
one table, :mod:`calibjax.core.dispatch`; on CPU the kernels run in interpret mode (for tests,
never for speed).
"""

from calibjax_kernels.row_stats import RowStats, row_stats, row_stats_reference
from calibjax_kernels.threshold_stats import (SCORES, ThresholdStats, threshold_stats,
                                              threshold_stats_reference)
from calibjax_kernels.valid_rank_counts import (RankCounts, valid_rank_counts,
                                                valid_rank_counts_reference)

__all__ = ["RowStats", "row_stats", "row_stats_reference", "SCORES", "ThresholdStats",
           "threshold_stats", "threshold_stats_reference", "RankCounts", "valid_rank_counts",
           "valid_rank_counts_reference"]

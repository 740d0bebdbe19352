"""Pallas kernels for the whole-vocabulary hot paths (optional; the library works without).

One module per op, each with its kernel and a plain-jnp ``<op>_reference``:

- :mod:`kernels.row_stats` — max, logsumexp, entropy, valid mass and valid entropy of every
  row in one streaming pass;
- :mod:`kernels.threshold_stats` — count and mass (and valid count, mass, ``Σ p log p``) of the
  tokens at or above ``S`` thresholds per row, in one pass;
- :mod:`kernels.valid_rank_counts` — tokens above and tied with each valid logit, and their mass.

Each is a pure block step run by one driver, :func:`kernels.blocks.stream`, as a
``pl.pallas_call`` in two variants: ``"grid"`` (TPU: a (row blocks, vocabulary blocks) grid,
accumulators initialised under ``pl.when``) and ``"loop"`` (GPU through Triton: one program per
row block looping over the vocabulary). The ragged vocabulary tail is masked; no sort, top-k or
cumsum inside a kernel. They depend only on jax. The array core chooses between them and its
XLA paths in one place, :mod:`calibjax.dispatch`; on CPU they run in interpret mode (for tests,
never for speed).
"""

from kernels.row_stats import RowStats, row_stats, row_stats_reference
from kernels.threshold_stats import (SCORES, ThresholdStats, threshold_stats,
                                     threshold_stats_reference)
from kernels.valid_rank_counts import RankCounts, valid_rank_counts, valid_rank_counts_reference

__all__ = ["RowStats", "row_stats", "row_stats_reference", "SCORES", "ThresholdStats",
           "threshold_stats", "threshold_stats_reference", "RankCounts", "valid_rank_counts",
           "valid_rank_counts_reference"]

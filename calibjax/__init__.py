"""calibjax: validity–diversity calibration of language models, in JAX.

The public API: order metrics (SPEC §1), shape metrics (§2), calibration error (§3),
truncation samplers (§4), oracle cutoffs (§5), ``calibjax.models`` (Gemma 3 from GGUF or
safetensors), ``calibjax.tasks`` (known-valid-set tasks, SPEC §6) and ``calibjax.validity``
(their token-validity masks), ``calibjax.sequence`` (exact and Monte Carlo answer
probabilities), ``calibjax.diagnostics`` and ``calibjax.frontier`` (what the experiment
binaries compute) and ``calibjax.plots`` (their figures, from the JSON results).
Definitions: SPEC.md and docs/semantics.md.
"""

from calibjax import diagnostics, errors, frontier, models, plots, sequence, tasks, validity
from calibjax.calibration import (DistributionalCalibration, ProperScores, Reliability,
                                  distributional_calibration, full_ece, proper_scores,
                                  top_label_ece)
from calibjax.inputs import check_logits
from calibjax.oracle import OracleCutoff, OracleGap, oracle_cutoff, oracle_gap
from calibjax.order import CutoffCurve, OrderStats, cutoff_curve, order_stats, recall_at_precision
from calibjax.shape import GroupMasses, RowStats, ShapeStats, group_masses, row_stats, shape_stats
from calibjax.truncation import RULES, Sampler, Sweep, Truncation, sweep, truncate, truncate_chain

__all__ = [
    "diagnostics", "errors", "frontier", "models", "plots", "sequence", "tasks", "validity",
    "check_logits",
    "OrderStats", "order_stats", "recall_at_precision", "CutoffCurve", "cutoff_curve",
    "ShapeStats", "shape_stats", "GroupMasses", "group_masses", "RowStats", "row_stats",
    "Reliability", "top_label_ece", "full_ece", "ProperScores", "proper_scores",
    "DistributionalCalibration", "distributional_calibration",
    "RULES", "Sampler", "Sweep", "Truncation", "sweep", "truncate", "truncate_chain",
    "OracleCutoff", "oracle_cutoff", "OracleGap", "oracle_gap",
]

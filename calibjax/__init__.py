"""calibjax: validity–diversity calibration of language models, in JAX."""

from calibjax import errors
from calibjax.inputs import check_logits
from calibjax.order import CutoffCurve, OrderStats, cutoff_curve, order_stats, recall_at_precision
from calibjax.shape import GroupMasses, ShapeStats, group_masses, shape_stats
from calibjax.calibration import (DistributionalCalibration, ProperScores, Reliability,
                                  distributional_calibration, full_ece, proper_scores,
                                  top_label_ece)
from calibjax.truncation import RULES, Sampler, Sweep, Truncation, sweep, truncate, truncate_chain
from calibjax.oracle import OracleCutoff, OracleGap, oracle_cutoff, oracle_gap

"""calibjax: validity–diversity calibration of language models, in JAX.

``import calibjax`` gives the array core (:mod:`calibjax.core`): order metrics (SPEC §1),
shape metrics (§2), calibration error (§3), truncation samplers (§4) and oracle cutoffs
(§5), pure functions over whole-vocabulary logits. The layers above load when first used:
``calibjax.tasks`` (known-valid-set tasks and their token-validity masks, §6),
``calibjax.models`` (language models from GGUF or safetensors), ``calibjax.sequence`` (exact
and Monte Carlo answer probabilities), ``calibjax.recalibration`` (heads),
``calibjax.analysis`` (diagnostics, frontiers, oracle gaps, figures) and
``calibjax.testing`` (float64 references). Definitions: SPEC.md and docs/semantics.md; the
layers: docs/architecture.md.
"""

import importlib

from calibjax import errors
from calibjax.core.calibration import (DistributionalCalibration, ProperScores, Reliability,
                                       distributional_calibration, full_ece, proper_scores,
                                       top_label_ece)
from calibjax.core.inputs import check_logits
from calibjax.core.oracle import OracleCutoff, oracle_cutoff
from calibjax.core.order import (CutoffCurve, OrderStats, cutoff_curve, order_stats,
                                 recall_at_precision)
from calibjax.core.rules import REGISTRY, RULES, Rule
from calibjax.core.shape import (GroupMasses, RowStats, ShapeStats, group_masses, row_stats,
                                 shape_stats)
from calibjax.core.truncation import Sampler, Sweep, Truncation, sweep, truncate, truncate_chain

__version__ = "0.7.0"  # see CHANGELOG.md; setup.py reads it from here

SUBPACKAGES = ("analysis", "models", "recalibration", "sequence", "tasks", "testing")
_LAZY = {"OracleGap": "calibjax.analysis.gaps", "oracle_gap": "calibjax.analysis.gaps"}

__all__ = [
    *SUBPACKAGES, "errors", "check_logits",
    "OrderStats", "order_stats", "recall_at_precision", "CutoffCurve", "cutoff_curve",
    "ShapeStats", "shape_stats", "GroupMasses", "group_masses", "RowStats", "row_stats",
    "Reliability", "top_label_ece", "full_ece", "ProperScores", "proper_scores",
    "DistributionalCalibration", "distributional_calibration",
    "REGISTRY", "RULES", "Rule", "Sampler", "Sweep", "Truncation", "sweep", "truncate",
    "truncate_chain", "OracleCutoff", "oracle_cutoff", "OracleGap", "oracle_gap",
]


def __getattr__(name: str):
  """The layers above the array core, imported on first use (PEP 562)."""
  if name in SUBPACKAGES:
    return importlib.import_module(f"calibjax.{name}")
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'calibjax' has no attribute {name!r}")

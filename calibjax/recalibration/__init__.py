"""Recalibration heads on a frozen model (Flax NNX).

- :mod:`calibjax.recalibration.heads` — the heads, their losses, saving and loading;
- :mod:`calibjax.recalibration.training` — training positions and the optax training loop;
- :mod:`calibjax.recalibration.report` — what a head changes, per step and per sequence.
"""

from calibjax.recalibration.heads import (HEADS, LossWeights, LowRankHead, TemperatureHead,
                                          ThresholdHead, bind, create, keep_loss, load, save,
                                          task_loss)

__all__ = ["HEADS", "LossWeights", "LowRankHead", "TemperatureHead", "ThresholdHead", "bind",
           "create", "keep_loss", "load", "save", "task_loss"]

"""Calibration-aware losses, metrics and temperature scaling for Keras 3."""

from keras_label_relax.losses import ConfidencePenalty
from keras_label_relax.losses import FocalLoss
from keras_label_relax.losses import LabelRelaxation
from keras_label_relax.losses import LabelSmoothing

__version__ = "0.1.0"

__all__ = [
    "ConfidencePenalty",
    "FocalLoss",
    "LabelRelaxation",
    "LabelSmoothing",
]

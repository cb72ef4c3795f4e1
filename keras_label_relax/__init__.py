"""Calibration-aware losses, metrics and temperature scaling for Keras 3."""

from keras_label_relax.calibration import TemperatureScaling
from keras_label_relax.losses import ConfidencePenalty
from keras_label_relax.losses import FocalLoss
from keras_label_relax.losses import LabelRelaxation
from keras_label_relax.losses import LabelSmoothing
from keras_label_relax.metrics import ExpectedCalibrationError
from keras_label_relax.plotting import plot_reliability_diagram

__version__ = "0.1.0"

__all__ = [
    "ConfidencePenalty",
    "ExpectedCalibrationError",
    "FocalLoss",
    "LabelRelaxation",
    "LabelSmoothing",
    "TemperatureScaling",
    "plot_reliability_diagram",
]

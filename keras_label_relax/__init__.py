"""Calibration-aware losses, metrics and calibrators for Keras 3."""

from keras_label_relax import calibration
from keras_label_relax import callbacks
from keras_label_relax import losses
from keras_label_relax import metrics
from keras_label_relax import plotting
from keras_label_relax._api import PUBLIC_NAMES

__version__ = "0.1.0"

# Every class and function decorated with `_api.export`, by name.
globals().update(
    {
        name: getattr(module, name)
        for module in (calibration, callbacks, losses, metrics, plotting)
        for name in PUBLIC_NAMES
        if hasattr(module, name)
    }
)
__all__ = sorted(PUBLIC_NAMES)

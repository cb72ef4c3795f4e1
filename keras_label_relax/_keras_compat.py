"""The pieces of Keras' loss machinery that Keras does not export.

`keras.losses.Loss.__call__` casts labels to the loss dtype before `call`;
the losses here override `__call__` to keep integer labels intact, and reuse
Keras' own masking and reduction so that `reduction`, `sample_weight` and
masks behave exactly as for the built-in losses.
"""

from keras.src.backend import get_keras_mask
from keras.src.losses.loss import reduce_weighted_values

__all__ = ["get_keras_mask", "reduce_weighted_values"]

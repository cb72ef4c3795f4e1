"""Value and gradient of a scalar function on whichever backend is active."""

import keras
import numpy as np


def value_and_gradient(fn, x):
    """Returns `fn(x)` and `d fn / d x` as numpy arrays."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value, gradient = jax.value_and_grad(fn)(jax.numpy.asarray(x))
    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = fn(x)
        gradient = tape.gradient(value, x)
    elif backend == "torch":
        import torch

        x = torch.tensor(np.asarray(x), requires_grad=True)
        value = fn(x)
        value.backward()
        gradient = x.grad
    else:
        raise NotImplementedError(backend)
    return keras.ops.convert_to_numpy(value), keras.ops.convert_to_numpy(gradient)

"""The paper's network architectures in Keras 3, plus a small MLP.

Every model outputs logits (no softmax), so pair it with `from_logits=True`
losses. Weight decay is an L2 kernel penalty inside the model, as in the
paper's Keras code; optimisers and schedules belong to the benchmark.

| name | used for | L2 |
|---|---|---|
| "mlp_small" | digits, synthetic (quick profile): Dense 128-128 ReLU | none |
| "dense2x1024" | MNIST, Fashion-MNIST: Dense 1024-1024 ReLU | none |
| "vgg16" | CIFAR: VGG16 with BatchNorm and dropout (Geifman's cifar-vgg) | 5e-4 |
| "resnet56v2" | CIFAR: pre-activation bottleneck ResNet, depth 56 | 1e-4 (conv) |
| "densenet_bc_100_12" | CIFAR: DenseNet-BC, depth 100, growth rate 12 | none |

Where the authors' code departs from the reference architecture, the
reference wins, and the docstring of each builder says what differs.
"""

import math
import operator

import keras
import numpy as np
from keras import layers

MODEL_NAMES = ("mlp_small", "dense2x1024", "vgg16", "resnet56v2", "densenet_bc_100_12")

# The L2 factor of each model's weight decay, from the paper's protocol.
DEFAULT_WEIGHT_DECAY = {
    "mlp_small": 0.0,
    "dense2x1024": 0.0,
    "vgg16": 5e-4,
    "resnet56v2": 1e-4,
    "densenet_bc_100_12": 0.0,
}

# Published parameter counts (CIFAR-10 head, 10 classes; dense2x1024 on
# 28x28 inputs), each counted as PARAMS_COUNTED says. Sources:
# - dense2x1024: the paper's architecture, 784*1024+1024 + 1024*1024+1024
#   + 1024*10+10 = 1,863,690 (exact).
# - vgg16: Geifman's cifar-vgg (github.com/geifmany/cifar-vgg; the authors'
#   code copies it), whose Keras summary reads "Total params: 15,001,418"
#   (14,991,946 trainable + 9,472 batch-norm statistics); exact.
# - resnet56v2: the Keras CIFAR-10 ResNet example (keras-team/keras,
#   examples/cifar10_resnet.py, resnet_v2 with n=6; the authors' code copies
#   it). Its table gives accuracies, not sizes; its code, built in Keras,
#   counts 1,673,738 (1,663,338 trainable), usually quoted as 1.67M; exact.
# - densenet_bc_100_12: Huang et al. 2017, Table 2: "0.8M"; the reference
#   count is 769,162 trainable parameters (osmr/imgclsmob model table,
#   densenet100_k12_bc_cifar10, PyTorch, which has no batch-norm statistics
#   among its parameters); exact.
PUBLISHED_PARAMS = {
    "dense2x1024": 1_863_690,
    "vgg16": 15_001_418,
    "resnet56v2": 1_673_738,
    "densenet_bc_100_12": 769_162,
}
# Which count each published figure is: "total" (Keras' count_params(),
# batch-norm moving statistics included) or "trainable".
PARAMS_COUNTED = {
    "dense2x1024": "total",
    "vgg16": "total",
    "resnet56v2": "total",
    "densenet_bc_100_12": "trainable",
}


def build_model(
    name,
    input_shape,
    num_classes,
    augment=False,
    seed=None,
    weight_decay=None,
    output_l2=0.0,
):
    """Builds one of `MODEL_NAMES`, outputting logits.

    Args:
        name: the architecture, one of `MODEL_NAMES`.
        input_shape: one example's shape, without the batch axis, e.g.
            `(32, 32, 3)`; the convolutional models need height, width and
            channels.
        num_classes: the number of classes K, the width of the logits.
        augment: if `True`, the model starts with random shifts of up to
            10% of the height and width and random horizontal flips (the
            CIFAR protocol). They act in training only.
        seed: an int for reproducible initial weights, dropout and
            augmentation; `None` draws them from Keras' global seed.
        weight_decay: the L2 factor on kernels; `None` takes the protocol's
            value from `DEFAULT_WEIGHT_DECAY`.
        output_l2: kernel and activity L2 factor of the output layer
            (`--protocol authors-code` sets 0.01 for ResNet, as the authors'
            code has); 0 for none.

    Returns:
        An uncompiled `keras.Model` named after `name`.
    """
    if name not in MODEL_NAMES:
        raise ValueError(
            f"Argument `name` must be one of {MODEL_NAMES}. Received: name={name!r}"
        )
    input_shape = _check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(
            f"Argument `num_classes` must be an int >= 2. Received: "
            f"num_classes={num_classes!r}"
        )
    if num_classes < 2:
        raise ValueError(
            f"Argument `num_classes` must be an int >= 2. Received: "
            f"num_classes={num_classes!r}"
        )
    if not isinstance(augment, bool):
        raise ValueError(
            f"Argument `augment` must be a bool. Received: augment={augment!r}"
        )
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
    ):
        raise ValueError(
            f"Argument `seed` must be an int >= 0 or None. Received: seed={seed!r}"
        )
    if weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAY[name]
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise ValueError(
            "Argument `weight_decay` must be a number >= 0 or None. Received: "
            f"weight_decay={weight_decay!r}"
        )
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(
            "Argument `weight_decay` must be a number >= 0 or None. Received: "
            f"weight_decay={weight_decay!r}"
        )
    if name in _CONV_NETS and len(input_shape) != 3:
        raise ValueError(
            f"Model {name!r} needs images of shape (height, width, channels). "
            f"Received: input_shape={input_shape}"
        )
    if augment and len(input_shape) != 3:
        raise ValueError(
            "Argument `augment=True` needs images of shape (height, width, "
            f"channels). Received: input_shape={input_shape}"
        )
    if isinstance(output_l2, bool) or not isinstance(output_l2, (int, float)):
        raise ValueError(
            "Argument `output_l2` must be a number >= 0. Received: "
            f"output_l2={output_l2!r}"
        )
    if not (math.isfinite(output_l2) and output_l2 >= 0):
        raise ValueError(
            "Argument `output_l2` must be a number >= 0. Received: "
            f"output_l2={output_l2!r}"
        )
    parts = _Parts(seed, float(weight_decay), float(output_l2))
    inputs = keras.Input(input_shape, name="inputs")
    x = inputs
    if augment:
        x = _random_shift(parts.seed())(x)
        x = layers.RandomFlip("horizontal", seed=parts.seed(), name="random_flip")(x)
    builder = {
        "mlp_small": _mlp_small,
        "dense2x1024": _dense2x1024,
        "vgg16": _vgg16,
        "resnet56v2": _resnet56v2,
        "densenet_bc_100_12": _densenet_bc_100_12,
    }[name]
    outputs = builder(x, num_classes, parts)
    return keras.Model(inputs, outputs, name=name)


_CONV_NETS = ("vgg16", "resnet56v2", "densenet_bc_100_12")


def _random_shift(seed):
    """Shifts of up to 10% of height and width, edges filled with the nearest
    pixel, as Keras' `ImageDataGenerator` did for the paper."""
    layer = layers.RandomTranslation(
        0.1, 0.1, fill_mode="nearest", seed=seed, name="random_shift"
    )
    # Keras marks this layer unfit for XLA (for TensorFlow's sake), which turns
    # jit off for the whole model. JAX compiles it fine, and a JAX model that
    # is not jitted trains orders of magnitude slower.
    if keras.backend.backend() == "jax":
        layer.supports_jit = True
    return layer


def _check_input_shape(input_shape):
    try:
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ValueError(
            "Argument `input_shape` must be a tuple of positive ints. Received: "
            f"input_shape={input_shape!r}"
        )
    return shape


class SeededInitializer(keras.initializers.Initializer):
    """Keras' Glorot uniform, He normal or zeros, drawn by numpy from `seed`.

    The same distributions as `keras.initializers.GlorotUniform`,
    `HeNormal` and `Zeros`, but drawn on the host: a seeded model then
    starts from the same weights on every backend, and JAX compiles no
    random-number program per weight shape (seconds each on a CPU, a
    tenth of the quick profile's run).

    Args:
        kind: `"glorot_uniform"`, `"he_normal"` or `"zeros"`.
        seed: an int, the seed of the draw.
    """

    def __init__(self, kind, seed=0):
        if kind not in ("glorot_uniform", "he_normal", "zeros"):
            raise ValueError(
                "Argument `kind` must be 'glorot_uniform', 'he_normal' or "
                f"'zeros'. Received: kind={kind!r}"
            )
        self.kind = kind
        self.seed = seed

    def __call__(self, shape, dtype=None):
        values = self._draw(tuple(shape)).astype(dtype or "float32")
        if keras.backend.backend() == "jax":
            import jax

            # `device_put` compiles nothing; `jnp.asarray` compiles a
            # program per shape.
            return jax.device_put(values)
        return keras.ops.convert_to_tensor(values)

    def _draw(self, shape):
        if self.kind == "zeros":
            return np.zeros(shape)
        rng = np.random.default_rng(self.seed)
        fan_in, fan_out = _fans(shape)
        if self.kind == "glorot_uniform":
            limit = math.sqrt(6.0 / max(1.0, fan_in + fan_out))
            return rng.uniform(-limit, limit, shape)
        # As Keras' VarianceScaling: a normal truncated at two standard
        # deviations, widened to keep the variance 2 / fan_in.
        stddev = math.sqrt(2.0 / max(1.0, fan_in)) / 0.87962566103423978
        values = rng.normal(0.0, stddev, shape)
        outside = np.abs(values) > 2 * stddev
        while outside.any():
            values[outside] = rng.normal(0.0, stddev, int(outside.sum()))
            outside = np.abs(values) > 2 * stddev
        return values

    def get_config(self):
        return {"kind": self.kind, "seed": self.seed}


def _fans(shape):
    """Keras' fan-in and fan-out of a kernel shape."""
    if len(shape) < 2:
        size = shape[0] if shape else 1
        return size, size
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


class _Parts:
    """Makes layers' seeded initializers, regularizers and seeds."""

    def __init__(self, seed, weight_decay, output_l2=0.0):
        self._rng = None if seed is None else np.random.default_rng(seed)
        self._weight_decay = weight_decay
        self._output_l2 = output_l2

    def seed(self):
        if self._rng is None:
            return None
        return int(self._rng.integers(2**31 - 1))

    def initializer(self, kind="glorot_uniform"):
        if self._rng is None:
            return kind
        return SeededInitializer(kind, self.seed())

    def bias_initializer(self):
        return "zeros" if self._rng is None else SeededInitializer("zeros")

    def regularizer(self):
        if self._weight_decay == 0:
            return None
        return keras.regularizers.L2(self._weight_decay)

    def logits(self, num_classes, regularize=False, kind="glorot_uniform"):
        """The output layer; `output_l2` puts kernel and activity L2 on it."""
        if self._output_l2:
            return layers.Dense(
                num_classes,
                kernel_initializer=self.initializer(kind),
                kernel_regularizer=keras.regularizers.L2(self._output_l2),
                activity_regularizer=keras.regularizers.L2(self._output_l2),
                name="logits",
            )
        return self.dense(num_classes, regularize, kind, name="logits")

    def dense(self, units, regularize=True, kind="glorot_uniform", **kwargs):
        return layers.Dense(
            units,
            kernel_initializer=self.initializer(kind),
            bias_initializer=self.bias_initializer(),
            kernel_regularizer=self.regularizer() if regularize else None,
            **kwargs,
        )

    def conv(self, filters, kernel_size, kind="glorot_uniform", **kwargs):
        return layers.Conv2D(
            filters,
            kernel_size,
            padding="same",
            kernel_initializer=self.initializer(kind),
            bias_initializer=self.bias_initializer(),
            kernel_regularizer=self.regularizer(),
            **kwargs,
        )

    def dropout(self, rate):
        return layers.Dropout(rate, seed=self.seed())


def _mlp(x, num_classes, parts, width):
    x = layers.Flatten()(x)
    x = parts.dense(width, activation="relu")(x)
    x = parts.dense(width, activation="relu")(x)
    return parts.dense(num_classes, name="logits")(x)


def _mlp_small(x, num_classes, parts):
    """Flatten -> Dense 128 ReLU -> Dense 128 ReLU -> Dense K."""
    return _mlp(x, num_classes, parts, width=128)


def _dense2x1024(x, num_classes, parts):
    """The paper's MNIST net: Flatten -> Dense 1024 ReLU (x2) -> Dense K."""
    return _mlp(x, num_classes, parts, width=1024)


# (filters, dropout rate after the block's batch norm, or None), "M": max pool.
_VGG16_LAYERS = (
    (64, 0.3), (64, None), "M",
    (128, 0.4), (128, None), "M",
    (256, 0.4), (256, 0.4), (256, None), "M",
    (512, 0.4), (512, 0.4), (512, None), "M",
    (512, 0.4), (512, 0.4), (512, None), "M",
)  # fmt: skip


def _vgg16(x, num_classes, parts):
    """VGG16 for CIFAR with batch norm and dropout (Geifman's cifar-vgg).

    Each 3x3 convolution is followed by ReLU, then batch norm, then dropout
    0.3 (first) or 0.4 except before a pooling; after the last pooling,
    dropout 0.5, a Dense 512 ReLU with batch norm, dropout 0.5 and the
    logits. L2 on every kernel but the logits'.
    """
    for entry in _VGG16_LAYERS:
        if entry == "M":
            x = layers.MaxPooling2D(2)(x)
            continue
        filters, rate = entry
        x = parts.conv(filters, 3, activation="relu")(x)
        x = layers.BatchNormalization()(x)
        if rate:
            x = parts.dropout(rate)(x)
    x = parts.dropout(0.5)(x)
    x = layers.Flatten()(x)
    x = parts.dense(512, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = parts.dropout(0.5)(x)
    return parts.dense(num_classes, regularize=False, name="logits")(x)


def _resnet56v2(x, num_classes, parts, depth=56):
    """ResNet v2 (He et al. 2016b), bottleneck units, as the Keras example.

    depth = 9n + 2 with n = 6 units per stage. A 3x3 conv (16 filters) with
    BN-ReLU, then 3 stages whose units are BN-ReLU-conv 1x1, 3x3, 1x1 with a
    shortcut (a 1x1 conv, strided, in each stage's first unit); bottleneck
    widths 16, 64, 128 and outputs 64, 128, 256; stages 2 and 3 halve the
    map size. Then BN-ReLU, global average pooling and the logits. He-normal
    initialisation, L2 on every conv kernel, none on the logits unless
    `output_l2` is set (the authors' code puts kernel and activity L2 of
    1e-2 on the output layer; the Keras example does not).
    """
    units = (depth - 2) // 9
    x = _resnet_conv(x, parts, 16, 3, pre_activation=False)
    width = 16
    for stage in range(3):
        out = width * (4 if stage == 0 else 2)
        for unit in range(units):
            first = unit == 0
            strides = 2 if first and stage > 0 else 1
            # The input of the very first unit is already BN-ReLU'd.
            normalize = not (first and stage == 0)
            y = _resnet_conv(x, parts, width, 1, strides=strides, normalize=normalize)
            y = _resnet_conv(y, parts, width, 3)
            y = _resnet_conv(y, parts, out, 1)
            if first:
                x = _resnet_conv(x, parts, out, 1, strides=strides, normalize=False)
            x = layers.Add()([x, y])
        width = out
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return parts.logits(num_classes, kind="he_normal")(x)


def _resnet_conv(
    x, parts, filters, kernel_size, strides=1, normalize=True, pre_activation=True
):
    """BN-ReLU-conv (BN-ReLU left out if not `normalize`), or conv-BN-ReLU."""
    conv = parts.conv(filters, kernel_size, kind="he_normal", strides=strides)
    if not pre_activation:
        return layers.Activation("relu")(layers.BatchNormalization()(conv(x)))
    if normalize:
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
    return conv(x)


def _densenet_bc_100_12(x, num_classes, parts, depth=100, growth=12):
    """DenseNet-BC (Huang et al. 2017): depth 100, growth rate 12.

    A 3x3 conv to 2 * growth channels, then 3 dense blocks of (depth - 4) / 6
    = 16 bottleneck layers (BN-ReLU-conv 1x1 to 4 * growth, BN-ReLU-conv
    3x3 to growth, concatenated to the input), with transitions between them
    (BN-ReLU-conv 1x1 halving the channels, 2x2 average pooling); then
    BN-ReLU, global average pooling and the logits. Convolutions have no
    bias. Glorot-uniform initialisation and no weight decay, as in the
    authors' code (which differs from the reference only by an unpadded
    first convolution).
    """
    layers_per_block = (depth - 4) // 6
    x = parts.conv(2 * growth, 3, use_bias=False)(x)
    for block in range(3):
        for _ in range(layers_per_block):
            y = _bn_relu_conv(x, parts, 4 * growth, 1)
            y = _bn_relu_conv(y, parts, growth, 3)
            x = layers.Concatenate()([x, y])
        if block < 2:
            x = _bn_relu_conv(x, parts, x.shape[-1] // 2, 1)
            x = layers.AveragePooling2D(2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return parts.dense(num_classes, name="logits")(x)


def _bn_relu_conv(x, parts, filters, kernel_size):
    x = layers.Activation("relu")(layers.BatchNormalization()(x))
    return parts.conv(filters, kernel_size, use_bias=False)(x)

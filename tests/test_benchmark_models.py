"""Tests of the benchmark architectures: sizes, logits, one training step."""

import math

import keras
import numpy as np
import pytest

from benchmarks import models

CIFAR = (32, 32, 3)
SHAPES = {
    "mlp_small": (64,),
    "dense2x1024": (28, 28),
    "vgg16": CIFAR,
    "resnet56v2": CIFAR,
    "densenet_bc_100_12": CIFAR,
}
# One compiled training step of a CIFAR net costs 4-75 s on 2 CPU cores,
# mostly compiling: JAX compiles each weight initialiser per shape, then the
# whole step (DenseNet ~75 s, VGG16 ~28 s); TensorFlow's DenseNet step takes
# 20-30 s. These steps run on the backends listed only; every model's build
# and size are tested on all three.
STEP_BACKENDS = {
    "vgg16": ("tensorflow", "torch"),
    "resnet56v2": ("tensorflow", "torch"),
    "densenet_bc_100_12": ("torch",),
}


def build_without_weights(name, num_classes=10, **kwargs):
    """Builds the whole graph but draws no initial weights (fast on JAX)."""
    with keras.StatelessScope(initialize_variables=False):
        model = models.build_model(name, SHAPES[name], num_classes, **kwargs)
    # Forget the deferred variables, or the next stateless scope (a JAX
    # training step) would initialise them all.
    keras.backend.clear_session(free_memory=False)
    return model


def count(weights):
    return sum(math.prod(w.shape) for w in weights)


@pytest.mark.parametrize("name", sorted(models.PUBLISHED_PARAMS))
def test_parameter_count_matches_the_published_size(name):
    model = build_without_weights(name)
    counted = models.PARAMS_COUNTED[name]
    size = (
        model.count_params() if counted == "total" else count(model.trainable_weights)
    )
    assert size == models.PUBLISHED_PARAMS[name]
    assert model.output_shape == (None, 10)


def test_other_sizes():
    # Huang et al. (2017), Table 2: DenseNet-BC (L=100, k=12) has 0.8M.
    densenet = build_without_weights("densenet_bc_100_12")
    assert abs(count(densenet.trainable_weights) / 0.8e6 - 1) < 0.05
    # 64*128+128 + 128*128+128 + 128*10+10.
    assert build_without_weights("mlp_small").count_params() == 26_122
    # A CIFAR-100 head only widens the logits layer.
    resnet = build_without_weights("resnet56v2", num_classes=100)
    assert resnet.count_params() == models.PUBLISHED_PARAMS["resnet56v2"] + 90 * 257


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_outputs_are_logits(name):
    model = build_without_weights(name)
    assert model.name == name
    assert model.layers[-1].name == "logits"
    assert model.layers[-1].activation is keras.activations.linear


def kernel_regularizers(model):
    """L2 factor (or None) of each layer with a kernel, in order."""
    factors = []
    for layer in model.layers:
        if hasattr(layer, "kernel_regularizer"):
            regularizer = layer.kernel_regularizer
            factors.append(None if regularizer is None else regularizer.l2)
    return factors


def test_weight_decay_is_where_the_protocol_puts_it():
    vgg = kernel_regularizers(build_without_weights("vgg16"))
    assert vgg == [pytest.approx(5e-4)] * 14 + [None]  # 13 conv, Dense 512
    resnet = kernel_regularizers(build_without_weights("resnet56v2"))
    assert resnet == [pytest.approx(1e-4)] * (len(resnet) - 1) + [None]
    assert len(resnet) == 56 + 3  # 55 convs + 3 projection shortcuts + logits
    densenet = kernel_regularizers(build_without_weights("densenet_bc_100_12"))
    assert densenet == [None] * 100  # 1 + 3 * 32 + 2 transitions + logits
    dense = kernel_regularizers(build_without_weights("dense2x1024"))
    assert dense == [None] * 3
    wide = build_without_weights("densenet_bc_100_12", weight_decay=1e-4)
    assert kernel_regularizers(wide) == [pytest.approx(1e-4)] * 100


def test_weight_decay_adds_l2_of_the_kernels_to_the_loss():
    model = models.build_model("mlp_small", (5,), 3, seed=0, weight_decay=1e-3)
    kernels = [layer.get_weights()[0] for layer in model.layers if layer.weights]
    expected = 1e-3 * sum(np.sum(np.square(kernel)) for kernel in kernels)
    penalty = sum(keras.ops.convert_to_numpy(loss) for loss in model.losses)
    np.testing.assert_allclose(penalty, expected, rtol=1e-5)
    assert models.build_model("mlp_small", (5,), 3).losses == []


def test_seed_fixes_the_initial_weights():
    def weights(seed):
        model = models.build_model("dense2x1024", (6, 6), 4, seed=seed)
        return model.get_weights()

    first, again, other = weights(0), weights(0), weights(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_augmentation_acts_in_training_only():
    model = models.build_model("mlp_small", (8, 8, 3), 10, augment=True, seed=1)
    shift, flip = model.layers[1], model.layers[2]
    assert isinstance(shift, keras.layers.RandomTranslation)
    config = shift.get_config()
    assert config["height_factor"] == config["width_factor"] == 0.1
    assert config["fill_mode"] == "nearest"
    assert isinstance(flip, keras.layers.RandomFlip) and flip.mode == "horizontal"
    images = np.random.default_rng(0).random((16, 8, 8, 3)).astype("float32")
    for layer in (shift, flip):
        unchanged = keras.ops.convert_to_numpy(layer(images, training=False))
        np.testing.assert_array_equal(unchanged, images)
        changed = keras.ops.convert_to_numpy(layer(images, training=True))
        assert changed.shape == images.shape and not np.allclose(changed, images)
    plain = models.build_model("mlp_small", (8, 8, 3), 10)
    assert len(plain.layers) == len(model.layers) - 2


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the jit override is JAX's alone"
)
def test_augmented_models_stay_jit_compiled_on_jax():
    model = models.build_model("mlp_small", (8, 8, 3), 10, augment=True)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    assert model.jit_compile is True


def test_authors_code_output_layer_has_kernel_and_activity_l2():
    model = models.build_model("resnet56v2", (8, 8, 3), 10, seed=0, output_l2=0.01)
    logits = model.get_layer("logits")
    assert logits.kernel_regularizer.l2 == pytest.approx(0.01)
    assert logits.activity_regularizer.l2 == pytest.approx(0.01)
    plain = models.build_model("resnet56v2", (8, 8, 3), 10, seed=0)
    assert plain.get_layer("logits").kernel_regularizer is None
    with pytest.raises(ValueError, match="output_l2"):
        models.build_model("mlp_small", (4,), 10, output_l2=-1.0)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_one_training_step_on_random_data(name):
    backends = STEP_BACKENDS.get(name)
    if backends and keras.backend.backend() not in backends:
        pytest.skip(f"too slow to compile here; runs on {backends}")
    shape = SHAPES[name]
    rng = np.random.default_rng(0)
    x = rng.random((4, *shape)).astype("float32")
    y = np.array([0, 3, 7, 9])
    model = models.build_model(name, shape, 10, augment=len(shape) == 3, seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = model.get_layer("logits").get_weights()[0]
    loss = model.train_on_batch(x, y)
    after = model.get_layer("logits").get_weights()[0]
    assert np.isfinite(loss) and loss > 0
    assert not np.array_equal(before, after)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet"}, "`name`"),
        ({"name": "vgg16", "input_shape": (28, 28)}, "height, width, channels"),
        ({"input_shape": (64,), "augment": True}, "`augment=True`"),
        ({"input_shape": "64"}, "`input_shape`"),
        ({"input_shape": (0, 3)}, "`input_shape`"),
        ({"num_classes": 1}, "`num_classes`"),
        ({"num_classes": 10.0}, "`num_classes`"),
        ({"augment": 1}, "`augment`"),
        ({"seed": -1}, "`seed`"),
        ({"seed": 1.5}, "`seed`"),
        ({"weight_decay": -1e-4}, "`weight_decay`"),
        ({"weight_decay": float("nan")}, "`weight_decay`"),
        ({"weight_decay": "1e-4"}, "`weight_decay`"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    arguments = {"name": "mlp_small", "input_shape": (64,), "num_classes": 10}
    with pytest.raises(ValueError, match=match):
        models.build_model(**(arguments | kwargs))

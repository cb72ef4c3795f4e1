"""The losses inside Keras: serialisation, saving, and training."""

import keras
import numpy as np
import pytest

from keras_label_relax import ConfidencePenalty
from keras_label_relax import DualFocalLoss
from keras_label_relax import FocalLoss
from keras_label_relax import LabelRelaxation
from keras_label_relax import LabelSmoothing
from keras_label_relax import MarginLabelSmoothing
from keras_label_relax import PolyLoss
from keras_label_relax import SampleDependentFocalLoss

CONFIGURED_LOSSES = [
    LabelRelaxation(alpha=0.25, from_logits=True, reduction="sum", name="lr"),
    LabelSmoothing(alpha=0.05, from_logits=True, reduction="mean", name="ls"),
    ConfidencePenalty(beta=2.0, reduction=None, name="cp", dtype="float64"),
    FocalLoss(gamma=3.5, from_logits=True, name="fl", dtype="mixed_bfloat16"),
    SampleDependentFocalLoss(
        thresholds=[0.2, 0.5], gammas=(5, 3, 1), from_logits=True, reduction=None
    ),
    DualFocalLoss(gamma=2.5, name="dfl", dtype="float64"),
    MarginLabelSmoothing(margin=6.0, weight=0.2, reduction="sum"),
    PolyLoss(epsilon=-0.5, from_logits=True, name="poly"),
]
LOSS_IDS = ["lr", "ls", "cp", "fl", "flsd", "dfl", "mbls", "poly"]


def attributes(loss):
    return {
        key: getattr(loss, key)
        for key in (
            "alpha",
            "beta",
            "gamma",
            "thresholds",
            "gammas",
            "margin",
            "weight",
            "epsilon",
            "from_logits",
            "reduction",
            "name",
        )
        if hasattr(loss, key)
    } | {"dtype": loss.dtype, "class": type(loss)}


@pytest.mark.parametrize("loss", CONFIGURED_LOSSES, ids=LOSS_IDS)
def test_serialize_round_trip(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert attributes(restored) == attributes(loss)
    assert restored.get_config() == loss.get_config()


@pytest.mark.parametrize("loss", CONFIGURED_LOSSES, ids=LOSS_IDS)
def test_get_config_round_trip(loss):
    restored = type(loss).from_config(loss.get_config())
    assert attributes(restored) == attributes(loss)


def small_model(num_classes=4, softmax=False):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    outputs = keras.layers.Dense(num_classes)(hidden)
    if softmax:
        outputs = keras.layers.Softmax(dtype="float32")(outputs)
    return keras.Model(inputs, outputs)


def toy_data(num_samples=64, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0).astype("int32")
    return x, y % num_classes


@pytest.mark.parametrize("loss", CONFIGURED_LOSSES, ids=LOSS_IDS)
def test_keras_file_round_trip(loss, tmp_path):
    model = small_model(softmax=not loss.from_logits)
    model.compile(optimizer="sgd", loss=loss)
    x, y = toy_data()
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert attributes(restored.loss) == attributes(loss)
    np.testing.assert_allclose(
        restored.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-5
    )


TRAINING_LOSSES = {
    "lr": lambda logits: LabelRelaxation(alpha=0.1, from_logits=logits),
    "ls": lambda logits: LabelSmoothing(alpha=0.1, from_logits=logits),
    "cp": lambda logits: ConfidencePenalty(beta=0.5, from_logits=logits),
    "fl": lambda logits: FocalLoss(gamma=0.5, from_logits=logits),
}
NEW_TRAINING_LOSSES = {
    "flsd": lambda logits: SampleDependentFocalLoss(from_logits=logits),
    "dfl": lambda logits: DualFocalLoss(gamma=2.0, from_logits=logits),
    "mbls": lambda logits: MarginLabelSmoothing(margin=2.0, weight=0.1),
    "poly": lambda logits: PolyLoss(epsilon=1.0, from_logits=logits),
}


@pytest.fixture
def mixed_bfloat16_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy("float32")


def fit_and_check(loss, from_logits, jit_compile):
    keras.utils.set_random_seed(0)
    x, y = toy_data(num_samples=128)
    model = small_model(softmax=not from_logits)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    return model


JIT_MODES = [False, True]
# torch.compile takes tens of seconds per model on CPU: the torch backend
# compiles once per loss, in `test_fit`.
MIXED_JIT_MODES = [False] if keras.backend.backend() == "torch" else JIT_MODES


@pytest.mark.parametrize("jit_compile", JIT_MODES)
@pytest.mark.parametrize("key", TRAINING_LOSSES)
def test_fit(key, jit_compile):
    fit_and_check(TRAINING_LOSSES[key](True), True, jit_compile)
    if not jit_compile or keras.backend.backend() != "torch":
        fit_and_check(TRAINING_LOSSES[key](False), False, jit_compile)


@pytest.mark.parametrize("jit_compile", MIXED_JIT_MODES)
@pytest.mark.parametrize("key", TRAINING_LOSSES)
def test_fit_under_mixed_bfloat16(key, jit_compile, mixed_bfloat16_policy):
    model = fit_and_check(TRAINING_LOSSES[key](True), True, jit_compile)
    assert model.layers[-1].compute_dtype == "bfloat16"


# torch.compile takes tens of seconds per model on CPU: the new losses are
# compiled on PyTorch only by tests/test_new_losses.py.
NEW_JIT_MODES = [False] if keras.backend.backend() == "torch" else JIT_MODES


@pytest.mark.parametrize("jit_compile", NEW_JIT_MODES)
@pytest.mark.parametrize("key", NEW_TRAINING_LOSSES)
def test_fit_new_losses(key, jit_compile):
    fit_and_check(NEW_TRAINING_LOSSES[key](True), True, jit_compile)
    if key != "mbls":
        fit_and_check(NEW_TRAINING_LOSSES[key](False), False, jit_compile)


@pytest.mark.parametrize("jit_compile", MIXED_JIT_MODES)
@pytest.mark.parametrize("key", NEW_TRAINING_LOSSES)
def test_fit_new_losses_under_mixed_bfloat16(key, jit_compile, mixed_bfloat16_policy):
    model = fit_and_check(NEW_TRAINING_LOSSES[key](True), True, jit_compile)
    assert model.layers[-1].compute_dtype == "bfloat16"


def test_compile_with_integer_and_one_hot_labels():
    x, y = toy_data()
    model = small_model()
    model.compile(optimizer="sgd", loss=LabelRelaxation(alpha=0.1, from_logits=True))
    sparse = model.evaluate(x, y, verbose=0)
    dense = model.evaluate(x, keras.utils.to_categorical(y, 4), verbose=0)
    assert sparse == pytest.approx(dense, rel=1e-6)


def test_masked_timesteps_are_ignored_as_by_keras_losses():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 5, 3)).astype("float32")
    x[:, 3:] = 0.0
    y = rng.integers(0, 4, (8, 5))
    inputs = keras.Input((5, 3))
    outputs = keras.layers.Dense(4)(keras.layers.Masking(0.0)(inputs))
    model = keras.Model(inputs, outputs)

    def evaluate(loss, labels):
        model.compile(loss=loss)
        return model.evaluate(x, labels, verbose=0)

    relaxation = LabelRelaxation(alpha=0.0, from_logits=True)
    expected = evaluate(keras.losses.SparseCategoricalCrossentropy(True), y)
    assert evaluate(relaxation, y) == pytest.approx(expected, rel=1e-6)
    y[:, 3:] = (y[:, 3:] + 1) % 4  # labels of masked steps must not matter
    assert evaluate(relaxation, y) == pytest.approx(expected, rel=1e-6)

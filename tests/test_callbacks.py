"""ReliabilityDiagramCallback writes the validation diagram while training."""

import glob
import os

import keras
import numpy as np
import pytest

from keras_label_relax import ExpectedCalibrationError
from keras_label_relax.callbacks import ReliabilityDiagramCallback

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def data(num_samples=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, 4)).astype(np.float32)
    y = rng.integers(0, 3, num_samples)
    return x, y


def fit(callback, epochs=4):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data(), batch_size=32, epochs=epochs, verbose=0, callbacks=[callback])
    return model


def test_writes_a_png_every_few_epochs(tmp_path):
    x_val, y_val = data(seed=1)
    callback = ReliabilityDiagramCallback(
        (x_val, y_val), log_dir=tmp_path, every=2, from_logits=True, tensorboard=False
    )
    model = fit(callback, epochs=5)
    names = sorted(os.path.basename(path) for path in callback.paths)
    assert names == [
        "reliability_diagram_epoch_0002.png",
        "reliability_diagram_epoch_0004.png",
    ]
    for path in callback.paths:
        with open(path, "rb") as file:
            assert file.read(8) == PNG_SIGNATURE
    # The last diagram is of the model after epoch 4 of 5: a different one.
    legend = [text.get_text() for text in callback.figure.axes[0].get_legend().texts]
    metric = ExpectedCalibrationError(from_logits=True)
    metric.update_state(y_val, model.predict(x_val, verbose=0))
    assert callback.figure.axes[0].get_title() == "Reliability diagram, epoch 4"
    assert len(callback.figure.axes) == 2
    assert any(text.startswith("ECE = ") for text in legend)
    assert not glob.glob(str(tmp_path / "events.*"))


def test_without_log_dir_keeps_the_figure_and_takes_batches():
    x_val, y_val = data(seed=2)
    weights = np.linspace(0.0, 2.0, len(y_val)).astype(np.float32)
    batches = [
        (x_val[i : i + 32], y_val[i : i + 32], weights[i : i + 32])
        for i in range(0, len(y_val), 32)
    ]
    callback = ReliabilityDiagramCallback(batches, from_logits=True)
    model = fit(callback, epochs=1)
    assert callback.paths == []
    counts = [float(text.get_text()) for text in callback.figure.axes[0].texts]
    assert sum(counts) == pytest.approx(weights.sum(), rel=1e-5)
    metric = ExpectedCalibrationError(from_logits=True)
    metric.update_state(y_val, model.predict(x_val, verbose=0), weights)
    legend = [text.get_text() for text in callback.figure.axes[0].get_legend().texts]
    assert f"ECE = {float(metric.result()):.4f}" in legend


def test_tensorboard_image_summary(tmp_path):
    tf = pytest.importorskip("tensorflow")
    x_val, y_val = data(seed=3)
    callback = ReliabilityDiagramCallback(
        (x_val, y_val), log_dir=tmp_path, from_logits=True
    )
    fit(callback, epochs=2)
    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    images = {}
    for event in tf.compat.v1.train.summary_iterator(events):
        for value in event.summary.value:
            images[event.step] = (value.tag, value.tensor.string_val)
    assert sorted(images) == [1, 2]
    tag, (width, height, png) = images[2]
    assert tag == "reliability_diagram"
    assert png.startswith(PNG_SIGNATURE)
    decoded = tf.image.decode_png(png).numpy()
    assert decoded.shape[:2] == (int(height), int(width))
    with open(callback.paths[-1], "rb") as file:
        assert tf.image.decode_png(file.read()).shape == decoded.shape


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_every(every):
    with pytest.raises(ValueError, match=f"every.*Received: every={every!r}"):
        ReliabilityDiagramCallback(data(), every=every)


def test_bad_validation_data():
    with pytest.raises(ValueError, match="validation_data"):
        ReliabilityDiagramCallback((np.zeros((2, 4)),))


def test_config_holds_the_settings():
    callback = ReliabilityDiagramCallback(data(), log_dir="logs", every=3, num_bins=10)
    config = callback.get_config()
    assert config["every"] == 3 and config["num_bins"] == 10
    assert config["log_dir"] == "logs"
    restored = ReliabilityDiagramCallback(data(), **config)
    assert restored.get_config() == config

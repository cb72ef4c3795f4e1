"""Draws `docs/images/reliability_diagrams.png` for `docs/calibration.md`.

An MLP on a synthetic 10-class task (scikit-learn's `make_classification`,
10% of the labels random), trained three ways: cross-entropy, cross-entropy
then temperature scaling on a validation split, and label relaxation.
Prints the accuracy and ECE of each.

Usage:
    KERAS_BACKEND=jax python docs/calibration_figure.py
"""

import pathlib

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402

from keras_label_relax import ExpectedCalibrationError  # noqa: E402
from keras_label_relax import LabelRelaxation  # noqa: E402
from keras_label_relax import TemperatureScaling  # noqa: E402
from keras_label_relax import plot_reliability_diagram  # noqa: E402

OUTPUT = pathlib.Path(__file__).parent / "images" / "reliability_diagrams.png"
NUM_BINS = 10
EPOCHS = 30
NUM_TRAIN, NUM_HELD_OUT, NUM_FEATURES = 20_000, 10_000, 40


def split_data(seed=0):
    """Train, validation and test splits of a 10-class synthetic task."""
    x, y = make_classification(
        n_samples=NUM_TRAIN + 2 * NUM_HELD_OUT,
        n_features=NUM_FEATURES,
        n_informative=20,
        n_classes=10,
        n_clusters_per_class=2,
        flip_y=0.1,
        random_state=seed,
    )
    x = x.astype("float32")
    splits = np.split(np.arange(len(y)), [NUM_TRAIN, NUM_TRAIN + NUM_HELD_OUT])
    return [(x[part], y[part]) for part in splits]


def train(loss, train_data, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    model.fit(*train_data, batch_size=128, epochs=EPOCHS, verbose=0)
    return model


def summary(name, labels, probs):
    metric = ExpectedCalibrationError(num_bins=15)
    metric.update_state(labels, probs)
    accuracy = float(np.mean(probs.argmax(axis=-1) == labels))
    print(f"{name}: accuracy {accuracy:.4f}, 15-bin ECE {float(metric.result()):.4f}")


def main():
    train_data, (x_val, y_val), (x_test, y_test) = split_data()
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ce_model = train(cross_entropy, train_data)
    lr_model = train(LabelRelaxation(alpha=0.1, from_logits=True), train_data)
    scaled = TemperatureScaling(ce_model)
    temperature = scaled.calibrate(x_val, y_val)
    softmax = keras.layers.Softmax()
    panels = {
        "Cross-entropy": softmax(ce_model.predict(x_test, verbose=0)),
        f"Cross-entropy + temperature scaling (T = {temperature:.2f})": (
            scaled.predict(x_test, verbose=0)
        ),
        "Label relaxation (alpha = 0.1)": softmax(lr_model.predict(x_test, verbose=0)),
    }
    figure, axes = plt.subplots(1, 3, figsize=(15, 6.2))
    for ax, (title, probs) in zip(axes, panels.items(), strict=True):
        probs = keras.ops.convert_to_numpy(probs)
        summary(title, y_test, probs)
        plot_reliability_diagram(y_test, probs, num_bins=NUM_BINS, ax=ax)
        ax.set_title(title, fontsize=10)
    figure.suptitle(
        f"Synthetic 10-class task, MLP, {len(y_test):,} test points, {NUM_BINS} bins",
        fontsize=11,
    )
    figure.tight_layout()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUTPUT, dpi=100)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()

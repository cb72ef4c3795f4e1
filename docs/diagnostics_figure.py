"""Draws the diagnostics figures of `docs/calibration.md`.

The MLP and synthetic 10-class task of `calibration_figure.py`, trained with
cross-entropy; its test predictions before and after temperature scaling:

- `images/diagnostics_reliability.png`: `plot_reliability_diagram` with its
  histogram panel;
- `images/diagnostics_smooth.png`: `plot_smooth_reliability_diagram` with
  its bootstrap band;
- `images/diagnostics_callback.png`: the PNGs `ReliabilityDiagramCallback`
  wrote during training (epochs 1, 10 and 30).

Prints the ECE and smECE of each.

Usage:
    KERAS_BACKEND=jax python docs/diagnostics_figure.py
"""

import pathlib
import tempfile

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from calibration_figure import EPOCHS  # noqa: E402
from calibration_figure import NUM_FEATURES  # noqa: E402
from calibration_figure import split_data  # noqa: E402

from keras_label_relax import ExpectedCalibrationError  # noqa: E402
from keras_label_relax import SmoothCalibrationError  # noqa: E402
from keras_label_relax import TemperatureScaling  # noqa: E402
from keras_label_relax import plot_reliability_diagram  # noqa: E402
from keras_label_relax import plot_smooth_reliability_diagram  # noqa: E402
from keras_label_relax.callbacks import ReliabilityDiagramCallback  # noqa: E402

IMAGES = pathlib.Path(__file__).parent / "images"
CALLBACK_EPOCHS = (1, 10, 30)


def train_with_callback(train_data, validation_data, log_dir):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = ReliabilityDiagramCallback(
        validation_data, log_dir=log_dir, from_logits=True, num_bins=10
    )
    model.fit(
        *train_data, batch_size=128, epochs=EPOCHS, verbose=0, callbacks=[callback]
    )
    return model, callback


def summary(name, labels, probs):
    ece = ExpectedCalibrationError(num_bins=15)
    ece.update_state(labels, probs)
    smooth = SmoothCalibrationError()
    smooth.update_state(labels, probs)
    print(
        f"{name}: 15-bin ECE {float(ece.result()):.4f}, "
        f"smECE {float(smooth.result()):.4f}"
    )


def side_by_side(panels, draw, path, width=5.0):
    figure, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 6.2))
    for ax, (title, probs) in zip(axes, panels.items(), strict=True):
        draw(ax, probs)
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def main():
    train_data, (x_val, y_val), (x_test, y_test) = split_data()
    with tempfile.TemporaryDirectory() as log_dir:
        model, callback = train_with_callback(train_data, (x_val, y_val), log_dir)
        pngs = {
            int(pathlib.Path(path).stem.rsplit("_", 1)[1]): plt.imread(path)
            for path in callback.paths
        }
    scaled = TemperatureScaling(model)
    temperature = scaled.calibrate(x_val, y_val)
    panels = {
        "Cross-entropy": keras.ops.convert_to_numpy(
            keras.ops.softmax(model.predict(x_test, verbose=0))
        ),
        f"Cross-entropy + temperature scaling (T = {temperature:.2f})": (
            keras.ops.convert_to_numpy(scaled.predict(x_test, verbose=0))
        ),
    }
    for title, probs in panels.items():
        summary(title, y_test, probs)
    IMAGES.mkdir(parents=True, exist_ok=True)
    side_by_side(
        panels,
        lambda ax, probs: plot_reliability_diagram(y_test, probs, 10, ax=ax),
        IMAGES / "diagnostics_reliability.png",
    )
    side_by_side(
        panels,
        lambda ax, probs: plot_smooth_reliability_diagram(y_test, probs, ax=ax),
        IMAGES / "diagnostics_smooth.png",
    )
    figure, axes = plt.subplots(1, len(CALLBACK_EPOCHS), figsize=(15, 6.2))
    for ax, epoch in zip(axes, CALLBACK_EPOCHS, strict=True):
        ax.imshow(pngs[epoch])
        ax.axis("off")
    figure.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0)
    figure.savefig(IMAGES / "diagnostics_callback.png", dpi=100)
    print(f"wrote {IMAGES / 'diagnostics_callback.png'}")


if __name__ == "__main__":
    main()

"""Training callbacks (need matplotlib: `pip install keras-label-relax[plot]`)."""

import io
import os

import keras
import numpy as np

from keras_label_relax._api import export
from keras_label_relax.plotting import plot_reliability_diagram

SUMMARY_TAG = "reliability_diagram"


@export
class ReliabilityDiagramCallback(keras.callbacks.Callback):
    """Draws the reliability diagram of the validation data during training.

    Every `every` epochs (counting from 1) the callback predicts on
    `validation_data`, draws `plot_reliability_diagram` (with its histogram
    panel), and, when `log_dir` is given, writes it to
    `log_dir/reliability_diagram_epoch_{epoch:04d}.png`. When TensorFlow is
    importable (on any Keras backend) and `tensorboard=True`, the same image
    also goes into a TensorBoard event file in `log_dir`, as an image
    summary tagged `"reliability_diagram"` at step `epoch`: TensorBoard's
    Images tab then shows how calibration evolves. Pointing `log_dir` at the
    `keras.callbacks.TensorBoard` log directory puts it beside the scalars.

    The latest figure is kept as `callback.figure` (a matplotlib `Figure`,
    also without `log_dir`), and the file paths written as
    `callback.paths`.

    Args:
        validation_data: a tuple `(x, y)` or `(x, y, sample_weight)` of
            arrays, or a dataset or other iterable (a list, say) of such
            batches, iterated once per drawing.
        log_dir: directory for the PNG files and the TensorBoard events;
            `None` writes nothing.
        every: draw every `every` epochs, an integer >= 1.
        num_bins: number of bins of the diagram.
        from_logits: whether the model outputs logits.
        binning: bin placement, passed to `plot_reliability_diagram`.
        tensorboard: whether to write the TensorBoard image summary when
            TensorFlow is importable.
        batch_size: batch size of the predictions on arrays.

    Example:

    ```python
    model.fit(
        x_train,
        y_train,
        epochs=20,
        callbacks=[
            ReliabilityDiagramCallback((x_val, y_val), log_dir="logs", every=5)
        ],
    )
    ```
    """

    def __init__(
        self,
        validation_data,
        log_dir=None,
        every=1,
        num_bins=15,
        from_logits=False,
        binning="equal_width",
        tensorboard=True,
        batch_size=256,
    ):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)):
            raise ValueError(
                f"Argument `every` must be an integer >= 1. Received: every={every!r}"
            )
        if every < 1:
            raise ValueError(
                f"Argument `every` must be >= 1. Received: every={every!r}"
            )
        if isinstance(validation_data, tuple) and len(validation_data) not in (
            2,
            3,
        ):
            raise ValueError(
                "Argument `validation_data` must be `(x, y)`, `(x, y, "
                "sample_weight)` or a dataset of such batches. Received: a "
                f"sequence of length {len(validation_data)}"
            )
        self.validation_data = validation_data
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.every = int(every)
        self.num_bins = num_bins
        self.from_logits = from_logits
        self.binning = binning
        self.tensorboard = tensorboard
        self.batch_size = batch_size
        self.figure = None
        self.paths = []
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        epoch = epoch + 1
        if epoch % self.every:
            return
        import matplotlib.pyplot as plt

        y_true, y_pred, sample_weight = self._predict()
        if self.figure is not None:
            plt.close(self.figure)
        self.figure = plot_reliability_diagram(
            y_true,
            y_pred,
            num_bins=self.num_bins,
            from_logits=self.from_logits,
            sample_weight=sample_weight,
            binning=self.binning,
        )
        self.figure.axes[0].set_title(f"Reliability diagram, epoch {epoch}")
        if self.log_dir is None:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=100)
        png = buffer.getvalue()
        path = os.path.join(self.log_dir, f"reliability_diagram_epoch_{epoch:04d}.png")
        with open(path, "wb") as file:
            file.write(png)
        self.paths.append(path)
        if self.tensorboard:
            self._write_summary(png, epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def get_config(self):
        """The settings; the validation data are not part of them."""
        return {
            "log_dir": self.log_dir,
            "every": self.every,
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
            "binning": self.binning,
            "tensorboard": self.tensorboard,
            "batch_size": self.batch_size,
        }

    def _predict(self):
        data = self.validation_data
        if isinstance(data, tuple):
            x, y = data[0], data[1]
            weight = data[2] if len(data) == 3 else None
            predictions = self.model.predict(x, batch_size=self.batch_size, verbose=0)
            return np.asarray(y), keras.ops.convert_to_numpy(predictions), weight
        labels, outputs, weights = [], [], []
        for batch in data:
            x, y = batch[0], batch[1]
            outputs.append(keras.ops.convert_to_numpy(self.model(x, training=False)))
            labels.append(keras.ops.convert_to_numpy(y))
            if len(batch) == 3:
                weights.append(keras.ops.convert_to_numpy(batch[2]))
        weight = np.concatenate(weights) if weights else None
        return np.concatenate(labels), np.concatenate(outputs), weight

    def _write_summary(self, png, epoch):
        try:
            import tensorflow as tf
        except ImportError:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        image = tf.image.decode_png(png, channels=4)[None]
        with self._writer.as_default():
            tf.summary.image(SUMMARY_TAG, image, step=epoch)
        self._writer.flush()

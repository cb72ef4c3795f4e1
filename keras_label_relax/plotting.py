"""Reliability diagrams (needs matplotlib: `pip install keras-label-relax[plot]`)."""

import numpy as np

from keras_label_relax._api import export
from keras_label_relax.metrics import ExpectedCalibrationError


@export
def plot_reliability_diagram(
    y_true, y_pred, num_bins=15, from_logits=False, ax=None, sample_weight=None
):
    """Draws accuracy against confidence per bin and returns the figure.

    Predictions are binned exactly as `ExpectedCalibrationError` bins them
    (equal-width bins `(lo, hi]`). Each non-empty bin gets a bar up to its
    accuracy and a shaded bar spanning the gap between its accuracy and its
    mean confidence; the number (total weight) of predictions is written
    above each bin, and the legend gives the ECE. A perfectly calibrated
    model has every bar on the diagonal.

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: predicted probabilities (or logits with `from_logits=True`),
            classes on the last axis.
        num_bins: number of equal-width confidence bins.
        from_logits: whether `y_pred` holds logits.
        ax: a matplotlib `Axes` to draw on; a new figure when `None`.
        sample_weight: optional per-prediction weights.

    Returns:
        The matplotlib `Figure` holding the diagram.

    Example:

    ```python
    figure = plot_reliability_diagram(y_test, model.predict(x_test))
    figure.savefig("reliability.png")
    ```

    Reference:
        - [Guo et al., 2017. On Calibration of Modern Neural Networks](
          https://arxiv.org/abs/1706.04599)
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plot_reliability_diagram needs matplotlib: "
            "`pip install keras-label-relax[plot]`."
        ) from error
    metric = ExpectedCalibrationError(num_bins=num_bins, from_logits=from_logits)
    metric.update_state(y_true, y_pred, sample_weight=sample_weight)
    stats = metric.bin_statistics()
    ece = float(metric.result())
    if ax is None:
        figure, ax = plt.subplots(figsize=(5, 5))
    else:
        figure = ax.figure
    _draw(ax, stats, ece)
    return figure


def _draw(ax, stats, ece):
    edges = stats["edges"]
    width = edges[1] - edges[0]
    left = edges[:-1]
    filled = stats["weight"] > 0
    accuracy = np.where(filled, stats["accuracy"], 0.0)
    confidence = np.where(filled, stats["confidence"], 0.0)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.bar(
        left[filled],
        accuracy[filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="Accuracy",
    )
    ax.bar(
        left[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="Gap to mean confidence",
    )
    for lo, top, count in zip(
        left[filled],
        np.maximum(accuracy, confidence)[filled],
        stats["weight"][filled],
        strict=True,
    ):
        ax.annotate(
            _format_count(count),
            (lo + width / 2, min(top, 0.97)),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=90 if len(left) > 10 else 0,
        )
    ax.plot([], [], " ", label=f"ECE = {ece:.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)


def _format_count(count):
    if float(count).is_integer():
        return f"{int(count):,}"
    return f"{count:,.1f}"

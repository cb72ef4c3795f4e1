"""Reliability diagrams (needs matplotlib: `pip install keras-label-relax[plot]`)."""

import warnings

import numpy as np
from keras import ops
from keras.backend import standardize_dtype

from keras_label_relax._api import export
from keras_label_relax._labels import class_ids
from keras_label_relax.metrics import ExpectedCalibrationError
from keras_label_relax.metrics import SmoothCalibrationError
from keras_label_relax.metrics import _curves
from keras_label_relax.metrics import _flat_weights
from keras_label_relax.metrics import _smooth_histogram
from keras_label_relax.metrics import _smooth_on_grid
from keras_label_relax.metrics import _top_label


@export
def plot_reliability_diagram(
    y_true,
    y_pred,
    num_bins=15,
    from_logits=False,
    ax=None,
    sample_weight=None,
    binning="equal_width",
    show_histogram=True,
):
    """Draws accuracy against confidence per bin and returns the figure.

    Predictions are binned exactly as `ExpectedCalibrationError` bins them
    (with `binning="equal_width"`, equal-width bins `(lo, hi]`). Each
    non-empty bin gets a bar up to its accuracy and a shaded bar spanning
    the gap between its accuracy and its mean confidence; the number (total
    weight) of predictions is written above each bin, and the legend gives
    the ECE. A perfectly calibrated model has every bar on the diagonal.

    Below it, as Guo et al. (2017) draw it, a histogram panel shows the
    share of predictions in each bin, with the overall accuracy and mean
    confidence as vertical lines: where the predictions are, and so which
    bars the ECE weighs. Bins of unequal width (as equal-mass binning makes
    them) are drawn at their true edges.

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: predicted probabilities (or logits with `from_logits=True`),
            classes on the last axis.
        num_bins: number of confidence bins.
        from_logits: whether `y_pred` holds logits.
        ax: a matplotlib `Axes` to draw on; a new figure when `None`. The
            histogram panel is split off its bottom.
        sample_weight: optional per-prediction weights.
        binning: how the bins are chosen, passed to `ExpectedCalibrationError`.
        show_histogram: whether to draw the histogram panel.

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
    plt = _pyplot("plot_reliability_diagram")
    metric = _binned_metric(num_bins, from_logits, binning)
    metric.update_state(y_true, y_pred, sample_weight=sample_weight)
    stats = metric.bin_statistics()
    ece = float(metric.result())
    figure, ax = _figure_and_axes(plt, ax, show_histogram)
    _draw(ax, stats, ece)
    if show_histogram:
        _draw_histogram(_panel_below(ax), stats)
    return figure


@export
def plot_smooth_reliability_diagram(
    y_true,
    y_pred,
    from_logits=False,
    ax=None,
    sample_weight=None,
    bandwidth=None,
    num_bootstrap=100,
    confidence_level=0.95,
    show_density=True,
    num_points=200,
    seed=0,
):
    """Draws the smoothed accuracy against confidence and returns the figure.

    The curve is the kernel-smoothed accuracy `t + r(t) / d(t)` of
    `SmoothCalibrationError` (Blasiok & Nakkiran, 2023): no bins, the
    kernel bandwidth chosen automatically unless given, and the legend
    gives the smECE and the bandwidth. The grey band is a bootstrap
    confidence band: the predictions are resampled with replacement
    `num_bootstrap` times and each resample's curve is smoothed at the same
    bandwidth; the band spans the central `confidence_level` of them at
    each confidence. A panel below shows the kernel density of the
    confidences.

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: predicted probabilities (or logits with `from_logits=True`),
            classes on the last axis.
        from_logits: whether `y_pred` holds logits.
        ax: a matplotlib `Axes` to draw on; a new figure when `None`. The
            density panel is split off its bottom.
        sample_weight: optional per-prediction weights (as repetitions).
        bandwidth: kernel bandwidth in [0.001, 1]; `None` chooses it.
        num_bootstrap: number of bootstrap resamples; 0 draws no band.
        confidence_level: the band's coverage, in (0, 1).
        show_density: whether to draw the density panel.
        num_points: number of confidences the curve is evaluated at.
        seed: seed of the bootstrap resampling.

    Returns:
        The matplotlib `Figure` holding the diagram.

    Example:

    ```python
    figure = plot_smooth_reliability_diagram(y_test, model.predict(x_test))
    figure.savefig("smooth_reliability.png")
    ```

    Reference:
        - [Blasiok & Nakkiran, 2023. Smooth ECE: Principled Reliability
          Diagrams via Kernel Smoothing](https://arxiv.org/abs/2309.12236)
    """
    if isinstance(num_bootstrap, bool) or not isinstance(
        num_bootstrap, (int, np.integer)
    ):
        raise ValueError(
            "Argument `num_bootstrap` must be an integer >= 0. "
            f"Received: num_bootstrap={num_bootstrap!r}"
        )
    if num_bootstrap < 0:
        raise ValueError(
            "Argument `num_bootstrap` must be >= 0. "
            f"Received: num_bootstrap={num_bootstrap!r}"
        )
    if not 0.0 < confidence_level < 1.0:
        raise ValueError(
            "Argument `confidence_level` must be in (0, 1). "
            f"Received: confidence_level={confidence_level!r}"
        )
    plt = _pyplot("plot_smooth_reliability_diagram")
    metric = SmoothCalibrationError(from_logits=from_logits, bandwidth=bandwidth)
    confidence, correct, weight = _top_label_numpy(
        y_true, y_pred, from_logits, sample_weight
    )
    metric.accumulate(confidence, correct, weight)
    curve = metric.reliability_curve(num_points=num_points)
    band = None
    if num_bootstrap > 0:
        band = _bootstrap_band(
            metric,
            (confidence, correct, weight),
            curve,
            num_bootstrap,
            confidence_level,
            np.random.default_rng(seed),
        )
    figure, ax = _figure_and_axes(plt, ax, show_density)
    _draw_smooth(ax, curve, band, confidence_level)
    if show_density:
        _draw_density(_panel_below(ax), curve)
    return figure


def _pyplot(caller):
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            f"{caller} needs matplotlib: `pip install keras-label-relax[plot]`."
        ) from error
    return plt


def _binned_metric(num_bins, from_logits, binning):
    return ExpectedCalibrationError(
        num_bins=num_bins, from_logits=from_logits, binning=binning
    )


def _figure_and_axes(plt, ax, with_panel):
    if ax is None:
        figure, ax = plt.subplots(figsize=(5, 6.2 if with_panel else 5))
        return figure, ax
    return ax.figure, ax


def _panel_below(ax):
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    panel = make_axes_locatable(ax).append_axes("bottom", size="28%", pad=0.25)
    panel.set_xlim(ax.get_xlim())
    ax.tick_params(labelbottom=False)
    ax.set_xlabel("")
    panel.set_xlabel("Confidence")
    return panel


def _draw(ax, stats, ece):
    edges = stats["edges"]
    widths = np.diff(edges)
    left = edges[:-1]
    filled = stats["weight"] > 0
    accuracy = np.where(filled, stats["accuracy"], 0.0)
    confidence = np.where(filled, stats["confidence"], 0.0)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.bar(
        left[filled],
        accuracy[filled],
        width=widths[filled],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="Accuracy",
    )
    ax.bar(
        left[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=widths[filled],
        align="edge",
        color="tab:red",
        # Translucent, not hatched: a hatch pattern took a third of the
        # time to render a diagram.
        alpha=0.3,
        edgecolor="tab:red",
        label="Gap to mean confidence",
    )
    for lo, width, top, count in zip(
        left[filled],
        widths[filled],
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


def _draw_histogram(ax, stats):
    weight = stats["weight"]
    total = weight.sum()
    share = weight / total if total > 0 else np.zeros_like(weight)
    edges = stats["edges"]
    ax.bar(
        edges[:-1],
        share,
        width=np.diff(edges),
        align="edge",
        color="tab:blue",
        edgecolor="black",
    )
    if total > 0:
        filled = weight > 0
        accuracy = np.sum((weight * stats["accuracy"])[filled]) / total
        confidence = np.sum((weight * stats["confidence"])[filled]) / total
        ax.axvline(accuracy, color="black", linestyle="--", label="Accuracy")
        ax.axvline(confidence, color="tab:red", linestyle=":", label="Mean confidence")
        ax.legend(loc="upper left", fontsize=7)
    ax.set_ylim(0, max(float(share.max(initial=0.0)), 1e-12) * 1.15)
    ax.set_ylabel("Share")


def _top_label_numpy(y_true, y_pred, from_logits, sample_weight):
    """Flat float64 confidences, correctness and weights, as numpy."""
    y_pred = ops.convert_to_tensor(y_pred)
    labels = ops.reshape(class_ids(ops.convert_to_tensor(y_true), y_pred), (-1,))
    dtype = "float64" if standardize_dtype(y_pred.dtype) == "float64" else "float32"
    y_pred = ops.cast(y_pred, dtype)
    confidence, correct = _top_label(y_pred, labels, from_logits)
    weight = ops.ones_like(confidence)
    if sample_weight is not None:
        weight = _flat_weights(sample_weight, y_pred, dtype)
    return tuple(
        np.asarray(ops.convert_to_numpy(ops.cast(values, dtype)), np.float64)
        for values in (confidence, correct, weight)
    )


def _bootstrap_band(metric, data, curve, num_bootstrap, level, rng):
    """Quantiles of the curves of resamples, smoothed at the curve's bandwidth."""
    confidence, correct, weight = data
    size = len(confidence)
    histograms = [
        _smooth_histogram(confidence, correct, counts * weight, metric.dtype)
        for counts in rng.multinomial(size, np.full(size, 1.0 / size), num_bootstrap)
    ]
    smoothed = _smooth_on_grid(
        ops.concatenate(histograms, axis=0), curve["bandwidth"], metric.dtype
    )
    accuracy, _ = _curves(ops.convert_to_numpy(smoothed), curve["confidence"])
    tail = (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        lower, upper = np.nanquantile(accuracy, [tail, 1.0 - tail], axis=0)
    return lower, upper


def _draw_smooth(ax, curve, band, level):
    points = curve["confidence"]
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    if band is not None:
        ax.fill_between(
            points,
            np.clip(band[0], 0, 1),
            np.clip(band[1], 0, 1),
            color="gray",
            alpha=0.35,
            linewidth=0,
            label=f"{level:.0%} bootstrap band",
        )
    ax.plot(
        points,
        curve["accuracy"],
        color="tab:red",
        linewidth=2,
        label="Smoothed accuracy",
    )
    ax.plot(
        [],
        [],
        " ",
        label=f"smECE = {curve['error']:.4f} (bandwidth {curve['bandwidth']:.3g})",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.set_title("Smooth reliability diagram")
    ax.legend(loc="upper left", fontsize=8)


def _draw_density(ax, curve):
    ax.fill_between(curve["confidence"], curve["density"], color="tab:blue", alpha=0.5)
    ax.plot(curve["confidence"], curve["density"], color="tab:blue")
    ax.set_ylim(0, max(float(np.max(curve["density"])), 1e-12) * 1.15)
    ax.set_ylabel("Density")


def _format_count(count):
    if float(count).is_integer():
        return f"{int(count):,}"
    return f"{count:,.1f}"

"""Streaming calibration metrics."""

import keras
import numpy as np
from keras import ops

from keras_label_relax._api import export
from keras_label_relax._labels import class_ids
from keras_label_relax._validation import check_bool

NORMS = ("l1", "l2", "max")

_SAME_WIDTH_INT = {
    "float16": "int16",
    "bfloat16": "int16",
    "float32": "int32",
    "float64": "int64",
}

# Rows of the per-bin state.
_WEIGHT, _CONFIDENCE, _CORRECT = 0, 1, 2


@export
class ExpectedCalibrationError(keras.metrics.Metric):
    """Top-label calibration error with equal-width confidence bins.

    The confidence of a prediction is its largest class probability; it is
    correct when that class (the first one, if several tie, as `argmax`
    picks it) is the label. Labels are integer class ids or one-hot
    vectors; probabilities must be non-negative. The unit interval is split into
    `num_bins` equal-width bins `(lo, hi]`; bin `b` holds the confidences
    `c` with `ceil(c * num_bins) == b + 1`, so a confidence of exactly 1.0
    falls in the last bin and 0.0 in the first. With `W_b` the total weight,
    `C_b` the weighted sum of confidences and `A_b` the weighted number of
    correct predictions in bin `b`, and `W` the total weight:

    - `norm="l1"`: the expected calibration error (ECE),
      `sum_b |A_b - C_b| / W`.
    - `norm="l2"`: the root-mean-square calibration error,
      `sqrt(sum_b (A_b - C_b)**2 / W_b / W)`.
    - `norm="max"`: the maximum calibration error (MCE),
      `max_b |A_b - C_b| / W_b` over the non-empty bins.

    Without `sample_weight` every prediction weighs 1 and `W_b` is a count.
    Weights must be non-negative; a weight of 0 masks a prediction. (In
    `compile()`, pass the metric in `weighted_metrics` to have it receive
    the sample weights.) `bin_statistics()` returns the per-bin counts,
    mean confidences and accuracies, as a reliability diagram draws them.

    The state is three sums per bin (weight, confidence, correctness), so it
    takes `O(num_bins)` memory whatever the number of predictions, and
    replicas combine by adding it, which makes the result under
    `tf.distribute` or JAX data parallelism equal the single-device one.
    Each update reduces its batch to per-bin sums (confidences are summed
    relative to their bin's centre, which keeps the float32 partial sums
    small) and adds them to the state with compensated (Kahan) summation,
    so float32 state stays within about 1e-7 of a float64 computation
    over millions of predictions.

    torchmetrics' `multiclass_calibration_error` bins `[lo, hi)` and puts a
    confidence of exactly 1.0 in an extra bin of its own; the two agree
    except for confidences that sit exactly on a bin edge.

    Args:
        num_bins: number of equal-width confidence bins, an integer >= 1.
        from_logits: whether `y_pred` holds logits rather than
            probabilities. With logits the confidence is the largest softmax
            probability, computed without forming the softmax.
        norm: `"l1"` (ECE), `"l2"` (RMS calibration error) or `"max"`
            (MCE).
        name: name of the metric instance.
        dtype: dtype of the metric's computations and state.

    Example:

    >>> metric = ExpectedCalibrationError(num_bins=4)
    >>> metric.update_state([0, 1], [[0.9, 0.1], [0.7, 0.3]])
    >>> round(float(metric.result()), 4)  # (|1 - 0.9| + |0 - 0.7|) / 2
    0.4

    Usage with `compile()`:

    ```python
    model.compile(
        optimizer="sgd",
        loss="sparse_categorical_crossentropy",
        metrics=[ExpectedCalibrationError(num_bins=15)],
    )
    ```

    Reference:
        - [Guo et al., 2017. On Calibration of Modern Neural Networks](
          https://arxiv.org/abs/1706.04599)
        - [Naeini et al., 2015. Obtaining Well Calibrated Probabilities Using
          Bayesian Binning](https://ojs.aaai.org/index.php/AAAI/article/view/9602)
    """

    def __init__(
        self, num_bins=15, from_logits=False, norm="l1", name="ece", dtype=None
    ):
        super().__init__(name=name, dtype=dtype)
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)):
            raise ValueError(
                "Argument `num_bins` must be an integer >= 1. "
                f"Received: num_bins={num_bins!r}"
            )
        if num_bins < 1:
            raise ValueError(
                f"Argument `num_bins` must be >= 1. Received: num_bins={num_bins!r}"
            )
        if norm not in NORMS:
            raise ValueError(
                f"Argument `norm` must be one of {NORMS}. Received: norm={norm!r}"
            )
        self.num_bins = int(num_bins)
        self.from_logits = check_bool("from_logits", from_logits)
        self.norm = norm
        self._direction = "down"
        self.bin_sums = self.add_variable(
            shape=(3, self.num_bins), initializer="zeros", name="bin_sums"
        )
        # Running Kahan compensation of `bin_sums`: the true sums are
        # `bin_sums - bin_sums_error`.
        self.bin_sums_error = self.add_variable(
            shape=(3, self.num_bins), initializer="zeros", name="bin_sums_error"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        labels = ops.reshape(class_ids(y_true, y_pred), (-1,))
        y_pred = ops.cast(y_pred, self.dtype)
        confidence, correct = _top_label(y_pred, labels, self.from_logits)
        if sample_weight is None:
            weight = None
        else:
            weight = _flat_weights(sample_weight, y_pred, self.dtype)
        self.accumulate(confidence, correct, weight)

    def accumulate(self, confidence, correct, weight=None):
        """Adds flat per-prediction confidences, correctness and weights.

        `update_state()` reduces its inputs to these; calibration code that
        has them already (for example, for many temperatures of the same
        logits) can add them directly.

        Args:
            confidence: top-label confidences in [0, 1], shape `(N,)`.
            correct: 1.0 where the top label is right, else 0.0, `(N,)`.
            weight: optional non-negative weights `(N,)`.
        """
        num_bins = self.num_bins
        scaled = ops.cast(confidence, self.dtype) * num_bins
        bins = ops.clip(ops.ceil(scaled) - 1.0, 0.0, num_bins - 1.0)
        # Confidences are summed relative to their bin's centre (in units of
        # the bin width): small numbers, so that float32 reductions over
        # large batches stay accurate.
        offset = scaled - (bins + 0.5)
        # Clipped again as integers: a NaN confidence casts to an arbitrary
        # integer, which must still be a valid bin index.
        bins = ops.clip(ops.cast(bins, "int32"), 0, num_bins - 1)
        correct = ops.cast(correct, self.dtype)
        if weight is not None:
            weight = ops.cast(weight, self.dtype)
            offset = offset * weight
            correct = correct * weight
        weight_sum, offset_sum, correct_sum = _segment_sums(
            [weight, offset, correct], bins, num_bins, self.dtype
        )
        centres = ops.arange(num_bins, dtype=self.dtype) + 0.5
        confidence_sum = (offset_sum + centres * weight_sum) / num_bins
        self._add_compensated(ops.stack([weight_sum, confidence_sum, correct_sum]))

    def _add_compensated(self, sums):
        total = self.bin_sums.value
        corrected = sums - self.bin_sums_error.value
        new_total = total + corrected
        self.bin_sums_error.assign((new_total - total) - corrected)
        self.bin_sums.assign(new_total)

    def result(self):
        sums = self.bin_sums.value - self.bin_sums_error.value
        weight = sums[_WEIGHT]
        gap = ops.abs(sums[_CORRECT] - sums[_CONFIDENCE])
        total_weight = ops.sum(weight)
        nonempty = weight > 0
        safe_weight = ops.where(nonempty, weight, ops.ones_like(weight))
        safe_total = ops.maximum(total_weight, ops.ones_like(total_weight) * 1e-30)
        if self.norm == "l1":
            error = ops.sum(gap) / safe_total
        elif self.norm == "l2":
            error = ops.sqrt(ops.sum(ops.square(gap) / safe_weight) / safe_total)
        else:
            error = ops.max(ops.where(nonempty, gap / safe_weight, 0.0))
        return ops.where(total_weight > 0, error, ops.zeros_like(error))

    def bin_statistics(self):
        """Returns the per-bin statistics accumulated so far, as numpy.

        Returns:
            A dict of float64 arrays:
            - `"edges"`: the `num_bins + 1` bin edges `0, 1/num_bins, ..., 1`.
            - `"weight"`: the total weight per bin (the number of
              predictions when no `sample_weight` was given).
            - `"confidence"`: the mean confidence per bin (NaN when empty).
            - `"accuracy"`: the (weighted) fraction of correct predictions
              per bin (NaN when empty).
        """
        total, error = (
            np.asarray(ops.convert_to_numpy(variable.value), dtype=np.float64)
            for variable in (self.bin_sums, self.bin_sums_error)
        )
        sums = total - error
        weight = sums[_WEIGHT]
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(weight > 0, sums[_CONFIDENCE] / weight, np.nan)
            accuracy = np.where(weight > 0, sums[_CORRECT] / weight, np.nan)
        return {
            "edges": np.linspace(0.0, 1.0, self.num_bins + 1),
            "weight": weight,
            "confidence": confidence,
            "accuracy": accuracy,
        }

    def get_config(self):
        return {
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
            "norm": self.norm,
            "name": self.name,
            "dtype": self.dtype,
        }


def _top_label(y_pred, labels, from_logits):
    """Returns flat top-label confidences and whether the top label is right.

    The top label is the first class of largest probability, as `argmax`
    picks it; with logits, of largest softmax probability.
    """
    y_pred = ops.reshape(y_pred, (-1, ops.shape(y_pred)[-1]))
    if from_logits:
        # Softmax numerators, in (0, 1]; the largest probability is
        # 1 / sum_k exp(z_k - max z).
        scores = ops.exp(y_pred - ops.max(y_pred, axis=-1, keepdims=True))
        confidence = 1.0 / ops.sum(scores, axis=-1)
    else:
        scores = y_pred
        confidence = ops.max(scores, axis=-1)
    # The bit patterns of non-negative floats, read as integers, order like
    # the floats, and an integer argmax runs 2-4x faster than a float one.
    bits = ops.view(
        scores, _SAME_WIDTH_INT[keras.backend.standardize_dtype(scores.dtype)]
    )
    predicted = ops.argmax(bits, axis=-1)
    correct = ops.equal(ops.cast(predicted, "int32"), labels)
    return confidence, correct


def _flat_weights(sample_weight, y_pred, dtype):
    """Broadcasts `sample_weight` to the batch shape and flattens it."""
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), dtype)
    batch_shape = tuple(y_pred.shape[:-1])
    weight_shape = tuple(sample_weight.shape)
    if (
        len(weight_shape) == len(batch_shape) + 1
        and weight_shape[-1] == 1
        and len(batch_shape) > 0
    ):
        sample_weight = ops.squeeze(sample_weight, axis=-1)
        weight_shape = weight_shape[:-1]
    if not _broadcastable(weight_shape, batch_shape):
        raise ValueError(
            "`sample_weight` must broadcast to the batch shape "
            f"`y_pred.shape[:-1]`. Received: sample_weight.shape={weight_shape}, "
            f"y_pred.shape={tuple(y_pred.shape)}"
        )
    if weight_shape != batch_shape or None in batch_shape:
        sample_weight = ops.broadcast_to(sample_weight, ops.shape(y_pred)[:-1])
    return ops.reshape(sample_weight, (-1,))


def _broadcastable(shape, target):
    if len(shape) > len(target):
        return False
    for dim, target_dim in zip(reversed(shape), reversed(target), strict=False):
        if dim not in (1, None) and target_dim is not None and dim != target_dim:
            return False
    return True


def _segment_sums(rows, segment_ids, num_segments, dtype):
    """Per-segment sums of each flat row; a `None` row counts segment ids.

    An accumulating scatter: as fast as `segment_sum` under XLA, and a
    third of the passes of Keras' PyTorch `segment_sum`.
    """
    if rows[0] is None:
        rows = [ops.ones_like(rows[1])] + list(rows[1:])
    # Stacked as rows and transposed: a view, cheaper than interleaving.
    values = ops.transpose(ops.stack(rows))
    sums = ops.scatter_update(
        ops.zeros((num_segments, len(rows)), dtype),
        segment_ids[:, None],
        values,
        reduction="add",
    )
    return ops.unstack(sums, axis=1)


# ---------------------------------------------------------------------------
# Smooth calibration error (Blasiok & Nakkiran, 2023)
# ---------------------------------------------------------------------------

# The state is a histogram of confidences on this many equal intervals of
# [0, 1], each prediction shared between the two nearest grid points in
# proportion to its distance (linear interpolation).
_SMOOTH_INTERVALS = 4000
# relplot smooths on a grid of 1000 intervals for bandwidths of at least
# 0.01. The fine grid restricts exactly onto it (its intervals are a
# multiple), so those bandwidths give relplot's discretisation.
_COARSE_INTERVALS = 1000
_COARSE_MIN_BANDWIDTH = 0.01
_SEARCH_STEPS = 10
_SEARCH_FLOOR = 1e-3
_MIN_MESH_POINTS = 200

# Rows of the smooth histogram.
_HIST_WEIGHT, _HIST_RESIDUAL = 0, 1


@export
def smooth_calibration_error(
    y_true, y_pred, from_logits=False, bandwidth=None, sample_weight=None
):
    """Smooth calibration error (smECE) of the top-label confidence.

    The functional form of `SmoothCalibrationError`, which documents the
    definition; it returns the same value as one `update_state()` followed by
    `result()`, as a scalar tensor, and can be compiled.

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: predicted probabilities (or logits with `from_logits=True`),
            classes on the last axis.
        from_logits: whether `y_pred` holds logits.
        bandwidth: the Gaussian kernel's standard deviation, in [0.001, 1];
            `None` chooses it as Blasiok & Nakkiran do.
        sample_weight: optional non-negative weights, broadcastable to
            `y_pred.shape[:-1]`; a weight counts as that many repetitions.

    Returns:
        The smECE, a scalar tensor of `y_pred`'s float dtype (float32 for
        float16 and bfloat16 inputs).

    Example:

    >>> value = smooth_calibration_error([0, 1], [[0.9, 0.1], [0.7, 0.3]])
    >>> round(float(value), 3)
    0.299
    """
    bandwidth = _check_bandwidth(bandwidth)
    from_logits = check_bool("from_logits", from_logits)
    y_pred = ops.convert_to_tensor(y_pred)
    dtype = keras.backend.standardize_dtype(y_pred.dtype)
    if dtype != "float64":
        dtype = "float32"
    if _is_empty(y_pred):
        return ops.zeros((), dtype)
    histogram = _smooth_batch_histogram(
        y_true, y_pred, sample_weight, from_logits, dtype
    )
    error, _ = _smooth_error(histogram, bandwidth, dtype)
    return error


@export
class SmoothCalibrationError(keras.metrics.Metric):
    """Smooth calibration error (smECE) of the top-label confidence.

    Blasiok & Nakkiran (2023) replace the bins of the ECE by a Gaussian
    kernel. With `c_i` the top-label confidence of prediction `i`, `a_i`
    1.0 when its top class (the first one, as `argmax` picks it) is the
    label and 0.0 otherwise, and `w_i` its weight, the kernel-smoothed
    residual and density on [0, 1] are

        r(t) = sum_i w_i (a_i - c_i) K(t, c_i),
        d(t) = sum_i w_i K(t, c_i),

    where `K` is a Gaussian of standard deviation `bandwidth` reflected at
    0 and 1, and the smECE is `integral |r(t)| dt / integral d(t) dt`: the
    mean absolute gap between the smoothed accuracy `t + r(t) / d(t)` and
    the diagonal, weighted by the density of confidences. With
    `bandwidth=None` the bandwidth is the authors' choice: the smallest
    `sigma` with `smECE_sigma <= sigma`, found as their `relplot` package
    finds it, by ten bisection steps on (0, 1] (the value at `sigma = 1`
    when that already exceeds 1; the bisection stops at 0.001).

    The computation follows `relplot` (version 1.0.3) and agrees with its
    `smECE` to within 1e-3 (the tests check it; the difference is usually
    below 1e-5): the kernel is truncated at distance 1/2 and the data are
    reflected once at each end; the smoothing runs on a grid of 1000 equal
    intervals for bandwidths of at least 0.01 and of 4000 below (relplot:
    about `10 / bandwidth`); each confidence is shared linearly between
    its two nearest grid points; and the integrals are sums over
    `max(round(10 / bandwidth), 200)` equally spaced points of [0, 1],
    including both ends. As in relplot, a grid point on 0 or 1 is not
    reflected onto itself, so confidences within one grid interval of 0 or
    1 weigh up to half as much as they would in the continuous definition.

    The state is that histogram on 4000 intervals: for each of the 4001 grid
    points, the shared weight and weighted residual `a_i - c_i`, kept with
    compensated (Kahan) summation. It takes the same memory whatever the
    number of predictions, streams over batches exactly, and replicas
    combine it by addition, so the value is the same on one device and
    under `tf.distribute` or JAX data parallelism. A `sample_weight` counts
    as that many repetitions of the prediction (the value does not change
    when all weights are scaled). `result()` smooths the histogram with a
    fast Fourier transform at each of the 11 bandwidths the search tries, in
    `keras.ops` (so it also runs inside compiled steps); it is 0.0 before
    any update.

    Args:
        from_logits: whether `y_pred` holds logits rather than
            probabilities.
        bandwidth: the kernel's standard deviation, a number in
            [0.001, 1], or `None` for the automatic choice.
        name: name of the metric instance.
        dtype: dtype of the metric's computations and state.

    Example:

    >>> metric = SmoothCalibrationError()
    >>> metric.update_state([0, 1], [[0.9, 0.1], [0.7, 0.3]])
    >>> round(float(metric.result()), 3)
    0.299

    Reference:
        - [Blasiok & Nakkiran, 2023. Smooth ECE: Principled Reliability
          Diagrams via Kernel Smoothing](https://arxiv.org/abs/2309.12236)
    """

    def __init__(
        self, from_logits=False, bandwidth=None, name="smooth_ece", dtype=None
    ):
        super().__init__(name=name, dtype=dtype)
        self.from_logits = check_bool("from_logits", from_logits)
        self.bandwidth = _check_bandwidth(bandwidth)
        self._direction = "down"
        shape = (2, _SMOOTH_INTERVALS + 1)
        self.histogram = self.add_variable(
            shape=shape, initializer="zeros", dtype=self.dtype, name="histogram"
        )
        # Running Kahan compensation: the true histogram is
        # `histogram - histogram_error`.
        self.histogram_error = self.add_variable(
            shape=shape, initializer="zeros", dtype=self.dtype, name="histogram_error"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        if _is_empty(y_pred):
            return
        self._add_compensated(
            _smooth_batch_histogram(
                y_true, y_pred, sample_weight, self.from_logits, self.dtype
            )
        )

    def accumulate(self, confidence, correct, weight=None):
        """Adds flat per-prediction confidences, correctness and weights.

        Args:
            confidence: confidences in [0, 1], shape `(N,)`.
            correct: 1.0 where the prediction is right, else 0.0, `(N,)`;
                any outcome in [0, 1] (for binary forecasts, the label).
            weight: optional non-negative weights `(N,)`.
        """
        confidence = ops.convert_to_tensor(confidence)
        if _is_empty(confidence):
            return
        self._add_compensated(
            _smooth_histogram(confidence, correct, weight, self.dtype)
        )

    def _add_compensated(self, histogram):
        total = self.histogram.value
        corrected = histogram - self.histogram_error.value
        new_total = total + corrected
        self.histogram_error.assign((new_total - total) - corrected)
        self.histogram.assign(new_total)

    def _histogram(self):
        return self.histogram.value - self.histogram_error.value

    def result(self):
        error, _ = _smooth_error(self._histogram(), self.bandwidth, self.dtype)
        return error

    def reliability_curve(self, num_points=200, bandwidth=None):
        """Returns the smoothed reliability curve, as numpy.

        Args:
            num_points: number of equally spaced points of [0, 1] to
                evaluate the curve at, an integer >= 2.
            bandwidth: kernel bandwidth for the curve; `None` takes the
                metric's (its automatic choice when that is `None`).

        Returns:
            A dict with float64 arrays over the points: `"confidence"` (the
            points), `"accuracy"` (the smoothed accuracy `t + r(t) / d(t)`,
            NaN where the density is 0) and `"density"` (the kernel density
            of the confidences, integrating to 1 over [0, 1], 0 before any
            update); and the floats `"error"` (the smECE) and
            `"bandwidth"` (the bandwidth used for both).
        """
        if isinstance(num_points, bool) or not isinstance(
            num_points, (int, np.integer)
        ):
            raise ValueError(
                "Argument `num_points` must be an integer >= 2. "
                f"Received: num_points={num_points!r}"
            )
        if num_points < 2:
            raise ValueError(
                "Argument `num_points` must be >= 2. "
                f"Received: num_points={num_points!r}"
            )
        bandwidth = _check_bandwidth(bandwidth)
        histogram = self._histogram()
        if bandwidth is None:
            bandwidth = self.bandwidth
        error, chosen = _smooth_error(histogram, bandwidth, self.dtype)
        chosen = bandwidth or float(ops.convert_to_numpy(chosen))
        smoothed = _smooth_on_grid(histogram, chosen, self.dtype)
        points = np.linspace(0.0, 1.0, int(num_points))
        accuracy, density = _curves(ops.convert_to_numpy(smoothed), points)
        return {
            "confidence": points,
            "accuracy": accuracy[0],
            "density": density[0],
            "error": float(ops.convert_to_numpy(error)),
            "bandwidth": chosen,
        }

    def get_config(self):
        return {
            "from_logits": self.from_logits,
            "bandwidth": self.bandwidth,
            "name": self.name,
            "dtype": self.dtype,
        }


def _check_bandwidth(bandwidth):
    if bandwidth is None:
        return None
    if isinstance(bandwidth, bool) or not isinstance(
        bandwidth, (int, float, np.number)
    ):
        raise ValueError(
            "Argument `bandwidth` must be None or a number in [0.001, 1]. "
            f"Received: bandwidth={bandwidth!r}"
        )
    if not _SEARCH_FLOOR <= float(bandwidth) <= 1.0:
        raise ValueError(
            "Argument `bandwidth` must be in [0.001, 1]. "
            f"Received: bandwidth={bandwidth!r}"
        )
    return float(bandwidth)


def _is_empty(tensor):
    """Whether a batch is statically known to hold no predictions."""
    return any(dim == 0 for dim in tuple(tensor.shape)[:-1]) or (
        len(tensor.shape) == 1 and tensor.shape[0] == 0
    )


def _smooth_batch_histogram(y_true, y_pred, sample_weight, from_logits, dtype):
    y_pred = ops.convert_to_tensor(y_pred)
    labels = ops.reshape(class_ids(ops.convert_to_tensor(y_true), y_pred), (-1,))
    y_pred = ops.cast(y_pred, dtype)
    confidence, correct = _top_label(y_pred, labels, from_logits)
    weight = None
    if sample_weight is not None:
        weight = _flat_weights(sample_weight, y_pred, dtype)
    return _smooth_histogram(confidence, correct, weight, dtype)


def _smooth_histogram(confidence, correct, weight, dtype):
    """Shares each prediction's weight and weighted residual between the two
    grid points around its confidence; returns `(2, _SMOOTH_INTERVALS + 1)`."""
    intervals = _SMOOTH_INTERVALS
    confidence = ops.reshape(ops.cast(confidence, dtype), (-1,))
    scaled = ops.clip(confidence * intervals, 0.0, float(intervals))
    # Truncation is the floor of these non-negative values (and, unlike
    # `ops.floor` on PyTorch, keeps float64). Clipped as integers: a NaN
    # confidence casts to an arbitrary integer, which must still be valid.
    index = ops.clip(ops.cast(scaled, "int32"), 0, intervals - 1)
    upper_share = scaled - ops.cast(index, dtype)
    lower_share = 1.0 - upper_share
    residual = ops.reshape(ops.cast(correct, dtype), (-1,)) - confidence
    if weight is not None:
        weight = ops.reshape(ops.cast(weight, dtype), (-1,))
        upper_share = upper_share * weight
        lower_share = lower_share * weight
    weight_lower, weight_upper, residual_lower, residual_upper = _segment_sums(
        [
            lower_share,
            upper_share,
            lower_share * residual,
            upper_share * residual,
        ],
        index,
        intervals,
        dtype,
    )
    zero = ops.zeros((1,), dtype)
    lower_sums = ops.stack([weight_lower, residual_lower])
    upper_sums = ops.stack([weight_upper, residual_upper])
    zeros = ops.stack([zero, zero])
    return ops.concatenate([lower_sums, zeros], axis=1) + ops.concatenate(
        [zeros, upper_sums], axis=1
    )


def _smooth_error(histogram, bandwidth, dtype):
    """Returns the smECE of a histogram and the bandwidth it used."""
    error_at = _error_function(histogram, bandwidth, dtype)
    if bandwidth is not None:
        sigma = ops.convert_to_tensor(bandwidth, dtype)
        return error_at(sigma, bandwidth), sigma
    one = ops.convert_to_tensor(1.0, dtype)
    top_error = error_at(one, 1.0)
    # relplot's bisection: `start` keeps the smallest bandwidth tried whose
    # error does not exceed it, `end` the largest one whose error does.
    start, start_error, end = one, top_error, ops.zeros_like(one)
    for step in range(1, _SEARCH_STEPS + 1):
        middle = (start + end) / 2.0
        # Step `k` tries a multiple of 2**-k: a static lower bound.
        middle_error = error_at(middle, max(2.0**-step, _SEARCH_FLOOR))
        below = ops.logical_or(middle < _SEARCH_FLOOR, middle < middle_error)
        end = ops.where(below, middle, end)
        start = ops.where(below, start, middle)
        start_error = ops.where(below, start_error, middle_error)
    at_top = one < top_error
    return ops.where(at_top, top_error, start_error), ops.where(at_top, one, start)


def _error_function(histogram, bandwidth, dtype):
    """Returns `(sigma, lowest) -> smECE_sigma` for a histogram.

    `sigma` is a scalar tensor and `lowest` a static lower bound on it,
    which sizes the evaluation points and, when at least 0.01, spares the
    fine grid (otherwise both grids are evaluated and the right one is
    picked). The histogram's Fourier transforms are taken once.
    """
    histogram = ops.cast(histogram, dtype)
    coarse_spectrum = _spectrum(_coarsen(histogram, dtype), _COARSE_INTERVALS)
    fine_spectrum = None
    if bandwidth is None or bandwidth < _COARSE_MIN_BANDWIDTH:
        fine_spectrum = _spectrum(histogram, _SMOOTH_INTERVALS)

    def error_on(spectrum, intervals, sigma, mesh_size):
        smoothed = _smooth(spectrum, sigma, intervals, dtype)
        values = _mesh_values(smoothed, sigma, mesh_size, dtype)
        weight = ops.sum(values[_HIST_WEIGHT])
        residual = ops.sum(ops.abs(values[_HIST_RESIDUAL]))
        positive = weight > 0
        safe_weight = ops.where(positive, weight, ops.ones_like(weight))
        return ops.where(positive, residual / safe_weight, ops.zeros_like(weight))

    def error_at(sigma, lowest):
        mesh_size = max(int(np.floor(10.0 / lowest + 0.5)), _MIN_MESH_POINTS)
        coarse_error = error_on(coarse_spectrum, _COARSE_INTERVALS, sigma, mesh_size)
        if lowest >= _COARSE_MIN_BANDWIDTH:
            return coarse_error
        fine_error = error_on(fine_spectrum, _SMOOTH_INTERVALS, sigma, mesh_size)
        return ops.where(sigma >= _COARSE_MIN_BANDWIDTH, coarse_error, fine_error)

    return error_at


def _curves(smoothed, points):
    """Smoothed accuracies and densities at `points` of smoothed histograms
    `(2 * M, grid)` (weight and residual rows of M histograms), as numpy."""
    smoothed = np.asarray(smoothed, np.float64)
    grid = np.linspace(0.0, 1.0, smoothed.shape[-1])
    rows = np.array([np.interp(points, grid, row) for row in smoothed])
    weight, residual = rows[_HIST_WEIGHT::2], rows[_HIST_RESIDUAL::2]
    # Trapezoidal integrals over the points.
    total = np.sum(weight[:, 1:] + weight[:, :-1], axis=1, keepdims=True) / 2.0
    total = total / (len(points) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(weight > 0, points + residual / weight, np.nan)
        density = np.where(total > 0, weight / total, 0.0)
    return accuracy, density


def _smooth_on_grid(histogram, sigma, dtype):
    """Smoothed histograms (rows `(2 * M, fine grid)`) on the grid the error
    uses at `sigma`."""
    histogram = ops.cast(histogram, dtype)
    intervals = _SMOOTH_INTERVALS
    if sigma >= _COARSE_MIN_BANDWIDTH:
        histogram = _coarsen(histogram, dtype)
        intervals = _COARSE_INTERVALS
    sigma = ops.convert_to_tensor(sigma, dtype)
    return _smooth(_spectrum(histogram, intervals), sigma, intervals, dtype)


def _coarsen(histogram, dtype):
    """Restricts the fine histogram to the coarse grid.

    A coarse grid point is a fine one; sharing each fine point's mass
    linearly between its two nearest coarse points gives exactly the
    coarse histogram of the original confidences.
    """
    factor = _SMOOTH_INTERVALS // _COARSE_INTERVALS
    offsets = np.arange(-factor + 1, factor)
    index = (np.arange(0, _SMOOTH_INTERVALS + 1, factor)[:, None] + offsets) + (
        factor - 1
    )
    shares = (1.0 - np.abs(offsets) / factor).astype(dtype)
    padded = ops.pad(histogram, [[0, 0], [factor - 1, factor - 1]])
    gathered = ops.take(padded, ops.convert_to_tensor(index.astype("int32")), axis=1)
    return ops.sum(gathered * ops.convert_to_tensor(shares), axis=-1)


def _spectrum(values, intervals):
    """Fourier transform of rows on the grid `i / intervals`, extended evenly
    about both ends to a period of `2 * intervals` (0 and 1 once each)."""
    extended = ops.concatenate(
        [values, ops.flip(values[:, 1:intervals], axis=1)], axis=1
    )
    return ops.rfft(extended)


def _smooth(spectrum, sigma, intervals, dtype):
    """Circular convolution of the evenly extended rows with a Gaussian
    truncated at distance 1/2: each grid point then sees the direct and the
    once-reflected images within 1/2, as relplot smooths."""
    period = 2 * intervals
    steps = np.arange(period)
    steps = np.minimum(steps, period - steps)
    distance = ops.convert_to_tensor((steps / intervals).astype(dtype))
    inside = ops.convert_to_tensor(steps <= intervals // 2)
    kernel = ops.where(
        inside, ops.exp(-0.5 * ops.square(distance / sigma)), ops.zeros_like(distance)
    )
    # The kernel is real and even, so its transform is real.
    kernel_real, _ = ops.rfft(kernel)
    real, imag = spectrum
    smoothed = ops.irfft((real * kernel_real, imag * kernel_real), fft_length=period)
    return smoothed[:, : intervals + 1]


def _mesh_values(smoothed, sigma, mesh_size, dtype):
    """The smoothed rows linearly interpolated at relplot's evaluation points:
    `max(round(10 / sigma), 200)` equally spaced points of [0, 1]; zero on
    the padding up to the static `mesh_size`."""
    intervals = smoothed.shape[-1] - 1
    rounded = ops.cast(ops.cast(10.0 / sigma + 0.5, "int32"), dtype)
    # `ops.clip`, not `ops.maximum`/`ops.minimum` with a Python float, which
    # return float32 on PyTorch.
    count = ops.clip(rounded, float(_MIN_MESH_POINTS), float(2**30))
    steps = ops.arange(mesh_size, dtype=dtype)
    used = steps < count
    position = ops.clip(steps / (count - 1.0), 0.0, 1.0) * intervals
    index = ops.clip(ops.cast(position, "int32"), 0, intervals - 1)
    upper_share = position - ops.cast(index, dtype)
    values = (
        ops.take(smoothed, index, axis=1) * (1.0 - upper_share)
        + ops.take(smoothed, index + 1, axis=1) * upper_share
    )
    return ops.where(used, values, ops.zeros_like(values))

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

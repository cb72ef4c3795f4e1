"""Streaming calibration metrics and their functional forms.

Each metric is a thin `keras.metrics.Metric` around two private steps that
its functional form shares: an *update* step reduces a batch to sums (per
bin, per class), which the metric adds to its state, and a *compute* step
turns such sums into the value. So `metric.update_state(...)` followed by
`metric.result()` and the function on the same data compute the same thing.
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_label_relax._api import export
from keras_label_relax._compilation import jax_jit
from keras_label_relax._labels import class_ids
from keras_label_relax._validation import check_bool
from keras_label_relax._validation import check_choice
from keras_label_relax._validation import check_num_bins

NORMS = ("l1", "l2", "max")
BINNINGS = ("equal_width", "equal_mass")

_SAME_WIDTH_INT = {
    "float16": "int16",
    "bfloat16": "int16",
    "float32": "int32",
    "float64": "int64",
}

# Rows of the per-bin state of the top-label and classwise errors.
_WEIGHT, _CONFIDENCE, _CORRECT = 0, 1, 2

# The fine histogram behind equal-mass binning: bins of equal width in
# `-log(1 - c)` over [0, 32 log 2], that is, confidences from 0 up to
# 1 - 2**-32; higher ones share the last bin with 1.0. A bin starting at
# confidence `c` is about `(1 - c) * 3.4e-4` wide: 3.4e-4 near 0, 1.7e-4 at
# 0.5, 3.4e-7 at 0.999.
FINE_BINS = 2**16
_FINE_RANGE = 32.0 * math.log(2.0)

_VALUE_CHECKS_NOTE = """\
With `validate_args=True` (the default) each eager update checks its values
and raises a `ValueError` that says what is wrong and how often: class ids
outside `[0, num_classes)`, probabilities outside [0, 1] or NaN (not checked
with `from_logits=True`), negative or non-finite sample weights. Inside a
compiled function (`jit_compile`, `tf.function`, `jax.jit`,
`torch.compile`, and so inside `fit`/`evaluate` unless `run_eagerly=True`)
the values are symbolic and are not checked; there an out-of-range class id
counts as a wrong prediction and bad probabilities or weights give a
meaningless value. `validate_args=False` skips the checks. An empty batch
leaves the state unchanged. Eager on TensorFlow and JAX, a batch of at
least 65536 values is reduced (and checked) by one compiled function,
compiled once per batch shape and metric configuration and shared by all
instances: a stream of batches of one size compiles once (about 0.1-0.5
s), the last, smaller batch once more."""


def _with_value_checks_note(docstring):
    note = _VALUE_CHECKS_NOTE.replace("\n", "\n    ")
    return docstring.replace("    {checks}", "\n    " + note)


class _SumsMetric(keras.metrics.Metric):
    """A metric whose state is sums, added with Kahan compensation.

    Each state variable `v` has a companion `v_error`; the true sum is
    `v - v_error`. Replicas combine by adding both, so the result under data
    parallelism equals the single-device one.
    """

    def __init__(self, from_logits, validate_args, name, dtype):
        super().__init__(name=name, dtype=dtype)
        _check_float64_available(self.dtype)
        self.from_logits = check_bool("from_logits", from_logits)
        self.validate_args = check_bool("validate_args", validate_args)
        self._direction = "down"
        self._sums = []

    def _add_sums_variable(self, name, shape):
        variable = self.add_variable(
            shape=shape, initializer="zeros", dtype=self.dtype, name=name
        )
        error = self.add_variable(
            shape=shape, initializer="zeros", dtype=self.dtype, name=name + "_error"
        )
        self._sums.append((variable, error))
        return variable

    def _add_compensated(self, *increments):
        totals = [variable.value for variable, _ in self._sums]
        errors = [error.value for _, error in self._sums]
        add = _compensated_sums
        if _compiles_small(increments[0]):
            # Eager, one compiled call instead of five ops per variable.
            add = _compiled_compensated_sums(self.dtype)
        self._assign_sums(*add(totals, errors, list(increments)))

    def _assign_sums(self, totals, errors):
        for (variable, error), total, new_error in zip(
            self._sums, totals, errors, strict=True
        ):
            error.assign(new_error)
            variable.assign(total)

    def _state(self):
        """The compensated sums, as tensors."""
        return [variable.value - error.value for variable, error in self._sums]

    def _state_numpy(self):
        return [
            np.asarray(ops.convert_to_numpy(variable.value), np.float64)
            - np.asarray(ops.convert_to_numpy(error.value), np.float64)
            for variable, error in self._sums
        ]

    def _add_batch(
        self,
        update,
        static,
        y_true,
        y_pred,
        sample_weight,
        blockwise=False,
    ):
        """Adds `update(labels, y_pred, weight, *static)`'s increments of a
        batch to the state, after checking its values; an empty batch is a
        no-op. `blockwise`: see `_compiled_state_step`."""
        inputs = _flat_inputs(
            y_true, y_pred, sample_weight, self.dtype, self.from_logits, False
        )
        if inputs is not None and _compiles_eager(inputs[1]):
            totals, errors = _compiled_state_update(
                update,
                static,
                *inputs,
                self.from_logits,
                self.validate_args,
                blockwise,
                [variable.value for variable, _ in self._sums],
                [error.value for _, error in self._sums],
            )
            self._assign_sums(totals, errors)
        elif inputs is not None:
            increments = _checked_increments(
                update,
                static,
                *inputs,
                self.from_logits,
                self.validate_args,
            )
            self._add_compensated(*increments)


def _compensated_sums(totals, errors, increments):
    """Kahan summation: `totals` plus `increments`, and the new errors."""
    new_totals, new_errors = [], []
    for total, error, increment in zip(totals, errors, increments, strict=True):
        corrected = ops.cast(increment, total.dtype) - error
        new_total = total + corrected
        new_errors.append((new_total - total) - corrected)
        new_totals.append(new_total)
    return new_totals, new_errors


@functools.cache
def _compiled_compensated_sums(dtype):
    del dtype  # Only part of the key.
    return _compile(_compensated_sums)


def _computed(compute, state, *static):
    """`compute(state, *static)`; on eager JAX by one compiled call (cached
    for `static`), where its dozens of small ops would each be compiled for
    the state's shape."""
    if keras.backend.backend() == "jax" and _values_visible(state):
        return _compiled_compute(compute, static)(state)
    return compute(state, *static)


@functools.cache
def _compiled_compute(compute, static):
    return jax_jit(functools.partial(_call_with_static, compute, static))


def _call_with_static(compute, static, state):
    return compute(state, *static)


def _compiles_small(x):
    """Whether eager tensor `x`'s backend compiles (TensorFlow, JAX)."""
    return keras.backend.backend() in ("tensorflow", "jax") and _values_visible(x)


@export
class ExpectedCalibrationError(_SumsMetric):
    """Top-label calibration error with equal-width or equal-mass bins.

    The confidence of a prediction is its largest class probability; it is
    correct when that class (the first one, if several tie, as `argmax`
    picks it) is the label. Labels are integer class ids or one-hot
    vectors. Predictions are grouped into `num_bins` bins by confidence.
    With `W_b` the total weight, `C_b` the weighted sum of confidences and
    `A_b` the weighted number of correct predictions in bin `b`, and `W`
    the total weight:

    - `norm="l1"`: the expected calibration error (ECE),
      `sum_b |A_b - C_b| / W`.
    - `norm="l2"`: the root-mean-square calibration error,
      `sqrt(sum_b (A_b - C_b)**2 / W_b / W)`.
    - `norm="max"`: the maximum calibration error (MCE),
      `max_b |A_b - C_b| / W_b` over the non-empty bins.

    **`binning="equal_width"`** (Guo et al., 2017) splits the unit interval
    into bins `(lo, hi]`: bin `b` holds the confidences `c` with
    `ceil(c * num_bins) == b + 1`, so 1.0 falls in the last bin and 0.0 in
    the first. The state is three sums per bin and the value is exact.

    **`binning="equal_mass"`** (adaptive binning, Nguyen & O'Connor, 2015)
    gives each bin the same weight: sort the predictions by confidence, lay
    them end to end by weight and cut the line into `num_bins` pieces of
    weight `W / num_bins`; predictions of equal confidence form one block,
    and a block cut by an edge is split between the two bins in proportion
    to the weight on each side. These bins depend on all the data, so the
    metric streams a fine histogram instead: 65536 bins of equal width in
    `-log(1 - c)` (3.4e-4 wide near 0, 1.7e-4 at 0.5, 3.4e-7 at 0.999),
    holding the same three sums. The equal-mass bins are read off it,
    splitting a fine bin that an edge cuts in proportion to weight. Only
    the `num_bins - 1` fine bins that the edges cut can differ from the
    exact sorted computation, by how their predictions' correctness and
    confidence are ordered inside them: for `norm="l1"` by at most
    `2 * sum_edges min(w_left, w_right) * (1 + width) / W` for the
    weights `w_left`, `w_right` on either side of an edge in its fine bin.
    The difference is largest when a cut fine bin holds two or three
    predictions: for 15 bins, up to 1e-3 with 1000 predictions, 6e-4 with
    3000, 5e-5 with 10^5 in the tests, which check 1e-3 for all three norms
    on 10^5 moderately confident predictions and on 10^5 from a model with
    95% of its confidences above 0.999. `"l2"` and `"max"` divide per-bin
    gaps by `W / num_bins`, so with few predictions they move `num_bins`
    times as much.

    Without `sample_weight` every prediction weighs 1 and `W_b` is a count.
    Weights must be non-negative; a weight of 0 masks a prediction. (In
    `compile()`, pass the metric in `weighted_metrics` to have it receive
    the sample weights.) `bin_statistics()` returns the per-bin counts,
    mean confidences and accuracies, as a reliability diagram draws them.
    {checks}

    The state is `O(num_bins)` (equal width) or `O(65536)` (equal mass)
    whatever the number of predictions, and replicas combine it by
    addition, which makes the result under `tf.distribute` or JAX data
    parallelism equal the single-device one. Each update reduces its batch
    to per-bin sums (confidences are summed relative to their bin's centre,
    which keeps the partial sums small) and adds them to the state with
    compensated (Kahan) summation, so float32 state stays within about 1e-7
    of a float64 computation over millions of predictions. With
    `dtype="float64"` state and arithmetic are float64 (on JAX this needs
    `jax.config.update("jax_enable_x64", True)`).

    torchmetrics' `multiclass_calibration_error` bins `[lo, hi)` and puts a
    confidence of exactly 1.0 in an extra bin of its own; the two agree
    except for confidences that sit exactly on a bin edge.
    `expected_calibration_error()` computes the same value in one call.

    Args:
        num_bins: number of confidence bins, an integer >= 1.
        from_logits: whether `y_pred` holds logits rather than
            probabilities. With logits the confidence is the largest softmax
            probability, computed without forming the softmax.
        norm: `"l1"` (ECE), `"l2"` (RMS calibration error) or `"max"`
            (MCE).
        binning: `"equal_width"` or `"equal_mass"`.
        validate_args: whether eager updates check their values.
        name: name of the metric instance.
        dtype: dtype of the metric's computations and state.

    Example:

    >>> metric = ExpectedCalibrationError(num_bins=4)
    >>> metric.update_state([0, 1], [[0.9, 0.1], [0.7, 0.3]])
    >>> round(float(metric.result()), 4)  # (|1 - 0.9| + |0 - 0.7|) / 2
    0.4
    >>> metric = ExpectedCalibrationError(num_bins=2, binning="equal_mass")
    >>> metric.update_state([0, 1], [[0.9, 0.1], [0.7, 0.3]])
    >>> round(float(metric.result()), 4)  # bins {0.7}, {0.9}
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
        - [Nguyen & O'Connor, 2015. Posterior calibration and exploratory
          analysis for natural language processing models](
          https://arxiv.org/abs/1508.05154)
    """

    def __init__(
        self,
        num_bins=15,
        from_logits=False,
        norm="l1",
        binning="equal_width",
        validate_args=True,
        name="ece",
        dtype=None,
    ):
        super().__init__(from_logits, validate_args, name, dtype)
        self.num_bins = check_num_bins(num_bins)
        self.norm = check_choice("norm", norm, NORMS)
        self.binning = check_choice("binning", binning, BINNINGS)
        size = self.num_bins if self.binning == "equal_width" else FINE_BINS
        self.bin_sums = self._add_sums_variable("bin_sums", (3, size))

    def update_state(self, y_true, y_pred, sample_weight=None):
        static = (self.from_logits, self._bins(), self.dtype)
        self._add_batch(_ece_update, static, y_true, y_pred, sample_weight)

    def accumulate(self, confidence, correct, weight=None):
        """Adds flat per-prediction confidences, correctness and weights.

        `update_state()` reduces its inputs to these; calibration code that
        has them already (for example, for many temperatures of the same
        logits) can add them directly. Values are not checked.

        Args:
            confidence: top-label confidences in [0, 1], shape `(N,)`.
            correct: 1.0 where the top label is right, else 0.0, `(N,)`.
            weight: optional non-negative weights `(N,)`.
        """
        self._add_compensated(
            _bin_sums(confidence, correct, weight, self._bins(), self.dtype)
        )

    def _bins(self):
        return self.num_bins if self.binning == "equal_width" else None

    def result(self):
        return _computed(
            _ece_compute, self._state()[0], self.num_bins, self.norm, self.binning
        )

    def bin_statistics(self):
        """Returns the per-bin statistics accumulated so far, as numpy.

        Returns:
            A dict of float64 arrays:
            - `"edges"`: the `num_bins + 1` bin edges: `0, 1/num_bins, ...,
              1` for equal-width bins; for equal-mass bins the confidences
              where the data is cut (located within the fine histogram's
              resolution; the outer edges are those of the lowest and
              highest non-empty fine bin).
            - `"weight"`: the total weight per bin (the number of
              predictions when no `sample_weight` was given).
            - `"confidence"`: the mean confidence per bin (NaN when empty).
            - `"accuracy"`: the (weighted) fraction of correct predictions
              per bin (NaN when empty).
        """
        sums = self._state_numpy()[0]
        if self.binning == "equal_width":
            edges = np.linspace(0.0, 1.0, self.num_bins + 1)
        else:
            sums, edges = _equal_mass_numpy(sums, self.num_bins)
        weight = sums[_WEIGHT]
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(weight > 0, sums[_CONFIDENCE] / weight, np.nan)
            accuracy = np.where(weight > 0, sums[_CORRECT] / weight, np.nan)
        return {
            "edges": edges,
            "weight": weight,
            "confidence": confidence,
            "accuracy": accuracy,
        }

    def get_config(self):
        return {
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
            "norm": self.norm,
            "binning": self.binning,
            "validate_args": self.validate_args,
            "name": self.name,
            "dtype": self.dtype,
        }


ExpectedCalibrationError.__doc__ = _with_value_checks_note(
    ExpectedCalibrationError.__doc__
)


@export
class ClasswiseCalibrationError(_SumsMetric):
    """Classwise calibration error: the binned error of every class.

    For each class `k`, the probabilities `p_k` are binned into `num_bins`
    equal-width bins `(lo, hi]` (as `ExpectedCalibrationError` bins
    confidences) and compared with the indicator `[y == k]`: with `W_kb`
    the weight, `C_kb` the weighted sum of `p_k` and `A_kb` the weight of
    label `k` in bin `b` of class `k`, and `W` the total weight, the error of
    class `k` is `sum_b |A_kb - C_kb| / W` (`norm="l1"`),
    `sqrt(sum_b (A_kb - C_kb)**2 / W_kb / W)` (`"l2"`) or
    `max_b |A_kb - C_kb| / W_kb` (`"max"`), and the result is the mean over
    all `K` classes: with `"l1"` the classwise-ECE of Kull et al. (2019).
    A class that never occurs as a label still counts in the mean, as in
    Kull et al.: its error is the weight its probabilities put on it.
    Labels are integer class ids or one-hot vectors.
    {checks}

    The state is three sums per class and bin, `O(K * num_bins)`, created
    at the first update (the number of classes `K` is the last axis of
    `y_pred`), and added with compensated summation as in
    `ExpectedCalibrationError`. `classwise_calibration_error()` computes
    the same value in one call.

    Args:
        num_bins: number of equal-width bins per class, an integer >= 1.
        from_logits: whether `y_pred` holds logits (softmax is applied).
        norm: `"l1"`, `"l2"` or `"max"`.
        validate_args: whether eager updates check their values.
        name: name of the metric instance.
        dtype: dtype of the metric's computations and state.

    Example:

    >>> metric = ClasswiseCalibrationError(num_bins=2)
    >>> metric.update_state([0, 1], [[0.8, 0.2], [0.6, 0.4]])
    >>> # class 0: bins {0.8, 0.6}: |1 - 1.4| / 2; class 1: {0.2, 0.4}: |1 - 0.6| / 2
    >>> round(float(metric.result()), 4)
    0.2

    Reference:
        - [Kull et al., 2019. Beyond temperature scaling: Obtaining
          well-calibrated multiclass probabilities with Dirichlet
          calibration](https://arxiv.org/abs/1910.12656)
    """

    def __init__(
        self,
        num_bins=15,
        from_logits=False,
        norm="l1",
        validate_args=True,
        name="classwise_ece",
        dtype=None,
    ):
        super().__init__(from_logits, validate_args, name, dtype)
        self.num_bins = check_num_bins(num_bins)
        self.norm = check_choice("norm", norm, NORMS)
        self.bin_sums = None

    def _build(self, num_classes):
        self.bin_sums = self._add_sums_variable(
            "bin_sums", (3, num_classes, self.num_bins)
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        if self.bin_sums is None:
            self._build(_num_classes(y_pred))
        # Checked values (eager, `validate_args`) need no clipping pass.
        checked = self.validate_args and _values_visible(y_pred)
        if _sparse_classwise(checked, self.from_logits, self.dtype):
            inputs = _flat_inputs(
                y_true, y_pred, sample_weight, self.dtype, False, False
            )
            if inputs is not None:
                static = (self.num_bins, self.dtype)
                increments = _checked_increments(
                    _classwise_sparse_update, static, *inputs, False, True
                )
                self._add_compensated(*increments)
            return
        static = (self.from_logits, self.num_bins, self.dtype, checked)
        self._add_batch(
            _classwise_update, static, y_true, y_pred, sample_weight, blockwise=True
        )

    def result(self):
        if self.bin_sums is None:
            return ops.zeros((), self.dtype)
        return _computed(_classwise_compute, self._state()[0], self.norm)

    def get_config(self):
        return {
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
            "norm": self.norm,
            "validate_args": self.validate_args,
            "name": self.name,
            "dtype": self.dtype,
        }


ClasswiseCalibrationError.__doc__ = _with_value_checks_note(
    ClasswiseCalibrationError.__doc__
)


@export
class BrierScore(_SumsMetric):
    """Multi-class Brier score, `sum_k (p_k - y_k)**2`, averaged by weight.

    `y` is the one-hot label, so a prediction scores between 0 (all its
    probability on the label) and 2. Labels are integer class ids or one-hot
    vectors (class vectors count as the one-hot vector of their argmax).

    `decomposition()` splits the score (Murphy, 1973) over the predictions
    grouped into `num_bins` equal-width bins `(lo, hi]` of top-label
    confidence, as `ExpectedCalibrationError` groups them. With `pbar_b`
    and `ybar_b` the mean probability vector and mean one-hot label in bin
    `b`, `ybar` the mean one-hot label, `W_b` the weight of bin `b` and `W`
    the total weight:

    - `reliability = sum_b W_b * ||pbar_b - ybar_b||**2 / W`,
    - `resolution = sum_b W_b * ||ybar_b - ybar||**2 / W`,
    - `uncertainty = sum_k ybar_k * (1 - ybar_k)`,
    - `within_bin_variance = sum_n w_n * ||p_n - pbar_b(n)||**2 / W`,
    - `within_bin_covariance = sum_n w_n * (p_n - pbar_b(n)) . (y_n - ybar_b(n)) / W`,

    and `brier = reliability - resolution + uncertainty
    + within_bin_variance - 2 * within_bin_covariance` exactly (Stephenson
    et al., 2008). Murphy's three-term decomposition is exact when all
    predictions in a bin are the same vector: then the last two terms are 0.
    Otherwise, with the bins of a streaming metric, they are the binning's
    share and are reported rather than hidden.
    {checks}

    The state is `2 * K + 3` sums per bin plus the total score and weight,
    created at the first update, and added with compensated summation.
    `brier_score()` computes the same score in one call.

    Args:
        from_logits: whether `y_pred` holds logits (softmax is applied).
        num_bins: number of confidence bins of the decomposition.
        validate_args: whether eager updates check their values.
        name: name of the metric instance.
        dtype: dtype of the metric's computations and state.

    Example:

    >>> metric = BrierScore()
    >>> metric.update_state([0, 1], [[0.8, 0.2], [0.6, 0.4]])
    >>> round(float(metric.result()), 4)  # (0.04 + 0.04 + 0.36 + 0.36) / 2
    0.4

    Reference:
        - [Brier, 1950. Verification of forecasts expressed in terms of
          probability](https://doi.org/10.1175/1520-0493(1950)078<0001:VOFEIT>2.0.CO;2)
        - [Murphy, 1973. A new vector partition of the probability score](
          https://doi.org/10.1175/1520-0450(1973)012<0595:ANVPOT>2.0.CO;2)
        - [Stephenson et al., 2008. Two extra components in the Brier score
          decomposition](https://doi.org/10.1175/2007WAF2007029.1)
    """

    def __init__(
        self,
        from_logits=False,
        num_bins=15,
        validate_args=True,
        name="brier_score",
        dtype=None,
    ):
        super().__init__(from_logits, validate_args, name, dtype)
        self.num_bins = check_num_bins(num_bins)
        self.totals = self._add_sums_variable("totals", (2,))
        self.bin_sums = None

    def _build(self, num_classes):
        self.bin_sums = self._add_sums_variable(
            "bin_sums", (self.num_bins, 2 * num_classes + 3)
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        if self.bin_sums is None:
            self._build(_num_classes(y_pred))
        static = (self.from_logits, self.num_bins, self.dtype)
        self._add_batch(_brier_update, static, y_true, y_pred, sample_weight)

    def result(self):
        return _computed(_brier_compute, self._state()[0])

    def decomposition(self):
        """Returns the decomposition of the score accumulated so far.

        Returns:
            A dict of float64 numbers: `"brier"`, `"reliability"`,
            `"resolution"`, `"uncertainty"`, `"within_bin_variance"` and
            `"within_bin_covariance"`, with `brier = reliability -
            resolution + uncertainty + within_bin_variance -
            2 * within_bin_covariance`. All are 0 before any update.
        """
        state = self._state_numpy()
        if self.bin_sums is None:
            return dict.fromkeys(_DECOMPOSITION_KEYS, 0.0)
        return _brier_decomposition_numpy(*state)

    def get_config(self):
        return {
            "from_logits": self.from_logits,
            "num_bins": self.num_bins,
            "validate_args": self.validate_args,
            "name": self.name,
            "dtype": self.dtype,
        }


BrierScore.__doc__ = _with_value_checks_note(BrierScore.__doc__)

_DECOMPOSITION_KEYS = (
    "brier",
    "reliability",
    "resolution",
    "uncertainty",
    "within_bin_variance",
    "within_bin_covariance",
)


@export
def expected_calibration_error(
    y_true,
    y_pred,
    num_bins=15,
    from_logits=False,
    norm="l1",
    binning="equal_width",
    sample_weight=None,
    validate_args=True,
    dtype=None,
):
    """The top-label calibration error of one set of predictions.

    The value `ExpectedCalibrationError` gives after one `update_state()`
    on the same arguments (see there for the definitions), as a scalar
    tensor, with no state: it can be compiled (`jax.jit`, `tf.function`,
    `torch.compile`), where the value checks are skipped.

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: probabilities (or logits with `from_logits=True`), classes
            on the last axis.
        num_bins: number of confidence bins, an integer >= 1.
        from_logits: whether `y_pred` holds logits.
        norm: `"l1"` (ECE), `"l2"` (RMS calibration error) or `"max"`
            (MCE).
        binning: `"equal_width"` or `"equal_mass"`.
        sample_weight: optional non-negative weights of the batch shape.
        validate_args: whether to check the values when they are visible.
        dtype: dtype of the computation; by default float64 for float64
            predictions, else float32.

    Returns:
        A scalar tensor; 0.0 for an empty batch or zero total weight.

    Example:

    >>> error = expected_calibration_error([0, 1], [[0.9, 0.1], [0.7, 0.3]], 4)
    >>> round(float(error), 4)
    0.4
    """
    num_bins = check_num_bins(num_bins)
    norm = check_choice("norm", norm, NORMS)
    binning = check_choice("binning", binning, BINNINGS)
    from_logits = check_bool("from_logits", from_logits)
    y_pred = ops.convert_to_tensor(y_pred)
    dtype = _function_dtype(y_pred, dtype)
    inputs = _flat_inputs(
        y_true, y_pred, sample_weight, dtype, from_logits, validate_args
    )
    if inputs is None:
        return ops.zeros((), dtype)
    bins = num_bins if binning == "equal_width" else None
    sums = _ece_update(*inputs, from_logits, bins, dtype)
    return _ece_compute(sums, num_bins, norm, binning)


@export
def classwise_calibration_error(
    y_true,
    y_pred,
    num_bins=15,
    from_logits=False,
    norm="l1",
    sample_weight=None,
    validate_args=True,
    dtype=None,
):
    """The classwise calibration error of one set of predictions.

    The value `ClasswiseCalibrationError` gives after one `update_state()`
    on the same arguments (see there for the definition), as a scalar
    tensor, with no state; compilable, where the value checks are skipped.

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: probabilities (or logits with `from_logits=True`), classes
            on the last axis.
        num_bins: number of equal-width bins per class, an integer >= 1.
        from_logits: whether `y_pred` holds logits.
        norm: `"l1"`, `"l2"` or `"max"`.
        sample_weight: optional non-negative weights of the batch shape.
        validate_args: whether to check the values when they are visible.
        dtype: dtype of the computation; by default float64 for float64
            predictions, else float32.

    Returns:
        A scalar tensor; 0.0 for an empty batch or zero total weight.

    Example:

    >>> error = classwise_calibration_error([0, 1], [[0.8, 0.2], [0.6, 0.4]], 2)
    >>> round(float(error), 4)
    0.2
    """
    num_bins = check_num_bins(num_bins)
    norm = check_choice("norm", norm, NORMS)
    from_logits = check_bool("from_logits", from_logits)
    y_pred = ops.convert_to_tensor(y_pred)
    dtype = _function_dtype(y_pred, dtype)
    inputs = _flat_inputs(
        y_true, y_pred, sample_weight, dtype, from_logits, validate_args
    )
    if inputs is None:
        return ops.zeros((), dtype)
    checked = _checked(validate_args, inputs[1])
    if _sparse_classwise(checked, from_logits, dtype):
        sums = _classwise_sparse_update(*inputs, num_bins, dtype)
    else:
        sums = _classwise_update(*inputs, from_logits, num_bins, dtype, checked)
    return _classwise_compute(sums, norm)


@export
def brier_score(
    y_true,
    y_pred,
    from_logits=False,
    sample_weight=None,
    validate_args=True,
    dtype=None,
):
    """The mean multi-class Brier score of one set of predictions.

    The value `BrierScore` gives after one `update_state()` on the same
    arguments, `sum_k (p_k - y_k)**2` averaged by weight, as a scalar
    tensor, with no state; compilable, where the value checks are skipped.

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: probabilities (or logits with `from_logits=True`), classes
            on the last axis.
        from_logits: whether `y_pred` holds logits.
        sample_weight: optional non-negative weights of the batch shape.
        validate_args: whether to check the values when they are visible.
        dtype: dtype of the computation; by default float64 for float64
            predictions, else float32.

    Returns:
        A scalar tensor; 0.0 for an empty batch or zero total weight.

    Example:

    >>> round(float(brier_score([0, 1], [[0.8, 0.2], [0.6, 0.4]])), 4)
    0.4
    """
    from_logits = check_bool("from_logits", from_logits)
    y_pred = ops.convert_to_tensor(y_pred)
    dtype = _function_dtype(y_pred, dtype)
    inputs = _flat_inputs(
        y_true, y_pred, sample_weight, dtype, from_logits, validate_args
    )
    if inputs is None:
        return ops.zeros((), dtype)
    return _brier_compute(_brier_totals(*inputs, from_logits, dtype))


# The shared steps. `*_update` reduces a batch to the state's increments,
# `*_compute` turns (accumulated) sums into the value.


def _ece_update(labels, y_pred, weight, from_logits, num_bins, dtype):
    """Per-bin sums `(3, num_bins)`; `num_bins=None`: the fine histogram."""
    confidence, correct = _top_label(y_pred, labels, from_logits)
    return _bin_sums(confidence, correct, weight, num_bins, dtype)


def _bin_sums(confidence, correct, weight, num_bins, dtype):
    """Sums of weight, confidence and correctness per confidence bin.

    `num_bins` equal-width bins `(lo, hi]`, or with `num_bins=None` the
    `FINE_BINS` bins of the equal-mass histogram.
    """
    confidence = ops.cast(confidence, dtype)
    correct = ops.cast(correct, dtype)
    if num_bins is None:
        return _fine_bin_sums(confidence, correct, weight, dtype)
    # Slot `ceil(c * num_bins)`, in [0, num_bins]: slot 0 holds the
    # confidences of exactly 0, which join bin 0 at the end. Confidences are
    # summed relative to their slot's centre (in units of the bin width):
    # small numbers, so that float32 reductions over large batches stay
    # accurate.
    scaled = confidence * num_bins
    ceiled = ops.ceil(scaled)
    offset = (ceiled - 0.5) - scaled
    rows = [None, offset, correct]
    if weight is not None:
        weight = ops.cast(weight, dtype)
        rows = [weight, offset * weight, correct * weight]
    slots = num_bins + 1
    # Clipped as integers: a NaN confidence casts to an arbitrary integer,
    # which must still be a valid index. (Eager, three histograms beat one
    # product with an `N x (num_bins + 1)` membership matrix on every
    # backend: its allocation alone costs more.)
    index = ops.clip(ops.cast(ceiled, "int32"), 0, num_bins)
    weight_sum, offset_sum, correct_sum = _segment_sums(rows, index, slots, dtype)
    centres = ops.arange(slots, dtype=dtype) - 0.5
    confidence_sum = (centres * weight_sum - offset_sum) / num_bins
    sums = ops.stack([weight_sum, confidence_sum, correct_sum])
    return ops.concatenate([sums[:, :1] + sums[:, 1:2], sums[:, 2:]], axis=1)


def _fine_bin_sums(confidence, correct, weight, dtype):
    position = ops.log1p(-confidence) * (-FINE_BINS / _FINE_RANGE)
    bins = ops.clip(ops.floor(position), 0.0, FINE_BINS - 1.0)
    bins = ops.clip(ops.cast(bins, "int32"), 0, FINE_BINS - 1)
    lower, upper = _fine_edges()
    centres = ops.convert_to_tensor((lower + upper) / 2.0, dtype)
    offset = confidence - ops.take(centres, bins)
    if weight is not None:
        weight = ops.cast(weight, dtype)
        offset = offset * weight
        correct = correct * weight
    weight_sum, offset_sum, correct_sum = _segment_sums(
        [weight, offset, correct], bins, FINE_BINS, dtype
    )
    return ops.stack([weight_sum, offset_sum + centres * weight_sum, correct_sum])


def _ece_compute(sums, num_bins, norm, binning):
    if binning == "equal_mass":
        sums = _equal_mass_sums(sums, num_bins)
    return _calibration_error(sums[_WEIGHT], sums[_CONFIDENCE], sums[_CORRECT], norm)


def _calibration_error(weight, confidence, correct, norm):
    """The binned error over the last axis (bins); leading axes are kept."""
    gap = ops.abs(correct - confidence)
    total_weight = ops.sum(weight, axis=-1)
    nonempty = weight > 0
    safe_weight = ops.where(nonempty, weight, ops.ones_like(weight))
    positive = total_weight > 0
    safe_total = ops.where(positive, total_weight, ops.ones_like(total_weight))
    if norm == "l1":
        error = ops.sum(gap, axis=-1) / safe_total
    elif norm == "l2":
        error = ops.sqrt(ops.sum(ops.square(gap) / safe_weight, axis=-1) / safe_total)
    else:
        error = ops.max(
            ops.where(nonempty, gap / safe_weight, ops.zeros_like(gap)), axis=-1
        )
    return ops.where(positive, error, ops.zeros_like(error))


def _equal_mass_sums(fine, num_bins):
    """Equal-mass bin sums `(3, num_bins)` from the fine histogram `(3, M)`.

    The cumulative sums over the fine bins, as functions of the cumulative
    weight, are interpolated linearly inside each fine bin (a fine bin cut
    by an edge is split in proportion to weight) and read at the edges
    `j * W / num_bins`.
    """
    cumulative = _cumsum(fine, axis=1)
    cumulative = ops.concatenate([ops.zeros_like(cumulative[:, :1]), cumulative], 1)
    total = cumulative[_WEIGHT, -1]
    fractions = ops.arange(1, num_bins, dtype=fine.dtype) / num_bins
    targets = total * fractions
    # The first cumulative weight >= target closes the fine bin it falls in.
    after = ops.sum(
        ops.cast(cumulative[_WEIGHT][None, :] < targets[:, None], "int32"), axis=1
    )
    after = ops.clip(after, 1, FINE_BINS)
    below = ops.take(cumulative, after - 1, axis=1)
    above = ops.take(cumulative, after, axis=1)
    span = above[_WEIGHT] - below[_WEIGHT]
    share = (targets - below[_WEIGHT]) / ops.where(span > 0, span, ops.ones_like(span))
    at_edges = below + share[None, :] * (above - below)
    bounds = ops.concatenate(
        [ops.zeros_like(cumulative[:, :1]), at_edges, cumulative[:, -1:]], axis=1
    )
    return bounds[:, 1:] - bounds[:, :-1]


def _cumsum(x, axis):
    if keras.backend.backend() == "torch":
        import torch

        # Keras 3.15's `ops.cumsum` returns float32 for float64 on PyTorch.
        return torch.cumsum(x, dim=axis)
    return ops.cumsum(x, axis=axis)


def _equal_mass_numpy(fine, num_bins):
    """`_equal_mass_sums` in numpy, plus the confidences at the edges."""
    weight = fine[_WEIGHT]
    cumulative = np.concatenate([np.zeros((3, 1)), np.cumsum(fine, axis=1)], axis=1)
    total = cumulative[_WEIGHT, -1]
    targets = total * np.arange(1, num_bins) / num_bins
    after = np.clip(np.searchsorted(cumulative[_WEIGHT], targets, "left"), 1, FINE_BINS)
    below, above = cumulative[:, after - 1], cumulative[:, after]
    span = above[_WEIGHT] - below[_WEIGHT]
    share = (targets - below[_WEIGHT]) / np.where(span > 0, span, 1.0)
    at_edges = below + share * (above - below)
    bounds = np.concatenate([np.zeros((3, 1)), at_edges, cumulative[:, -1:]], axis=1)
    sums = np.diff(bounds, axis=1)
    lower, upper = _fine_edges()
    nonempty = np.flatnonzero(weight > 0)
    if len(nonempty) == 0:
        return sums, np.linspace(0.0, 1.0, num_bins + 1)
    inner = lower[after - 1] + share * (upper[after - 1] - lower[after - 1])
    edges = np.concatenate([[lower[nonempty[0]]], inner, [upper[nonempty[-1]]]])
    return sums, edges


@functools.cache
def _fine_edges():
    """Lower and upper confidence edges of the fine bins, float64."""
    steps = np.arange(FINE_BINS + 1) * (_FINE_RANGE / FINE_BINS)
    edges = -np.expm1(-steps)
    edges[-1] = 1.0
    return edges[:-1], edges[1:]


def _classwise_update(
    labels, y_pred, weight, from_logits, num_bins, dtype, checked=False
):
    """Per-class, per-bin sums `(3, K, num_bins)` of weight, p_k, [y == k]."""
    slots = _classwise_slots(labels, y_pred, weight, from_logits, num_bins, checked)
    return _classwise_sums(*slots, y_pred.shape[-1], num_bins, dtype)


def _classwise_slots(labels, y_pred, weight, from_logits, num_bins, checked):
    """The slot ids `(N * K,)` of the probabilities, the rows to sum over them
    (the weights, or `None` to count; the offsets), the label's slot ids
    `(N,)` and weights `(N,)`.

    Each probability goes to slot `ceil(p_k * num_bins)` of its class, in
    `[0, num_bins]`: slot 0 holds the probabilities of exactly 0, which
    bin 0 takes afterwards, so values that passed the checks (`checked`)
    need no clipping pass. Probabilities are summed relative to their
    slot's centre (`ceil - 0.5`), small numbers that keep float32 sums
    accurate. Every pass over the `N x K` probabilities counts here: six,
    plus the two histograms.
    """
    dtype = keras.backend.standardize_dtype(y_pred.dtype)
    probs = ops.softmax(y_pred, axis=-1) if from_logits else y_pred
    num_classes = probs.shape[-1]
    scaled = probs * num_bins
    ceiled = ops.ceil(scaled)
    offset = (ceiled - 0.5) - scaled
    slot_ids = ops.cast(ceiled, "int32")
    if from_logits or not checked:
        # Unchecked values may lie anywhere (or be NaN, which casts to an
        # arbitrary integer): the index must still be valid.
        slot_ids = ops.clip(slot_ids, 0, num_bins)
    slot_ids = slot_ids + ops.arange(num_classes, dtype="int32") * (num_bins + 1)
    valid = ops.logical_and(labels >= 0, labels < num_classes)
    safe_labels = ops.where(valid, labels, 0)
    label_slots = ops.take_along_axis(slot_ids, safe_labels[:, None], axis=-1)[:, 0]
    label_weight = ops.cast(valid, dtype)
    slot_ids = ops.reshape(slot_ids, (-1,))
    if weight is None:
        return slot_ids, None, ops.reshape(offset, (-1,)), label_slots, label_weight
    weight = ops.cast(weight, dtype)
    weights = ops.reshape(ops.broadcast_to(weight[:, None], ops.shape(probs)), (-1,))
    offsets = ops.reshape(offset * weight[:, None], (-1,))
    return slot_ids, weights, offsets, label_slots, label_weight * weight


def _classwise_sums(
    slot_ids, weights, offsets, label_slots, label_weight, num_classes, num_bins, dtype
):
    """`_classwise_update`'s sums from `_classwise_slots`' slots and rows."""
    slots_per_class = num_bins + 1
    size = num_classes * slots_per_class
    counts, offsets = _segment_sums([weights, offsets], slot_ids, size, dtype)
    (correct,) = _segment_sums([label_weight], label_slots, size, dtype)
    centres = ops.tile(ops.arange(slots_per_class, dtype=dtype) - 0.5, (num_classes,))
    confidence = (centres * counts - offsets) / num_bins
    sums = ops.reshape(
        ops.stack([counts, confidence, correct]), (3, num_classes, slots_per_class)
    )
    # Slot 0 (probabilities of exactly 0) joins bin 0.
    return ops.concatenate([sums[:, :, :1] + sums[:, :, 1:2], sums[:, :, 2:]], axis=-1)


def _sparse_classwise(checked, from_logits, dtype):
    """Whether an update takes `_classwise_sparse_sums`: eager on PyTorch,
    for checked float32 or float64 probabilities. (TensorFlow and JAX
    reduce a batch block by block in one compiled function, faster.)"""
    return (
        keras.backend.backend() == "torch"
        and checked
        and not from_logits
        and dtype in ("float32", "float64")
    )


def _classwise_sparse_update(labels, y_pred, weight, num_bins, dtype):
    """`_classwise_update`'s sums for probabilities known to lie in [0, 1]."""
    totals = _classwise_totals(labels, y_pred, weight, num_bins, dtype)
    return _classwise_sparse_sums(y_pred, weight, num_bins, dtype, *totals)


def _classwise_totals(labels, y_pred, weight, num_bins, dtype):
    """The part of `_classwise_sparse_sums` that needs no histogram of the
    `N x K` probabilities: the (weighted) probability totals and count per
    class, and the label sums `(K * num_bins,)`."""
    num_classes = y_pred.shape[-1]
    if weight is None:
        total = ops.cast(ops.shape(y_pred)[0], dtype)
        label_weight = ops.ones_like(labels, dtype)
    else:
        total = ops.sum(weight)
        label_weight = weight
    label_prob = _row_values(y_pred, labels)
    label_bins = ops.cast(ops.ceil(label_prob * num_bins), "int32")
    label_ids = labels * num_bins + ops.maximum(label_bins - 1, 0)
    (correct,) = _segment_sums([label_weight], label_ids, num_classes * num_bins, dtype)
    return _column_sums(y_pred, weight), total, correct


def _classwise_sparse_sums(
    y_pred, weight, num_bins, dtype, prob_totals, total, correct
):
    """`_classwise_update`'s sums `(3, K, num_bins)` for probabilities known
    to lie in [0, 1], from `_classwise_totals`, histogramming only the
    probabilities above bin 0.

    A prediction's probabilities sum to 1, so fewer than `num_bins` of them
    exceed `1 / num_bins`: with many classes, most fall in bin 0, whose sums
    are the per-class totals less the other bins' sums. Eager histograms
    cost far more per value than these totals.
    """
    num_classes = y_pred.shape[-1]
    index, values = _entries_above(y_pred, _first_bin_top(num_bins, dtype))
    scaled = values * num_bins
    ceiled = ops.ceil(scaled)
    # Bin `ceil(p * num_bins) - 1`, summed relative to its centre.
    offsets = (ceiled - 0.5) - scaled
    classes = ops.cast(index % num_classes, "int32")
    ids = classes * num_bins + ops.cast(ceiled, "int32") - 1
    weights = None
    if weight is not None:
        weights = ops.take(weight, index // num_classes)
        offsets = offsets * weights
    size = num_classes * num_bins
    counts, offset_sums = _segment_sums([weights, offsets], ids, size, dtype)
    centres = ops.tile(ops.arange(num_bins, dtype=dtype) + 0.5, (num_classes,))
    confidence = (centres * counts - offset_sums) / num_bins
    counts, confidence, correct = (
        ops.reshape(x, (num_classes, num_bins)) for x in (counts, confidence, correct)
    )
    first = ops.stack(
        [
            total - ops.sum(counts, axis=1),
            ops.cast(prob_totals, dtype) - ops.sum(confidence, axis=1),
            correct[:, 0],
        ]
    )
    rest = ops.stack([counts[:, 1:], confidence[:, 1:], correct[:, 1:]])
    return ops.concatenate([first[:, :, None], rest], axis=-1)


def _entries_above(values, threshold):
    """The flat indices (int64) and the values of the entries of `values`
    above `threshold`.

    Eager on a PyTorch CPU tensor through numpy, which shares its memory:
    its comparison and `flatnonzero` run 3-6x faster than PyTorch's `gt`
    and `nonzero` (10^6 to 10^7 values).
    """
    if keras.backend.backend() == "torch" and _values_visible(values):
        import torch

        if values.device.type == "cpu":
            flat = values.detach().reshape(-1).numpy()
            index = np.flatnonzero(flat > threshold)
            return torch.from_numpy(index), torch.from_numpy(flat[index])
    flat = ops.reshape(values, (-1,))
    (index,) = ops.nonzero(flat > threshold)
    return index, ops.take(flat, index)


def _row_values(values, columns):
    """`values[n, columns[n]]` for each row `n` of a matrix; `columns` must
    be valid. On PyTorch by `torch.gather`: Keras' `take_along_axis`
    broadcasts first, 4x slower eager."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.gather(values, 1, columns[:, None].long())[:, 0]
    return ops.take_along_axis(values, columns[:, None], axis=-1)[:, 0]


def _column_sums(values, weight, block=256):
    """The (weighted) sums of the rows of `values`, in blocks of `block`
    rows: accumulated row after row, as a product or column sum does, they
    lose a hundred times more precision over 10^5 float32 rows."""
    num_rows, num_columns = values.shape
    whole = num_rows - num_rows % block
    if weight is None:
        # A sum over the middle axis: on PyTorch 1.2-5x faster than the
        # product below (100 to 10 columns).
        blocks = ops.sum(ops.reshape(values[:whole], (-1, block, num_columns)), 1)
        return ops.sum(blocks, axis=0) + ops.sum(values[whole:], axis=0)
    blocks = ops.einsum(
        "bn,bnk->bk",
        ops.reshape(weight[:whole], (-1, block)),
        ops.reshape(values[:whole], (-1, block, num_columns)),
    )
    rest = ops.einsum("n,nk->k", weight[whole:], values[whole:])
    return ops.sum(blocks, axis=0) + rest


@functools.cache
def _first_bin_top(num_bins, dtype):
    """The largest `p` of `dtype` with `ceil(p * num_bins) <= 1`, as the
    updates round it: the top of bin 0."""
    dtype = np.dtype(dtype)
    scale = dtype.type(num_bins)
    top = dtype.type(1.0 / num_bins)
    while top * scale > 1:
        top = np.nextafter(top, dtype.type(0))
    while np.nextafter(top, dtype.type(1)) * scale <= 1:
        top = np.nextafter(top, dtype.type(1))
    return float(top)


def _classwise_compute(sums, norm):
    errors = _calibration_error(sums[_WEIGHT], sums[_CONFIDENCE], sums[_CORRECT], norm)
    # Not `ops.mean`: with JAX's x64 it returns float32 here (Keras 3.15).
    return ops.sum(errors) / errors.shape[0]


# Columns of the Brier score's per-bin state, after the 2 * K vector sums
# of probabilities and one-hot labels.
_BRIER_WEIGHT, _BRIER_SQUARES, _BRIER_LABEL_PROB = -3, -2, -1


def _brier_update(labels, y_pred, weight, from_logits, num_bins, dtype):
    """Total `(2,)` (weight, score) and per-bin sums `(num_bins, 2K + 3)`.

    Per bin: the probability vectors, the one-hot labels, the weight, the
    squared norms `||p||**2` and the label's probabilities `p_y`.
    """
    probs, squares, label_prob, valid = _brier_terms(labels, y_pred, from_logits)
    num_classes = probs.shape[-1]
    totals = _brier_totals_from_terms(squares, label_prob, weight, dtype)
    confidence = _row_max(probs)
    bins = ops.clip(ops.ceil(confidence * num_bins) - 1.0, 0.0, num_bins - 1.0)
    bins = ops.clip(ops.cast(bins, "int32"), 0, num_bins - 1)
    label_weight = ops.cast(valid, dtype)
    rows = [None, squares, label_prob]
    if weight is not None:
        weight = ops.cast(weight, dtype)
        label_weight = label_weight * weight
        rows = [weight, weight * squares, weight * label_prob]
    scalars = ops.stack(_segment_sums(rows, bins, num_bins, dtype), axis=1)
    prob_sums = _per_bin_vector_sums(probs, weight, bins, num_bins, dtype)
    safe_labels = ops.where(valid, labels, 0)
    (label_sums,) = _segment_sums(
        [label_weight], bins * num_classes + safe_labels, num_bins * num_classes, dtype
    )
    per_bin = ops.concatenate(
        [
            prob_sums,
            ops.reshape(label_sums, (num_bins, num_classes)),
            scalars,
        ],
        axis=1,
    )
    return totals, per_bin


def _per_bin_vector_sums(probs, weight, bins, num_bins, dtype):
    """The (weighted) sums of the probability vectors per bin, `(num_bins, K)`.

    A sum of rows by segment: on PyTorch `index_add_`, elsewhere
    `segment_sum` (compiled, a scatter of rows). Both beat the product with
    the `N x num_bins` membership matrix 2-4x on a CPU, and PyTorch's and
    TensorFlow's histograms of each column for 100 classes by far more; on
    eager PyTorch with 10 classes, `index_add_` of 10^5 rows also beats a
    histogram of each (strided) column 1.6x.
    """
    values = probs if weight is None else probs * weight[:, None]
    backend = keras.backend.backend()
    if backend == "torch":
        # Also on meta tensors (Keras' symbolic pass), where Keras'
        # `segment_sum` fails.
        import torch

        sums = torch.zeros(
            (num_bins, probs.shape[-1]), dtype=values.dtype, device=values.device
        )
        return sums.index_add_(0, bins.long(), values)
    return ops.segment_sum(values, bins, num_bins)


def _brier_terms(labels, y_pred, from_logits):
    """Probabilities, `||p||**2`, `p_y` (0 for a bad label) and validity."""
    probs = ops.softmax(y_pred, axis=-1) if from_logits else y_pred
    num_classes = probs.shape[-1]
    squares = _row_dots(probs)
    valid = ops.logical_and(labels >= 0, labels < num_classes)
    safe_labels = ops.where(valid, labels, 0)
    label_prob = _row_values(probs, safe_labels)
    label_prob = ops.where(valid, label_prob, ops.zeros_like(label_prob))
    return probs, squares, label_prob, valid


def _row_dots(x):
    """`||x_n||**2` for each row of a matrix, with no `N x K` temporary,
    unlike `sum(square(x))`: on PyTorch by `bmm` (Keras' `einsum` took 2.5x
    as long eager, 10^5 x 10), elsewhere by `einsum`."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.bmm(x[:, None, :], x[:, :, None]).reshape(x.shape[:1])
    return ops.einsum("nk,nk->n", x, x)


def _brier_totals(labels, y_pred, weight, from_logits, dtype):
    _, squares, label_prob, _ = _brier_terms(labels, y_pred, from_logits)
    return _brier_totals_from_terms(squares, label_prob, weight, dtype)


def _brier_totals_from_terms(squares, label_prob, weight, dtype):
    """(total weight, weighted sum of `||p - y||**2`)."""
    # ||p - y||**2 = sum_{k != y} p_k**2 + (1 - p_y)**2.
    scores = (squares - ops.square(label_prob)) + ops.square(1.0 - label_prob)
    if weight is None:
        total_weight = ops.cast(ops.shape(scores)[0], dtype)
    else:
        weight = ops.cast(weight, dtype)
        total_weight = ops.sum(weight)
        scores = scores * weight
    return ops.stack([total_weight, ops.sum(scores)])


def _brier_compute(totals):
    weight, score = totals[0], totals[1]
    safe = ops.where(weight > 0, weight, ops.ones_like(weight))
    return ops.where(weight > 0, score / safe, ops.zeros_like(score))


def _brier_decomposition_numpy(totals, per_bin):
    num_classes = (per_bin.shape[1] - 3) // 2
    prob_sums = per_bin[:, :num_classes]
    label_sums = per_bin[:, num_classes : 2 * num_classes]
    weight = per_bin[:, _BRIER_WEIGHT]
    squares = per_bin[:, _BRIER_SQUARES]
    label_prob = per_bin[:, _BRIER_LABEL_PROB]
    total = weight.sum()
    if not total > 0:
        return dict.fromkeys(_DECOMPOSITION_KEYS, 0.0)
    safe = np.where(weight > 0, weight, 1.0)[:, None]
    mean_prob, mean_label = prob_sums / safe, label_sums / safe
    base_rate = label_sums.sum(axis=0) / total
    reliability = np.sum(weight * np.sum((mean_prob - mean_label) ** 2, 1)) / total
    resolution = np.sum(weight * np.sum((mean_label - base_rate) ** 2, 1)) / total
    variance = np.sum(squares - np.sum(prob_sums * mean_prob, 1)) / total
    covariance = np.sum(label_prob - np.sum(prob_sums * mean_label, 1)) / total
    return {
        "brier": float(totals[1] / totals[0]),
        "reliability": float(reliability),
        "resolution": float(resolution),
        "uncertainty": float(np.sum(base_rate * (1.0 - base_rate))),
        "within_bin_variance": float(variance),
        "within_bin_covariance": float(covariance),
    }


def _function_dtype(y_pred, dtype):
    if dtype is not None:
        return _check_float64_available(keras.backend.standardize_dtype(dtype))
    if keras.backend.standardize_dtype(y_pred.dtype) == "float64":
        return "float64"
    return "float32"


def _check_float64_available(dtype):
    """float64 must mean float64: JAX would silently compute in float32."""
    if dtype == "float64" and keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            raise ValueError(
                "Argument `dtype` is float64 but JAX computes in float32 unless "
                'x64 is enabled: call `jax.config.update("jax_enable_x64", True)` '
                "first (or set JAX_ENABLE_X64=1). Received: dtype='float64'"
            )
    return dtype


def _num_classes(y_pred):
    shape = tuple(y_pred.shape) if hasattr(y_pred, "shape") else np.shape(y_pred)
    num_classes = shape[-1] if shape else None
    if num_classes is None:
        raise ValueError(
            "The number of classes, the last axis of `y_pred`, must be known. "
            f"Received: y_pred.shape={shape}"
        )
    return num_classes


def _flat_inputs(y_true, y_pred, sample_weight, dtype, from_logits, validate_args):
    """Returns flat int32 labels `(N,)`, `y_pred` as `(N, K)` in `dtype` and
    flat weights `(N,)` (or `None`), or `None` for an empty batch.

    Shapes are checked always; values where they are visible and
    `validate_args` is set.
    """
    y_pred = _to_tensor(y_pred)
    y_true = _to_tensor(y_true)
    labels = class_ids(y_true, y_pred)
    weight = None
    if sample_weight is not None:
        weight = _flat_weights(sample_weight, y_pred, dtype)
    if 0 in tuple(y_pred.shape):
        return None
    num_classes = y_pred.shape[-1]
    # Reshaped only when needed: eager TensorFlow copies tensors it reshapes.
    if len(labels.shape) != 1:
        labels = ops.reshape(labels, (-1,))
    y_pred = ops.cast(y_pred, dtype)
    if len(y_pred.shape) != 2:
        y_pred = ops.reshape(y_pred, (-1, num_classes))
    if _checked(validate_args, y_pred):
        _check_values(labels, y_pred, weight, from_logits)
    return labels, y_pred, weight


# The numpy dtypes `_to_tensor` hands over without `ops.convert_to_tensor`.
_HANDED_OVER = ("float32", "float64", "int32", "int64")


def _to_tensor(x):
    """`ops.convert_to_tensor`, faster for large numpy arrays.

    JAX and TensorFlow copy them slowly (4-10x): they are copied here into a
    64-byte aligned buffer (so that the tensor owns its memory) that the
    tensor then shares. Keras' PyTorch backend copies every numpy array
    (`np.array(x)`) before `torch.as_tensor`: a tensor on the CPU shares it
    here instead, as `torch.from_numpy` does (the updates only read their
    inputs), which spares a copy of 4 MB of fresh memory per 10^5 x 10
    float32 probabilities.
    """
    backend = keras.backend.backend()
    if backend == "torch" and _shareable(x):
        import torch

        # Keras moves the tensor to its device (a no-op on the CPU).
        return ops.convert_to_tensor(torch.from_numpy(x))
    if (
        not isinstance(x, np.ndarray)
        or x.dtype.name not in _HANDED_OVER
        or x.size < _COMPILE_MIN_VALUES
        or backend not in ("tensorflow", "jax")
    ):
        return ops.convert_to_tensor(x)
    buffer = np.empty(x.nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    aligned = buffer[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    np.copyto(aligned, x)
    if backend == "jax":
        import jax

        return jax.device_put(aligned)
    import tensorflow as tf

    return tf.experimental.dlpack.from_dlpack(aligned.__dlpack__())


def _shareable(x):
    """Whether `torch.from_numpy` can share numpy array `x`'s memory."""
    return (
        isinstance(x, np.ndarray)
        and x.dtype.name in _HANDED_OVER
        and x.flags.c_contiguous
        and x.flags.writeable
    )


def _checked(validate_args, y_pred):
    """Whether `_flat_inputs` checked the values of `y_pred`."""
    return validate_args and _values_visible(y_pred)


def _values_visible(x):
    """Whether `x` holds concrete values (eager), not a traced placeholder."""
    if isinstance(x, keras.KerasTensor):
        return False
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        if torch.compiler.is_compiling():
            return False
        return not isinstance(x, torch.Tensor) or x.device.type != "meta"
    return True


def _check_values(labels, y_pred, weight, from_logits):
    """Raises a `ValueError` saying what is wrong with the values and how often.

    One host transfer of a few reductions when all is well; the counts are
    computed only for the message.
    """
    summary = _value_summary(labels, y_pred, weight, from_logits)
    _raise_for_values(summary, labels, y_pred, weight, from_logits)


def _value_summary(labels, y_pred, weight, from_logits):
    """The reductions `_raise_for_values` reads, as one tensor.

    (The sum catches NaN, which JAX's `min` and `max` may skip; integer
    reductions over the bit patterns, which would need no sum, cost more on
    JAX, where the bitcast copies.)
    """
    dtype = y_pred.dtype
    if keras.backend.backend() == "torch":
        return _torch_value_summary(labels, y_pred, weight, from_logits)
    summary = [ops.cast(ops.min(labels), dtype), ops.cast(ops.max(labels), dtype)]
    if not from_logits:
        summary += [ops.min(y_pred), ops.max(y_pred), ops.sum(y_pred)]
    if weight is not None:
        summary += [ops.min(weight), ops.sum(weight)]
    return ops.stack(summary)


def _torch_value_summary(labels, y_pred, weight, from_logits):
    """`_value_summary` in one pass over the probabilities: PyTorch's `aminmax`
    propagates NaN, so no sum is needed to catch it."""
    import torch

    dtype = y_pred.dtype
    summary = [x.to(dtype) for x in torch.aminmax(labels)]
    if not from_logits:
        low, high = torch.aminmax(y_pred)
        # The maximum stands in for the sum: NaN or infinite when that is.
        summary += [low, high, high]
    if weight is not None:
        summary += [torch.amin(weight), torch.sum(weight)]
    return torch.stack(summary)


def _raise_for_values(summary, labels, y_pred, weight, from_logits):
    """Raises for bad values seen in `_value_summary`'s `summary`."""
    num_classes = y_pred.shape[-1]
    summary = ops.convert_to_numpy(summary).tolist()
    low, high = summary[:2]
    if low < 0 or high >= num_classes:
        bad = ops.logical_or(labels < 0, labels >= num_classes)
        raise ValueError(
            f"Invalid values in `y_true`: {_count(bad)} of {labels.shape[0]} class "
            f"ids are outside [0, {num_classes}) (the number of classes, "
            f"`y_pred.shape[-1]`). Received: class ids from {int(low)} to "
            f"{int(high)}"
        )
    if not from_logits:
        low, high, total = summary[2:5]
        if not (low >= 0 and high <= 1 and math.isfinite(total)):
            inside = ops.logical_and(y_pred >= 0, y_pred <= 1)
            raise ValueError(
                f"Invalid values in `y_pred`: {_count(ops.logical_not(inside))} of "
                f"{labels.shape[0] * num_classes} probabilities are outside "
                "[0, 1] or NaN (pass `from_logits=True` for logits). Received: "
                f"values from {low} to {high}"
            )
    if weight is not None:
        low, total = summary[-2:]
        if not (low >= 0 and math.isfinite(total)):
            negative = _count(weight < 0)
            not_finite = _count(ops.logical_not(ops.isfinite(weight)))
            raise ValueError(
                f"Invalid values in `sample_weight`: of {weight.shape[0]} weights, "
                f"{negative} are negative and {not_finite} are not finite. "
                f"Received: smallest weight {low}"
            )


# Eager batches of at least this many predicted values are reduced by one
# compiled function on TensorFlow, whose eager ops are dispatched one by
# one: for 10^5 x 10 values, 3-6x faster. Each new batch shape costs a
# compilation (about 0.1-0.5 s), which smaller batches, fast eager anyway,
# are spared. JAX compiles every eager batch: its eager ops are compiled
# one by one for each new shape, dozens of compilations where a whole
# update, compiled for speed of compilation when small, is one. (PyTorch
# has no compiler cheap enough.)
_COMPILE_MIN_VALUES = 2**16


def _checked_increments(
    update,
    static,
    labels,
    y_pred,
    weight,
    from_logits,
    check,
):
    """`update(labels, y_pred, weight, *static)` as a tuple of state
    increments, the values checked first (with `check`, when visible).

    Eager large batches on TensorFlow and JAX take `_compiled_state_update`
    instead (see `_compiles_eager`).
    """
    if check and _values_visible(y_pred):
        _check_values(labels, y_pred, weight, from_logits)
    return _as_tuple(update(labels, y_pred, weight, *static))


def _compiles_eager(y_pred):
    """Whether an eager update of `y_pred` runs `_compiled_state_update`."""
    return _values_visible(y_pred) and _compiles(y_pred)


def _compiled_state_update(
    update,
    static,
    labels,
    y_pred,
    weight,
    from_logits,
    check,
    blockwise,
    totals,
    errors,
):
    """The state's new compensated sums: `totals` and their Kahan `errors`
    plus `update(labels, y_pred, weight, *static)`'s increments, by one
    cached compiled function (eager TensorFlow and JAX, large batches).

    It also returns the value checks' reductions (with `check`), and the
    `ValueError` is raised before the caller assigns any state. One call
    per batch: on TensorFlow each call of a compiled function costs about
    0.3 ms besides its work, as much as its check's reductions.
    """
    compiled = _compiled_state_step(
        update,
        static,
        from_logits,
        check,
        weight is None,
        y_pred.shape[-1],
        blockwise,
    )
    new_totals, new_errors, summary = _call_compiled(
        compiled, totals, errors, labels, y_pred, weight
    )
    if check:
        _raise_for_values(summary, labels, y_pred, weight, from_logits)
    return new_totals, new_errors


@functools.cache
def _compiled_state_step(
    update, static, from_logits, check, unweighted, num_classes, blockwise
):
    """The compiled `(totals, errors, labels, y_pred, weight) -> (totals,
    errors, summary)` of `_compiled_state_update`.

    Cached for every configuration (`unweighted` and `num_classes` keep
    TensorFlow from generalising them away), so that metric instances share
    it; each new batch shape is traced and compiled once. With `blockwise`,
    the increments are sums over the rows, added up block by block.
    """
    del unweighted, num_classes  # Only part of the key.
    # A partial, not a closure: TensorFlow tells functions apart by their
    # code when it counts retracing, and would warn for all of them at once.
    return _compile(
        functools.partial(_state_step, update, static, from_logits, check, blockwise)
    )


def _call_compiled(compiled, *args):
    """`compiled(*args)`; on TensorFlow through the concrete function for the
    arguments' shapes and dtypes, looked up once: `tf.function`'s own
    dispatch of these arguments costs about 0.3 ms of Python per call."""
    if keras.backend.backend() != "tensorflow":
        return compiled(*args)
    import tensorflow as tf

    key = (compiled,) + tuple(
        None if x is None else (tuple(x.shape), x.dtype) for x in tf.nest.flatten(args)
    )
    concrete = _CONCRETE_FUNCTIONS.get(key)
    if concrete is None:
        concrete = compiled.get_concrete_function(*args)
        _CONCRETE_FUNCTIONS[key] = concrete
    return concrete(*args)


# `_call_compiled`'s concrete functions, by compiled function and argument
# shapes and dtypes.
_CONCRETE_FUNCTIONS = {}


def _state_step(
    update,
    static,
    from_logits,
    check,
    blockwise,
    totals,
    errors,
    labels,
    y_pred,
    weight,
):
    increments, summary = _increments_and_summary(
        update, static, from_logits, check, blockwise, labels, y_pred, weight
    )
    new_totals, new_errors = _compensated_sums(totals, errors, list(increments))
    return new_totals, new_errors, summary


def _compiles(y_pred):
    backend = keras.backend.backend()
    size = math.prod(tuple(y_pred.shape))
    return backend == "jax" or (backend == "tensorflow" and size >= _COMPILE_MIN_VALUES)


def _as_tuple(increments):
    return increments if isinstance(increments, tuple) else (increments,)


def _compile(function):
    """`function` compiled with XLA (TensorFlow or JAX)."""
    if keras.backend.backend() == "jax":
        return jax_jit(function)
    import tensorflow as tf

    return tf.function(function, jit_compile=True, reduce_retracing=True)


def _increments_and_summary(
    update, static, from_logits, check, blockwise, labels, y_pred, weight
):
    if blockwise:
        increments = _blockwise_sums(update, static, labels, y_pred, weight)
    else:
        increments = _as_tuple(update(labels, y_pred, weight, *static))
    if not check:
        return increments, ops.zeros((0,), y_pred.dtype)
    return increments, _value_summary(labels, y_pred, weight, from_logits)


# Compiled updates reduce large batches in blocks of about this many
# predicted values: the temporaries of a whole batch of 10^7 values are
# fresh memory each time (tens of MB, above the allocator's reuse
# threshold), whose first touch costs more than the arithmetic; a block's
# stay in the cache. 10^5 x 100 values: 4x faster on a CPU.
_BLOCK_VALUES = 2**18


def _blockwise_sums(update, static, labels, y_pred, weight):
    """`update`'s increments, sums over the rows, added up block by block."""
    num_rows, num_classes = y_pred.shape
    rows = max(1, _BLOCK_VALUES // num_classes)
    if num_rows is None or num_rows < 2 * rows:
        return _as_tuple(update(labels, y_pred, weight, *static))

    def block_sums(start, size):
        pieces = [
            None
            if x is None
            else ops.slice(x, (start,) + (0,) * (x.ndim - 1), (size,) + x.shape[1:])
            for x in (labels, y_pred, weight)
        ]
        return _as_tuple(update(*pieces, *static))

    def added(sums, more):
        return tuple(a + b for a, b in zip(sums, more, strict=True))

    blocks, rest = divmod(num_rows, rows)
    sums = block_sums(0, rows)
    if rest:
        sums = added(sums, block_sums(blocks * rows, rest))
    return ops.fori_loop(
        1, blocks, lambda index, sums: added(sums, block_sums(index * rows, rows)), sums
    )


def _count(mask):
    return int(ops.convert_to_numpy(ops.sum(ops.cast(mask, "int32"))))


def _top_label(y_pred, labels, from_logits):
    """Returns flat top-label confidences and whether the top label is right.

    The top label is the first class of largest probability, as `argmax`
    picks it; with logits, of largest softmax probability.
    """
    y_pred = ops.reshape(y_pred, (-1, ops.shape(y_pred)[-1]))
    if _torch_fast_top_label(y_pred, from_logits):
        return _torch_top_label(y_pred, labels)
    scores = y_pred
    if from_logits:
        # Softmax numerators, in (0, 1]; the largest probability is
        # 1 / sum_k exp(z_k - max z).
        scores = ops.exp(y_pred - ops.max(y_pred, axis=-1, keepdims=True))
    # The bit patterns of non-negative floats, read as integers, order like
    # the floats, and an integer argmax runs 2-4x faster than a float one.
    bits = ops.view(
        scores, _SAME_WIDTH_INT[keras.backend.standardize_dtype(scores.dtype)]
    )
    predicted = ops.cast(ops.argmax(bits, axis=-1), "int32")
    if from_logits:
        confidence = 1.0 / ops.sum(scores, axis=-1)
    else:
        confidence = ops.max(y_pred, axis=-1)
    return confidence, ops.equal(predicted, labels)


def _torch_fast_top_label(y_pred, from_logits):
    return (
        keras.backend.backend() == "torch"
        and not from_logits
        and _values_visible(y_pred)
        and keras.backend.standardize_dtype(y_pred.dtype) in ("float32", "float64")
    )


# Up to this many classes, eager PyTorch takes row maxima by `max_pool1d`:
# its reductions along a short last axis run 2-7x slower.
_TORCH_POOLED_MAX_CLASSES = 12


def _row_max(x):
    """`ops.max(x, axis=-1)` of a matrix, faster on eager PyTorch."""
    if keras.backend.backend() == "torch" and _values_visible(x):
        return _torch_row_max(x)
    return ops.max(x, axis=-1)


def _torch_row_max(x):
    import torch
    import torch.nn.functional as F

    num_classes = x.shape[-1]
    poolable = x.dtype in (torch.float32, torch.float64)
    if num_classes > _TORCH_POOLED_MAX_CLASSES or not poolable:
        return torch.amax(x, dim=-1)
    pooled = F.max_pool1d(x.reshape(1, 1, -1), num_classes, num_classes)
    return pooled.reshape(-1)


def _torch_top_label(y_pred, labels):
    """`_top_label` of eager PyTorch probabilities `(N, K)`.

    Whether the label is the top class is read off its probability: it is
    when that equals the row's maximum and no other class does. Only when
    some row has a tied maximum is the first one located by `argmax`.
    """
    import torch

    num_rows, num_classes = y_pred.shape
    with torch.no_grad():
        confidence = _torch_row_max(y_pred)
        valid = (labels >= 0) & (labels < num_classes)
        safe_labels = torch.where(valid, labels, 0).long()
        label_prob = torch.gather(y_pred, 1, safe_labels[:, None])[:, 0]
        maxima = int(torch.count_nonzero(torch.eq(y_pred, confidence[:, None])))
        if maxima == num_rows:
            correct = (label_prob == confidence) & valid
        else:
            integer = torch.int32 if y_pred.dtype == torch.float32 else torch.int64
            bits = y_pred.view(integer)
            correct = torch.argmax(bits, dim=-1) == labels
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

    Compiled, an accumulating scatter (as fast as `segment_sum` under XLA,
    a third of the passes of Keras' PyTorch `segment_sum`). Eager, the
    backend's fastest kernel: `bincount` on TensorFlow (10x its scatter on
    a CPU) and PyTorch, `segment_sum` on JAX (twice as fast as its
    `bincount`, both scatters).
    """
    visible = _values_visible(segment_ids)
    backend = keras.backend.backend()
    if visible and backend == "torch":
        import torch

        # Not `ops.bincount`: on PyTorch it returns float32 for float64 weights.
        return [
            ops.cast(torch.bincount(segment_ids, row, num_segments), dtype)
            for row in rows
        ]
    if visible and backend == "tensorflow":
        return [
            ops.cast(
                ops.bincount(segment_ids, weights=row, minlength=num_segments), dtype
            )
            for row in rows
        ]
    if rows[0] is None:
        rows = [ops.ones_like(rows[1])] + list(rows[1:])
    # Stacked as rows and transposed: a view, cheaper than interleaving.
    values = ops.transpose(ops.stack(rows))
    if visible:
        sums = ops.segment_sum(values, segment_ids, num_segments)
    else:
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
    y_true,
    y_pred,
    from_logits=False,
    bandwidth=None,
    sample_weight=None,
    validate_args=True,
):
    """Smooth calibration error (smECE) of the top-label confidence.

    The functional form of `SmoothCalibrationError`, which documents the
    definition; it returns the same value as one `update_state()` followed by
    `result()`, as a scalar tensor, and can be compiled (where the value
    checks are skipped).

    Args:
        y_true: integer class ids, or one-hot labels of `y_pred`'s shape.
        y_pred: predicted probabilities (or logits with `from_logits=True`),
            classes on the last axis.
        from_logits: whether `y_pred` holds logits.
        bandwidth: the Gaussian kernel's standard deviation, in [0.001, 1];
            `None` chooses it as Blasiok & Nakkiran do.
        sample_weight: optional non-negative weights, broadcastable to
            `y_pred.shape[:-1]`; a weight counts as that many repetitions.
        validate_args: whether to check the values when they are visible.

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
        y_true, y_pred, sample_weight, from_logits, dtype, validate_args
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
    `keras.ops` (so it also runs inside compiled steps; eager on TensorFlow
    and JAX, as one cached compiled function); it is 0.0 before any update.
    {checks}

    Args:
        from_logits: whether `y_pred` holds logits rather than
            probabilities.
        bandwidth: the kernel's standard deviation, a number in
            [0.001, 1], or `None` for the automatic choice.
        validate_args: whether eager updates check their values.
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
        self,
        from_logits=False,
        bandwidth=None,
        validate_args=True,
        name="smooth_ece",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.from_logits = check_bool("from_logits", from_logits)
        self.bandwidth = _check_bandwidth(bandwidth)
        self.validate_args = check_bool("validate_args", validate_args)
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
        y_pred = _to_tensor(y_pred)
        if _is_empty(y_pred):
            return
        inputs = _flat_inputs(
            y_true, y_pred, sample_weight, self.dtype, self.from_logits, False
        )
        if _compiles_eager(inputs[1]):
            (total,), (error,) = _compiled_state_update(
                _smooth_update,
                (self.from_logits, self.dtype),
                *inputs,
                self.from_logits,
                self.validate_args,
                False,
                [self.histogram.value],
                [self.histogram_error.value],
            )
            self.histogram_error.assign(error)
            self.histogram.assign(total)
            return
        (histogram,) = _checked_increments(
            _smooth_update,
            (self.from_logits, self.dtype),
            *inputs,
            self.from_logits,
            self.validate_args,
        )
        self._add_compensated(histogram)

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
            "validate_args": self.validate_args,
            "name": self.name,
            "dtype": self.dtype,
        }


SmoothCalibrationError.__doc__ = _with_value_checks_note(SmoothCalibrationError.__doc__)


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


def _smooth_batch_histogram(
    y_true, y_pred, sample_weight, from_logits, dtype, validate_args
):
    """The histogram of a non-empty batch."""
    labels, y_pred, weight = _flat_inputs(
        y_true, y_pred, sample_weight, dtype, from_logits, validate_args
    )
    return _smooth_update(labels, y_pred, weight, from_logits, dtype)


def _smooth_update(labels, y_pred, weight, from_logits, dtype):
    """The smooth histogram of flat inputs."""
    confidence, correct = _top_label(y_pred, labels, from_logits)
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
    """Returns the smECE of a histogram and the bandwidth it used.

    Eager on TensorFlow and JAX, through one cached compiled function: the
    search's few hundred small ops, dispatched one by one, take 30-70 times
    as long (0.2-0.5 s).
    """
    if keras.backend.backend() in ("tensorflow", "jax") and _values_visible(histogram):
        return _compiled_smooth_error(bandwidth, dtype)(histogram)
    return _smooth_error_ops(histogram, bandwidth, dtype)


@functools.cache
def _compiled_smooth_error(bandwidth, dtype):
    return _compile(
        functools.partial(_smooth_error_ops, bandwidth=bandwidth, dtype=dtype)
    )


def _smooth_error_ops(histogram, bandwidth, dtype):
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

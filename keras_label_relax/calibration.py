"""Post-hoc calibration of a trained classifier by temperature scaling."""

import math

import keras
import numpy as np
from keras import ops

from keras_label_relax._api import export
from keras_label_relax._validation import check_bool
from keras_label_relax._validation import check_number
from keras_label_relax.metrics import ExpectedCalibrationError

# The grid of Lienen & Hüllermeier (2021), after Guo et al. (2017).
PAPER_GRID = (0.25, 0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9)
PAPER_GRID += (2.0, 2.5, 3.0)
METHODS = ("nll", "ece_grid")

# The NLL fit searches T in [MIN_TEMPERATURE, MAX_TEMPERATURE].
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2
# Probabilities are clipped to this before taking logs.
_TINY = 1e-30


@export
class TemperatureScaling(keras.Model):
    """Wraps a trained classifier and divides its logits by a temperature.

    The wrapped model is frozen; the only parameter is the temperature
    `T > 0`, stored as `log T` so that it stays positive under any update.
    Calling the wrapper returns calibrated probabilities `softmax(z / T)`.
    `calibrate()` fits `T` on held-out data; `T > 1` softens over-confident
    predictions, `T < 1` sharpens under-confident ones. Dividing by `T`
    never changes the predicted class, so accuracy is unchanged.

    If the wrapped model outputs probabilities (`from_logits=False`), their
    logarithms stand in for the logits, so the output is `p**(1/T)`
    renormalised. Probabilities that have underflowed to 0 (or rounded to
    1) in float32 carry no ranking any more, and no temperature recovers
    it; wrap the logits when you can.

    The temperature is a trainable weight: besides `calibrate()`, it can be
    fitted with `compile()` and `fit()` against a probability loss (for
    example `"sparse_categorical_crossentropy"`), which trains only `T`.

    Args:
        model: the trained `keras.Model` to calibrate.
        from_logits: whether `model` outputs logits (`True`) or
            probabilities (`False`).
        name: name of the wrapper model.

    Example:

    ```python
    scaled = TemperatureScaling(model, from_logits=True)
    temperature = scaled.calibrate(x_val, y_val)  # minimises the NLL
    probabilities = scaled.predict(x_test)
    scaled.save("calibrated.keras")
    ```

    Reference:
        - [Guo et al., 2017. On Calibration of Modern Neural Networks](
          https://arxiv.org/abs/1706.04599)
    """

    def __init__(self, model, from_logits=True, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"Argument `model` must be a `keras.Model`. Received: model={model!r}"
            )
        self.base_model = model
        self.base_model.trainable = False
        self.from_logits = check_bool("from_logits", from_logits)
        self.log_temperature = self.add_weight(
            shape=(), initializer="zeros", name="log_temperature"
        )

    def call(self, inputs, training=False):
        outputs = ops.cast(self.base_model(inputs, training=False), self.compute_dtype)
        if not self.from_logits:
            outputs = ops.log(ops.maximum(outputs, _TINY))
        return ops.softmax(outputs * ops.exp(-self.log_temperature), axis=-1)

    @property
    def temperature(self):
        """The current temperature `T` (a Python float)."""
        return math.exp(float(ops.convert_to_numpy(self.log_temperature)))

    @temperature.setter
    def temperature(self, value):
        value = check_number("temperature", value)
        if value <= 0:
            raise ValueError(
                f"Argument `temperature` must be > 0. Received: temperature={value!r}"
            )
        self.log_temperature.assign(math.log(value))

    def calibrate(
        self, x, y=None, method="nll", grid=None, batch_size=None, sample_weight=None
    ):
        """Fits the temperature on held-out data and returns it.

        The wrapped model runs once over `x`; the temperature is then fitted
        to its cached outputs in numpy.

        Args:
            x: inputs, as for `Model.predict()`; or a `tf.data.Dataset`,
                `keras.utils.PyDataset` or iterable yielding `(x, y)` or
                `(x, y, sample_weight)` batches, in which case `y` must be
                `None`.
            y: integer class ids or one-hot labels, when `x` holds inputs.
            method: `"nll"` minimises the negative log-likelihood exactly
                (a safeguarded Newton search on `1 / T`, in which the NLL is
                convex, over `T` in [0.01, 100], to about 1e-7 relative).
                `"ece_grid"` takes the temperature of `grid` with the lowest
                15-bin expected calibration error, as Lienen & Hüllermeier
                (2021) did.
            grid: the candidate temperatures for `"ece_grid"`. Defaults to
                the paper's {0.25, 0.5, 0.75, 1, 1.1, ..., 2.0, 2.5, 3}.
            batch_size: batch size for running the wrapped model on arrays.
            sample_weight: optional per-example weights, when `x` holds
                inputs.

        Returns:
            The fitted temperature, a Python float. It is also stored in
            the wrapper (`self.temperature`).
        """
        if method not in METHODS:
            raise ValueError(
                f"Argument `method` must be one of {METHODS}. Received: "
                f"method={method!r}"
            )
        if grid is not None and method != "ece_grid":
            raise ValueError(
                "Argument `grid` is only used with method='ece_grid'. "
                f"Received: method={method!r}, grid={grid!r}"
            )
        logits, labels, weights = self._collect_outputs(x, y, sample_weight, batch_size)
        if method == "nll":
            temperature = fit_temperature_nll(logits, labels, weights)
        else:
            grid = PAPER_GRID if grid is None else _check_grid(grid)
            temperature = fit_temperature_ece_grid(logits, labels, grid, weights)
        self.temperature = temperature
        return temperature

    def _collect_outputs(self, x, y, sample_weight, batch_size):
        if y is None:
            if sample_weight is not None:
                raise ValueError(
                    "Argument `sample_weight` needs array inputs with `y`; a "
                    "dataset yields its weights as `(x, y, sample_weight)`."
                )
            outputs, labels, weights = self._predict_batches(x)
        else:
            outputs = self.base_model.predict(x, batch_size=batch_size, verbose=0)
            labels, weights = y, sample_weight
        outputs = np.asarray(outputs, dtype=np.float64)
        if not self.from_logits:
            outputs = np.log(np.maximum(outputs, _TINY))
        return _flatten_outputs(outputs, labels, weights)

    def _predict_batches(self, dataset):
        outputs, labels, weights = [], [], []
        for batch in _iterate(dataset):
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise ValueError(
                    "Without `y`, `x` must yield `(x, y)` or "
                    "`(x, y, sample_weight)` batches. Received a batch of "
                    f"type {type(batch).__name__}"
                )
            outputs.append(np.asarray(self.base_model.predict_on_batch(batch[0])))
            labels.append(ops.convert_to_numpy(batch[1]))
            if len(batch) == 3:
                weights.append(ops.convert_to_numpy(batch[2]))
        if not outputs:
            raise ValueError("Argument `x` yielded no batches.")
        weights = np.concatenate(weights) if weights else None
        return np.concatenate(outputs), np.concatenate(labels), weights

    def get_config(self):
        return {
            "model": keras.saving.serialize_keras_object(self.base_model),
            "from_logits": self.from_logits,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)


def fit_temperature_nll(logits, labels, sample_weight=None, rtol=1e-8):
    """Returns the temperature in [0.01, 100] minimising the mean NLL.

    The NLL of `softmax(s * z)` is convex in the inverse temperature `s`
    and its first two derivatives cost one pass over the logits, so a
    Newton iteration on its derivative, kept inside a shrinking bracket
    (bisection in `log s` when a step leaves it), converges in a few passes.
    When the minimum lies beyond a bound, the bound is returned.

    Args:
        logits: float array `(N, K)`.
        labels: integer class ids `(N,)`.
        sample_weight: optional non-negative weights `(N,)`.
        rtol: relative tolerance on the temperature.
    """
    derivatives = _NLLDerivatives(logits, labels, sample_weight)
    lo, hi = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    unvisited_bounds = {lo, hi}
    s = 1.0
    for _ in range(200):
        unvisited_bounds.discard(s)
        slope, curvature = derivatives(s)
        if slope > 0:
            hi = s
        elif slope < 0:
            lo = s
        if slope == 0 or hi - lo <= rtol * lo:
            break
        s_new = s - slope / curvature if curvature > 0 else math.inf
        if not lo < s_new < hi:
            bound = lo if s_new <= lo else hi
            s_new = bound if bound in unvisited_bounds else math.sqrt(lo * hi)
        converged = abs(s_new - s) <= rtol * s
        s = s_new
        if converged:
            break
    return float(np.clip(1.0 / s, MIN_TEMPERATURE, MAX_TEMPERATURE))


class _NLLDerivatives:
    """First and second derivative of the mean NLL w.r.t. `s = 1 / T`.

    The passes over the logits run in float32 (half the memory traffic of
    float64, and a vectorised `exp`); per-row results, which carry about
    1e-7 relative error, are combined in float64. That moves the root by
    about 1e-7 relative, far inside the 1e-4 the fit promises.
    """

    def __init__(self, logits, labels, sample_weight):
        logits = np.asarray(logits, dtype=np.float64)
        # Shifting each row by its maximum leaves the softmax unchanged and
        # keeps exp(s * z) in (0, 1].
        shifted = logits - logits.max(axis=-1, keepdims=True)
        self.label_logit = np.take_along_axis(shifted, labels[:, None], axis=-1)[:, 0]
        self.shifted = shifted.astype(np.float32)
        self.weights = _normalised_weights(sample_weight, len(labels))
        self.buffer = np.empty_like(self.shifted)

    def __call__(self, s):
        exp = np.multiply(self.shifted, np.float32(s), out=self.buffer)
        # exp(-80) is still a normal float32: no slow subnormal arithmetic,
        # and terms that small vanish next to the partition (>= 1) anyway.
        np.maximum(exp, np.float32(-80.0), out=exp)
        np.exp(exp, out=exp)
        partition = exp.sum(axis=-1).astype(np.float64)
        weighted = np.multiply(exp, self.shifted, out=exp)
        mean_logit = weighted.sum(axis=-1) / partition
        mean_square = np.einsum("ij,ij->i", weighted, self.shifted) / partition
        slope = self.weights @ (mean_logit - self.label_logit)
        curvature = self.weights @ (mean_square - mean_logit**2)
        return slope, curvature


def nll(logits, labels, temperature, sample_weight=None):
    """Mean negative log-likelihood of `softmax(logits / temperature)`."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    log_partition = np.log(np.exp(scaled).sum(axis=-1))
    label_logit = np.take_along_axis(scaled, labels[:, None], axis=-1)[:, 0]
    weights = _normalised_weights(sample_weight, len(labels))
    return float(weights @ (log_partition - label_logit))


def fit_temperature_ece_grid(logits, labels, grid=PAPER_GRID, sample_weight=None):
    """Returns the temperature of `grid` with the lowest 15-bin ECE.

    Ties go to the earliest temperature of `grid`.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    # Dividing by a temperature changes the confidences, never the argmax.
    correct = ops.convert_to_tensor(shifted.argmax(axis=-1) == labels, "float32")
    if sample_weight is not None:
        sample_weight = ops.convert_to_tensor(sample_weight, "float32")
    metric = ExpectedCalibrationError(num_bins=15)
    buffer = np.empty_like(shifted)
    errors = []
    for temperature in grid:
        exp = np.exp(np.multiply(shifted, 1.0 / temperature, out=buffer), out=buffer)
        confidence = (1.0 / exp.sum(axis=-1)).astype(np.float32)
        metric.reset_state()
        metric.accumulate(confidence, correct, sample_weight)
        errors.append(float(metric.result()))
    return float(grid[int(np.argmin(errors))])


def _normalised_weights(sample_weight, num_samples):
    if sample_weight is None:
        return np.full(num_samples, 1.0 / num_samples)
    weights = np.asarray(sample_weight, dtype=np.float64)
    total = weights.sum()
    if np.any(weights < 0) or not total > 0:
        raise ValueError(
            "Argument `sample_weight` must be non-negative with a positive sum."
        )
    return weights / total


def _flatten_outputs(outputs, labels, weights):
    """Flattens outputs to `(N, K)` and labels to int ids `(N,)`."""
    labels = np.asarray(labels)
    num_classes = outputs.shape[-1]
    if labels.shape == outputs.shape:
        labels = labels.argmax(axis=-1)
    elif labels.shape == outputs.shape[:-1] + (1,) and num_classes != 1:
        labels = labels[..., 0]
    if labels.shape != outputs.shape[:-1]:
        raise ValueError(
            "`y` must hold class ids of shape `outputs.shape[:-1]` or one-hot "
            f"vectors of the model's output shape. Received: y.shape="
            f"{labels.shape}, model output shape={outputs.shape}"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`y` must hold class ids in [0, {num_classes}). Received ids in "
            f"[{labels.min()}, {labels.max()}]"
        )
    if weights is not None:
        weights = _broadcast_weights(weights, outputs.shape[:-1])
    return outputs.reshape(-1, num_classes), labels, weights


def _broadcast_weights(weights, batch_shape):
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape == batch_shape + (1,):
        weights = weights[..., 0]
    try:
        return np.broadcast_to(weights, batch_shape).reshape(-1)
    except ValueError:
        raise ValueError(
            "`sample_weight` must broadcast to the batch shape. Received: "
            f"sample_weight.shape={weights.shape}, batch shape={batch_shape}"
        ) from None


def _check_grid(grid):
    values = []
    for value in np.asarray(grid, dtype=object).reshape(-1):
        value = check_number("grid", value)
        if value <= 0:
            raise ValueError(
                f"Argument `grid` must hold temperatures > 0. Received: grid={grid!r}"
            )
        values.append(value)
    if not values:
        raise ValueError(f"Argument `grid` must not be empty. Received: grid={grid!r}")
    return tuple(values)


def _iterate(dataset):
    if hasattr(dataset, "as_numpy_iterator"):
        return dataset.as_numpy_iterator()
    if isinstance(dataset, keras.utils.PyDataset):
        return (dataset[index] for index in range(len(dataset)))
    try:
        return iter(dataset)
    except TypeError:
        raise ValueError(
            "Argument `x` must be an array, a dataset or an iterable of "
            f"batches. Received: x of type {type(dataset).__name__}"
        ) from None

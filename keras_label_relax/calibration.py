"""Post-hoc calibration of a trained classifier: temperature, vector, matrix
and Dirichlet scaling, each a Keras model wrapping the frozen classifier."""

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_label_relax._api import export
from keras_label_relax._compilation import jax_jit
from keras_label_relax._validation import check_bool
from keras_label_relax._validation import check_non_negative
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


class _Calibrator(keras.Model):
    """What every calibrator shares: the frozen wrapped model, its scores
    (logits, or log-probabilities standing in for them), the collection of
    its outputs on held-out data, and the config.

    A subclass defines its weights in `_build_parameters(num_classes)`, the
    map of scores to calibrated logits in `_transform(scores)`, and its fit.
    """

    # Whether the scores are log-probabilities even for a logit model.
    _log_probability_scores = False
    # Whether the weights need the number of classes at construction.
    _needs_num_classes = True

    def __init__(self, model, from_logits=True, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"Argument `model` must be a `keras.Model`. Received: model={model!r}"
            )
        self.base_model = model
        self.base_model.trainable = False
        self.from_logits = check_bool("from_logits", from_logits)
        if self._needs_num_classes:
            self.num_classes = _num_classes(model)
        self._build_parameters()

    def _build_parameters(self):
        raise NotImplementedError

    def _transform(self, scores):
        raise NotImplementedError

    def call(self, inputs, training=False):
        outputs = ops.cast(self.base_model(inputs, training=False), self.compute_dtype)
        return ops.softmax(self._transform(self._scores(outputs)), axis=-1)

    def _scores(self, outputs):
        if not self.from_logits:
            return ops.log(ops.maximum(outputs, _TINY))
        if self._log_probability_scores:
            return ops.log_softmax(outputs, axis=-1)
        return outputs

    def _collect_scores(self, x, y, sample_weight, batch_size):
        """Runs the wrapped model over held-out data.

        Returns the scores `(N, K)` in float64, integer labels `(N,)` and
        weights `(N,)` that sum to 1.
        """
        if y is None:
            if sample_weight is not None:
                raise ValueError(
                    "Argument `sample_weight` needs array inputs with `y`; a "
                    "dataset yields its weights as `(x, y, sample_weight)`."
                )
            outputs, labels, weights = self._predict_batches(x)
        else:
            if _num_examples(x) == 0:
                raise ValueError(
                    "Argument `x` must hold at least one example. Received: "
                    "x with 0 examples"
                )
            outputs = self.base_model.predict(x, batch_size=batch_size, verbose=0)
            labels, weights = y, sample_weight
        outputs = _check_outputs(outputs)
        if self._needs_num_classes and outputs.shape[-1] != self.num_classes:
            raise ValueError(
                f"The model's outputs have {outputs.shape[-1]} classes on `x`, "
                f"but {self.num_classes} in its output shape."
            )
        outputs, labels, weights = _flatten_outputs(outputs, labels, weights)
        if not len(labels):
            raise ValueError("Argument `x` must hold at least one example.")
        if not self.from_logits:
            outputs = np.log(np.maximum(outputs, _TINY))
        elif self._log_probability_scores:
            outputs = _log_softmax(outputs)
        return outputs, labels, _normalised_weights(weights, len(labels))

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


@export
class TemperatureScaling(_Calibrator):
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

    _needs_num_classes = False

    def _build_parameters(self):
        self.log_temperature = self.add_weight(
            shape=(), initializer="zeros", name="log_temperature"
        )

    def _transform(self, scores):
        return scores * ops.exp(-self.log_temperature)

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
        to its cached outputs.

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
        scores, labels, weights = self._collect_scores(x, y, sample_weight, batch_size)
        if method == "nll":
            temperature = fit_temperature_nll(scores, labels, weights)
        else:
            grid = PAPER_GRID if grid is None else _check_grid(grid)
            temperature = fit_temperature_ece_grid(scores, labels, grid, weights)
        self.temperature = temperature
        return temperature


@export
class VectorScaling(_Calibrator):
    """Wraps a trained classifier and scales each logit by its own factor.

    Calling the wrapper returns `softmax(w * z + b)` with a scale `w_k` and
    an offset `b_k` per class. It generalises temperature scaling
    (`w = 1 / T`, `b = 0`) and, unlike it, can change the predicted class.
    `calibrate()` fits `w` and `b` by minimising the NLL on held-out data
    with a full-batch Newton method (2K parameters); `b` is defined up to a
    constant and is returned with mean 0.

    With `from_logits=False` the logarithms of the probabilities stand in
    for the logits.

    Args:
        model: the trained `keras.Model` to calibrate; its output shape must
            end in the number of classes.
        from_logits: whether `model` outputs logits (`True`) or
            probabilities (`False`).
        name: name of the wrapper model.

    Example:

    ```python
    scaled = VectorScaling(model)
    fitted = scaled.calibrate(x_val, y_val)  # {"scale": w, "bias": b}
    probabilities = scaled.predict(x_test)
    ```

    Reference:
        - [Guo et al., 2017. On Calibration of Modern Neural Networks](
          https://arxiv.org/abs/1706.04599)
    """

    def _build_parameters(self):
        k = self.num_classes
        self.scale = self.add_weight(shape=(k,), initializer="ones", name="scale")
        self.bias = self.add_weight(shape=(k,), initializer="zeros", name="bias")

    def _transform(self, scores):
        return scores * self.scale + self.bias

    def calibrate(self, x, y=None, batch_size=None, sample_weight=None):
        """Fits the per-class scales and offsets on held-out data.

        Args:
            x: inputs, as for `Model.predict()`; or a dataset or iterable
                of `(x, y)` or `(x, y, sample_weight)` batches, with `y`
                `None`.
            y: integer class ids or one-hot labels, when `x` holds inputs.
            batch_size: batch size for running the wrapped model on arrays.
            sample_weight: optional per-example weights, when `x` holds
                inputs.

        Returns:
            A dict of float64 numpy arrays `{"scale": w, "bias": b}`, also
            stored in the wrapper.
        """
        scores, labels, weights = self._collect_scores(x, y, sample_weight, batch_size)
        scale, bias = fit_vector_scaling(scores, labels, weights)
        self.scale.assign(scale)
        self.bias.assign(bias)
        return {"scale": scale, "bias": bias}


@export
class MatrixScaling(_Calibrator):
    """Wraps a trained classifier and maps its logits by an affine map.

    Calling the wrapper returns `softmax(W z + b)` with a `K x K` matrix
    `W` and an offset `b`. `calibrate()` minimises the mean NLL on held-out
    data plus the ODIR penalty of Kull et al. (2019),

    `off_diagonal_l2 / (K (K - 1)) * sum_{i != j} W_ij**2
    + bias_l2 / K * sum_k b_k**2`,

    which pulls `W` towards a diagonal matrix (vector scaling) and `b`
    towards 0. Without a penalty, `K (K + 1)` parameters overfit small
    calibration sets easily; the penalty is what makes matrix scaling
    usable with many classes.

    With `from_logits=False` the logarithms of the probabilities stand in
    for the logits, which is `DirichletCalibration` without its
    cross-validated penalty choice.

    Args:
        model: the trained `keras.Model` to calibrate; its output shape must
            end in the number of classes.
        off_diagonal_l2: weight of the penalty on the off-diagonal entries
            of `W`, >= 0.
        bias_l2: weight of the penalty on `b`, >= 0.
        from_logits: whether `model` outputs logits (`True`) or
            probabilities (`False`).
        name: name of the wrapper model.

    Example:

    ```python
    scaled = MatrixScaling(model, off_diagonal_l2=1e-2, bias_l2=1e-2)
    fitted = scaled.calibrate(x_val, y_val)  # {"matrix": W, "bias": b}
    probabilities = scaled.predict(x_test)
    ```

    Reference:
        - [Kull et al., 2019. Beyond temperature scaling: Obtaining
          well-calibrated multiclass probabilities with Dirichlet
          calibration](https://arxiv.org/abs/1910.12656)
    """

    def __init__(
        self,
        model,
        off_diagonal_l2=0.0,
        bias_l2=0.0,
        from_logits=True,
        name=None,
        **kwargs,
    ):
        self.off_diagonal_l2 = check_non_negative("off_diagonal_l2", off_diagonal_l2)
        self.bias_l2 = check_non_negative("bias_l2", bias_l2)
        super().__init__(model, from_logits=from_logits, name=name, **kwargs)

    def _build_parameters(self):
        k = self.num_classes
        self.matrix = self.add_weight(
            shape=(k, k), initializer="identity", name="matrix"
        )
        self.bias = self.add_weight(shape=(k,), initializer="zeros", name="bias")

    def _transform(self, scores):
        return ops.matmul(scores, ops.transpose(self.matrix)) + self.bias

    def calibrate(self, x, y=None, batch_size=None, sample_weight=None):
        """Fits `W` and `b` on held-out data with the wrapper's penalties.

        Args:
            x: inputs, as for `Model.predict()`; or a dataset or iterable
                of `(x, y)` or `(x, y, sample_weight)` batches, with `y`
                `None`.
            y: integer class ids or one-hot labels, when `x` holds inputs.
            batch_size: batch size for running the wrapped model on arrays.
            sample_weight: optional per-example weights, when `x` holds
                inputs.

        Returns:
            A dict of float64 numpy arrays `{"matrix": W, "bias": b}`, also
            stored in the wrapper.
        """
        scores, labels, weights = self._collect_scores(x, y, sample_weight, batch_size)
        return self._fit(scores, labels, weights)

    def _fit(self, scores, labels, weights):
        matrix, bias = fit_matrix_scaling(
            scores, labels, self.off_diagonal_l2, self.bias_l2, weights
        )
        self.matrix.assign(matrix)
        self.bias.assign(bias)
        return {"matrix": matrix, "bias": bias}

    def get_config(self):
        return super().get_config() | {
            "off_diagonal_l2": self.off_diagonal_l2,
            "bias_l2": self.bias_l2,
        }


@export
class DirichletCalibration(MatrixScaling):
    """Dirichlet calibration with ODIR: matrix scaling of log-probabilities.

    Calling the wrapper returns `softmax(W log(p) + b)`, where `p` are the
    wrapped model's probabilities (the softmax of its logits when
    `from_logits=True`), fitted like `MatrixScaling` with the ODIR penalty
    `off_diagonal_l2 / (K (K - 1)) * sum_{i != j} W_ij**2 + bias_l2 / K *
    sum_k b_k**2` added to the mean NLL. It is the model of Kull et al.
    (2019): the calibrated probabilities are those of a Dirichlet
    distribution per class, and `W = I`, `b = 0` leaves `p` unchanged.

    `calibrate(..., off_diagonal_l2="cv")` chooses both penalties by k-fold
    cross-validation over Kull et al.'s grid (see `calibrate()`).

    Args:
        model: the trained `keras.Model` to calibrate; its output shape must
            end in the number of classes.
        off_diagonal_l2: weight of the penalty on the off-diagonal entries
            of `W`, >= 0.
        bias_l2: weight of the penalty on `b`, >= 0.
        from_logits: whether `model` outputs logits (`True`) or
            probabilities (`False`).
        name: name of the wrapper model.

    Example:

    ```python
    scaled = DirichletCalibration(model)
    fitted = scaled.calibrate(x_val, y_val, off_diagonal_l2="cv")
    fitted["off_diagonal_l2"], fitted["bias_l2"]  # the chosen penalties
    probabilities = scaled.predict(x_test)
    ```

    Reference:
        - [Kull et al., 2019. Beyond temperature scaling: Obtaining
          well-calibrated multiclass probabilities with Dirichlet
          calibration](https://arxiv.org/abs/1910.12656)
    """

    _log_probability_scores = True

    def __init__(
        self,
        model,
        off_diagonal_l2=1e-2,
        bias_l2=1e-2,
        from_logits=True,
        name=None,
        **kwargs,
    ):
        super().__init__(
            model,
            off_diagonal_l2=off_diagonal_l2,
            bias_l2=bias_l2,
            from_logits=from_logits,
            name=name,
            **kwargs,
        )

    def calibrate(
        self,
        x,
        y=None,
        batch_size=None,
        sample_weight=None,
        off_diagonal_l2=None,
        bias_l2=None,
        grid=None,
        folds=5,
        seed=0,
    ):
        """Fits `W` and `b` on held-out data, choosing the penalties if asked.

        Args:
            x: inputs, as for `Model.predict()`; or a dataset or iterable
                of `(x, y)` or `(x, y, sample_weight)` batches, with `y`
                `None`.
            y: integer class ids or one-hot labels, when `x` holds inputs.
            batch_size: batch size for running the wrapped model on arrays.
            sample_weight: optional per-example weights, when `x` holds
                inputs.
            off_diagonal_l2: `None` keeps the wrapper's penalties; a number
                sets the off-diagonal penalty (and `bias_l2`, if given);
                `"cv"` chooses both penalties by `folds`-fold stratified
                cross-validation on `x`: the pair of `grid` with the lowest
                held-out NLL, then refits on all of `x` with it.
            bias_l2: the intercept penalty, with a numeric `off_diagonal_l2`.
            grid: `(off_diagonal_values, bias_values)` for `"cv"`. Defaults
                to Kull et al.'s: `off_diagonal_l2` in {0.25, 0.5, 1} x
                10^i and `bias_l2` in 10^i for i from -5 (-2 with 100 or
                more classes) to 6.
            folds: the number of cross-validation folds, >= 2.
            seed: seed of the random fold assignment.

        Returns:
            A dict `{"matrix": W, "bias": b, "off_diagonal_l2": ...,
            "bias_l2": ...}`; `W`, `b` and the penalties are also stored in
            the wrapper.
        """
        if isinstance(off_diagonal_l2, str):
            if off_diagonal_l2 != "cv":
                raise ValueError(
                    "Argument `off_diagonal_l2` must be a number >= 0 or 'cv'. "
                    f"Received: off_diagonal_l2={off_diagonal_l2!r}"
                )
            if bias_l2 is not None:
                raise ValueError(
                    "Argument `bias_l2` is chosen with off_diagonal_l2='cv'. "
                    f"Received: bias_l2={bias_l2!r}"
                )
            grid = _check_odir_grid(grid, self.num_classes)
            folds = _check_folds(folds)
        else:
            if grid is not None:
                raise ValueError(
                    "Argument `grid` is only used with off_diagonal_l2='cv'. "
                    f"Received: grid={grid!r}"
                )
            if off_diagonal_l2 is not None:
                self.off_diagonal_l2 = check_non_negative(
                    "off_diagonal_l2", off_diagonal_l2
                )
            if bias_l2 is not None:
                self.bias_l2 = check_non_negative("bias_l2", bias_l2)
        scores, labels, weights = self._collect_scores(x, y, sample_weight, batch_size)
        if off_diagonal_l2 == "cv":
            self.off_diagonal_l2, self.bias_l2 = choose_odir_penalties(
                scores, labels, grid, folds, seed, weights
            )
        return self._fit(scores, labels, weights) | {
            "off_diagonal_l2": self.off_diagonal_l2,
            "bias_l2": self.bias_l2,
        }


def odir_grid(num_classes):
    """Kull et al.'s grid of ODIR penalties for `num_classes` classes.

    Returns `(off_diagonal_values, bias_values)`: {0.25, 0.5, 1} x 10^i and
    10^i, for i from -5 (-2 from 100 classes on, as their deep-network
    experiments did for CIFAR-100) to 6.
    """
    start = -2 if num_classes >= 100 else -5
    powers = [10.0**i for i in range(start, 7)]
    off_diagonal = sorted(f * p for p in powers for f in (0.25, 0.5, 1.0))
    return tuple(off_diagonal), tuple(powers)


def choose_odir_penalties(scores, labels, grid, folds=5, seed=0, sample_weight=None):
    """The ODIR penalties of `grid` with the lowest cross-validated NLL.

    Folds are stratified by label and assigned at random (`seed`). For each
    bias penalty the off-diagonal penalties are visited from the largest
    down, each fit starting from the previous one's solution (the first from
    the previous bias penalty's first, the fold's very first from temperature
    scaling's fit on all rows) and with the fold's latest L-BFGS
    curvature pairs (see `_MatrixProblem.fit`), and stopping at a 10 times
    looser tolerance than a final fit: comparing held-out NLLs needs no
    more. Ties go to the larger penalties.

    Returns:
        `(off_diagonal_l2, bias_l2)`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    weights = _normalised_weights(sample_weight, len(labels))
    fold_of = _stratified_folds(labels, folds, seed)
    off_diagonal_values = sorted(grid[0], reverse=True)
    bias_values = sorted(grid[1], reverse=True)
    losses = np.zeros((len(bias_values), len(off_diagonal_values)))
    # Every fold's path starts from temperature scaling's fit on all rows:
    # only a start (each fit converges from it), and one fit, not one a fold.
    k = scores.shape[-1]
    temperature = _start_temperature(scores, labels, weights)
    first_start = np.eye(k) / temperature, np.zeros(k)
    for fold in range(folds):
        train, test = fold_of != fold, fold_of == fold
        if not train.any() or not test.any():
            continue
        problem = _MatrixProblem(scores[train], labels[train], weights[train])
        heldout = _MatrixProblem(scores[test], labels[test], weights[test])
        path_start, curvature = first_start, []
        for i, bias_l2 in enumerate(bias_values):
            start = path_start
            for j, off_diagonal_l2 in enumerate(off_diagonal_values):
                start = problem.fit(
                    off_diagonal_l2,
                    bias_l2,
                    start=start,
                    ftol=CV_LBFGS_FTOL,
                    curvature=curvature,
                )
                path_start = start if j == 0 else path_start
                # The held-out NLL, weighted like the whole set.
                losses[i, j] += heldout.nll(*start) * weights[test].sum()
    i, j = np.unravel_index(np.argmin(losses), losses.shape)
    return float(off_diagonal_values[j]), float(bias_values[i])


@export
def compare_calibrators(
    calibration_logits,
    calibration_labels,
    test_logits,
    test_labels,
    num_bins=15,
    grid=None,
):
    """Fits every calibrator on held-out logits and scores it on test logits.

    The calibrators: none, `TemperatureScaling` (NLL), `VectorScaling`,
    `MatrixScaling` with ODIR penalties 1e-2, and `DirichletCalibration`
    with its penalties chosen by 5-fold cross-validation. Each wraps an
    identity model over the logits, so the logits stand for any classifier's.

    Args:
        calibration_logits: float array `(N, K)`, the held-out logits.
        calibration_labels: integer class ids `(N,)`.
        test_logits: float array `(M, K)`.
        test_labels: integer class ids `(M,)`.
        num_bins: bins of the expected calibration error.
        grid: the ODIR grid for the Dirichlet cross-validation (see
            `DirichletCalibration.calibrate()`); Kull et al.'s by default.

    Returns:
        A list of dicts, one per calibrator: `name`, `nll` (mean negative
        log-likelihood), `ece` (top-label, `num_bins` equal-width bins),
        `brier` (mean squared error of the probability vector, summed over
        classes), `accuracy` and `parameters` (what `calibrate()` returned).
    """
    calibration_logits = np.asarray(calibration_logits, dtype=np.float32)
    test_logits = np.asarray(test_logits, dtype=np.float32)
    test_labels = np.asarray(test_labels).astype(np.int64)
    num_classes = calibration_logits.shape[-1]
    model = keras.Sequential(
        [keras.Input((num_classes,)), keras.layers.Identity()], name="logits"
    )
    calibrators = {
        "temperature scaling": (TemperatureScaling(model), {}),
        "vector scaling": (VectorScaling(model), {}),
        "matrix scaling (ODIR 1e-2)": (
            MatrixScaling(model, off_diagonal_l2=1e-2, bias_l2=1e-2),
            {},
        ),
        "Dirichlet (ODIR, cv)": (
            DirichletCalibration(model),
            {"off_diagonal_l2": "cv", "grid": grid},
        ),
    }
    rows = [_scores_row("uncalibrated", _softmax(test_logits), test_labels, num_bins)]
    for name, (calibrator, options) in calibrators.items():
        parameters = calibrator.calibrate(
            calibration_logits, calibration_labels, **options
        )
        probs = ops.convert_to_numpy(calibrator(test_logits))
        row = _scores_row(name, probs, test_labels, num_bins)
        rows.append(row | {"parameters": parameters})
    return rows


def _scores_row(name, probs, labels, num_bins):
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(labels))
    metric = ExpectedCalibrationError(num_bins=num_bins)
    metric.update_state(labels, probs.astype(np.float32))
    onehot = np.eye(probs.shape[-1])[labels]
    return {
        "name": name,
        "nll": float(-np.mean(np.log(np.maximum(probs[rows, labels], _TINY)))),
        "ece": float(metric.result()),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=-1))),
        "accuracy": float(np.mean(probs.argmax(axis=-1) == labels)),
        "parameters": None,
    }


def _softmax(logits):
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64)))


def fit_temperature_nll(logits, labels, sample_weight=None, rtol=1e-8):
    """Returns the temperature in [0.01, 100] minimising the mean NLL.

    The NLL of `softmax(s * z)` is convex in the inverse temperature `s`
    and its first two derivatives cost one pass over the logits, so a
    Newton iteration on its derivative, kept inside a shrinking bracket
    (bisection in `log s` when a step leaves it), converges in a few passes.
    With 20,000 rows or more it starts from a fit on every 16th row, which
    leaves about two passes over all of them. When the minimum lies
    beyond a bound, the bound is returned.

    Args:
        logits: float array `(N, K)`.
        labels: integer class ids `(N,)`.
        sample_weight: optional non-negative weights `(N,)`.
        rtol: relative tolerance on the temperature: the search stops once
            a step, or the next one as the last two Newton steps' quadratic
            convergence predicts it, is below it. The passes see `s` in
            float32, so it also stops once a step is within its rounding
            (about 6e-8 relative).
    """
    problem = _TemperatureProblem(logits, labels, sample_weight)
    return 1.0 / _inverse_temperature(problem, rtol)


def _inverse_temperature(problem, rtol):
    """The `s` in [1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE] that zeroes
    `problem`'s slope, started from a fit on a subset of the rows if large."""
    coarse = problem.coarse()
    s = 1.0 if coarse is None else _inverse_temperature(coarse, COARSE_RTOL)
    lo, hi = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    unvisited_bounds = {lo, hi}
    previous_step = None
    for _ in range(200):
        unvisited_bounds.discard(s)
        slope, curvature = problem(s)
        if slope > 0:
            hi = s
        elif slope < 0:
            lo = s
        if slope == 0 or hi - lo <= rtol * lo:
            break
        s_new = s - slope / curvature if curvature > 0 else math.inf
        newton = lo < s_new < hi
        if not newton:
            bound = lo if s_new <= lo else hi
            s_new = bound if bound in unvisited_bounds else math.sqrt(lo * hi)
        step = abs(s_new - s)
        # The passes see `s` in float32: a step within its rounding is final.
        converged = step <= rtol * s or np.float32(s_new) == np.float32(s)
        # Newton's steps shrink quadratically near the root: after steps of
        # e and then d, the next would be about d**3 / e**2. No pass is
        # spent on it when that is within the tolerance.
        if newton and previous_step:
            converged |= step**3 <= rtol * s * previous_step**2
        previous_step = step if newton else None
        s = s_new
        if converged:
            break
    return float(np.clip(s, 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE))


def fit_vector_scaling(scores, labels, sample_weight=None):
    """The per-class scale `w` and offset `b` minimising the mean NLL of
    `softmax(w * scores + b)`, by a damped Newton method.

    Returns:
        `(w, b)`, float64 arrays of shape `(K,)`; `b` has mean 0.
    """
    parameters, _ = _VectorProblem(scores, labels, sample_weight).fit()
    k = len(parameters) // 2
    scale, bias = parameters[:k], parameters[k:]
    return scale, bias - bias.mean()


def fit_matrix_scaling(
    scores, labels, off_diagonal_l2=0.0, bias_l2=0.0, sample_weight=None
):
    """The `W`, `b` minimising the mean NLL of `softmax(scores W^T + b)`
    plus the ODIR penalty (see `MatrixScaling`), by L-BFGS.

    Returns:
        `(W, b)`, float64 arrays of shapes `(K, K)` and `(K,)`.
    """
    off_diagonal_l2 = check_non_negative("off_diagonal_l2", off_diagonal_l2)
    bias_l2 = check_non_negative("bias_l2", bias_l2)
    problem = _MatrixProblem(scores, labels, sample_weight)
    return problem.fit(off_diagonal_l2, bias_l2)


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

    Ties go to the earliest temperature of `grid`. The ECE is that of
    `ExpectedCalibrationError(num_bins=15)`: float32 confidences in bins
    `(lo, hi]`, here summed in float64 with numpy, since a metric update per
    temperature costs eager dispatches and compilations on JAX and
    TensorFlow for a few thousand predictions.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    # Dividing by a temperature changes the confidences, never the argmax.
    correct = shifted.argmax(axis=-1) == labels
    weights = _normalised_weights(sample_weight, len(labels))
    buffer = np.empty_like(shifted)
    errors = []
    for temperature in grid:
        exp = np.exp(np.multiply(shifted, 1.0 / temperature, out=buffer), out=buffer)
        confidence = (1.0 / exp.sum(axis=-1)).astype(np.float32)
        errors.append(_equal_width_ece(confidence, correct, weights, num_bins=15))
    return float(grid[int(np.argmin(errors))])


def _equal_width_ece(confidence, correct, weights, num_bins):
    """ECE of float32 `confidence` with normalised `weights`, binned as
    `ExpectedCalibrationError` bins them: `ceil(c * num_bins)` in float32."""
    slots = np.ceil(confidence * np.float32(num_bins)).astype(np.int64)
    bins = np.clip(slots - 1, 0, num_bins - 1)
    gaps = np.bincount(bins, weights * (correct - confidence), minlength=num_bins)
    return float(np.abs(gaps).sum())


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


def _log_softmax(scores):
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _num_classes(model):
    try:
        shape = tuple(model.output_shape)
    except (AttributeError, ValueError, TypeError):
        shape = None
    if not shape or len(shape) < 2 or not isinstance(shape[-1], int):
        raise ValueError(
            "Argument `model` must have a known output shape `(..., K)` with "
            f"K >= 2 classes. Received: model with output shape {shape}"
        )
    if shape[-1] < 2:
        raise ValueError(
            "Argument `model` must output at least 2 classes. Received: model "
            f"with output shape {shape}"
        )
    return shape[-1]


def _num_examples(x):
    if isinstance(x, dict):
        x = next(iter(x.values()), None)
    elif isinstance(x, (list, tuple)) and x:
        x = x[0]
    shape = getattr(x, "shape", None)
    return shape[0] if shape else None


def _check_outputs(outputs):
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim < 2 or outputs.shape[-1] < 2:
        raise ValueError(
            "The wrapped model must output scores of shape `(..., K)` with K "
            ">= 2, which flatten to a 2-D `(N, K)` array. Received: model "
            f"outputs of shape {outputs.shape} on `x`"
        )
    finite = np.isfinite(outputs)
    if not finite.all():
        bad = outputs[~finite]
        raise ValueError(
            "Invalid value for argument `x`: the wrapped model's outputs on it "
            f"must be finite. Received: {bad.size} non-finite outputs "
            f"(first: {bad[0]}) of {outputs.size}"
        )
    return outputs


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
    if labels.size and not np.all(labels == np.round(labels)):
        raise ValueError(
            f"Argument `y` must hold integer class ids. Received: y={labels!r}"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Argument `y` must hold class ids in [0, {num_classes}). Received "
            f"ids in [{labels.min()}, {labels.max()}]"
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


def _check_odir_grid(grid, num_classes):
    if grid is None:
        return odir_grid(num_classes)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(
            "Argument `grid` must be a pair (off_diagonal_values, bias_values). "
            f"Received: grid={grid!r}"
        )
    checked = []
    for values in grid:
        values = [check_non_negative("grid", v) for v in np.ravel(values).tolist()]
        if not values:
            raise ValueError(
                f"Argument `grid` must not hold an empty list. Received: grid={grid!r}"
            )
        checked.append(tuple(values))
    return tuple(checked)


def _check_folds(folds):
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(
            f"Argument `folds` must be an integer >= 2. Received: folds={folds!r}"
        )
    return folds


def _stratified_folds(labels, folds, seed):
    """Fold ids `(N,)`: each class spread evenly over the folds, at random."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[order] = np.arange(len(labels)) % folds
    return fold_of


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


# The fits. Each pass over the scores is a keras.ops function, compiled for
# the backend (`jax.jit`, a `tf.function` graph; eager PyTorch, whose big
# kernels gain little from compiling) and run where the backend runs, in
# float32. What comes back is small: per-row losses, which are summed in
# float64 on the host so that the objective resolves changes far below
# float32's precision, and K- or K x K-sized derivatives. The optimisers
# (Newton, L-BFGS) work on those in float64 on the host.


def _shift_pass(logits, labels):
    shifted = logits - ops.max(logits, axis=-1, keepdims=True)
    label_score = ops.take_along_axis(shifted, labels[:, None], axis=-1)[:, 0]
    return shifted, label_score


def _temperature_pass(shifted, label_score, scale):
    exp = ops.exp(ops.maximum(shifted * scale, -80.0))
    partition = ops.sum(exp, axis=-1)
    weighted = exp * shifted
    mean = ops.sum(weighted, axis=-1) / partition
    mean_square = ops.sum(weighted * shifted, axis=-1) / partition
    return mean - label_score, mean_square - mean**2


def _softmax_loss(logits, labels, onehot):
    """Probabilities minus one-hot labels, and the per-row NLL, from the
    backend's fused log-softmax and one exponential per entry.

    With `onehot` None, the label's 1 is taken off where the class index
    equals the label: XLA fuses that comparison into the pass, which then
    reads no (N, K) one-hot array."""
    log_probs = ops.log_softmax(logits, axis=-1)
    row_loss = -ops.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    probs = ops.exp(log_probs)
    # Residuals, not probabilities, are summed into gradients: their running
    # sums cancel as they go and stay far more precise in float32.
    if onehot is None:
        classes = ops.arange(ops.shape(logits)[-1], dtype=labels.dtype)
        return ops.where(labels[:, None] == classes, probs - 1.0, probs), row_loss
    return probs - onehot, row_loss


def _vector_gradient_pass(scores, labels, onehot, weights, scale, bias):
    residual, row_loss = _softmax_loss(scores * scale + bias, labels, onehot)
    residual = residual * weights[:, None]
    gradient = ops.stack(
        [ops.sum(residual * scores, axis=0), ops.sum(residual, axis=0)]
    )
    return row_loss, gradient


def _vector_hessian_pass(scores, labels, onehot, weights, scale, bias):
    residual, row_loss = _softmax_loss(scores * scale + bias, labels, onehot)
    probs = residual + onehot
    weighted_probs = probs * weights[:, None]
    weighted_products = weighted_probs * scores
    products = probs * scores
    residual = residual * weights[:, None]
    gradient = ops.stack(
        [ops.sum(residual * scores, axis=0), ops.sum(residual, axis=0)]
    )
    hessian = ops.stack(
        [
            ops.diag(ops.sum(weighted_products * scores, axis=0))
            - ops.matmul(ops.transpose(weighted_products), products),
            ops.diag(ops.sum(weighted_products, axis=0))
            - ops.matmul(ops.transpose(weighted_products), probs),
            ops.diag(ops.sum(weighted_probs, axis=0))
            - ops.matmul(ops.transpose(weighted_probs), probs),
        ]
    )
    return row_loss, gradient, hessian


def _matrix_pass(features, weighted_features, labels, onehot, matrix):
    residual, row_loss = _softmax_loss(
        ops.matmul(features, ops.transpose(matrix)), labels, onehot
    )
    return row_loss, ops.matmul(ops.transpose(residual), weighted_features)


def _matrix_hessian_pass(features, weighted_features, matrix):
    """The NLL's Hessian w.r.t. the whitened matrix, in two parts:
    `sum_n w_n p_n,i x_n x_n^T` for each class `i` (`(K (K + 1), K + 1)`,
    the diagonal blocks) and `sum_n w_n (p_n x_n^T)(p_n x_n^T)^T` over the
    flattened outer products (`(K (K + 1), K (K + 1))`)."""
    probabilities = ops.softmax(ops.matmul(features, ops.transpose(matrix)), axis=-1)
    # Rows first: a retraced `tf.function` may know neither K nor N.
    rows = ops.shape(features)[0]
    outer = ops.reshape(probabilities[:, :, None] * features[:, None, :], (rows, -1))
    weighted_outer = ops.reshape(
        probabilities[:, :, None] * weighted_features[:, None, :], (rows, -1)
    )
    transposed = ops.transpose(weighted_outer)
    return ops.matmul(transposed, features), ops.matmul(transposed, outer)


def _matrix_loss_pass(scores, labels, matrix, bias):
    logits = ops.matmul(scores, ops.transpose(matrix)) + bias
    shifted = logits - ops.max(logits, axis=-1, keepdims=True)
    label_logit = ops.take_along_axis(shifted, labels[:, None], axis=-1)[:, 0]
    return ops.log(ops.sum(ops.exp(shifted), axis=-1)) - label_logit


# The features `x = (z, 1)` are never padded out: `sum_n w_n x_n x_n^T` and
# `L^-1 x` are assembled from the scores' products and sums.


def _second_moment_pass(scores, weights):
    weighted = scores * weights[:, None]
    return ops.matmul(ops.transpose(weighted), scores), ops.sum(weighted, axis=0)


def _whiten_pass(scores, weights, inverse_factor):
    # Not `[:, :K]`: a retraced `tf.function` may not know K.
    whitened = ops.matmul(scores, ops.transpose(inverse_factor[:, :-1]))
    whitened = whitened + inverse_factor[:, -1]
    return whitened, whitened * weights[:, None]


# TensorFlow and JAX run the matrix pass over blocks of rows whose (rows, K)
# float32 arrays take at most _BLOCK_BYTES: the allocator reuses blocks this
# small from one pass to the next, where it returns larger ones to the system
# and pays for their pages afresh, and they stay in the cache from the logits
# to the gradient product. Under load, a pass over 10^5 x 100 scores in
# blocks of 8 MiB took 0.7-0.85x the CPU time of one over all rows. PyTorch
# keeps one block, in a buffer of its own (see `_torch_matrix_pass`): its
# smaller products were slower.
_BLOCK_BYTES = 2**23


def _row_blocks(num_rows, num_classes):
    """Slices of about equal blocks of rows for the matrix pass."""
    if keras.backend.backend() == "torch":
        return [slice(0, num_rows)]
    count = max(1, math.ceil(4 * num_rows * num_classes / _BLOCK_BYTES))
    bounds = np.linspace(0, num_rows, count + 1).round().astype(int).tolist()
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


def _matrix_pass_runner(features, weighted_features, labels, onehot):
    """The matrix pass over one block of rows, as a function of the whitened
    matrix that returns the rows' losses and their share of the gradient.

    PyTorch's and JAX's passes need no one-hot labels: `onehot` is a
    callable that builds them, called only on TensorFlow (whose graph,
    without XLA, would build the comparison that replaces them every pass)."""
    if keras.backend.backend() == "torch":
        import torch

        num_classes = features.shape[-1] - 1
        logits = features.new_empty((len(labels), num_classes))
        index = labels[:, None].long()

        def run_torch(matrix):
            with torch.no_grad():
                return _torch_matrix_pass(
                    features, weighted_features, index, matrix, logits
                )

        return run_torch
    run = _compiled(_matrix_pass)
    onehot = onehot() if keras.backend.backend() == "tensorflow" else None
    return lambda matrix: run(features, weighted_features, labels, onehot, matrix)


# Eager PyTorch runs each operation as written, with a new (N, K) tensor for
# each: the two passes that dominate the fits are written for it in place,
# on fused kernels, which cuts the temperature fit's time by about half and
# the matrix fits' by about 40% against their `keras.ops` versions.


def _torch_temperature_pass(shifted, label_score, scale):
    exp = (shifted * float(scale)).clamp_(min=-80.0).exp_()
    partition = exp.sum(dim=-1)
    weighted = exp.mul_(shifted)
    mean = weighted.sum(dim=-1) / partition
    mean_square = weighted.mul_(shifted).sum(dim=-1) / partition
    return mean - label_score, mean_square - mean**2


def _torch_matrix_pass(features, weighted_features, index, matrix, logits):
    # The logits, log-probabilities, probabilities and residuals all live in
    # `logits`, a buffer of the problem's: a new (N, K) tensor each pass
    # costs its pages afresh (the allocator hands large blocks back to the
    # system), which took about a quarter of the pass's CPU time.
    import torch

    torch.matmul(features, matrix.T, out=logits)
    log_probs = torch.log_softmax(logits, dim=-1, out=logits)
    row_loss = -log_probs.gather(1, index)[:, 0]
    # The probabilities lose 1 at the label: the residuals, without an
    # (N, K) one-hot pass.
    residual = log_probs.exp_().scatter_add_(1, index, -logits.new_ones(index.shape))
    return row_loss, residual.T @ weighted_features


def _torch_vector_pass(scores, weights, index, scale, bias, buffers, with_hessian):
    """Vector scaling's pass in three (N, K) buffers of the problem's (see
    `_torch_matrix_pass`), with the same sums as `_vector_hessian_pass`."""
    import torch

    probs, scratch, weighted = buffers
    torch.addcmul(bias, scores, scale, out=probs)
    log_probs = torch.log_softmax(probs, dim=-1, out=probs)
    row_loss = -log_probs.gather(1, index)[:, 0]
    probs = log_probs.exp_()
    hessian = None
    if with_hessian:
        torch.mul(probs, weights[:, None], out=weighted)
        h_bb = torch.diag(weighted.sum(dim=0)) - weighted.T @ probs
        torch.mul(probs, scores, out=scratch)
        weighted_products = weighted.mul_(scores)
        h_ss = -(weighted_products.T @ scratch)
        h_sb = torch.diag(weighted_products.sum(dim=0)) - weighted_products.T @ probs
        h_ss += torch.diag(torch.mul(weighted_products, scores, out=scratch).sum(dim=0))
        hessian = torch.stack([h_ss, h_sb, h_bb])
    # The residuals, as in `_torch_matrix_pass`, then their weighted sums.
    residual = probs.scatter_add_(1, index, -probs.new_ones(index.shape))
    residual = torch.mul(residual, weights[:, None], out=scratch)
    bias_gradient = residual.sum(dim=0)
    scale_gradient = residual.mul_(scores).sum(dim=0)
    return row_loss, torch.stack([scale_gradient, bias_gradient]), hessian


_TORCH_PASSES = {_temperature_pass: _torch_temperature_pass}


# XLA on the CPU runs the matrix pass's gradient product faster on residuals
# that a program of their own wrote out: split in two, a JAX fit took 0.82x
# the time of one program (under load, the same process).


def _residual_pass(features, labels, onehot, matrix):
    return _softmax_loss(ops.matmul(features, ops.transpose(matrix)), labels, onehot)


def _gradient_pass(residual, weighted_features):
    return ops.matmul(ops.transpose(residual), weighted_features)


def _jax_matrix_pass(features, weighted_features, labels, onehot, matrix):
    residual, row_loss = _compiled(_residual_pass)(features, labels, onehot, matrix)
    return row_loss, _compiled(_gradient_pass)(residual, weighted_features)


# Passes that JAX runs as several compiled programs of their own.
_JAX_PASSES = {_matrix_pass: _jax_matrix_pass}


_COMPILED = {}


def _compiled(function):
    """`function` compiled for the current backend, once per process."""
    key = (keras.backend.backend(), function)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(function)
    return _COMPILED[key]


def _compile(function):
    backend = keras.backend.backend()
    if backend == "jax":
        return _JAX_PASSES.get(function) or jax_jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        # A graph without XLA: cross-validation meets a new shape per fold,
        # and an XLA compilation for each costs more than the fusion gains,
        # except for temperature scaling's elementwise passes, which XLA fuses
        # into one loop at about twice the speed (its shapes: all rows and
        # every 16th, once per calibration set).
        jit_compile = function in (_shift_pass, _temperature_pass)
        return tf.function(function, reduce_retracing=True, jit_compile=jit_compile)
    if backend == "torch":
        import torch

        function = _TORCH_PASSES.get(function, function)

        def run(*args):
            with torch.no_grad():
                return function(*args)

        return run
    return function


def _to_numpy(tensor):
    return np.asarray(ops.convert_to_numpy(tensor), dtype=np.float64)


def _float32(array):
    return ops.convert_to_tensor(np.asarray(array, dtype=np.float32))


class _TemperatureProblem:
    """First and second derivative of the mean NLL w.r.t. `s = 1 / T`.

    The passes over the logits run in float32 on the backend; per-row
    results, which carry about 1e-7 relative error, are combined in
    float64. That moves the root by about 1e-7 relative.
    """

    def __init__(self, logits, labels, sample_weight):
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        if logits.dtype != np.float32:
            # Shifting each row by its maximum leaves the softmax unchanged
            # and keeps exp(s * z) in (0, 1]; done in float64 first, it keeps
            # the differences that a cast of large logits would round away.
            logits = logits - logits.max(axis=-1, keepdims=True)
        self.host_data = logits, labels
        self.shifted, self.label_score = _compiled(_shift_pass)(
            _float32(logits), ops.convert_to_tensor(labels.astype(np.int32))
        )
        self.weights = _normalised_weights(sample_weight, len(labels))
        self.run = _compiled(_temperature_pass)

    def __call__(self, s):
        slopes, curvatures = map(
            _to_numpy, self.run(self.shifted, self.label_score, np.float32(s))
        )
        return _dot(self.weights, slopes), _dot(self.weights, curvatures)

    def coarse(self):
        """The same problem on every TEMPERATURE_COARSE_STRIDE-th row, or None."""
        rows = _strided_rows(self.weights, TEMPERATURE_COARSE_STRIDE)
        if rows is None:
            return None
        logits, labels = self.host_data
        return _TemperatureProblem(logits[rows], labels[rows], self.weights[rows])


# Vector scaling fits on more rows than this start from a fit on every
# COARSE_STRIDE-th row (itself started the same way): most of the way to the
# optimum at a fraction of the cost, leaving the Newton passes over all rows
# a few final steps. (Not so for matrix scaling: with K (K + 1) parameters a
# fit on a quarter of the rows lands too far from the full optimum to pay.)
COARSE_MIN_ROWS = 20_000
COARSE_STRIDE = 4
# Temperature scaling's one parameter is fitted well on far fewer rows: its
# coarse fits take every 16th row, to a relative tolerance of 1e-4.
TEMPERATURE_COARSE_STRIDE = 16
WHITENING_STRIDE = 4
COARSE_RTOL = 1e-4


def _strided_rows(weights, stride):
    """Every `stride`-th row as a slice, for problems of COARSE_MIN_ROWS rows
    or more whose strided rows carry weight; otherwise None."""
    rows = slice(None, None, stride)
    if len(weights) < COARSE_MIN_ROWS or not weights[rows].sum() > 0:
        return None
    return rows


class _Problem:
    """Scores, labels (ids and one-hot) and weights on the backend's device."""

    def __init__(self, scores, labels, sample_weight):
        scores = np.asarray(scores)
        if scores.dtype != np.float32:
            scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels).astype(np.int32)
        self.num_classes = scores.shape[-1]
        self.weights = _normalised_weights(sample_weight, len(labels))
        self.scores = _float32(scores)
        self.labels = ops.convert_to_tensor(labels)
        self.device_weights = _float32(self.weights)
        self.host_data = scores, labels

    @functools.cached_property
    def onehot(self):
        # Built on first use: PyTorch's matrix pass does without.
        return ops.one_hot(self.labels, self.num_classes, dtype="float32")

    def coarse(self):
        """The same problem on every COARSE_STRIDE-th row, or None."""
        rows = _strided_rows(self.weights, COARSE_STRIDE)
        if rows is None:
            return None
        scores, labels = self.host_data
        return type(self)(scores[rows], labels[rows], self.weights[rows])


class _VectorProblem(_Problem):
    def objective(self, parameters, with_hessian=True):
        """Mean NLL, its gradient and (`with_hessian`) Hessian w.r.t.
        `(scale, bias)`; the Hessian is None without."""
        k = self.num_classes
        scale, bias = _float32(parameters[:k]), _float32(parameters[k:])
        if keras.backend.backend() == "torch":
            row_loss, gradient, hessian = self._torch_pass(scale, bias, with_hessian)
            hessian = [] if hessian is None else [hessian]
        else:
            run = _compiled(
                _vector_hessian_pass if with_hessian else _vector_gradient_pass
            )
            row_loss, gradient, *hessian = run(
                self.scores, self.labels, self.onehot, self.device_weights, scale, bias
            )
        if hessian:
            h_ss, h_sb, h_bb = _to_numpy(hessian[0])
            hessian = np.block([[h_ss, h_sb], [h_sb.T, h_bb]])
        else:
            hessian = None
        return (
            _dot(self.weights, _to_numpy(row_loss)),
            _to_numpy(gradient).ravel(),
            hessian,
        )

    @functools.cached_property
    def _torch_index_and_buffers(self):
        import torch

        buffers = [torch.empty_like(self.scores) for _ in range(3)]
        return self.labels[:, None].long(), buffers

    def _torch_pass(self, scale, bias, with_hessian):
        import torch

        index, buffers = self._torch_index_and_buffers
        with torch.no_grad():
            return _torch_vector_pass(
                self.scores,
                self.device_weights,
                index,
                scale,
                bias,
                buffers,
                with_hessian,
            )

    def fit(self):
        """`(scale, bias)` and the Hessian there (or close to there)."""
        k = self.num_classes
        coarse = self.coarse()
        if coarse is None:
            # Temperature scaling's fit, w = 1 / T, costs a few cheap passes
            # and saves Newton its first, damped steps.
            scores, labels = self.host_data
            temperature = fit_temperature_nll(scores, labels, self.weights)
            start = np.concatenate([np.full(k, 1.0 / temperature), np.zeros(k)])
            hessian = None
        else:
            start, hessian = coarse.fit()
        return _minimize_newton(self.objective, start, hessian)


class _MatrixProblem(_Problem):
    """The ODIR-penalised NLL of matrix scaling, in whitened coordinates.

    With `x = (z, 1)` and `C = sum_n w_n x_n x_n^T = L L^T`, the logits are
    `[W b] x = V (L^-1 x)`: L-BFGS works on `V = [W b] L` over the whitened
    features `L^-1 x`, in which the NLL's curvature is far more even than
    over raw logits or log-probabilities (strongly correlated, and offset
    by a common log-normaliser), so it needs several times fewer passes.
    """

    def __init__(self, scores, labels, sample_weight):
        super().__init__(scores, labels, sample_weight)
        second_moment = self._second_moment()
        k = self.num_classes + 1
        # A ridge keeps the factor finite for constant or collinear scores.
        ridge = 1e-6 * np.trace(second_moment) / k
        self.factor = _cholesky(second_moment + ridge * np.eye(k))
        self.inverse_factor = _solve_lower(self.factor, np.eye(k))
        self.blocks = [
            (rows, *self._whitened(rows))
            for rows in _row_blocks(len(self.weights), self.num_classes)
        ]
        self.passes = [
            _matrix_pass_runner(
                features,
                weighted_features,
                self.labels[rows],
                lambda rows=rows: self.onehot[rows],
            )
            for rows, features, weighted_features in self.blocks
        ]

    def _whitened(self, rows):
        """The whitened features of `rows`, and the same times the weights."""
        return _compiled(_whiten_pass)(
            self.scores[rows], self.device_weights[rows], _float32(self.inverse_factor)
        )

    def _second_moment(self):
        # Any factor gives the same fit, only a better or worse conditioned
        # path to it: from 20,000 rows on, every WHITENING_STRIDE-th row
        # estimates the moment well enough, for a fraction of a pass.
        rows = _strided_rows(self.weights, WHITENING_STRIDE)
        if rows is None:
            rows = slice(None)
        weights = self.weights[rows]
        products, sums = map(
            _to_numpy,
            _compiled(_second_moment_pass)(
                self.scores[rows], _float32(weights / weights.sum())
            ),
        )
        return np.block([[products, sums[:, None]], [sums[None, :], np.ones((1, 1))]])

    def objective(self, parameters, off_diagonal_l2, bias_l2):
        """Penalised mean NLL and its gradient w.r.t. the whitened `V`."""
        k = self.num_classes
        whitened = parameters.reshape(k, k + 1)
        device_whitened = _float32(whitened)
        # Every block is started before any result is read: JAX runs them
        # while the host waits.
        results = [run(device_whitened) for run in self.passes]
        row_loss = np.concatenate([_to_numpy(loss) for loss, _ in results])
        gradient = sum(_to_numpy(block_gradient) for _, block_gradient in results)
        affine = _matmul(whitened, self.inverse_factor)
        penalty, penalty_gradient = _odir_penalty(affine, off_diagonal_l2, bias_l2)
        value = _dot(self.weights, row_loss) + penalty
        gradient = gradient + _matmul(penalty_gradient, self.inverse_factor.T)
        return value, gradient.ravel()

    def newton_objective(self, parameters, with_hessian, off_diagonal_l2, bias_l2):
        """`objective()` and (`with_hessian`) the Hessian, for `_minimize_newton`."""
        value, gradient = self.objective(parameters, off_diagonal_l2, bias_l2)
        if not with_hessian:
            return value, gradient, None
        k = self.num_classes
        device_whitened = _float32(parameters.reshape(k, k + 1))
        run = _compiled(_matrix_hessian_pass)
        parts = [
            run(features, weighted_features, device_whitened)
            for _, features, weighted_features in self.blocks
        ]
        blocks = sum(_to_numpy(part) for part, _ in parts).reshape(k, k + 1, k + 1)
        hessian = _block_diagonal(blocks) - sum(_to_numpy(cross) for _, cross in parts)
        penalty = self._penalty_hessian(off_diagonal_l2, bias_l2)
        return value, gradient, hessian + penalty

    def _penalty_hessian(self, off_diagonal_l2, bias_l2):
        """The ODIR penalty's (constant) Hessian w.r.t. the whitened `V`: row
        `i` of `[W b] = V L^-1` weighs its entries by `c_i`, so its block is
        `2 L^-1 diag(c_i) L^-T`."""
        k = self.num_classes
        coefficients = _odir_coefficients(k, off_diagonal_l2, bias_l2)
        inverse = self.inverse_factor
        blocks = 2 * np.einsum("ab,ib,cb->iac", inverse, coefficients, inverse)
        return _block_diagonal(blocks)

    def nll(self, matrix, bias):
        """The unpenalised mean NLL at `(W, b)`."""
        row_loss = _compiled(_matrix_loss_pass)(
            self.scores, self.labels, _float32(matrix), _float32(bias)
        )
        return float(_dot(self.weights, _to_numpy(row_loss)))

    def fit(self, off_diagonal_l2, bias_l2, start=None, ftol=None, curvature=()):
        """`(W, b)` minimising the penalised NLL, from `start` (a `(W, b)`)
        or temperature scaling's fit: by Newton where `_newton_applies` and
        neither `ftol` nor `curvature` is given, else by L-BFGS.

        With `curvature` (a list), L-BFGS starts from the NLL's curvature
        pairs it holds, from earlier fits of this problem, and leaves its
        own there: the penalty's share of a pair is exact (it is quadratic),
        so pairs carry from one penalty to another, and a fit along a path of
        penalties starts with a quasi-Newton model instead of a short
        gradient step.
        """
        k = self.num_classes
        if start is None:
            # Temperature scaling's fit, W = I / T, is a cheap start that
            # saves L-BFGS a fifth of its passes.
            scores, labels = self.host_data
            temperature = _start_temperature(scores, labels, self.weights)
            start = (np.eye(k) / temperature, np.zeros(k))
        affine = np.concatenate([start[0], np.reshape(start[1], (k, 1))], axis=1)
        whitened = _matmul(affine, self.factor).ravel()
        penalties = off_diagonal_l2, bias_l2
        if ftol is None and not curvature and self._newton_applies(*penalties):
            parameters, _ = _minimize_newton(
                lambda v, with_hessian: self.newton_objective(
                    v, with_hessian, *penalties
                ),
                whitened,
                # Near-separable data converge linearly along a flat valley,
                # where a held Hessian's steps look stalled: a fresh one
                # each step, cheap at this size.
                hold_decrement=0.0,
            )
        else:
            parameters, pairs = _minimize_lbfgs(
                lambda v: self.objective(v, *penalties),
                whitened,
                ftol=LBFGS_FTOL if ftol is None else ftol,
                pairs=[
                    (s, y + self._penalty_change(s, *penalties)) for s, y in curvature
                ],
            )
            if isinstance(curvature, list):
                curvature[:] = [
                    (s, y - self._penalty_change(s, *penalties)) for s, y in pairs
                ]
        affine = _matmul(parameters.reshape(k, k + 1), self.inverse_factor)
        return affine[:, :k], affine[:, k]

    def _newton_applies(self, off_diagonal_l2, bias_l2):
        """Small problems with both penalties: without either, adding one
        vector to every row of `[W b]` leaves the softmax unchanged, and
        Newton's steps, unlike L-BFGS's, would wander along such flat
        directions on the passes' rounding."""
        k = self.num_classes
        return k * (k + 1) <= NEWTON_MATRIX_SIZE and off_diagonal_l2 > 0 < bias_l2

    def _penalty_change(self, step, off_diagonal_l2, bias_l2):
        """The change of the penalty's gradient over a whitened `step`."""
        k = self.num_classes
        affine_step = _matmul(step.reshape(k, k + 1), self.inverse_factor)
        _, change = _odir_penalty(affine_step, off_diagonal_l2, bias_l2)
        return _matmul(change, self.inverse_factor.T).ravel()


def _start_temperature(scores, labels, weights):
    """Temperature scaling's fit as a start: from 20,000 rows on, only its
    coarse fit (every 16th row, to 1e-4 relative), which starts L-BFGS as
    well for a few passes over a sixteenth of the rows."""
    rows = _strided_rows(weights, TEMPERATURE_COARSE_STRIDE)
    if rows is None:
        return fit_temperature_nll(scores, labels, weights)
    coarse = _TemperatureProblem(scores[rows], labels[rows], weights[rows])
    return 1.0 / _inverse_temperature(coarse, COARSE_RTOL)


def _odir_penalty(affine, off_diagonal_l2, bias_l2):
    """Kull et al.'s normalised ODIR penalty of `[W b]` and its gradient."""
    coefficients = _odir_coefficients(len(affine), off_diagonal_l2, bias_l2)
    return np.sum(coefficients * affine**2), 2 * coefficients * affine


def _odir_coefficients(k, off_diagonal_l2, bias_l2):
    """The weights `c` of the penalty `sum c * [W b]**2`, `(K, K + 1)`."""
    coefficients = np.full((k, k + 1), off_diagonal_l2 / (k * (k - 1)))
    coefficients[np.diag_indices(k)] = 0.0
    coefficients[:, k] = bias_l2 / k
    return coefficients


def _block_diagonal(blocks):
    """The block-diagonal matrix of the square `blocks` `(count, n, n)`."""
    count, n, _ = blocks.shape
    matrix = np.zeros((count * n, count * n))
    for i, block in enumerate(blocks):
        matrix[i * n : (i + 1) * n, i * n : (i + 1) * n] = block
    return matrix


# Newton stops once the decrement g^T H^+ g / 2, which estimates how far the
# objective is above its minimum, falls below NEWTON_TOLERANCE, after taking
# that last full step (which, Newton converging quadratically, leaves it far
# lower). The objective's float32 passes resolve it to about 1e-9.
NEWTON_TOLERANCE = 1e-8
# Matrix and Dirichlet fits of at most this many parameters `K (K + 1)` (up
# to 10 classes) use Newton: its Hessian pass costs K (K + 1) times the
# gradient's, and L-BFGS, on a small calibration set that the model nearly
# separates, crawls along the flat valley of a growing diagonal (on 257
# digits predictions: 2,000 iterations, still far from the minimum that
# Newton reaches in 25).
NEWTON_MATRIX_SIZE = 110
# Below this decrement Newton holds its Hessian (see `_minimize_newton`).
HOLD_DECREMENT = 1e-3
# L-BFGS stops when the largest gradient entry falls below LBFGS_GTOL or an
# iteration lowers the objective by less than LBFGS_FTOL (relative) and the
# next is predicted to. On 10^5 x 100 scores 1e-7 leaves the mean NLL about
# 3e-7 (matrix) and 1.5e-6 (Dirichlet) above the minimum, far below the
# calibration set's sampling noise, in 17 and 16 passes where 1e-8 took 21
# and 22 to come within 3e-8. Cross-validation's fits stop at CV_LBFGS_FTOL.
LBFGS_GTOL = 1e-6
LBFGS_FTOL = 1e-7
CV_LBFGS_FTOL = 1e-7
_ARMIJO = 1e-4


def _minimize_newton(
    objective, x, hessian=None, max_iterations=100, hold_decrement=HOLD_DECREMENT
):
    """Damped Newton with backtracking for a convex
    `objective(x, with_hessian) -> (f, g, H or None)`.

    The step solves `(H + mu I) d = -g` with a tiny ridge `mu`, which keeps
    it finite in directions in which the objective is flat (shifting every
    offset by a constant).
    Close to the minimum, where the Hessian hardly changes, the passes skip
    it (about three times cheaper) and keep stepping with the last one while
    that shrinks the decrement at least tenfold a step. `hessian`, if
    given, is such an estimate to start with (a fit's on fewer rows).
    `hold_decrement=0` computes the Hessian at every step.

    Returns:
        The minimiser and the Hessian last used.
    """
    f, g, h = objective(x, hessian is None)
    # Steps since the Hessian was computed (2: it came with the call).
    h, age = (hessian, 2) if h is None else (h, 0)
    previous = math.inf
    for _ in range(max_iterations):
        step = _newton_step(h, g)
        decrement = -_dot(g, step)
        if not decrement > 0:
            break
        if decrement / 2 <= NEWTON_TOLERANCE:
            return x + step, h
        if age and decrement > previous / 10:
            if age == 1:
                # An exact Newton step stalled: the objective's float32
                # passes resolve it no further.
                break
            f, g, h = objective(x, True)
            age, previous = 0, math.inf
            continue
        # Far from the minimum exact Newton steps; a held Hessian stays
        # while it keeps working (the test above).
        fresh = age == 0 and decrement > hold_decrement
        t = 1.0
        while t > 1e-6:
            f_new, g_new, h_new = objective(x + t * step, fresh)
            if f_new <= f - _ARMIJO * t * decrement:
                break
            t /= 4
        else:
            break  # No decrease within the precision of the objective.
        x, f, g = x + t * step, f_new, g_new
        h, age = (h_new, 0) if fresh else (h, age + 1)
        previous = decrement
    return x, h


def _newton_step(hessian, gradient):
    ridge = 1e-6 * np.max(np.abs(np.diag(hessian)))
    try:
        lower = _cholesky(hessian + ridge * np.eye(len(gradient)))
    except np.linalg.LinAlgError:
        # Rounding made it indefinite: least squares ignores what it cannot
        # resolve (slowly, see below, but this is rare).
        return -np.linalg.lstsq(hessian, gradient, rcond=1e-12)[0]
    return -_solve_lower(lower.T, _solve_lower(lower, gradient), upper=True)


# Two small factorisations written out with einsum: LAPACK's, their BLAS
# threads spinning against the backend's on a busy machine, can take a
# hundred times longer at this size (tens of milliseconds, not a fraction).


def _cholesky(matrix):
    """The lower Cholesky factor of a positive definite `matrix`."""
    n = len(matrix)
    lower = np.zeros_like(matrix)
    for j in range(n):
        row = lower[j, :j]
        pivot = matrix[j, j] - np.einsum("i,i->", row, row)
        if not pivot > 0:
            raise np.linalg.LinAlgError("Matrix is not positive definite.")
        lower[j, j] = math.sqrt(pivot)
        below = matrix[j + 1 :, j] - np.einsum("ik,k->i", lower[j + 1 :, :j], row)
        lower[j + 1 :, j] = below / lower[j, j]
    return lower


def _solve_lower(lower, rhs, upper=False):
    """Solves `lower x = rhs` for triangular `lower` (upper if `upper`);
    `rhs` is a vector or a matrix of columns."""
    n = len(lower)
    solution = np.zeros(np.shape(rhs))
    for i in reversed(range(n)) if upper else range(n):
        done = slice(i + 1, n) if upper else slice(0, i)
        known = np.einsum("k,k...->...", lower[i, done], solution[done])
        solution[i] = (rhs[i] - known) / lower[i, i]
    return solution


def _minimize_lbfgs(
    objective, x, ftol=LBFGS_FTOL, memory=10, max_iterations=2000, pairs=()
):
    """L-BFGS with backtracking for a convex `objective(x) -> (f, g)`.

    Stops when the largest gradient entry is below LBFGS_GTOL, or when both
    the last iteration's decrease and the next one's, as the quasi-Newton
    model predicts it (`-g.d / 2`), are below `ftol` (relative): on a flat,
    ill-conditioned stretch one small decrease alone says little.
    `pairs`, `(step, gradient change)` from an earlier fit of a similar
    objective, start the quasi-Newton model.

    Returns:
        The minimiser and the last `memory` pairs.
    """
    f, g = objective(x)
    pairs = [(s, y) for s, y in pairs if _dot(s, y) > 0][-memory:]
    steps, changes = [s for s, _ in pairs], [y for _, y in pairs]
    decrease = math.inf
    for _ in range(max_iterations):
        if np.max(np.abs(g)) <= LBFGS_GTOL:
            break
        direction = -_two_loop(g, steps, changes)
        slope = _dot(g, direction)
        if not slope < 0:
            steps, changes = [], []
            direction, slope = -g, -_dot(g, g)
        tolerance = ftol * max(1.0, abs(f))
        if decrease <= tolerance and -slope / 2 <= tolerance:
            break
        t = 1.0 if steps else min(1.0, 1.0 / np.max(np.abs(g)))
        # Backtracking ends where the step's first-order decrease falls below
        # the tolerance: the float32 passes cannot resolve it any more.
        while -t * slope > tolerance:
            f_new, g_new = objective(x + t * direction)
            if f_new <= f + _ARMIJO * t * slope:
                break
            t /= 2
        else:
            break  # No decrease within the precision of the objective.
        step, change = t * direction, g_new - g
        if _dot(step, change) > 1e-12 * _dot(change, change):
            steps, changes = (steps + [step])[-memory:], (changes + [change])[-memory:]
        decrease = f - f_new
        x, f, g = x + step, f_new, g_new
    return x, list(zip(steps, changes, strict=True))


def _two_loop(gradient, steps, changes):
    """The L-BFGS approximation of the inverse Hessian times `gradient`."""
    q = gradient.copy()
    alphas = []
    for s, y in zip(reversed(steps), reversed(changes), strict=True):
        alpha = _dot(s, q) / _dot(s, y)
        q -= alpha * y
        alphas.append(alpha)
    if steps:
        q *= _dot(steps[-1], changes[-1]) / _dot(changes[-1], changes[-1])
    for (s, y), alpha in zip(
        zip(steps, changes, strict=True), reversed(alphas), strict=True
    ):
        beta = _dot(y, q) / _dot(s, y)
        q += (alpha - beta) * s
    return q


def _dot(a, b):
    # Not `a @ b`: BLAS's threads, spinning on a busy machine, can make a
    # 10^4-element dot product take tens of milliseconds.
    return float(np.einsum("i,i->", a, b))


def _matmul(a, b):
    return np.einsum("ij,jk->ik", a, b)

"""Training and scoring one model the way the paper does."""

import math
import time

import keras
import numpy as np
from keras import ops

from benchmarks import models
from keras_label_relax import ConfidencePenalty
from keras_label_relax import ExpectedCalibrationError
from keras_label_relax import FocalLoss
from keras_label_relax import LabelRelaxation
from keras_label_relax import LabelSmoothing

_LOSS_CLASSES = {
    "ls": LabelSmoothing,
    "cp": ConfidencePenalty,
    "fl": FocalLoss,
    "lr": LabelRelaxation,
}
_EVAL_BATCH_SIZE = 1024


def make_loss(loss, value=None):
    """The paper's loss `loss` ("ce", "ls", "cp", "fl", "lr") on logits."""
    if loss == "ce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return _LOSS_CLASSES[loss](value, from_logits=True)


@keras.saving.register_keras_serializable(package="benchmarks")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate times `factor` after each boundary step.

    With `decay > 0` the rate is further divided by `1 + decay * step`, as the
    old Keras `SGD(decay=...)` of the authors' code did.
    """

    def __init__(self, initial_learning_rate, boundaries, factor, decay=0.0):
        self.initial_learning_rate = float(initial_learning_rate)
        self.boundaries = [int(step) for step in boundaries]
        self.factor = float(factor)
        self.decay = float(decay)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = ops.convert_to_tensor(self.initial_learning_rate, "float32")
        for boundary in self.boundaries:
            rate = ops.where(step >= boundary, rate * self.factor, rate)
        if self.decay:
            rate = rate / (1.0 + self.decay * step)
        return rate

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "boundaries": self.boundaries,
            "factor": self.factor,
            "decay": self.decay,
        }


def brier_score(y_true, y_pred):
    """Multi-class Brier score of logits: sum_k (p_k - [y = k])^2."""
    probs = ops.softmax(y_pred, axis=-1)
    labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=probs.dtype)
    return ops.sum(ops.square(probs - one_hot), axis=-1)


def make_metrics():
    """Accuracy, 15-bin ECE, NLL and Brier score, all on logits."""
    return [
        keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
        ExpectedCalibrationError(from_logits=True, name="ece"),
        keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="nll"),
        keras.metrics.MeanMetricWrapper(brier_score, name="brier"),
    ]


METRIC_NAMES = ("accuracy", "ece", "nll", "brier")


def score_logits(logits, labels):
    """The metrics of `make_metrics()` for predicted logits, as floats."""
    scores = {}
    logits = ops.convert_to_tensor(np.asarray(logits, "float32"))
    labels = ops.convert_to_tensor(np.asarray(labels, "int32"))
    for metric in make_metrics():
        metric.update_state(labels, logits)
        scores[metric.name] = float(ops.convert_to_numpy(metric.result()))
    return scores


def true_calibration_error(logits, true_probs, num_bins=15):
    """Top-label calibration error against the true class probabilities.

    With c(x) the predicted confidence max_k p_hat(k|x) and y_hat(x) its
    class, the confidences are put in `num_bins` equal-width bins (lo, hi]
    (as `ExpectedCalibrationError` bins them), and each bin b adds
    |mean p*(y_hat|x) - mean c(x)| over its points, weighted by its share of
    the points. It is the binned ECE with the correctness of each prediction
    replaced by its true probability p*(y_hat|x), so the label noise of the
    test labels does not enter; it needs the true class probabilities p*
    (the synthetic task). A predictor whose confidence equals its true
    accuracy on every bin scores 0, however sharp it is.

    Args:
        logits: predicted logits, shape `(n, num_classes)`.
        true_probs: the true class probabilities, the same shape.
        num_bins: number of equal-width confidence bins, an integer >= 1.

    Returns:
        The error as a Python float.
    """
    is_integer = isinstance(num_bins, (int, np.integer)) and not isinstance(
        num_bins, bool
    )
    if not is_integer or num_bins < 1:
        raise ValueError(
            "Invalid value for argument `num_bins`: expected an integer >= 1. "
            f"Received: num_bins={num_bins!r}"
        )
    probs = _softmax(np.asarray(logits, np.float64))
    true_probs = np.asarray(true_probs, np.float64)
    if true_probs.shape != probs.shape or probs.ndim != 2:
        raise ValueError(
            "Invalid value for argument `true_probs`: expected the shape of "
            f"`logits`, (n, num_classes) = {probs.shape}. "
            f"Received: true_probs.shape={true_probs.shape}"
        )
    top = np.argmax(probs, axis=-1)
    rows = np.arange(len(top))
    confidence = probs[rows, top]
    bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    gaps = np.bincount(bins, true_probs[rows, top] - confidence, minlength=num_bins)
    return float(np.abs(gaps).sum() / max(len(top), 1))


def _softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def input_arrays(config, train, *others):
    """Model inputs: the training part's pixel mean subtracted where the
    protocol does so (CIFAR)."""
    if not config.subtract_mean:
        return (train.x, *(other.x for other in others))
    from benchmarks import data

    return data.subtract_pixel_mean(train.x, *(other.x for other in others))


class ShuffledBatches(keras.utils.PyDataset):
    """Full batches of `(x, y)` in a new random order each epoch.

    Each epoch drops the `len(x) % batch_size` examples that would form a
    smaller last batch (different ones each epoch). On the small datasets of
    the quick profile, that smaller batch would make JAX compile the training
    step a second time, which costs as much as the training itself.
    """

    def __init__(self, x, y, batch_size, seed):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, index):
        batch = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[batch], self.y[batch]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.x))


def train_model(config, train_x, train_y, num_classes, loss, value, seed, verbose):
    """Builds, compiles and trains one model; returns it and the seconds taken."""
    start = time.perf_counter()
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = models.build_model(
        config.model,
        train_x.shape[1:],
        num_classes,
        augment=config.augment,
        seed=seed,
    )
    if config.full_batches:
        steps_per_epoch = len(train_x) // config.batch_size
    else:
        steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    schedule = StepDecay(
        config.learning_rate,
        [drop * steps_per_epoch for drop in config.drops],
        config.drop_factor,
        config.legacy_decay,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
        loss=make_loss(loss, value),
        metrics=["accuracy", ExpectedCalibrationError(from_logits=True)],
    )
    verbose = 1 if verbose else 0
    if config.full_batches:
        batches = ShuffledBatches(train_x, train_y, config.batch_size, seed)
        model.fit(batches, epochs=config.epochs, verbose=verbose)
    else:
        model.fit(
            train_x,
            train_y,
            batch_size=config.batch_size,
            epochs=config.epochs,
            shuffle=True,
            verbose=verbose,
        )
    return model, time.perf_counter() - start


def predict_logits(model, x):
    """The model's logits for `x`, in inference mode.

    Direct calls in batches rather than `Model.predict`, which would compile
    a prediction function per model: on the small quick-profile models that
    compilation costs more than the prediction itself.
    """
    batches = [
        ops.convert_to_numpy(model(x[start : start + _EVAL_BATCH_SIZE], training=False))
        for start in range(0, len(x), _EVAL_BATCH_SIZE)
    ]
    return np.concatenate(batches).astype(np.float32)

"""Training and scoring models the way the paper does.

`SequentialTrainer` trains one Keras model at a time with `Model.fit`, on any
backend; `benchmarks.population.PopulationTrainer` (JAX) trains many at once.
Both draw the same initial weights, batches and losses from here.
"""

import contextlib
import functools
import sys
import time

import keras
import numpy as np
from keras import ops

from benchmarks import data
from benchmarks import models
from benchmarks import plan
from benchmarks import protocol
from keras_label_relax import ExpectedCalibrationError
from keras_label_relax import losses as library_losses
from keras_label_relax import metrics as library_metrics

_EVAL_BATCH_SIZE = 1024


def loss_function(loss, config):
    """`fn(y_true, logits, value) -> per-sample losses` for the loss key.

    The value may be a Python number or a (traced, vmapped) scalar tensor.
    """
    if loss == "cp" and config.paper_cp_sign:
        return paper_confidence_penalty
    spec = protocol.LOSS_SPECS[loss]
    if spec.function is None:
        return _cross_entropy
    function = getattr(library_losses, spec.function)
    if not spec.param:
        return lambda y_true, logits, value: function(y_true, logits, from_logits=True)
    options = _fixed_options(loss)
    return lambda y_true, logits, value: function(
        y_true, logits, value, from_logits=True, **options
    )


def _cross_entropy(y_true, logits, value=None):
    return ops.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


def paper_confidence_penalty(y_true, logits, beta):
    """`CE + beta * H(p)`: the sign of the paper's eq. (2) and code, which
    rewards confidence. Benchmark-only (`--protocol authors-code`); the
    library's `ConfidencePenalty` subtracts the entropy, as Pereyra et al."""
    log_p = ops.log_softmax(logits, axis=-1)
    entropy = -ops.sum(ops.exp(log_p) * log_p, axis=-1)
    return _cross_entropy(y_true, logits) + beta * entropy


def make_loss(loss, value, config):
    """The Keras loss object that `Model.fit` trains `loss` with."""
    if loss == "ce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if loss == "cp" and config.paper_cp_sign:
        return keras.losses.LossFunctionWrapper(
            paper_confidence_penalty, beta=value, name="paper_confidence_penalty"
        )
    spec = protocol.LOSS_SPECS[loss]
    class_name = "".join(part.title() for part in spec.function.split("_"))
    loss_class = getattr(library_losses, class_name)
    if not spec.param:
        return loss_class(from_logits=True)
    return loss_class(**{spec.param: value}, from_logits=True, **_fixed_options(loss))


def _fixed_options(loss):
    """Arguments the protocol fixes rather than searches: MbLS's weight."""
    return {"weight": protocol.MBLS_WEIGHT} if loss == "mbls" else {}


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


METRIC_NAMES = ("accuracy", "ece", "nll", "brier", "classwise_ece")
# Scored arrays are padded (with weight 0) to a power of two at least this
# long, so that a compiled scorer serves many sizes: every part of the quick
# profile (at most 1,429 examples) is scored by one program, where 256 compiled
# it for 512 and 2,048 rows, seconds each, and scoring 2,048 rows takes far less.
_MIN_SCORED = 2048


def score_logits(logits, labels):
    """Accuracy, 15-bin ECE, NLL, Brier score and classwise ECE of predicted
    logits, as floats.

    On JAX the scores come from one compiled function per padded size:
    op by op, eager JAX compiles every operation again for every new array
    shape, which cost more than the trainings of the quick profile.
    """
    logits = np.asarray(logits, "float32")
    labels = np.asarray(labels, "int32")
    weight = np.ones(len(labels), "float32")
    if keras.backend.backend() == "jax":
        size = max(_MIN_SCORED, 1 << max(len(labels) - 1, 0).bit_length())
        padding = size - len(labels)
        logits = np.pad(logits, ((0, padding), (0, 0)))
        labels, weight = np.pad(labels, (0, padding)), np.pad(weight, (0, padding))
    scores = _scorer()(
        ops.convert_to_tensor(labels),
        ops.convert_to_tensor(logits),
        ops.convert_to_tensor(weight),
    )
    return {name: float(ops.convert_to_numpy(scores[name])) for name in METRIC_NAMES}


def _scores(labels, logits, weight):
    total = ops.sum(weight)
    predicted = ops.argmax(logits, axis=-1)
    correct = ops.cast(ops.equal(predicted, labels), weight.dtype)
    nll = keras.losses.sparse_categorical_crossentropy(labels, logits, True)
    common = {"from_logits": True, "sample_weight": weight, "validate_args": False}
    return {
        "accuracy": ops.sum(correct * weight) / total,
        "ece": library_metrics.expected_calibration_error(labels, logits, **common),
        "nll": ops.sum(nll * weight) / total,
        "brier": library_metrics.brier_score(labels, logits, **common),
        "classwise_ece": library_metrics.classwise_calibration_error(
            labels, logits, **common
        ),
    }


def _scorer():
    if keras.backend.backend() != "jax":
        return _scores
    return _jitted_scores()


@functools.cache
def _jitted_scores():
    import jax

    return jax.jit(_scores)


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


def input_arrays(config, train_x, *others):
    """Model inputs: the training part's pixel mean subtracted where the
    protocol does so."""
    if not config.subtract_mean:
        return (train_x, *others)
    return data.subtract_pixel_mean(train_x, *others)


def steps_per_epoch(num_examples, config):
    if config.full_batches:
        return num_examples // config.batch_size
    return -(-num_examples // config.batch_size)


def schedule(config, num_examples):
    return StepDecay(
        config.learning_rate,
        [drop * steps_per_epoch(num_examples, config) for drop in config.drops],
        config.drop_factor,
        config.legacy_decay,
    )


def make_optimizer(config, num_examples):
    return keras.optimizers.SGD(
        schedule(config, num_examples), momentum=protocol.MOMENTUM, nesterov=True
    )


def initial_model(config, input_shape, num_classes, seed):
    """The model a training with `seed` starts from: the same weights
    whichever trainer trains it."""
    # Without the garbage collection `clear_session` would run: it takes
    # seconds once a run holds many models, and the weights do not depend
    # on it.
    keras.backend.clear_session(free_memory=False)
    with _tensorflow_left_unimported():
        keras.utils.set_random_seed(seed)
    return models.build_model(
        config.model,
        input_shape,
        num_classes,
        augment=config.augment,
        seed=seed,
        output_l2=config.resnet_output_l2,
    )


@contextlib.contextmanager
def _tensorflow_left_unimported():
    """`keras.utils.set_random_seed` imports TensorFlow to seed it too, which
    takes seconds; on another backend, in a process that has not imported it,
    nothing uses TensorFlow's seed, so it is left unimported."""
    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        yield
        return
    from keras.src.utils import module_utils

    lazy = module_utils.tensorflow
    available = lazy._available
    lazy._available = False
    try:
        yield
    finally:
        lazy._available = available


def batch_orders(config, num_examples, seed):
    return plan.batch_orders(
        num_examples, config.batch_size, seed, config.epochs, config.full_batches
    )


class ShuffledBatches(keras.utils.PyDataset):
    """The batches of `(x, y)` of all epochs, in the order `plan.batch_orders`
    draws them, as one long epoch.

    One long epoch, because when Keras calls `on_epoch_end` is not something
    to build an order on (it peeks at a batch before the first epoch). With
    full batches, each epoch drops the `len(x) % batch_size` examples that
    would form a smaller last batch (different ones each epoch). On the
    small datasets of the quick profile, that smaller batch would make JAX
    compile the training step a second time, which costs as much as the
    training itself.
    """

    def __init__(self, x, y, orders):
        super().__init__()
        self.x, self.y = x, y
        self.batches = [batch for epoch in orders for batch in epoch]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        batch = self.batches[index]
        return self.x[batch], self.y[batch]


def train_model(config, train_x, train_y, num_classes, loss, value, seed, verbose):
    """Builds, compiles and trains one model; returns it and the seconds taken."""
    start = time.perf_counter()
    model = initial_model(config, train_x.shape[1:], num_classes, seed)
    model.compile(
        optimizer=make_optimizer(config, len(train_x)),
        loss=make_loss(loss, value, config),
        metrics=["accuracy", ExpectedCalibrationError(from_logits=True)],
    )
    batches = ShuffledBatches(
        train_x, train_y, batch_orders(config, len(train_x), seed)
    )
    # `shuffle=False`: Keras would otherwise shuffle the order of the batches.
    model.fit(batches, epochs=1, shuffle=False, verbose=1 if verbose else 0)
    return model, time.perf_counter() - start


class SequentialTrainer:
    """Trains the planned trainings one after another with `Model.fit`."""

    name = "sequential"

    def __init__(self, config, verbose=False):
        self.config = config
        self.verbose = verbose

    def groups(self, trainings):
        return [[training] for training in trainings]

    def train(self, group, splits):
        """Trains `group` (one training); returns `[(logits, seconds)]` with
        `logits` a dict of the evaluation parts' logits."""
        (training,) = group
        split = splits[(training.dataset, training.seed)]
        inputs = input_arrays(
            self.config,
            split.dataset.x[split.parts[training.train_part]],
            *(split.dataset.x[split.parts[part]] for part in training.eval_parts),
        )
        model, seconds = train_model(
            self.config,
            inputs[0],
            split.labels(training.train_part),
            split.dataset.num_classes,
            training.loss,
            training.value,
            training.seed,
            self.verbose,
        )
        logits = {
            part: predict_logits(model, x)
            for part, x in zip(training.eval_parts, inputs[1:], strict=True)
        }
        return [(logits, seconds)]


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

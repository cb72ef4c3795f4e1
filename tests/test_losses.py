"""The four losses against independent float64 references, on every backend."""

import re

import keras
import numpy as np
import pytest
import references
from autodiff import value_and_gradient
from keras import ops

from keras_label_relax import ConfidencePenalty
from keras_label_relax import FocalLoss
from keras_label_relax import LabelRelaxation
from keras_label_relax import LabelSmoothing
from keras_label_relax import losses as losses_module

LOSSES = {
    "lr": (LabelRelaxation, "alpha", references.label_relaxation),
    "ls": (LabelSmoothing, "alpha", references.label_smoothing),
    "cp": (ConfidencePenalty, "beta", references.confidence_penalty),
    "fl": (FocalLoss, "gamma", references.focal_loss),
}
PARAMETERS = {
    "lr": [0.0, 0.01, 0.1, 0.4],
    "ls": [0.0, 0.1, 0.4],
    "cp": [0.0, 0.5, 8.0],
    "fl": [0.0, 0.1, 0.5, 2.0, 5.0],
}
CASES = [(key, value) for key, values in PARAMETERS.items() for value in values]
CASE_IDS = [f"{key}-{value}" for key, value in CASES]
NUM_CLASSES = 7


def make_loss(key, value, **kwargs):
    cls, argument, _ = LOSSES[key]
    return cls(**{argument: value}, **kwargs)


def reference(key, value, y_true, y_pred, from_logits):
    return LOSSES[key][2](y_true, y_pred, value, from_logits)


def random_logits(rng, batch=32, num_classes=NUM_CLASSES, scale=3.0):
    return (scale * rng.standard_normal((batch, num_classes))).astype("float32")


def large_logits(rng, batch=32, num_classes=NUM_CLASSES):
    """Logits of +-1e4: ties at the top plus O(1) differences, and pure +-1e4."""
    signs = rng.choice([-1.0, 0.0, 1.0], size=(batch, num_classes))
    logits = 1e4 * signs + rng.standard_normal((batch, num_classes))
    logits[: batch // 4] = 1e4 * rng.choice([-1.0, 1.0], (batch // 4, num_classes))
    return logits.astype("float32")


def extreme_probabilities(rng, batch=32, num_classes=NUM_CLASSES):
    """Exact one-hot predictions (right and wrong) plus rows with exact zeros."""
    probabilities = rng.dirichlet(np.ones(num_classes), size=batch)
    probabilities[: batch // 2] = np.eye(num_classes)[
        rng.integers(0, num_classes, batch // 2)
    ]
    probabilities[batch // 2 :, 0] = 0.0
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    return probabilities.astype("float32")


def labels(rng, batch=32, num_classes=NUM_CLASSES):
    return rng.integers(0, num_classes, batch)


def assert_close(actual, expected, rtol=1e-5, atol=2e-5):
    np.testing.assert_allclose(
        ops.convert_to_numpy(actual),
        ops.convert_to_numpy(expected),
        rtol=rtol,
        atol=atol,
    )


INPUTS = {
    "random-logits": (random_logits, True),
    "large-logits": (large_logits, True),
    "random-probabilities": (
        lambda rng: rng.dirichlet(np.ones(NUM_CLASSES), 32).astype("float32"),
        False,
    ),
    "extreme-probabilities": (extreme_probabilities, False),
}


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("key,value", CASES, ids=CASE_IDS)
def test_values_match_reference(key, value, inputs):
    rng = np.random.default_rng(0)
    make_inputs, from_logits = INPUTS[inputs]
    y_pred = make_inputs(rng)
    y_true = labels(rng)
    loss = make_loss(key, value, from_logits=from_logits, reduction=None)
    expected = reference(key, value, y_true, y_pred, from_logits)
    assert_close(loss(y_true, y_pred), expected)
    one_hot = np.eye(NUM_CLASSES, dtype="float32")[y_true]
    assert_close(loss(one_hot, y_pred), expected)
    assert_close(loss(y_true[:, None], y_pred), expected)


@pytest.mark.parametrize(
    "inputs", ["random-logits", "large-logits", "random-probabilities"]
)
@pytest.mark.parametrize("key,value", CASES, ids=CASE_IDS)
def test_gradients_match_reference(key, value, inputs):
    rng = np.random.default_rng(1)
    make_inputs, from_logits = INPUTS[inputs]
    y_pred = make_inputs(rng)[:8]
    y_true = labels(rng, batch=8)
    loss = make_loss(key, value, from_logits=from_logits, reduction="sum")
    value_, gradient = value_and_gradient(lambda z: loss(y_true, z), y_pred)
    assert np.all(np.isfinite(gradient))

    def reference_total(z):
        return reference(key, value, y_true, z, from_logits).sum()

    expected = references.numeric_gradient(reference_total, y_pred.astype("float64"))
    np.testing.assert_allclose(value_, reference_total(y_pred), rtol=1e-5)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key,value", [("lr", 0.1), ("fl", 2.0)])
def test_large_logits_run_op_by_op_on_tensorflow(key, value, monkeypatch):
    # Eager TensorFlow runs these losses op by op from a size on (on its
    # fused cross-entropy op); every input is that large here.
    monkeypatch.setattr(losses_module, "_OP_BY_OP_FROM_ENTRIES", 1)
    test_gradients_match_reference(key, value, "large-logits")
    test_values_match_reference(key, value, "random-logits")


@pytest.mark.parametrize(
    "key,value", [("lr", 0.1), ("ls", 0.1), ("cp", 0.5), ("fl", 2.0)]
)
def test_torch_softmax_kernels_match_reference(key, value, monkeypatch):
    # Eager PyTorch takes log p_y from the softmax from a number of classes
    # on (these tests' 7 classes take the log-softmax); every input does here.
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's kernels")
    monkeypatch.setattr(losses_module, "_SOFTMAX_FROM_CLASSES", 1)
    test_values_match_reference(key, value, "large-logits")
    test_gradients_match_reference(key, value, "large-logits")
    test_gradients_match_reference(key, value, "random-logits")


@pytest.mark.parametrize("key,value", CASES, ids=CASE_IDS)
def test_gradients_wrt_probabilities_are_finite_at_0_and_1(key, value):
    rng = np.random.default_rng(2)
    y_pred = extreme_probabilities(rng, batch=8)
    y_true = labels(rng, batch=8)
    loss = make_loss(key, value, reduction="sum")
    _, gradient = value_and_gradient(lambda p: loss(y_true, p), y_pred)
    assert np.all(np.isfinite(gradient))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("key,value", CASES, ids=CASE_IDS)
def test_half_precision_inputs_are_computed_in_float32(key, value, dtype):
    rng = np.random.default_rng(3)
    logits = np.concatenate([random_logits(rng, 8), large_logits(rng, 8)])
    y_true = labels(rng, 16)
    half = ops.cast(logits, dtype)
    rounded = ops.convert_to_numpy(ops.cast(half, "float32")).astype("float64")
    loss = make_loss(key, value, from_logits=True, reduction=None)
    expected = reference(key, value, y_true, rounded, True)
    assert_close(loss(y_true, half), expected)
    _, gradient = value_and_gradient(
        lambda z: ops.sum(loss(y_true, ops.cast(z, dtype))), logits
    )
    assert np.all(np.isfinite(gradient))


@pytest.mark.parametrize(
    "reduction", ["sum", "sum_over_batch_size", "mean", "mean_with_sample_weight", None]
)
@pytest.mark.parametrize("key", LOSSES)
def test_reductions_with_sample_weights(key, reduction):
    rng = np.random.default_rng(4)
    value = PARAMETERS[key][1]
    y_pred, y_true = random_logits(rng, 16), labels(rng, 16)
    weights = rng.uniform(0, 2, 16).astype("float32")
    loss = make_loss(key, value, from_logits=True, reduction=reduction)
    per_sample = reference(key, value, y_true, y_pred, True)
    for sample_weight in (None, weights):
        expected = references.reduce(per_sample, sample_weight, reduction)
        assert_close(loss(y_true, y_pred, sample_weight=sample_weight), expected)


@pytest.mark.parametrize("key", LOSSES)
def test_per_timestep_labels(key):
    rng = np.random.default_rng(5)
    value = PARAMETERS[key][1]
    y_pred = (3 * rng.standard_normal((4, 5, NUM_CLASSES))).astype("float32")
    y_true = rng.integers(0, NUM_CLASSES, (4, 5))
    loss = make_loss(key, value, from_logits=True, reduction=None)
    expected = reference(key, value, y_true, y_pred, True)
    assert tuple(loss(y_true, y_pred).shape) == (4, 5)
    assert_close(loss(y_true, y_pred), expected)
    assert_close(loss(y_true[..., None], y_pred), expected)


@pytest.mark.parametrize("key", ["ls", "cp", "fl"])
def test_soft_labels_generalise_cross_entropy(key):
    rng = np.random.default_rng(6)
    value = PARAMETERS[key][1]
    y_pred = random_logits(rng, 16)
    soft = rng.dirichlet(np.ones(NUM_CLASSES), 16).astype("float32")
    loss = make_loss(key, value, from_logits=True, reduction=None)
    assert_close(loss(soft, y_pred), reference(key, value, soft, y_pred, True))


def test_label_relaxation_takes_argmax_of_soft_labels():
    rng = np.random.default_rng(7)
    y_pred = random_logits(rng, 16)
    soft = rng.dirichlet(np.ones(NUM_CLASSES), 16).astype("float32")
    loss = LabelRelaxation(alpha=0.1, from_logits=True, reduction=None)
    # Soft labels and class ids run different kernels on some backends: the
    # same loss up to float32 rounding.
    assert_close(loss(soft, y_pred), loss(np.argmax(soft, -1), y_pred), 1e-6, 0)


@pytest.mark.parametrize("loss_dtype", ["float16", "bfloat16", "mixed_bfloat16"])
@pytest.mark.parametrize("key", LOSSES)
def test_large_class_ids_survive_half_precision_loss_dtype(key, loss_dtype):
    rng = np.random.default_rng(8)
    num_classes = 1000
    y_true = np.array([999, 513, 257, 1])
    y_pred = (3 * rng.standard_normal((4, num_classes))).astype("float32")
    y_pred[np.arange(4), y_true] += 20.0
    value = PARAMETERS[key][1]
    loss = make_loss(key, value, from_logits=True, reduction=None, dtype=loss_dtype)
    expected = reference(key, value, y_true, y_pred, True)
    for ids in (y_true, y_true.astype("float32")):
        result = loss(ids, y_pred)
        assert keras.backend.standardize_dtype(result.dtype) == loss.dtype
        assert_close(ops.cast(result, "float32"), expected, rtol=1e-2, atol=1e-3)


def test_label_relaxation_with_zero_alpha_is_cross_entropy():
    rng = np.random.default_rng(9)
    y_pred, y_true = random_logits(rng), labels(rng)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    relaxed = LabelRelaxation(alpha=0.0, from_logits=True)
    assert_close(relaxed(y_true, y_pred), expected(y_true, y_pred), 1e-6, 1e-6)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.4])
def test_label_relaxation_is_exactly_zero_inside_the_set(alpha):
    rng = np.random.default_rng(10)
    y_true = labels(rng, 64)
    probabilities = rng.dirichlet(np.ones(NUM_CLASSES) * 0.05, 64)
    logits = np.log(probabilities + 1e-12).astype("float32")
    p_observed = references.log_probabilities(logits, True)[np.arange(64), y_true]
    inside = np.exp(p_observed) >= 1 - alpha + 1e-4
    assert 0 < inside.sum() < 64
    loss = LabelRelaxation(alpha=alpha, from_logits=True, reduction=None)
    values = ops.convert_to_numpy(loss(y_true, logits))
    assert np.all(values[inside] == 0.0)
    assert np.all(values[~inside] >= 0.0)
    _, gradient = value_and_gradient(
        lambda z: ops.sum(loss(y_true, z)), logits.astype("float32")
    )
    assert np.all(gradient[inside] == 0.0)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.4])
def test_label_relaxation_gradient_is_p_minus_q(alpha):
    rng = np.random.default_rng(11)
    logits, y_true = random_logits(rng, 64), labels(rng, 64)
    p = np.exp(references.log_probabilities(logits, True))
    q = references.relaxed_target(y_true, p, alpha)
    outside = p[np.arange(64), y_true] < 1 - alpha
    expected = np.where(outside[:, None], p - q, 0.0)
    loss = LabelRelaxation(alpha=alpha, from_logits=True, reduction="sum")
    _, gradient = value_and_gradient(lambda z: loss(y_true, z), logits)
    np.testing.assert_allclose(gradient, expected, atol=1e-6)


def test_label_relaxation_matches_brute_force_minimisation():
    from scipy import optimize

    rng = np.random.default_rng(12)
    num_classes, alpha = 4, 0.2
    loss = LabelRelaxation(alpha=alpha, from_logits=False, reduction=None)
    for _ in range(20):
        p = rng.dirichlet(np.ones(num_classes))
        observed = int(rng.integers(num_classes))
        others = np.arange(num_classes) != observed

        def kl(q, p=p):
            return np.sum(q * (np.log(q) - np.log(p)))

        start = np.full(num_classes, alpha / (num_classes - 1))
        start[observed] = 1 - alpha
        result = optimize.minimize(
            kl,
            start,
            method="SLSQP",
            bounds=[(1e-12, 1.0)] * num_classes,
            constraints=[
                {"type": "eq", "fun": lambda q: q.sum() - 1.0},
                {"type": "ineq", "fun": lambda q, o=others: alpha - q[o].sum()},
            ],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        brute_force = max(result.fun, 0.0)
        closed_form = loss(np.array([observed]), p[None].astype("float64"))
        assert abs(float(ops.convert_to_numpy(closed_form)[0]) - brute_force) < 1e-6


def test_focal_gradient_is_finite_for_small_gamma_at_certainty():
    logits = np.array([[30.0, -30.0, -30.0], [1e4, -1e4, 0.0]], dtype="float32")
    for from_logits, y_pred in ((True, logits), (False, np.eye(3)[[0, 0]])):
        loss = FocalLoss(gamma=0.1, from_logits=from_logits, reduction="sum")
        value, gradient = value_and_gradient(
            lambda z, loss=loss: loss([0, 0], z), y_pred.astype("float32")
        )
        assert np.isfinite(value) and np.all(np.isfinite(gradient))
        assert value == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("key", LOSSES)
def test_mismatched_shapes_raise(key):
    loss = make_loss(key, PARAMETERS[key][1])
    with pytest.raises(ValueError, match=r"y_true.shape=\(4, 3\).*y_pred.shape"):
        loss(np.zeros((4, 3)), np.full((4, 5), 0.2))
    with pytest.raises(ValueError, match="y_true.shape"):
        loss(np.zeros((4, 2, 2)), np.full((4, 5), 0.2))


@pytest.mark.parametrize(
    "cls,argument,bad",
    [
        (LabelRelaxation, "alpha", [-0.1, 1.0, 1.5, float("nan"), "0.1", None, True]),
        (LabelSmoothing, "alpha", [-0.1, 1.0, float("inf"), "x", [0.1]]),
        (ConfidencePenalty, "beta", [-1.0, float("nan"), "1"]),
        (FocalLoss, "gamma", [-0.5, float("nan"), None]),
    ],
)
def test_bad_parameters_raise_naming_argument_and_value(cls, argument, bad):
    for value in bad:
        with pytest.raises(ValueError, match=re.escape(f"{argument}={value!r}")):
            cls(**{argument: value})
    with pytest.raises(ValueError, match="from_logits"):
        cls(from_logits="yes")
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="average")

"""FLSD, dual focal, MbLS and Poly-1 against independent float64 references."""

import re

import keras
import numpy as np
import pytest
import references
from autodiff import value_and_gradient
from keras import ops
from test_losses import NUM_CLASSES
from test_losses import assert_close
from test_losses import extreme_probabilities
from test_losses import labels
from test_losses import large_logits
from test_losses import random_logits

from keras_label_relax import DualFocalLoss
from keras_label_relax import MarginLabelSmoothing
from keras_label_relax import PolyLoss
from keras_label_relax import SampleDependentFocalLoss
from keras_label_relax import losses as losses_module

# key: (class, keyword arguments, reference taking the same keywords)
CASES = {
    "flsd-53": (SampleDependentFocalLoss, {}, "flsd"),
    "flsd-3bins": (
        SampleDependentFocalLoss,
        {"thresholds": (0.2, 0.5), "gammas": (5.0, 3.0, 0.5)},
        "flsd",
    ),
    "dfl-0": (DualFocalLoss, {"gamma": 0.0}, "dfl"),
    "dfl-0.5": (DualFocalLoss, {"gamma": 0.5}, "dfl"),
    "dfl-4": (DualFocalLoss, {"gamma": 4.0}, "dfl"),
    "mbls-10": (MarginLabelSmoothing, {"margin": 10.0, "weight": 0.1}, "mbls"),
    "mbls-2": (MarginLabelSmoothing, {"margin": 2.0, "weight": 1.5}, "mbls"),
    "poly-1": (PolyLoss, {"epsilon": 1.0}, "poly"),
    "poly--1": (PolyLoss, {"epsilon": -1.0}, "poly"),
    "poly-8": (PolyLoss, {"epsilon": 8.0}, "poly"),
}
DEFAULTS = {"flsd": {"thresholds": (0.2,), "gammas": (5.0, 3.0)}}
REFERENCES = {
    "flsd": references.sample_dependent_focal_loss,
    "dfl": references.dual_focal_loss,
    "mbls": references.margin_label_smoothing,
    "poly": references.poly_loss,
}


def make(case, **kwargs):
    cls, arguments, _ = CASES[case]
    return cls(**arguments, **kwargs)


def reference(case, y_true, y_pred, from_logits):
    _, arguments, kind = CASES[case]
    arguments = {**DEFAULTS.get(kind, {}), **arguments}
    return REFERENCES[kind](y_true, y_pred, **arguments, from_logits=from_logits)


def logits_only(case):
    return CASES[case][2] == "mbls"


def untied_large_logits(rng, batch=8):
    """+-1e4 plus distinct O(1) parts: no ties, so the loss is differentiable."""
    signs = rng.choice([-1.0, 0.0, 1.0], size=(batch, NUM_CLASSES))
    return (1e4 * signs + rng.standard_normal((batch, NUM_CLASSES))).astype("float32")


def probabilities(rng, batch=32):
    return rng.dirichlet(np.ones(NUM_CLASSES), batch).astype("float32")


INPUTS = {
    "random-logits": (random_logits, True),
    "large-logits": (large_logits, True),
    "random-probabilities": (probabilities, False),
    "extreme-probabilities": (extreme_probabilities, False),
}


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("case", CASES)
def test_values_match_reference(case, inputs):
    make_inputs, from_logits = INPUTS[inputs]
    if logits_only(case) and not from_logits:
        pytest.skip("MbLS is defined on logits only")
    rng = np.random.default_rng(0)
    y_pred, y_true = make_inputs(rng), labels(rng)
    loss = make(case, from_logits=from_logits, reduction=None)
    expected = reference(case, y_true, y_pred, from_logits)
    assert_close(loss(y_true, y_pred), expected)
    one_hot = np.eye(NUM_CLASSES, dtype="float32")[y_true]
    assert_close(loss(one_hot, y_pred), expected)
    assert_close(loss(y_true[:, None], y_pred), expected)


GRADIENT_INPUTS = {
    "random-logits": (lambda rng: random_logits(rng, 8), True),
    "large-logits": (untied_large_logits, True),
    "random-probabilities": (lambda rng: probabilities(rng, 8), False),
}


@pytest.mark.parametrize("inputs", GRADIENT_INPUTS)
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_reference(case, inputs):
    make_inputs, from_logits = GRADIENT_INPUTS[inputs]
    if logits_only(case) and not from_logits:
        pytest.skip("MbLS is defined on logits only")
    rng = np.random.default_rng(1)
    y_pred, y_true = make_inputs(rng), labels(rng, 8)
    loss = make(case, from_logits=from_logits, reduction="sum")
    value, gradient = value_and_gradient(lambda z: loss(y_true, z), y_pred)
    assert np.all(np.isfinite(gradient))

    def total(z):
        return reference(case, y_true, z, from_logits).sum()

    expected = references.numeric_gradient(total, y_pred.astype("float64"))
    np.testing.assert_allclose(value, total(y_pred), rtol=1e-5)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [case for case in CASES if not logits_only(case)])
def test_gradients_wrt_probabilities_are_finite_at_0_and_1(case):
    rng = np.random.default_rng(2)
    y_pred, y_true = extreme_probabilities(rng, 8), labels(rng, 8)
    loss = make(case, reduction="sum")
    value, gradient = value_and_gradient(lambda p: loss(y_true, p), y_pred)
    assert np.isfinite(value) and np.all(np.isfinite(gradient))


@pytest.mark.parametrize("case", CASES)
def test_gradients_are_finite_at_certainty_and_ties(case):
    logits = np.array(
        [[30.0, -30.0, -30.0], [1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [0.0, 0.0, 0.0]],
        dtype="float32",
    )
    loss = make(case, from_logits=True, reduction="sum")
    value, gradient = value_and_gradient(lambda z: loss([0, 0, 1, 2], z), logits)
    assert np.isfinite(value) and np.all(np.isfinite(gradient))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_half_precision_inputs_are_computed_in_float32(case, dtype):
    rng = np.random.default_rng(3)
    logits = np.concatenate([random_logits(rng, 8), large_logits(rng, 8)])
    y_true = labels(rng, 16)
    half = ops.cast(logits, dtype)
    rounded = ops.convert_to_numpy(ops.cast(half, "float32")).astype("float64")
    loss = make(case, from_logits=True, reduction=None)
    result = loss(y_true, half)
    assert keras.backend.standardize_dtype(result.dtype) == "float32"
    assert_close(result, reference(case, y_true, rounded, True))
    _, gradient = value_and_gradient(
        lambda z: ops.sum(loss(y_true, ops.cast(z, dtype))), logits
    )
    assert np.all(np.isfinite(gradient))


@pytest.mark.parametrize("case", ["flsd-53", "dfl-4", "mbls-2", "poly-1"])
def test_torch_softmax_kernels_match_reference(case, monkeypatch):
    # Eager PyTorch takes log p_y from the softmax from a number of classes
    # on (the tests' 7 classes take the log-softmax); every input does here.
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's kernels")
    monkeypatch.setattr(losses_module, "_SOFTMAX_FROM_CLASSES", 1)
    test_values_match_reference(case, "large-logits")
    test_gradients_match_reference(case, "large-logits")
    test_gradients_match_reference(case, "random-logits")


def test_dual_focal_ranks_on_the_inputs_not_on_rounded_probabilities():
    # Logits whose probabilities tie after rounding, a label tied at the top
    # and one tied with a signed zero: p_j comes from the next lower rank, 0
    # when there is none.
    logits = np.array(
        [
            [2.0, 2.0, 0.0],
            [2.0, 2.0, 2.0],
            [1.0, 1.0 + 1e-7, -3.0],
            [0.0, -0.0, -1.0],
            [-0.0, 0.0, -1.0],
        ],
        dtype="float32",
    )
    y_true = np.array([0, 1, 0, 0, 0])
    loss = DualFocalLoss(gamma=2.0, from_logits=True, reduction=None)
    p = np.exp(references.log_probabilities(logits, True))
    p_y = p[np.arange(5), y_true]
    p_j = np.array([p[0, 2], 0.0, p[2, 2], p[3, 2], p[4, 2]])
    expected = -((1 - p_y + p_j) ** 2) * np.log(p_y)
    assert_close(loss(y_true, logits), expected, rtol=1e-6, atol=1e-7)


def test_sample_dependent_focal_picks_gamma_by_bin():
    # p_y = 0.1 (gamma 5), 0.2 exactly (gamma 3: thresholds are inclusive).
    probabilities_ = np.array([[0.1, 0.9], [0.2, 0.8]], dtype="float64")
    loss = SampleDependentFocalLoss(reduction=None)
    expected = -(0.9**5) * np.log(0.1), -(0.8**3) * np.log(0.2)
    assert_close(loss([0, 0], probabilities_), expected, rtol=1e-6, atol=1e-7)


def test_sample_dependent_gamma_carries_no_gradient():
    logits = np.array([[0.0, 2.0, -1.0]], dtype="float32")
    loss = SampleDependentFocalLoss(from_logits=True, reduction="sum")
    _, gradient = value_and_gradient(lambda z: loss([0], z), logits)
    p = np.exp(references.log_probabilities(logits, True))[0]
    # d/dz of -(1 - p0)^g log p0 with g fixed = 5 (p0 < 0.2).
    g, p0 = 5.0, p[0]
    d_dp0 = g * (1 - p0) ** (g - 1) * np.log(p0) - (1 - p0) ** g / p0
    expected = d_dp0 * p0 * (np.eye(3)[0] - p)
    np.testing.assert_allclose(gradient[0], expected, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_soft_labels(case):
    rng = np.random.default_rng(6)
    y_pred = random_logits(rng, 16)
    soft = rng.dirichlet(np.ones(NUM_CLASSES), 16).astype("float32")
    loss = make(case, from_logits=True, reduction=None)
    if CASES[case][2] == "dfl":  # the argmax of the label, as LabelRelaxation
        expected = reference(case, np.argmax(soft, -1), y_pred, True)
    else:
        expected = reference(case, soft, y_pred, True)
    assert_close(loss(soft, y_pred), expected)


@pytest.mark.parametrize("case", CASES)
def test_reductions_and_per_timestep_labels(case):
    rng = np.random.default_rng(4)
    y_pred = (3 * rng.standard_normal((4, 5, NUM_CLASSES))).astype("float32")
    y_true = rng.integers(0, NUM_CLASSES, (4, 5))
    weights = rng.uniform(0, 2, (4, 5)).astype("float32")
    per_sample = reference(case, y_true, y_pred, True)
    for reduction in ("sum", "sum_over_batch_size", "mean_with_sample_weight", None):
        loss = make(case, from_logits=True, reduction=reduction)
        expected = references.reduce(per_sample, weights, reduction)
        assert_close(loss(y_true, y_pred, sample_weight=weights), expected)


@pytest.mark.parametrize("loss_dtype", ["bfloat16", "mixed_bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_large_class_ids_survive_half_precision_loss_dtype(case, loss_dtype):
    rng = np.random.default_rng(8)
    y_true = np.array([999, 513, 257, 1])
    y_pred = (3 * rng.standard_normal((4, 1000))).astype("float32")
    y_pred[np.arange(4), y_true] += 5.0
    loss = make(case, from_logits=True, reduction=None, dtype=loss_dtype)
    expected = reference(case, y_true, y_pred, True)
    result = loss(y_true, y_pred)
    assert keras.backend.standardize_dtype(result.dtype) == loss.dtype
    assert_close(ops.cast(result, "float32"), expected, rtol=1e-2, atol=1e-3)


def compiled(fn):
    """`fn` compiled as `fit` compiles a train step on the active backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    import torch

    return torch.compile(fn)


def test_compiled_values_and_gradients_match_reference():
    """One case per loss, weighted in one compiled function (one torch.compile).

    On PyTorch, this runs the hand-written gradients under `torch.compile`.
    """
    rng = np.random.default_rng(9)
    logits = np.concatenate([random_logits(rng, 8), untied_large_logits(rng, 8)])
    y_true = labels(rng, 16)
    cases = ["flsd-53", "dfl-4", "mbls-10", "poly-1"]
    losses = {case: make(case, from_logits=True, reduction="sum") for case in cases}

    def totals(z):
        return ops.stack([loss(y_true, z) for loss in losses.values()])

    weights = rng.uniform(0.5, 1.5, len(cases))

    def objective(z):
        return ops.sum(totals(z) * ops.convert_to_tensor(weights, "float32"))

    value, gradient = value_and_gradient(compiled(objective), logits)

    def reference_objective(z):
        return sum(
            w * reference(case, y_true, z, True).sum()
            for w, case in zip(weights, cases, strict=True)
        )

    np.testing.assert_allclose(value, reference_objective(logits), rtol=1e-5)
    expected_gradient = references.numeric_gradient(
        reference_objective, logits.astype("float64")
    )
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make_bad,match",
    [
        (lambda: SampleDependentFocalLoss(gammas=(5.0,)), "gammas=(5.0,)"),
        (lambda: SampleDependentFocalLoss((0.2,), (5.0, 3.0, 1.0)), "gammas="),
        (lambda: SampleDependentFocalLoss((0.5, 0.2), (1.0, 2.0, 3.0)), "thresh"),
        (lambda: SampleDependentFocalLoss((0.2, 0.2), (1.0, 2.0, 3.0)), "thresh"),
        (lambda: SampleDependentFocalLoss((0.0,), (1.0, 2.0)), "thresholds=(0.0,)"),
        (lambda: SampleDependentFocalLoss((1.0,), (1.0, 2.0)), "thresholds=(1.0,)"),
        (lambda: SampleDependentFocalLoss((0.2,), (5.0, -3.0)), "gammas=(5.0, -3.0)"),
        (lambda: SampleDependentFocalLoss(0.2, (5.0, 3.0)), "thresholds=0.2"),
        (lambda: SampleDependentFocalLoss((0.2,), (5.0, "3")), "gammas="),
        (lambda: DualFocalLoss(gamma=-1.0), "gamma=-1.0"),
        (lambda: DualFocalLoss(gamma=float("nan")), "gamma=nan"),
        (lambda: MarginLabelSmoothing(margin=-1.0), "margin=-1.0"),
        (lambda: MarginLabelSmoothing(weight=-0.1), "weight=-0.1"),
        (lambda: MarginLabelSmoothing(from_logits=False), "from_logits=False"),
        (lambda: PolyLoss(epsilon=-1.5), "epsilon=-1.5"),
        (lambda: PolyLoss(epsilon="1"), "epsilon='1'"),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(make_bad, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        make_bad()


def test_margin_label_smoothing_says_why_it_needs_logits():
    with pytest.raises(ValueError, match="logit"):
        MarginLabelSmoothing(from_logits=False)


@pytest.mark.parametrize("case", CASES)
def test_bad_shapes_and_flags_raise(case):
    loss = make(case)
    with pytest.raises(ValueError, match=r"y_true.shape=\(4, 3\)"):
        loss(np.zeros((4, 3)), np.full((4, 5), 0.2))
    with pytest.raises(ValueError, match="reduction"):
        make(case, reduction="average")

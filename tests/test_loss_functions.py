"""The loss functions: tensor hyper-parameters, jit and vmap, and float64."""

import contextlib
import re

import keras
import numpy as np
import pytest
import references
from autodiff import value_and_gradient
from keras import ops
from test_losses import NUM_CLASSES
from test_losses import assert_close
from test_losses import labels
from test_losses import random_logits

from keras_label_relax import losses

ON_JAX = keras.backend.backend() == "jax"
needs_jax = pytest.mark.skipif(not ON_JAX, reason="jax.jit / jax.vmap are JAX's")

# key: function, class, hyper-parameter name, reference, values to test, a
# value outside its range.
FUNCTIONS = {
    "lr": (
        losses.label_relaxation,
        losses.LabelRelaxation,
        "alpha",
        references.label_relaxation,
        [0.0, 0.1, 0.4],
        1.5,
    ),
    "ls": (
        losses.label_smoothing,
        losses.LabelSmoothing,
        "alpha",
        references.label_smoothing,
        [0.0, 0.1, 0.4],
        -0.1,
    ),
    "cp": (
        losses.confidence_penalty,
        losses.ConfidencePenalty,
        "beta",
        references.confidence_penalty,
        [0.0, 0.5, 2.0],
        -1.0,
    ),
    "fl": (
        losses.focal_loss,
        losses.FocalLoss,
        "gamma",
        references.focal_loss,
        [0.0, 0.5, 2.0],
        -1.0,
    ),
    "dfl": (
        losses.dual_focal_loss,
        losses.DualFocalLoss,
        "gamma",
        references.dual_focal_loss,
        [0.0, 0.5, 4.0],
        -1.0,
    ),
    "poly": (
        losses.poly_loss,
        losses.PolyLoss,
        "epsilon",
        references.poly_loss,
        [-1.0, 0.0, 2.0],
        -2.0,
    ),
}
CASES = [(key, value) for key, spec in FUNCTIONS.items() for value in spec[4]]
CASE_IDS = [f"{key}-{value}" for key, value in CASES]


def function_loss(key, y_true, y_pred, value, from_logits=True):
    return FUNCTIONS[key][0](y_true, y_pred, value, from_logits=from_logits)


def class_loss(key, value, **kwargs):
    _, cls, argument, *_ = FUNCTIONS[key]
    return cls(**{argument: value}, **kwargs)


def reference(key, y_true, y_pred, value, from_logits=True):
    return FUNCTIONS[key][3](y_true, y_pred, value, from_logits)


def tensor(value, dtype="float32"):
    return ops.convert_to_tensor(np.asarray(value, dtype=dtype))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("key,value", CASES, ids=CASE_IDS)
def test_function_with_number_or_tensor_matches_class_and_reference(
    key, value, from_logits
):
    rng = np.random.default_rng(0)
    y_pred, y_true = random_logits(rng, 16), labels(rng, 16)
    if not from_logits:
        y_pred = np.exp(references.log_probabilities(y_pred, True)).astype("float32")
    expected = reference(key, y_true, y_pred, value, from_logits)
    by_class = class_loss(key, value, from_logits=from_logits, reduction=None)
    assert_close(by_class(y_true, y_pred), expected)
    for hyper_parameter in (value, tensor(value), tensor(value, "float64")):
        result = function_loss(key, y_true, y_pred, hyper_parameter, from_logits)
        assert tuple(result.shape) == (16,)
        assert keras.backend.standardize_dtype(result.dtype) == "float32"
        assert_close(result, expected)


@pytest.mark.parametrize("key,value", CASES, ids=CASE_IDS)
def test_gradients_with_tensor_hyper_parameters_match_class(key, value):
    rng = np.random.default_rng(1)
    y_pred, y_true = random_logits(rng, 8), labels(rng, 8)
    by_class = class_loss(key, value, from_logits=True, reduction="sum")
    _, expected = value_and_gradient(lambda z: by_class(y_true, z), y_pred)
    _, gradient = value_and_gradient(
        lambda z: ops.sum(function_loss(key, y_true, z, tensor(value))), y_pred
    )
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-6)


def test_probability_clip_follows_the_epsilon_of_each_call():
    # TensorFlow (eager) and JAX run the losses as compiled functions cached
    # across calls: a later `keras.config.epsilon()` must still apply.
    default = keras.config.epsilon()
    try:
        for epsilon in (default, 1e-3, default):
            keras.config.set_epsilon(epsilon)
            result = losses.focal_loss([1], [[1.0, 0.0]], 0.0, from_logits=False)
            # p = (1, 0) is clipped to epsilon at the label.
            np.testing.assert_allclose(
                ops.convert_to_numpy(result), [-np.log(epsilon)], rtol=1e-5
            )
    finally:
        keras.config.set_epsilon(default)


@pytest.mark.parametrize("key", FUNCTIONS)
def test_tensor_outside_the_range_gives_nan(key):
    rng = np.random.default_rng(2)
    y_pred, y_true = random_logits(rng, 4), labels(rng, 4)
    bad = FUNCTIONS[key][5]
    result = ops.convert_to_numpy(function_loss(key, y_true, y_pred, tensor(bad)))
    assert np.all(np.isnan(result))


@pytest.mark.parametrize("key", FUNCTIONS)
def test_numbers_are_checked_like_the_classes(key):
    bad = FUNCTIONS[key][5]
    argument = FUNCTIONS[key][2]
    with pytest.raises(ValueError, match=re.escape(f"{argument}={bad!r}")):
        function_loss(key, [0], [[0.0, 1.0]], bad)


def test_margin_label_smoothing_function_takes_tensors_and_checks_numbers():
    rng = np.random.default_rng(3)
    y_pred = 6 * random_logits(rng, 8)
    y_true = labels(rng, 8)
    expected = references.margin_label_smoothing(y_true, y_pred, 4.0, 0.5)
    for margin, weight in ((4.0, 0.5), (tensor(4.0), tensor(0.5))):
        result = losses.margin_label_smoothing(y_true, y_pred, margin, weight)
        assert_close(result, expected)
    nan = losses.margin_label_smoothing(y_true, y_pred, tensor(-1.0), 0.5)
    assert np.all(np.isnan(ops.convert_to_numpy(nan)))
    with pytest.raises(ValueError, match=re.escape("weight=-0.5")):
        losses.margin_label_smoothing(y_true, y_pred, 4.0, -0.5)
    with pytest.raises(ValueError, match=re.escape("from_logits=False")):
        losses.margin_label_smoothing(y_true, y_pred, 4.0, 0.5, from_logits=False)


def test_sample_dependent_focal_function_takes_tensor_schedules():
    rng = np.random.default_rng(4)
    y_pred, y_true = random_logits(rng, 16), labels(rng, 16)
    thresholds, gammas = (0.2, 0.5), (5.0, 3.0, 1.0)
    expected = references.sample_dependent_focal_loss(
        y_true, y_pred, thresholds, gammas, True
    )
    result = losses.sample_dependent_focal_loss(
        y_true, y_pred, tensor(thresholds), tensor(gammas), from_logits=True
    )
    assert_close(result, expected)
    with pytest.raises(ValueError, match="thresholds"):
        losses.sample_dependent_focal_loss(y_true, y_pred, (0.5, 0.2), gammas)


@needs_jax
@pytest.mark.parametrize("key,value", CASES, ids=CASE_IDS)
def test_jit_traces_the_hyper_parameter(key, value):
    import jax

    rng = np.random.default_rng(5)
    y_pred, y_true = random_logits(rng, 8), labels(rng, 8)

    @jax.jit
    def step(z, hyper_parameter):
        return jax.value_and_grad(
            lambda z: ops.sum(function_loss(key, y_true, z, hyper_parameter))
        )(z)

    def total(z):
        return reference(key, y_true, z, value).sum()

    result, gradient = step(y_pred, value)  # a traced Python float
    np.testing.assert_allclose(result, total(y_pred), rtol=1e-5)
    expected = references.numeric_gradient(total, y_pred.astype("float64"))
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-5)
    assert step._cache_size() == 1
    step(y_pred, value + 0.25)
    assert step._cache_size() == 1  # one compilation serves every value


@needs_jax
@pytest.mark.parametrize("key", FUNCTIONS)
def test_vmap_over_parameters_and_hyper_parameters(key):
    """One step for a population of linear models, each with its own value."""
    import jax

    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 5)).astype("float32")
    y_true = labels(rng, 16)
    values = np.asarray(FUNCTIONS[key][4], dtype="float32")
    kernels = rng.standard_normal((len(values), 5, NUM_CLASSES)).astype("float32")

    def objective(kernel, hyper_parameter):
        return ops.mean(function_loss(key, y_true, x @ kernel, hyper_parameter))

    step = jax.jit(jax.vmap(jax.value_and_grad(objective)))
    population_values, population_gradients = step(kernels, values)
    for member, value in enumerate(values):
        by_class = class_loss(key, float(value), from_logits=True)
        alone, gradient = jax.value_and_grad(lambda k, c=by_class: c(y_true, x @ k))(
            kernels[member]
        )
        np.testing.assert_allclose(population_values[member], alone, rtol=1e-5)
        np.testing.assert_allclose(
            population_gradients[member], gradient, rtol=1e-4, atol=1e-6
        )
        expected = reference(key, y_true, x @ kernels[member], float(value)).mean()
        np.testing.assert_allclose(alone, expected, rtol=1e-5)
    assert np.all(np.isfinite(population_gradients))


# float64 throughout: every loss, old and new, at 1e-12 on every backend.


@contextlib.contextmanager
def float64_enabled():
    """JAX computes in float32 unless x64 is on; scoped to the block."""
    if ON_JAX:
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(16,), (4, 5), (0,), (0, 3)], ids=str)
@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "mean", "mean_with_sample_weight"]
)
def test_unweighted_mean_is_keras_reduction(reduction, shape, dtype):
    # Without weights or masks the losses skip Keras' reduction for a mean;
    # it must give what Keras' reduction gives, 0 for an empty batch too.
    from keras.src.losses.loss import reduce_weighted_values

    rng = np.random.default_rng(11)
    y_pred = (3 * rng.standard_normal((*shape, NUM_CLASSES))).astype(dtype)
    y_true = rng.integers(0, NUM_CLASSES, shape)
    loss = losses.LabelRelaxation(
        alpha=0.1, from_logits=True, reduction=reduction, dtype=dtype
    )
    per_sample = losses.LabelRelaxation(
        alpha=0.1, from_logits=True, reduction=None, dtype=dtype
    )
    with float64_enabled():
        result = loss(y_true, ops.convert_to_tensor(y_pred))
        expected = reduce_weighted_values(
            per_sample(y_true, ops.convert_to_tensor(y_pred)),
            reduction=reduction,
            dtype=dtype,
        )
        assert keras.backend.standardize_dtype(result.dtype) == dtype
    np.testing.assert_allclose(
        ops.convert_to_numpy(result), ops.convert_to_numpy(expected), rtol=1e-6
    )


FLOAT64_CASES = {
    "lr": (
        losses.LabelRelaxation(alpha=0.1, reduction=None),
        references.label_relaxation,
        (0.1,),
    ),
    "ls": (
        losses.LabelSmoothing(alpha=0.1, reduction=None),
        references.label_smoothing,
        (0.1,),
    ),
    "cp": (
        losses.ConfidencePenalty(beta=0.5, reduction=None),
        references.confidence_penalty,
        (0.5,),
    ),
    "fl": (losses.FocalLoss(gamma=2.0, reduction=None), references.focal_loss, (2.0,)),
    "fl-0.5": (
        losses.FocalLoss(gamma=0.5, reduction=None),
        references.focal_loss,
        (0.5,),
    ),
    "flsd": (
        losses.SampleDependentFocalLoss(reduction=None),
        references.sample_dependent_focal_loss,
        ((0.2,), (5.0, 3.0)),
    ),
    "dfl": (
        losses.DualFocalLoss(gamma=4.0, reduction=None),
        references.dual_focal_loss,
        (4.0,),
    ),
    "mbls": (
        losses.MarginLabelSmoothing(margin=2.0, weight=0.1, reduction=None),
        references.margin_label_smoothing,
        (2.0, 0.1),
    ),
    "poly": (
        losses.PolyLoss(epsilon=1.0, reduction=None),
        references.poly_loss,
        (1.0,),
    ),
}


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("key", FLOAT64_CASES)
def test_float64_in_is_float64_throughout(key, from_logits):
    loss, reference_fn, arguments = FLOAT64_CASES[key]
    if key == "mbls" and not from_logits:
        pytest.skip("MbLS is defined on logits only")
    rng = np.random.default_rng(7)
    y_pred = 3 * rng.standard_normal((64, NUM_CLASSES))
    # p_y close to 1 too, where float32 would lose log(1 - p_y).
    y_pred[:8, 0] += 25.0
    y_true = labels(rng, 64)
    y_true[:8] = 0
    if not from_logits:
        y_pred = np.exp(references.log_probabilities(y_pred, True))
    config = {**loss.get_config(), "from_logits": from_logits, "dtype": "float64"}
    loss = loss.from_config(config)
    expected = reference_fn(y_true, y_pred, *arguments, from_logits=from_logits)
    with float64_enabled():
        z = ops.convert_to_tensor(y_pred, "float64")
        # `call` is the loss's function: per-sample losses in float64.
        results = [
            loss.call(ops.convert_to_tensor(y_true), z),
            loss.call(ops.convert_to_tensor(np.eye(NUM_CLASSES)[y_true]), z),
            loss(y_true, z),
        ]
        for result in results:
            assert keras.backend.standardize_dtype(result.dtype) == "float64"
            np.testing.assert_allclose(
                ops.convert_to_numpy(result), expected, rtol=1e-12, atol=1e-12
            )


@pytest.mark.parametrize("key", FLOAT64_CASES)
def test_float64_torch_softmax_kernels(key, monkeypatch):
    # Eager PyTorch takes log p_y from the softmax from a number of classes
    # on (these tests' classes take the log-softmax); every input does here.
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's kernels")
    monkeypatch.setattr(losses, "_SOFTMAX_FROM_CLASSES", 1)
    test_float64_in_is_float64_throughout(key, True)


@pytest.mark.parametrize("softmax_from_classes", [1, None], ids=["softmax", "default"])
@pytest.mark.parametrize("key", FLOAT64_CASES)
def test_torch_kernels_give_the_same_gradient_twice(
    key, softmax_from_classes, monkeypatch
):
    # Some kernels turn a forward tensor into the gradient in place; a second
    # backward through a retained graph must not see it changed.
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's kernels")
    import torch

    if softmax_from_classes is not None:
        monkeypatch.setattr(losses, "_SOFTMAX_FROM_CLASSES", softmax_from_classes)
    loss, _, _ = FLOAT64_CASES[key]
    loss = loss.from_config({**loss.get_config(), "from_logits": True})
    rng = np.random.default_rng(10)
    logits = torch.tensor(
        3 * rng.standard_normal((16, NUM_CLASSES)), requires_grad=True
    )
    total = ops.sum(loss(torch.tensor(labels(rng, 16)), logits) * torch.arange(16.0))
    (first,) = torch.autograd.grad(total, logits, retain_graph=True)
    first = first.numpy().copy()  # a gradient may be a kernel's buffer
    (second,) = torch.autograd.grad(total, logits)
    np.testing.assert_array_equal(second.numpy(), first)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.4])
def test_float64_label_relaxation_gradient_is_p_minus_q_to_1e12(alpha):
    rng = np.random.default_rng(8)
    logits = 3 * rng.standard_normal((32, NUM_CLASSES))
    logits[:8, 0] += 12.0
    y_true = labels(rng, 32)
    y_true[:8] = 0
    p = np.exp(references.log_probabilities(logits, True))
    q = references.relaxed_target(y_true, p, alpha)
    outside = p[np.arange(32), y_true] < 1 - alpha
    expected = np.where(outside[:, None], p - q, 0.0)
    with float64_enabled():
        _, gradient = value_and_gradient(
            lambda z: ops.sum(losses.label_relaxation(y_true, z, alpha, True)), logits
        )
        assert gradient.dtype == np.float64
    np.testing.assert_allclose(gradient, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", FLOAT64_CASES)
def test_float64_gradients_of_integer_labels_and_logits(key):
    # On eager PyTorch these losses run on written-out gradients, elsewhere on
    # autodiff; either must give the reference's float64 derivative, also per
    # timestep and where p_y is close to 1.
    loss, reference_fn, arguments = FLOAT64_CASES[key]
    rng = np.random.default_rng(9)
    y_pred = 3 * rng.standard_normal((6, 2, NUM_CLASSES))
    y_pred[:2, :, 0] += 12.0
    y_true = rng.integers(0, NUM_CLASSES, (6, 2))
    y_true[:2] = 0
    loss = loss.from_config({**loss.get_config(), "from_logits": True})

    def total(z):
        flat = z.reshape(-1, NUM_CLASSES)
        return reference_fn(y_true.reshape(-1), flat, *arguments, True).sum()

    with float64_enabled():
        _, gradient = value_and_gradient(
            lambda z: ops.sum(loss.call(ops.convert_to_tensor(y_true), z)), y_pred
        )
    assert gradient.dtype == np.float64
    expected = references.numeric_gradient(total, y_pred)
    np.testing.assert_allclose(gradient, expected, rtol=1e-6, atol=1e-8)

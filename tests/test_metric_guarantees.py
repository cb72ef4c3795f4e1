"""Guarantees every calibration metric keeps, against float64 references.

Each case is a metric class, its functional form and an independent float64
numpy reference from `ece_reference`: values on random, tied, edge-of-bin
and extreme inputs, sample weights, label forms, streaming, float64 state,
value checks, empty batches, bad arguments, serialisation and compilation.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ece_reference as reference
import keras
import numpy as np
import pytest
from keras import ops

from keras_label_relax import BrierScore
from keras_label_relax import ClasswiseCalibrationError
from keras_label_relax import ExpectedCalibrationError
from keras_label_relax import SmoothCalibrationError
from keras_label_relax import brier_score
from keras_label_relax import classwise_calibration_error
from keras_label_relax import expected_calibration_error
from keras_label_relax import metrics as metrics_module
from keras_label_relax.metrics import FINE_BINS

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKEND = keras.backend.backend()


class Case:
    """A metric, its function and its reference, with the same arguments."""

    def __init__(self, metric, function, reference, arguments, tolerance=1e-6):
        self.metric_class = metric
        self.function = function
        self.reference = reference
        self.arguments = arguments
        # The equal-mass histogram approximates the exact sorted bins.
        self.tolerance = tolerance

    def metric(self, **kwargs):
        return self.metric_class(**self.arguments, **kwargs)

    def value(self, labels, preds, sample_weight=None, **kwargs):
        metric = self.metric(**kwargs)
        metric.update_state(labels, preds, sample_weight=sample_weight)
        return float(metric.result())

    def call(self, labels, preds, sample_weight=None, **kwargs):
        return self.function(
            labels, preds, sample_weight=sample_weight, **self.arguments, **kwargs
        )

    def expected(self, labels, probs, sample_weight=None):
        return self.reference(labels, probs, sample_weight=sample_weight)


def _ece_reference(num_bins, norm):
    def compute(labels, probs, sample_weight=None):
        return reference.calibration_error(labels, probs, num_bins, norm, sample_weight)

    return compute


CASES = {
    "ece_l1": Case(
        ExpectedCalibrationError,
        expected_calibration_error,
        _ece_reference(10, "l1"),
        {"num_bins": 10},
    ),
    "ece_max": Case(
        ExpectedCalibrationError,
        expected_calibration_error,
        _ece_reference(10, "max"),
        {"num_bins": 10, "norm": "max"},
    ),
    "ece_equal_mass_l2": Case(
        ExpectedCalibrationError,
        expected_calibration_error,
        functools.partial(
            reference.equal_mass_calibration_error, num_bins=10, norm="l2"
        ),
        {"num_bins": 10, "norm": "l2", "binning": "equal_mass"},
        tolerance=1e-3,
    ),
    "classwise_l1": Case(
        ClasswiseCalibrationError,
        classwise_calibration_error,
        functools.partial(reference.classwise_calibration_error, num_bins=10),
        {"num_bins": 10},
    ),
    "classwise_l2": Case(
        ClasswiseCalibrationError,
        classwise_calibration_error,
        functools.partial(reference.classwise_calibration_error, num_bins=7, norm="l2"),
        {"num_bins": 7, "norm": "l2"},
    ),
    "brier": Case(BrierScore, brier_score, reference.brier_score, {}),
}
METRIC_CLASSES = (ExpectedCalibrationError, ClasswiseCalibrationError, BrierScore)


def random_predictions(num_samples=1000, num_classes=5, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((num_samples, num_classes))
    labels = rng.integers(0, num_classes, num_samples)
    probs = reference.softmax(logits).astype(np.float32)
    return logits.astype(np.float32), labels, probs


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


def test_matches_reference_on_random_predictions(case):
    _, labels, probs = random_predictions()
    expected = case.expected(labels, probs)
    assert case.value(labels, probs) == pytest.approx(expected, abs=case.tolerance)


def test_matches_reference_with_sample_weights(case):
    _, labels, probs = random_predictions(seed=1)
    weights = np.random.default_rng(2).uniform(0, 3, len(labels)).astype(np.float32)
    expected = case.expected(labels, probs, weights)
    actual = case.value(labels, probs, weights)
    assert actual == pytest.approx(expected, abs=case.tolerance)


def test_function_equals_metric(case):
    _, labels, probs = random_predictions(seed=3)
    weights = np.random.default_rng(4).uniform(0, 1, len(labels)).astype(np.float32)
    for sample_weight in (None, weights):
        value = case.call(labels, probs, sample_weight)
        assert tuple(value.shape) == ()
        assert float(value) == pytest.approx(
            case.value(labels, probs, sample_weight), abs=1e-7
        )


def test_label_forms_and_logits_agree(case):
    logits, labels, probs = random_predictions(seed=5, scale=1.0)
    expected = case.value(labels, probs)
    one_hot = np.eye(probs.shape[-1], dtype=np.float32)[labels]
    assert case.value(one_hot, probs) == pytest.approx(expected, abs=1e-6)
    assert case.value(labels[:, None], probs) == pytest.approx(expected, abs=1e-6)
    float_ids = labels.astype(np.float32)
    assert case.value(float_ids, probs) == pytest.approx(expected, abs=1e-6)
    from_logits = case.value(labels, logits, from_logits=True)
    assert from_logits == pytest.approx(expected, abs=max(case.tolerance, 1e-6))


def test_sequence_predictions(case):
    rng = np.random.default_rng(6)
    probs = reference.softmax(rng.standard_normal((8, 6, 4))).astype(np.float32)
    labels = rng.integers(0, 4, (8, 6))
    weights = rng.uniform(0, 1, (8, 6)).astype(np.float32)
    expected = case.expected(labels, probs, weights)
    assert case.value(labels, probs, weights) == pytest.approx(
        expected, abs=case.tolerance
    )
    assert case.value(labels, probs, weights[..., None]) == pytest.approx(
        expected, abs=case.tolerance
    )


def test_streaming_equals_one_batch(case):
    _, labels, probs = random_predictions(num_samples=1000, seed=7)
    weights = np.random.default_rng(8).uniform(0, 2, len(labels)).astype(np.float32)
    metric = case.metric()
    for start in range(0, len(labels), 100):
        batch = slice(start, start + 100)
        metric.update_state(labels[batch], probs[batch], weights[batch])
    assert float(metric.result()) == pytest.approx(
        case.value(labels, probs, weights), abs=1e-6
    )


def test_tied_and_edge_of_bin_confidences(case):
    # Probabilities k / 16, repeated (ties): exactly on the bin edges of 2, 4,
    # 8 or 16 bins, and of 10 bins at 0.5 and 1.0. (A decimal edge such as
    # 0.3 has no float; the nearest float32 is 1.2e-8 above it, where the
    # metric's float32 product `c * 10` rounds onto the edge.)
    rng = np.random.default_rng(9)
    tops = np.arange(8, 17) / 16
    top = np.repeat(tops, 20)
    probs = np.zeros((len(top), 4))
    probs[:, 0] = top
    probs[:, 1] = 1.0 - top
    probs = rng.permuted(probs, axis=1).astype(np.float32)
    labels = rng.integers(0, 4, len(top))
    expected = case.expected(labels, probs)
    assert case.value(labels, probs) == pytest.approx(expected, abs=1e-6)


def test_probabilities_exactly_zero_and_one(case):
    # One-hot predictions: confidence 1.0, every other probability 0.0.
    rng = np.random.default_rng(10)
    predicted = rng.integers(0, 3, 200)
    probs = np.eye(3, dtype=np.float32)[predicted]
    probs[:50] = [1.0, 0.0, 0.0]
    labels = np.where(rng.random(200) < 0.7, predicted, (predicted + 1) % 3)
    expected = case.expected(labels, probs)
    assert case.value(labels, probs) == pytest.approx(expected, abs=1e-6)
    assert float(case.call(labels, probs)) == pytest.approx(expected, abs=1e-6)


def test_extreme_logits(case):
    rng = np.random.default_rng(11)
    logits = rng.choice([-1e4, 0.0, 1e4], size=(300, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    expected = case.expected(labels, reference.softmax(logits))
    actual = case.value(labels, logits, from_logits=True)
    assert actual == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("input_dtype", ["float16", "bfloat16"])
def test_low_precision_inputs(case, input_dtype):
    _, labels, probs = random_predictions(num_samples=500, seed=12)
    low = ops.cast(ops.convert_to_tensor(probs), input_dtype)
    # The reference sees exactly the values the metric receives.
    seen = np.asarray(ops.convert_to_numpy(ops.cast(low, "float32")), np.float64)
    expected = case.expected(labels, seen)
    assert case.value(labels, low) == pytest.approx(expected, abs=case.tolerance)
    assert float(case.call(labels, low)) == pytest.approx(expected, abs=case.tolerance)


def test_empty_batch_is_a_no_op(case):
    _, labels, probs = random_predictions(num_samples=100, seed=13)
    metric = case.metric()
    metric.update_state(labels, probs)
    before = float(metric.result())
    empty_labels, empty_probs = np.zeros(0, np.int32), np.zeros((0, 5), np.float32)
    metric.update_state(empty_labels, empty_probs)
    metric.update_state(empty_labels, empty_probs, np.zeros(0, np.float32))
    metric.update_state(np.zeros((0, 5), np.float32), empty_probs)
    assert float(metric.result()) == before
    assert float(case.call(empty_labels, empty_probs)) == 0.0
    fresh = case.metric()
    fresh.update_state(empty_labels, empty_probs)
    assert float(fresh.result()) == 0.0


def test_zero_before_updates_after_reset_and_for_zero_weights(case):
    metric = case.metric()
    assert float(metric.result()) == 0.0
    _, labels, probs = random_predictions(num_samples=50, seed=14)
    metric.update_state(labels, probs)
    assert float(metric.result()) > 0.0
    metric.reset_state()
    assert float(metric.result()) == 0.0
    metric.update_state(labels, probs, sample_weight=np.zeros(50, np.float32))
    assert float(metric.result()) == 0.0


def test_bad_class_ids_raise_with_a_count(case):
    probs = np.full((4, 3), 1 / 3, np.float32)
    for labels in ([0, 3, 1, 7], [-1, 0, 1, 3]):
        with pytest.raises(ValueError, match=r"y_true.*2 of 4 class ids.*\[0, 3\)"):
            case.metric().update_state(np.array(labels), probs)
        with pytest.raises(ValueError, match=r"2 of 4 class ids"):
            case.call(np.array(labels), probs)


def test_bad_probabilities_raise_with_a_count(case):
    probs = np.full((4, 3), 1 / 3, np.float32)
    probs[0, 0] = -0.1
    probs[1, 2] = 1.5
    probs[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"y_pred.*3 of 12 probabilities"):
        case.metric().update_state(np.arange(4) % 3, probs)
    with pytest.raises(ValueError, match=r"3 of 12 probabilities"):
        case.call(np.arange(4) % 3, probs)


def test_bad_weights_raise_with_counts(case):
    _, labels, probs = random_predictions(num_samples=6, seed=15)
    weights = np.array([1.0, -2.0, np.inf, np.nan, -1.0, 0.5], np.float32)
    pattern = r"sample_weight.*of 6 weights, 2 are negative and 2 are not finite"
    with pytest.raises(ValueError, match=pattern):
        case.metric().update_state(labels, probs, weights)
    with pytest.raises(ValueError, match=pattern):
        case.call(labels, probs, weights)


def test_checks_can_be_switched_off(case):
    probs = np.full((4, 3), 1 / 3, np.float32)
    labels = np.array([0, 1, 2, 5])
    metric = case.metric(validate_args=False)
    metric.update_state(labels, probs, np.array([1, 1, 1, -1], np.float32))
    assert np.isfinite(float(metric.result()))
    case.call(labels, probs, validate_args=False)


def float64_data():
    """float64 probabilities that differ from float32 ones by more than 1e-12.

    No two top-label confidences share a bin of the equal-mass histogram, so
    that its equal-mass bins are the exact ones.
    """
    rng = np.random.default_rng(20)
    probs = rng.dirichlet(np.full(4, 0.5), size=60)
    fine = np.floor(-np.log1p(-probs.max(axis=1)) * FINE_BINS / (32 * np.log(2)))
    assert len(np.unique(fine)) == len(fine)
    return rng.integers(0, 4, 60), probs, rng.uniform(0, 2, 60)


def test_float64_state_and_arithmetic(case):
    if BACKEND == "jax":
        pytest.skip("JAX needs x64: see test_float64_on_jax_with_x64")
    labels, probs, weights = float64_data()
    metric = case.metric(dtype="float64")
    metric.update_state(labels, probs, weights)
    for variable in metric.variables:
        assert keras.backend.standardize_dtype(variable.dtype) == "float64"
    result = metric.result()
    assert keras.backend.standardize_dtype(result.dtype) == "float64"
    expected = case.expected(labels, probs, weights)
    assert float(result) == pytest.approx(expected, abs=1e-12)
    value = case.call(labels, probs, weights)
    assert keras.backend.standardize_dtype(value.dtype) == "float64"
    assert float(value) == pytest.approx(expected, abs=1e-12)
    # float32 arithmetic would be visibly off.
    float32 = case.value(labels, probs.astype(np.float32), weights)
    assert float32 != pytest.approx(expected, abs=1e-12)


JAX_X64_SCRIPT = """
import json
import sys

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, "tests")
import ece_reference as reference
import keras
import numpy as np
from test_metric_guarantees import CASES

results = {}
from test_metric_guarantees import float64_data

from keras_label_relax import metrics as metrics_module

labels, probs, weights = float64_data()
for name, case in CASES.items():
    metric = case.metric(dtype="float64")
    metric.update_state(labels, probs, weights)
    dtypes = {str(v.dtype) for v in metric.variables} | {str(metric.result().dtype)}
    value = case.call(labels, probs, weights)
    minimum, metrics_module._COMPILE_MIN_VALUES = metrics_module._COMPILE_MIN_VALUES, 0
    compiled = case.metric(dtype="float64")  # the compiled eager update
    compiled.update_state(labels, probs, weights)
    metrics_module._COMPILE_MIN_VALUES = minimum
    results[name] = {
        "dtypes": sorted(dtypes | {str(value.dtype)}),
        "metric": float(metric.result()),
        "compiled": float(compiled.result()),
        "function": float(value),
        "expected": case.expected(labels, probs, weights),
    }
print("RESULT " + json.dumps(results))
"""


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only")
def test_float64_on_jax_with_x64():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(JAX_X64_SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [x for x in completed.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, completed.stderr
    for name, result in json.loads(lines[0][len("RESULT ") :]).items():
        assert result["dtypes"] == ["float64"], name
        assert result["metric"] == pytest.approx(result["expected"], abs=1e-12), name
        assert result["compiled"] == pytest.approx(result["expected"], abs=1e-12)
        assert result["function"] == pytest.approx(result["expected"], abs=1e-12)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only")
def test_float64_without_x64_on_jax_is_an_error():
    for metric_class in METRIC_CLASSES:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            metric_class(dtype="float64")


def compiled(function):
    if BACKEND == "jax":
        import jax

        return jax.jit(function)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    import torch

    return torch.compile(function)


@pytest.mark.parametrize(
    "name", ["ece_l1", "ece_equal_mass_l2", "classwise_l1", "brier"]
)
def test_function_compiles(name):
    if BACKEND == "torch":
        pytest.skip("torch.compile takes minutes: see test_function_torch_compiles")
    case = CASES[name]
    _, labels, probs = random_predictions(num_samples=300, seed=17)
    weights = np.random.default_rng(18).uniform(0, 1, 300).astype(np.float32)
    function = compiled(lambda y, p, w: case.call(y, p, w))
    value = function(
        ops.convert_to_tensor(labels.astype(np.int32)),
        ops.convert_to_tensor(probs),
        ops.convert_to_tensor(weights),
    )
    assert float(value) == pytest.approx(case.value(labels, probs, weights), abs=1e-6)


@pytest.mark.benchmark
@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch only")
@pytest.mark.parametrize(
    "name", ["ece_l1", "ece_equal_mass_l2", "classwise_l1", "brier"]
)
def test_function_torch_compiles(name):
    """Minutes of compilation on a CPU: `pytest -m benchmark` runs it."""
    import torch

    torch._dynamo.reset()
    case = CASES[name]
    _, labels, probs = random_predictions(num_samples=300, seed=17)
    function = torch.compile(lambda y, p: case.call(y, p))
    value = function(torch.from_numpy(labels), torch.from_numpy(probs))
    assert float(value) == pytest.approx(case.value(labels, probs), abs=1e-6)


def test_stateless_update_compiles(case):
    if BACKEND == "torch":
        pytest.skip("torch.compile is slow; fit/evaluate cover PyTorch")
    _, labels, probs = random_predictions(num_samples=300, seed=19)
    metric = case.metric()
    metric.update_state(labels[:1], probs[:1])  # builds lazily created state
    metric.reset_state()
    update = compiled(metric.stateless_update_state)
    variables = [v.value for v in metric.variables]
    for batch in np.split(np.arange(300), 3):
        variables = update(
            variables,
            ops.convert_to_tensor(labels[batch].astype(np.int32)),
            ops.convert_to_tensor(probs[batch]),
        )
    for variable, value in zip(metric.variables, variables, strict=True):
        variable.assign(value)
    assert float(metric.result()) == pytest.approx(case.value(labels, probs), abs=1e-6)


# Eager, TensorFlow and JAX reduce batches of at least `_COMPILE_MIN_VALUES`
# values in one compiled function: these tests force that path on small
# batches.
compiled_eager = pytest.mark.skipif(
    BACKEND == "torch", reason="PyTorch updates op by op"
)
COMPILED_EAGER_NAMES = ["ece_l1", "ece_equal_mass_l2", "classwise_l1", "brier"]
EVERY_PATH = {"fast": 0, "op by op": 2**62}


def every_metric(name, **kwargs):
    if name == "smooth":
        return SmoothCalibrationError(**kwargs)
    return CASES[name].metric(**kwargs)


def compensated_state(metric):
    """The state's sums (each variable less its Kahan error), float64."""
    values = [np.asarray(ops.convert_to_numpy(v), np.float64) for v in metric.variables]
    totals, errors = values[::2], values[1::2]
    return [total - error for total, error in zip(totals, errors, strict=True)]


@compiled_eager
@pytest.mark.parametrize("name", [*COMPILED_EAGER_NAMES, "smooth"])
def test_fast_eager_update_equals_op_by_op(name, monkeypatch):
    logits, labels, probs = random_predictions(num_samples=400, seed=40)
    weights = np.random.default_rng(41).uniform(0, 2, 400).astype(np.float32)
    one_hot = np.eye(5, dtype=np.float32)[labels]
    configs = [
        ({}, labels, probs, None, 1e-6),
        ({"from_logits": True}, one_hot, logits, weights, 1e-6),
    ]
    if BACKEND != "jax":  # JAX: test_float64_on_jax_with_x64
        labels64, probs64, weights64 = float64_data()
        configs.append(({"dtype": "float64"}, labels64, probs64, weights64, 1e-13))
    for kwargs, y_true, y_pred, sample_weight, tolerance in configs:
        states = {}
        for path, minimum in EVERY_PATH.items():
            monkeypatch.setattr(metrics_module, "_COMPILE_MIN_VALUES", minimum)
            metric = every_metric(name, **kwargs)
            for _ in range(2):
                metric.update_state(y_true, y_pred, sample_weight)
            # The smooth histogram shares a prediction between grid points
            # 1/4000 apart, which magnifies float32 rounding: its value, then.
            states[path] = (
                [float(metric.result())]
                if name == "smooth"
                else compensated_state(metric)
            )
        for fast, op_by_op in zip(*states.values(), strict=True):
            np.testing.assert_allclose(
                fast, op_by_op, rtol=tolerance, atol=10 * tolerance
            )


@compiled_eager
@pytest.mark.parametrize("name", [*COMPILED_EAGER_NAMES, "smooth"])
def test_fast_eager_update_checks_values_before_any_change(name, monkeypatch):
    monkeypatch.setattr(metrics_module, "_COMPILE_MIN_VALUES", EVERY_PATH["fast"])
    probs = np.full((4, 3), 1 / 3, np.float32)
    labels = np.array([0, 1, 2, 0])
    metric = every_metric(name)
    metric.update_state(labels, probs)
    before = compensated_state(metric)
    bad_probs = probs.copy()
    bad_probs[0, 0], bad_probs[1, 2], bad_probs[3, 1] = -0.1, 1.5, np.nan
    bad_weights = np.array([1.0, -2.0, np.inf, 1.0], np.float32)
    with pytest.raises(ValueError, match=r"y_true.*2 of 4 class ids.*\[0, 3\)"):
        metric.update_state(np.array([0, 3, 1, -1]), probs)
    with pytest.raises(ValueError, match=r"y_pred.*3 of 12 probabilities"):
        metric.update_state(labels, bad_probs)
    with pytest.raises(ValueError, match=r"of 4 weights, 1 are negative and 1 are"):
        metric.update_state(labels, probs, bad_weights)
    for after, expected in zip(compensated_state(metric), before, strict=True):
        np.testing.assert_array_equal(after, expected)


@compiled_eager
def test_compiled_eager_update_traces_once_per_batch_shape(monkeypatch):
    monkeypatch.setattr(metrics_module, "_COMPILE_MIN_VALUES", 0)
    traces = []
    ece_update = metrics_module._ece_update

    def counted_update(*args):
        traces.append(1)  # runs only when traced
        return ece_update(*args)

    monkeypatch.setattr(metrics_module, "_ece_update", counted_update)
    _, labels, probs = random_predictions(num_samples=300, seed=42)
    for _ in range(2):  # a new instance shares the compiled function
        metric = ExpectedCalibrationError(num_bins=10)
        for batch in np.split(np.arange(300), 3):
            metric.update_state(labels[batch], probs[batch])
    assert len(traces) == 1
    expected = reference.calibration_error(labels, probs, 10)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def tiny_model(num_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(num_classes, name="logits")]
    )


def evaluation_data(num_samples=128, num_classes=3, seed=20):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, 4)).astype(np.float32)
    y = rng.integers(0, num_classes, num_samples)
    return x, y


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_evaluate_with_every_metric(mode):
    if BACKEND == "torch" and mode == "jit":
        pytest.skip("torch.compile takes minutes: test_function_torch_compiles")
    x, y = evaluation_data()
    model = tiny_model()
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            ExpectedCalibrationError(binning="equal_mass", from_logits=True),
            ClasswiseCalibrationError(from_logits=True),
            BrierScore(from_logits=True),
        ],
        run_eagerly=mode == "eager",
        jit_compile=mode == "jit",
    )
    results = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    probs = reference.softmax(ops.convert_to_numpy(model(x)))
    assert results["ece"] == pytest.approx(
        reference.equal_mass_calibration_error(y, probs), abs=1e-3
    )
    assert results["classwise_ece"] == pytest.approx(
        reference.classwise_calibration_error(y, probs), abs=1e-5
    )
    assert results["brier_score"] == pytest.approx(
        reference.brier_score(y, probs), abs=1e-5
    )


def test_config_round_trip(case):
    metric = case.metric(from_logits=True, validate_args=False, name="m")
    config = metric.get_config()
    assert config["validate_args"] is False and config["from_logits"] is True
    restored = type(metric).from_config(config)
    assert restored.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    assert type(revived) is type(metric)
    assert revived.get_config() == config
    name = keras.saving.get_registered_name(type(metric))
    assert name == f"keras_label_relax>{type(metric).__name__}"


def test_saved_model_keeps_every_metric(tmp_path):
    x, y = evaluation_data(num_samples=64)
    model = tiny_model()
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            ExpectedCalibrationError(
                num_bins=5, binning="equal_mass", from_logits=True
            ),
            ClasswiseCalibrationError(num_bins=5, from_logits=True, norm="max"),
            BrierScore(from_logits=True, num_bins=5),
        ],
    )
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    actual = restored.evaluate(x, y, verbose=0, return_dict=True)
    for name in ("ece", "classwise_ece", "brier_score"):
        assert actual[name] == pytest.approx(expected[name], abs=1e-6), name


@pytest.mark.parametrize("metric_class", METRIC_CLASSES)
def test_bad_arguments_name_argument_and_value(metric_class):
    for num_bins in (0, -3, 2.5, True, "15", None):
        with pytest.raises(ValueError, match=rf"num_bins.*{num_bins!r}"):
            metric_class(num_bins=num_bins)
    with pytest.raises(ValueError, match="from_logits.*'yes'"):
        metric_class(from_logits="yes")
    with pytest.raises(ValueError, match="validate_args.*1"):
        metric_class(validate_args=1)


def test_bad_norm_and_binning():
    with pytest.raises(ValueError, match="binning.*'foo'"):
        ExpectedCalibrationError(binning="foo")
    with pytest.raises(ValueError, match="binning.*'foo'"):
        expected_calibration_error([0], [[1.0, 0.0]], binning="foo")
    with pytest.raises(ValueError, match="num_bins.*0"):
        expected_calibration_error([0], [[1.0, 0.0]], num_bins=0)
    with pytest.raises(ValueError, match="num_bins.*0"):
        classwise_calibration_error([0], [[1.0, 0.0]], num_bins=0)
    for metric_class in (ExpectedCalibrationError, ClasswiseCalibrationError):
        with pytest.raises(ValueError, match="norm.*'l3'"):
            metric_class(norm="l3")
    with pytest.raises(ValueError, match="norm.*'l3'"):
        classwise_calibration_error([0], [[1.0, 0.0]], norm="l3")


def test_mismatched_shapes(case):
    metric = case.metric()
    with pytest.raises(ValueError, match=r"y_true.shape=\(3,\)"):
        metric.update_state(np.zeros(3), np.full((4, 5), 0.2))
    with pytest.raises(ValueError, match="sample_weight"):
        metric.update_state(np.zeros(4), np.full((4, 5), 0.2), np.ones(3))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_brier_decomposition_matches_reference_when_streamed(dtype):
    if dtype == "float64" and BACKEND == "jax":
        pytest.skip("JAX needs x64 for float64")
    _, labels, probs = random_predictions(num_samples=3000, num_classes=6, seed=31)
    probs = probs.astype(dtype)
    probs[:5] = np.eye(6, dtype=dtype)[:5]  # confidences of exactly 1
    weights = np.random.default_rng(32).uniform(0, 2, len(labels))
    metric = BrierScore(num_bins=8, dtype=dtype)
    for index in np.array_split(np.arange(len(labels)), 3):
        metric.update_state(labels[index], probs[index], weights[index])
    terms = metric.decomposition()
    expected = reference.brier_decomposition(labels, probs, 8, weights)
    tolerance = 1e-12 if dtype == "float64" else 1e-6
    assert terms.keys() == expected.keys()
    for key, value in expected.items():
        assert terms[key] == pytest.approx(value, abs=tolerance), key
    recombined = (
        terms["reliability"]
        - terms["resolution"]
        + terms["uncertainty"]
        + terms["within_bin_variance"]
        - 2 * terms["within_bin_covariance"]
    )
    assert recombined == pytest.approx(terms["brier"], abs=tolerance)

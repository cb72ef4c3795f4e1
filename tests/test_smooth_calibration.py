"""SmoothCalibrationError against a float64 numpy reference and relplot.

The reference below is written from the definition documented in
`SmoothCalibrationError` (after Blasiok & Nakkiran, 2023, discretised as
their relplot package does), without the package: each confidence is shared
linearly between the two nearest points of a grid of equal intervals of
[0, 1] (1000 intervals for bandwidths of at least 0.01, 4000 below), the
grid is smoothed by the Gaussian truncated at distance 1/2 with the points'
images reflected once about 0 and about 1 (scipy's "mirror" extension), and the
integrals are sums of the linear interpolants over
`max(round(10 / sigma), 200)` equally spaced points of [0, 1].
"""

import keras
import numpy as np
import pytest
import test_distributed_metric as distributed
from keras import ops
from scipy import ndimage

from keras_label_relax import SmoothCalibrationError
from keras_label_relax import smooth_calibration_error

BACKEND = keras.backend.backend()


# --- float64 reference --------------------------------------------------


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def top_label(labels, probs):
    probs = np.asarray(probs, np.float64).reshape(-1, np.shape(probs)[-1])
    labels = np.asarray(labels).reshape(-1)
    return probs.max(axis=-1), (probs.argmax(axis=-1) == labels).astype(np.float64)


def grid_masses(confidence, outcome, weight, intervals):
    """Per grid point: shared weight and shared weighted (outcome - confidence)."""
    confidence = np.asarray(confidence, np.float64)
    position = confidence * intervals
    left = np.minimum(np.floor(position).astype(int), intervals - 1)
    right_share = position - left
    weight = np.broadcast_to(np.asarray(weight, np.float64), confidence.shape)
    residual = np.asarray(outcome, np.float64) - confidence
    masses = np.zeros((2, intervals + 1))
    for point, share in ((left, 1.0 - right_share), (left + 1, right_share)):
        np.add.at(masses[0], point, weight * share)
        np.add.at(masses[1], point, weight * share * residual)
    return masses


def smooth(masses, sigma, intervals):
    """Gaussian truncated at distance 1/2, the points' images reflected once
    about 0 and 1 (a point on a mirror is its own image): scipy's "mirror"
    extension."""
    distance = np.arange(-(intervals // 2), intervals // 2 + 1) / intervals
    kernel = np.exp(-0.5 * (distance / sigma) ** 2)
    return ndimage.correlate1d(masses, kernel, axis=-1, mode="mirror")


def reference_error_at(confidence, outcome, weight, sigma):
    intervals = 1000 if sigma >= 0.01 else 4000
    masses = grid_masses(confidence, outcome, weight, intervals)
    smoothed = smooth(masses, sigma, intervals).T
    points = np.linspace(0.0, 1.0, max(int(np.floor(10.0 / sigma + 0.5)), 200))
    grid = np.arange(intervals + 1) / intervals
    density = np.interp(points, grid, smoothed[:, 0])
    residual = np.interp(points, grid, smoothed[:, 1])
    if density.sum() <= 0:
        return 0.0
    return float(np.abs(residual).sum() / density.sum())


def reference(confidence, outcome, weight=1.0, bandwidth=None):
    """smECE and its bandwidth; relplot's bisection when `bandwidth` is None."""
    if bandwidth is not None:
        return reference_error_at(confidence, outcome, weight, bandwidth), bandwidth
    cache = {}

    def error(sigma):
        if sigma not in cache:
            cache[sigma] = reference_error_at(confidence, outcome, weight, sigma)
        return cache[sigma]

    if 1.0 < error(1.0):
        return error(1.0), 1.0
    upper, lower = 1.0, 0.0
    for _ in range(10):
        middle = (upper + lower) / 2
        if middle < 1e-3 or middle < error(middle):
            lower = middle
        else:
            upper = middle
    return error(upper), upper


# --- helpers ------------------------------------------------------------


def predictions(num_samples=2000, num_classes=5, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((num_samples, num_classes))).astype(
        np.float32
    )
    labels = rng.integers(0, num_classes, num_samples)
    return logits, labels, softmax(logits).astype(np.float32)


def smece(labels, preds, sample_weight=None, **kwargs):
    metric = SmoothCalibrationError(**kwargs)
    metric.update_state(labels, preds, sample_weight=sample_weight)
    return float(metric.result())


def relplot_examples(seed=0):
    """The data of relplot's demo and paper notebooks, and multi-class ones."""
    rng = np.random.default_rng(seed)
    n = 4000
    f = rng.random(n)
    yield "demo", f, (rng.random(n) > 1 - (f + 0.2 * np.sin(2 * np.pi * f))) * 1.0
    for beta in (0.5, 2.0, 5.0):  # temperature-scaled calibrated forecasts
        f = rng.random(n)
        y = (rng.random(n) < f) * 1.0
        yield f"temperature {beta}", f**beta / (f**beta + (1 - f) ** beta), y
    z = 2 * rng.random(n) - 1  # the paper's skewed forecaster
    f = rng.random(n)
    skew = (2 * f - 1 + 0.2 * np.sin(4 * np.pi * (2 * f - 1)) + 1) / 2
    yield "skew", f, (rng.random(n) > 1 - skew) * 1.0
    del z
    for num_classes, scale in ((10, 1.0), (10, 3.0), (10, 10.0), (100, 3.0)):
        logits, labels, _ = predictions(n, num_classes, scale, seed)
        confidence, correct = top_label(labels, softmax(logits))
        yield f"K={num_classes} scale={scale}", confidence, correct
    f = 1 - 0.01 * rng.random(n) ** 8  # 95% above 0.999
    yield "near one", f, (rng.random(n) < f) * 1.0


# --- reference ------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])
def test_matches_reference_with_automatic_bandwidth(scale):
    _, labels, probs = predictions(scale=scale, seed=1)
    expected, _ = reference(*top_label(labels, probs))
    assert smece(labels, probs) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("bandwidth", [0.004, 0.05, 0.3, 1.0])
def test_matches_reference_with_fixed_bandwidth(bandwidth):
    _, labels, probs = predictions(num_samples=500, seed=2)
    expected, _ = reference(*top_label(labels, probs), bandwidth=bandwidth)
    actual = smece(labels, probs, bandwidth=bandwidth)
    assert actual == pytest.approx(expected, abs=2e-6)


def test_float64_state_and_arithmetic_match_reference_to_1e_12():
    if BACKEND == "jax" and not keras.config.floatx() == "float64":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX needs x64 enabled: covered by the subprocess test")
    rng = np.random.default_rng(3)
    confidence = np.concatenate([rng.random(600), [0.0, 1.0, 0.5, 1.0]])
    outcome = (rng.random(len(confidence)) < confidence**2) * 1.0
    weight = rng.uniform(0, 2, len(confidence))
    metric = SmoothCalibrationError(dtype="float64")
    metric.accumulate(confidence, outcome, weight)
    assert keras.backend.standardize_dtype(metric.histogram.dtype) == "float64"
    assert keras.backend.standardize_dtype(metric.result().dtype) == "float64"
    expected, bandwidth = reference(confidence, outcome, weight)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-12)
    curve = metric.reliability_curve()
    assert curve["bandwidth"] == bandwidth
    logits, labels, probs = predictions(num_samples=300, seed=4)
    value = smooth_calibration_error(labels, logits.astype(np.float64), True)
    assert keras.backend.standardize_dtype(value.dtype) == "float64"
    expected, _ = reference(*top_label(labels, softmax(logits)))
    assert float(value) == pytest.approx(expected, abs=1e-12)


JAX_FLOAT64 = """
import jax
import numpy as np
from keras_label_relax import SmoothCalibrationError
rng = np.random.default_rng(3)
confidence = rng.random(300)
outcome = (rng.random(300) < confidence ** 2) * 1.0
metric = SmoothCalibrationError(dtype="float64")
metric.accumulate(confidence, outcome)
# Compiled: one compilation instead of one per operation in eager JAX.
value = jax.jit(metric.stateless_result)([v.value for v in metric.variables])
print("RESULT " + json.dumps({
    "value": float(value),
    "dtype": str(metric.histogram.value.dtype),
    "confidence": confidence.tolist(),
    "outcome": outcome.tolist(),
}))
"""


@pytest.mark.skipif(BACKEND != "jax", reason="runs once, from the JAX test session")
def test_float64_on_jax_with_x64():
    result = distributed.run_script(
        "jax", "import json\n" + JAX_FLOAT64, {"JAX_ENABLE_X64": "1"}
    )
    assert result["dtype"] == "float64"
    expected, _ = reference(np.array(result["confidence"]), np.array(result["outcome"]))
    assert result["value"] == pytest.approx(expected, abs=1e-12)


# --- relplot --------------------------------------------------------------


def test_agrees_with_relplot_on_its_examples_and_random_data():
    relplot = pytest.importorskip(
        "relplot", reason="relplot (the authors' package) is not installed"
    )
    for name, f, y in relplot_examples():
        expected, expected_width = relplot.smECE(f, y, return_width=True)
        metric = SmoothCalibrationError()
        metric.accumulate(f.astype(np.float32), y.astype(np.float32))
        assert float(metric.result()) == pytest.approx(expected, abs=1e-3), name
        assert metric.reliability_curve()["bandwidth"] == pytest.approx(
            expected_width, abs=2e-3
        ), name


def test_agrees_with_relplot_on_logistic_regression():
    relplot = pytest.importorskip(
        "relplot", reason="relplot (the authors' package) is not installed"
    )
    datasets = pytest.importorskip("sklearn.datasets")
    linear_model = pytest.importorskip("sklearn.linear_model")
    # relplot's figure-1 notebook: logistic regression, 300 training points.
    x, y = datasets.make_classification(n_samples=700, random_state=0)
    model = linear_model.LogisticRegression().fit(x[:300], y[:300])
    probs = model.predict_proba(x[300:])
    expected = relplot.smECE(probs[:, 1], y[300:])
    # The same forecasts as two-class predictions: top-label confidence.
    confidence, correct = relplot.multiclass_logits_to_confidences(
        probs, y[300:], probs=True
    )
    expected_top = relplot.smECE(confidence, correct)
    metric = SmoothCalibrationError()
    metric.accumulate(probs[:, 1].astype(np.float32), y[300:].astype(np.float32))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-3)
    assert smece(y[300:], probs.astype(np.float32)) == pytest.approx(
        expected_top, abs=1e-3
    )


def test_fixed_bandwidth_agrees_with_relplot_from_0_01():
    """Below 0.01 relplot smooths on about `10 / bandwidth` intervals and this
    metric on 4000: saturated confidences (within one of relplot's intervals
    of 1) then weigh differently, by up to 2e-3 here."""
    relplot = pytest.importorskip(
        "relplot", reason="relplot (the authors' package) is not installed"
    )
    logits, labels, _ = predictions(4000, 10, 10.0, seed=5)
    confidence, correct = top_label(labels, softmax(logits))
    for bandwidth in (0.01, 0.05, 0.2, 0.7):
        expected = relplot.smECE_sigma(confidence, correct, bandwidth)
        metric = SmoothCalibrationError(bandwidth=bandwidth)
        metric.accumulate(confidence.astype(np.float32), correct.astype(np.float32))
        assert float(metric.result()) == pytest.approx(expected, abs=1e-4)
    expected = relplot.smECE_sigma(confidence, correct, 0.005)
    metric = SmoothCalibrationError(bandwidth=0.005)
    metric.accumulate(confidence, correct)
    difference = abs(float(metric.result()) - expected)
    assert 1e-4 < difference < 2e-3


# --- behaviour ------------------------------------------------------------


def test_streaming_equals_one_batch():
    _, labels, probs = predictions(num_samples=3000, seed=6)
    weights = np.random.default_rng(7).uniform(0, 2, 3000).astype(np.float32)
    whole = SmoothCalibrationError()
    whole.update_state(labels, probs, weights)
    streamed = SmoothCalibrationError()
    for part in np.array_split(np.arange(3000), 37):
        streamed.update_state(labels[part], probs[part], weights[part])
    assert float(streamed.result()) == pytest.approx(float(whole.result()), abs=1e-6)


def test_sample_weights_count_as_repetitions():
    _, labels, probs = predictions(num_samples=400, seed=8)
    counts = np.random.default_rng(9).integers(0, 4, 400)
    repeated = smece(np.repeat(labels, counts), np.repeat(probs, counts, axis=0))
    weighted = smece(labels, probs, counts.astype(np.float32))
    assert weighted == pytest.approx(repeated, abs=1e-6)
    # Scaling every weight changes nothing.
    scaled = smece(labels, probs, 0.25 * counts.astype(np.float32))
    assert scaled == pytest.approx(repeated, abs=1e-6)


def test_label_forms_logits_and_functional_agree():
    logits, labels, probs = predictions(seed=10)
    expected, _ = reference(*top_label(labels, probs))
    one_hot = np.eye(probs.shape[-1], dtype=np.float32)[labels]
    for value in (
        smece(labels, probs),
        smece(one_hot, probs),
        smece(labels[:, None], probs),
        smece(labels, logits, from_logits=True),
        float(smooth_calibration_error(labels, probs)),
        float(smooth_calibration_error(one_hot, logits, from_logits=True)),
    ):
        assert value == pytest.approx(expected, abs=2e-6)


def test_extreme_logits_and_exact_confidences():
    rng = np.random.default_rng(11)
    logits = rng.choice([-1e4, 0.0, 1e4], size=(500, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 500)
    expected, _ = reference(*top_label(labels, softmax(logits)))
    assert smece(labels, logits, from_logits=True) == pytest.approx(expected, abs=2e-6)
    # Confidences of exactly 0 and 1 sit on the grid's end points.
    confidence = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.3], np.float32)
    outcome = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0], np.float32)
    metric = SmoothCalibrationError()
    metric.accumulate(confidence, outcome)
    expected, _ = reference(confidence, outcome)
    assert float(metric.result()) == pytest.approx(expected, abs=2e-6)
    # One-hot predictions: every confidence is exactly 1.
    one_hot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 100)]
    labels = rng.integers(0, 4, 100)
    expected, _ = reference(*top_label(labels, one_hot))
    assert smece(labels, one_hot) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs(dtype):
    logits, labels, _ = predictions(num_samples=800, seed=12)
    half = ops.cast(logits, dtype)
    rounded = ops.convert_to_numpy(ops.cast(half, "float32")).astype(np.float64)
    expected, _ = reference(*top_label(labels, softmax(rounded)))
    metric = SmoothCalibrationError(from_logits=True)
    metric.update_state(labels, half)
    assert keras.backend.standardize_dtype(metric.result().dtype) == "float32"
    assert float(metric.result()) == pytest.approx(expected, abs=2e-5)
    value = smooth_calibration_error(labels, half, from_logits=True)
    assert float(value) == pytest.approx(expected, abs=2e-5)


def test_empty_batch_is_a_no_op_and_empty_metric_is_zero():
    metric = SmoothCalibrationError()
    assert float(metric.result()) == 0.0
    metric.update_state(np.zeros((0,), np.int32), np.zeros((0, 3), np.float32))
    assert float(metric.result()) == 0.0
    _, labels, probs = predictions(num_samples=200, seed=13)
    metric.update_state(labels, probs)
    before = float(metric.result())
    metric.update_state(np.zeros((0,), np.int32), np.zeros((0, 5), np.float32))
    metric.accumulate(np.zeros((0,), np.float32), np.zeros((0,), np.float32))
    assert float(metric.result()) == before
    metric.reset_state()
    assert float(metric.result()) == 0.0
    empty = smooth_calibration_error(np.zeros((0,), np.int32), np.zeros((0, 3)))
    assert float(empty) == 0.0


def test_reliability_curve():
    rng = np.random.default_rng(14)
    confidence = rng.random(20000)
    outcome = (rng.random(20000) < confidence) * 1.0  # calibrated
    metric = SmoothCalibrationError()
    metric.accumulate(confidence, outcome)
    curve = metric.reliability_curve(num_points=101)
    assert curve["confidence"].shape == (101,)
    step = curve["confidence"][1]
    density = curve["density"]
    assert np.sum(density[1:] + density[:-1]) / 2 * step == pytest.approx(1.0)
    inner = slice(10, 91)
    np.testing.assert_allclose(
        curve["accuracy"][inner], curve["confidence"][inner], atol=0.05
    )
    assert curve["error"] == pytest.approx(float(metric.result()), abs=1e-7)
    fixed = metric.reliability_curve(bandwidth=0.2)
    assert fixed["bandwidth"] == 0.2
    expected, _ = reference(confidence, outcome, bandwidth=0.2)
    assert fixed["error"] == pytest.approx(expected, abs=2e-6)


def test_compiled_functional_and_stateless_steps():
    _, labels, probs = predictions(num_samples=500, seed=15)
    expected, _ = reference(*top_label(labels, probs))
    metric = SmoothCalibrationError()

    def step(variables, y, p):
        variables = metric.stateless_update_state(variables, y, p)
        return metric.stateless_result(variables)

    variables = [variable.value for variable in metric.variables]
    y, p = ops.convert_to_tensor(labels.astype(np.int32)), ops.convert_to_tensor(probs)
    if BACKEND == "jax":
        import jax

        compiled = jax.jit(step)
        assert float(compiled(variables, y, p)) == pytest.approx(expected, abs=2e-6)
        functional = jax.jit(smooth_calibration_error)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        # The stateful metric compiles in `evaluate` (the round-trip test).
        functional = tf.function(smooth_calibration_error, jit_compile=True)
    else:
        pytest.skip("torch.compile takes minutes on this model; eager is tested")
    assert float(functional(y, p)) == pytest.approx(expected, abs=2e-6)


def tiny_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def test_keras_round_trip_and_evaluate(tmp_path):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((256, 4)).astype(np.float32)
    y = rng.integers(0, 3, 256)
    model = tiny_model()
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[SmoothCalibrationError(from_logits=True)],
    )
    logits = ops.convert_to_numpy(model(x))
    expected, _ = reference(*top_label(y, softmax(logits)))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    result = restored.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert result["smooth_ece"] == pytest.approx(expected, abs=1e-5)


def test_config_round_trip():
    metric = SmoothCalibrationError(
        from_logits=True,
        bandwidth=0.05,
        validate_args=False,
        name="sm",
        dtype="float32",
    )
    config = metric.get_config()
    assert config == {
        "from_logits": True,
        "bandwidth": 0.05,
        "validate_args": False,
        "name": "sm",
        "dtype": "float32",
    }
    assert SmoothCalibrationError.from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    assert isinstance(revived, SmoothCalibrationError)
    assert revived.get_config() == config
    name = keras.saving.get_registered_name(SmoothCalibrationError)
    assert name == "keras_label_relax>SmoothCalibrationError"


@pytest.mark.parametrize("bandwidth", [-1, 0, 0.0005, 1.5, float("nan"), "0.1", True])
def test_bad_bandwidth(bandwidth):
    with pytest.raises(ValueError, match=r"bandwidth.*Received: bandwidth="):
        SmoothCalibrationError(bandwidth=bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        smooth_calibration_error([0], [[1.0, 0.0]], bandwidth=bandwidth)


def test_bad_arguments():
    with pytest.raises(ValueError, match="from_logits.*'yes'"):
        SmoothCalibrationError(from_logits="yes")
    with pytest.raises(ValueError, match="num_points.*1"):
        SmoothCalibrationError().reliability_curve(num_points=1)
    with pytest.raises(ValueError, match=r"y_true.shape=\(3,\)"):
        SmoothCalibrationError().update_state(np.zeros(3), np.full((4, 5), 0.2))
    with pytest.raises(ValueError, match="validate_args.*1"):
        SmoothCalibrationError(validate_args=1)


# --- value checks ----------------------------------------------------------


def check_both(labels, probs, weights, pattern):
    """The metric's update and the function raise `pattern`."""
    with pytest.raises(ValueError, match=pattern):
        SmoothCalibrationError().update_state(labels, probs, weights)
    with pytest.raises(ValueError, match=pattern):
        smooth_calibration_error(labels, probs, sample_weight=weights)


def test_bad_class_ids_raise_with_a_count():
    probs = np.full((4, 3), 1 / 3, np.float32)
    for labels in ([0, 3, 1, 7], [-1, 0, 1, 3]):
        pattern = r"y_true.*2 of 4 class ids are outside \[0, 3\)"
        check_both(np.array(labels), probs, None, pattern)


def test_bad_probabilities_raise_with_a_count():
    probs = np.full((4, 3), 1 / 3, np.float32)
    probs[0, 0] = -0.1
    probs[1, 2] = 1.5
    probs[3, 1] = np.nan
    check_both(np.arange(4) % 3, probs, None, r"y_pred.*3 of 12 probabilities")
    # Logits are not probabilities: any finite value is fine.
    logits = np.array([[-5.0, 2.0, 7.0]] * 4, np.float32)
    value = smooth_calibration_error(np.arange(4) % 3, logits, from_logits=True)
    assert np.isfinite(float(value))


def test_bad_weights_raise_with_counts():
    probs = np.full((6, 2), 0.5, np.float32)
    weights = np.array([1.0, -2.0, np.inf, np.nan, -1.0, 0.5], np.float32)
    pattern = r"sample_weight.*of 6 weights, 2 are negative and 2 are not finite"
    check_both(np.zeros(6, np.int32), probs, weights, pattern)


def test_probabilities_of_exactly_0_and_1_and_negative_zero_pass():
    probs = np.array([[1.0, 0.0], [-0.0, 1.0]], np.float32)
    value = smooth_calibration_error([0, 1], probs)
    assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_checks_can_be_switched_off():
    probs = np.full((4, 3), 1 / 3, np.float32)
    labels = np.array([0, 1, 2, 5])
    weights = np.array([1, 1, 1, -1], np.float32)
    metric = SmoothCalibrationError(validate_args=False)
    metric.update_state(labels, probs, weights)
    assert np.isfinite(float(metric.result()))
    value = smooth_calibration_error(
        labels, probs, sample_weight=weights, validate_args=False
    )
    assert np.isfinite(float(value))


JAX_SCRIPT = """
import json
import keras
import numpy as np
from keras_label_relax import SmoothCalibrationError


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # A fixed bandwidth: what is shared across devices is the histogram
        # (the bandwidth search compiles in the other tests).
        weighted_metrics=[SmoothCalibrationError(from_logits=True, bandwidth=0.05)],
    )
    return model


rng = np.random.default_rng(0)
x = rng.standard_normal((512, 4)).astype("float32")
y = rng.integers(0, 3, 512)
weights = rng.uniform(0, 2, 512).astype("float32")
single_model = build()
logits = single_model(x)
# The single-device value, eagerly.
metric = SmoothCalibrationError(from_logits=True, bandwidth=0.05)
metric.update_state(y, logits, weights)
single = {"smooth_ece": float(metric.result())}
logits = keras.ops.convert_to_numpy(logits).tolist()
devices = keras.distribution.list_devices("cpu")
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
parallel_model = build()
parallel_model.set_weights(single_model.get_weights())
parallel = parallel_model.evaluate(
    x, y, sample_weight=weights, batch_size=64, verbose=0, return_dict=True
)
replicas = len(parallel_model.layers[0].kernel.value.sharding.device_set)
print("RESULT " + json.dumps(
    {"single": single, "parallel": parallel, "logits": logits, "replicas": replicas}
))
"""


def distributed_reference(logits):
    """smECE (bandwidth 0.05) of the distributed scripts' model logits, with
    the labels and weights those scripts draw after their inputs."""
    rng = np.random.default_rng(0)
    rng.standard_normal((512, 4))
    labels = rng.integers(0, 3, 512)
    weights = rng.uniform(0, 2, 512).astype(np.float32)
    expected, _ = reference(
        *top_label(labels, softmax(np.array(logits, np.float32))),
        weight=weights,
        bandwidth=0.05,
    )
    return expected


@pytest.mark.skipif(BACKEND != "jax", reason="runs once, from the JAX test session")
def test_jax_data_parallel_over_four_devices():
    result = distributed.run_script(
        "jax", JAX_SCRIPT, {"JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    )
    assert result["replicas"] == 4
    expected = distributed_reference(result["logits"])
    parallel = result["parallel"]["smooth_ece"]
    assert parallel == pytest.approx(result["single"]["smooth_ece"], abs=1e-6)
    assert parallel == pytest.approx(expected, abs=1e-5)


TF_SCRIPT = """
import json
import keras
import numpy as np
from keras_label_relax import SmoothCalibrationError

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 4)).astype("float32")
y = rng.integers(0, 3, 512)
weights = rng.uniform(0, 2, 512).astype("float32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[SmoothCalibrationError(from_logits=True, bandwidth=0.05)],
    )
parallel = model.evaluate(
    x, y, sample_weight=weights, batch_size=64, verbose=0, return_dict=True
)
logits = keras.ops.convert_to_numpy(model(x)).tolist()
print("RESULT " + json.dumps(
    {"parallel": parallel, "logits": logits, "replicas": strategy.num_replicas_in_sync}
))
"""


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="runs once, from the TensorFlow test session"
)
def test_tensorflow_mirrored_strategy_over_two_cpus():
    result = distributed.run_script("tensorflow", distributed.TF_SETUP + TF_SCRIPT)
    assert result["replicas"] == 2
    expected = distributed_reference(result["logits"])
    assert result["parallel"]["smooth_ece"] == pytest.approx(expected, abs=1e-5)

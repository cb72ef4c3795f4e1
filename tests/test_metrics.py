"""ExpectedCalibrationError against the float64 reference in `ece_reference`."""

import doctest

import ece_reference as reference
import keras
import numpy as np
import pytest
from keras import ops

from keras_label_relax import ExpectedCalibrationError
from keras_label_relax import metrics as metrics_module

NORMS = ("l1", "l2", "max")


def random_predictions(num_samples=2000, num_classes=5, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((num_samples, num_classes))
    labels = rng.integers(0, num_classes, num_samples)
    probs = reference.softmax(logits).astype(np.float32)
    return logits.astype(np.float32), labels, probs


def ece(labels, preds, sample_weight=None, **kwargs):
    metric = ExpectedCalibrationError(**kwargs)
    metric.update_state(labels, preds, sample_weight=sample_weight)
    return float(metric.result())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("num_bins", [1, 7, 15])
def test_matches_reference(norm, num_bins):
    _, labels, probs = random_predictions()
    expected = reference.calibration_error(labels, probs, num_bins, norm)
    assert ece(labels, probs, num_bins=num_bins, norm=norm) == pytest.approx(
        expected, abs=1e-6
    )


@pytest.mark.parametrize("norm", NORMS)
def test_sample_weight_matches_reference(norm):
    _, labels, probs = random_predictions(seed=1)
    weights = np.random.default_rng(2).uniform(0, 3, len(labels))
    expected = reference.calibration_error(labels, probs, 10, norm, weights)
    actual = ece(labels, probs, weights, num_bins=10, norm=norm)
    assert actual == pytest.approx(expected, abs=1e-6)


def test_integer_weights_replace_counts():
    _, labels, probs = random_predictions(num_samples=300, seed=3)
    counts = np.random.default_rng(4).integers(0, 4, len(labels))
    repeated = ece(np.repeat(labels, counts), np.repeat(probs, counts, axis=0))
    assert ece(labels, probs, counts.astype(np.float32)) == pytest.approx(
        repeated, abs=1e-6
    )


def test_zero_weight_masks_predictions():
    _, labels, probs = random_predictions(num_samples=200, seed=5)
    mask = np.arange(200) % 3 == 0
    masked = ece(labels, probs, mask.astype(np.float32))
    assert masked == pytest.approx(ece(labels[mask], probs[mask]), abs=1e-6)


def test_label_forms_and_logits_agree():
    logits, labels, probs = random_predictions(seed=6)
    expected = ece(labels, probs)
    one_hot = np.eye(probs.shape[-1], dtype=np.float32)[labels]
    assert ece(one_hot, probs) == pytest.approx(expected, abs=1e-6)
    assert ece(labels[:, None], probs) == pytest.approx(expected, abs=1e-6)
    assert ece(labels.astype(np.float32), probs) == pytest.approx(expected, abs=1e-6)
    assert ece(labels, logits, from_logits=True) == pytest.approx(expected, abs=1e-6)


def test_sequence_predictions_with_weights():
    rng = np.random.default_rng(7)
    probs = reference.softmax(rng.standard_normal((8, 6, 4))).astype(np.float32)
    labels = rng.integers(0, 4, (8, 6))
    weights = rng.uniform(0, 1, (8, 6))
    expected = reference.calibration_error(labels, probs, 15, "l1", weights)
    assert ece(labels, probs, weights) == pytest.approx(expected, abs=1e-6)
    assert ece(labels, probs, weights[..., None]) == pytest.approx(expected, abs=1e-6)


def test_bin_edges_are_closed_on_the_right():
    # Confidences exactly on the edges of 4 bins, and a confidence of 1.0.
    probs = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.5, 0.5, 0.0, 0.0],
            [0.75, 0.25, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    metric = ExpectedCalibrationError(num_bins=4)
    metric.update_state(np.zeros(4, dtype=np.int32), probs)
    stats = metric.bin_statistics()
    np.testing.assert_array_equal(stats["weight"], [1, 1, 1, 1])
    np.testing.assert_allclose(stats["confidence"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(stats["edges"], [0, 0.25, 0.5, 0.75, 1.0])


def test_zero_confidence_goes_to_first_bin():
    metric = ExpectedCalibrationError(num_bins=3)
    metric.update_state([1], [[0.0, 0.0]])
    np.testing.assert_array_equal(metric.bin_statistics()["weight"], [1, 0, 0])


@pytest.mark.parametrize("from_logits", [False, True])
def test_ties_go_to_the_first_class(from_logits):
    # Uniform predictions: `argmax` picks class 0, so only label 0 is right.
    preds = np.zeros((8, 4), np.float32) + (0.0 if from_logits else 0.25)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    metric = ExpectedCalibrationError(num_bins=4, from_logits=from_logits)
    metric.update_state(labels, preds)
    np.testing.assert_allclose(metric.bin_statistics()["accuracy"][0], 0.25)
    assert float(metric.result()) == pytest.approx(0.0, abs=1e-7)


def test_out_of_range_labels_count_as_wrong_without_checks():
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    stats_metric = ExpectedCalibrationError(num_bins=10, validate_args=False)
    stats_metric.update_state(np.array([-1, 5]), probs)
    stats = stats_metric.bin_statistics()
    np.testing.assert_array_equal(stats["accuracy"][stats["weight"] > 0], [0, 0])


@pytest.mark.parametrize("norm", NORMS)
def test_agrees_with_torchmetrics_off_the_bin_edges(norm):
    torch = pytest.importorskip("torch")
    classification = pytest.importorskip("torchmetrics.functional.classification")
    _, labels, probs = random_predictions(num_samples=5000, seed=11)
    expected = classification.multiclass_calibration_error(
        torch.from_numpy(probs),
        torch.from_numpy(labels),
        num_classes=probs.shape[-1],
        n_bins=15,
        norm=norm,
    )
    assert ece(labels, probs, norm=norm) == pytest.approx(float(expected), abs=1e-6)


def test_differs_from_torchmetrics_at_confidence_one():
    """torchmetrics puts confidence 1.0 in an extra bin; here it is in the last."""
    torch = pytest.importorskip("torch")
    classification = pytest.importorskip("torchmetrics.functional.classification")
    probs = np.array([[1.0, 0.0], [0.95, 0.05]], np.float32)
    labels = np.array([0, 1])
    # Here: one bin (0.9, 1], |1 - 1.95| / 2. torchmetrics: two bins,
    # (|1 - 1| + |0 - 0.95|) / 2, the same.
    assert ece(labels, probs, num_bins=10) == pytest.approx(0.475)
    theirs = classification.multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(labels), num_classes=2, n_bins=10
    )
    assert float(theirs) == pytest.approx(0.475)
    labels = np.array([1, 0])
    # One bin: |1 - 1.95| / 2; torchmetrics: (|0 - 1| + |1 - 0.95|) / 2.
    assert ece(labels, probs, num_bins=10) == pytest.approx(0.475)
    theirs = classification.multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(labels), num_classes=2, n_bins=10
    )
    assert float(theirs) == pytest.approx(0.525)


def test_bin_statistics_match_reference():
    _, labels, probs = random_predictions(seed=8)
    metric = ExpectedCalibrationError(num_bins=12)
    metric.update_state(labels, probs)
    stats = metric.bin_statistics()
    weights, confidences, corrects = reference.bin_statistics(labels, probs, 12)
    np.testing.assert_array_equal(stats["weight"], weights)
    filled = weights > 0
    weights = np.where(filled, weights, 1.0)
    np.testing.assert_allclose(
        stats["confidence"][filled], (confidences / weights)[filled], atol=1e-6
    )
    np.testing.assert_allclose(
        stats["accuracy"][filled], (corrects / weights)[filled], atol=1e-6
    )
    assert np.all(np.isnan(stats["confidence"][~filled]))


@pytest.mark.parametrize("norm", NORMS)
def test_result_is_zero_before_updates_and_after_reset(norm):
    metric = ExpectedCalibrationError(norm=norm)
    assert float(metric.result()) == 0.0
    _, labels, probs = random_predictions(num_samples=50)
    metric.update_state(labels, probs)
    assert float(metric.result()) > 0.0
    metric.reset_state()
    assert float(metric.result()) == 0.0
    metric.update_state(labels, probs, sample_weight=np.zeros(50))
    assert float(metric.result()) == 0.0


def test_streaming_equals_one_batch():
    _, labels, probs = random_predictions(num_samples=1000, seed=9)
    metric = ExpectedCalibrationError()
    for start in range(0, 1000, 64):
        metric.update_state(labels[start : start + 64], probs[start : start + 64])
    assert float(metric.result()) == pytest.approx(ece(labels, probs), abs=1e-6)


def compiled_update(metric):
    """`stateless_update_state` compiled by the backend (eager on torch)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(metric.stateless_update_state)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(metric.stateless_update_state, jit_compile=True)
    return metric.stateless_update_state


def test_protocol_check_value_to_1e5_over_a_million_samples_in_batches():
    """A known value: K = 10, N = 1e6, logits 3 * N(0, 1), uniform labels
    (seed 0) give a float64 ECE of 0.56067; fed in batches of 1000."""
    logits, labels = reference.protocol_check_data(10**6, 10)
    probs = reference.softmax(logits).astype(np.float32)
    expected = reference.calibration_error(labels, probs, 15)
    assert round(expected, 5) == 0.56067
    metric = ExpectedCalibrationError(num_bins=15)
    update = compiled_update(metric)
    variables = [v.value for v in metric.variables]
    labels = labels.astype(np.int32)
    for batch in np.split(np.arange(10**6), 1000):
        variables = update(variables, labels[batch], probs[batch])
    for variable, value in zip(metric.variables, variables, strict=True):
        variable.assign(value)
    assert abs(float(metric.result()) - expected) < 1e-5
    # float32 and float64 may bin a confidence within ~1e-7 of an edge
    # differently, so single predictions may move to a neighbouring bin.
    stats = metric.bin_statistics()
    weights, confidences, _ = reference.bin_statistics(labels, probs, 15)
    np.testing.assert_allclose(stats["weight"], weights, atol=2)
    confidence_sums = np.nan_to_num(stats["weight"] * stats["confidence"])
    np.testing.assert_allclose(confidence_sums, confidences, atol=2)
    assert confidence_sums.sum() == pytest.approx(confidences.sum(), rel=1e-7)
    # One batch of a million: the per-batch sums stay accurate too.
    assert abs(ece(labels, probs) - expected) < 1e-5


def test_state_stays_exact_beyond_float32_integers():
    """Compensated sums: 2**24 + 1 is not a float32, yet every 1 counts."""
    metric = ExpectedCalibrationError(num_bins=1)
    update = compiled_update(metric)
    variables = [v.value for v in metric.variables]
    labels, probs = np.zeros(1, np.int32), np.array([[0.75, 0.25]], np.float32)
    variables = update(variables, labels, probs, np.array([2.0**24], np.float32))
    for _ in range(100):
        variables = update(variables, labels, probs, np.ones(1, np.float32))
    for variable, value in zip(metric.variables, variables, strict=True):
        variable.assign(value)
    stats = metric.bin_statistics()
    assert stats["weight"][0] == 2**24 + 100
    assert stats["confidence"][0] == 0.75
    assert float(metric.result()) == pytest.approx(0.25)


def tiny_model(num_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(num_classes, name="logits")]
    )


def evaluation_data(num_samples=256, num_classes=3, seed=10):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, 4)).astype(np.float32)
    y = rng.integers(0, num_classes, num_samples)
    return x, y


@pytest.mark.parametrize("mode", ["eager", "compiled", "jit"])
def test_compile_and_evaluate(mode):
    x, y = evaluation_data()
    model = tiny_model()
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            ExpectedCalibrationError(num_bins=10, from_logits=True),
            ExpectedCalibrationError(num_bins=10, from_logits=True, norm="max"),
        ],
        run_eagerly=mode == "eager",
        jit_compile=mode == "jit",
    )
    results = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    probs = reference.softmax(ops.convert_to_numpy(model(x)))
    expected = reference.calibration_error(y, probs.astype(np.float32), 10)
    expected_max = reference.calibration_error(y, probs.astype(np.float32), 10, "max")
    assert results["ece"] == pytest.approx(expected, abs=1e-5)
    assert results["ece_1"] == pytest.approx(expected_max, abs=1e-5)


def test_fit_reports_the_metric():
    x, y = evaluation_data(num_samples=64)
    model = tiny_model()
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[ExpectedCalibrationError(from_logits=True)],
    )
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert all(0.0 <= value <= 1.0 for value in history.history["ece"])


def test_config_round_trip():
    metric = ExpectedCalibrationError(
        num_bins=7, from_logits=True, norm="l2", name="rms", dtype="float32"
    )
    config = metric.get_config()
    assert config == {
        "num_bins": 7,
        "from_logits": True,
        "norm": "l2",
        "binning": "equal_width",
        "validate_args": True,
        "name": "rms",
        "dtype": "float32",
    }
    restored = ExpectedCalibrationError.from_config(config)
    assert restored.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    assert isinstance(revived, ExpectedCalibrationError)
    assert revived.get_config() == config
    name = keras.saving.get_registered_name(ExpectedCalibrationError)
    assert name == "keras_label_relax>ExpectedCalibrationError"


def test_saved_model_keeps_compiled_metric(tmp_path):
    x, y = evaluation_data(num_samples=64)
    model = tiny_model()
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[ExpectedCalibrationError(num_bins=5, from_logits=True)],
    )
    expected = model.evaluate(x, y, verbose=0, return_dict=True)["ece"]
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    actual = restored.evaluate(x, y, verbose=0, return_dict=True)["ece"]
    assert actual == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("num_bins", [0, -3, 2.5, True, "15", None])
def test_bad_num_bins(num_bins):
    with pytest.raises(ValueError, match="num_bins"):
        ExpectedCalibrationError(num_bins=num_bins)


def test_bad_norm_and_from_logits():
    with pytest.raises(ValueError, match="norm.*'l3'"):
        ExpectedCalibrationError(norm="l3")
    with pytest.raises(ValueError, match="from_logits"):
        ExpectedCalibrationError(from_logits="yes")


def test_mismatched_shapes():
    metric = ExpectedCalibrationError()
    with pytest.raises(ValueError, match=r"y_true.shape=\(3,\)"):
        metric.update_state(np.zeros(3), np.full((4, 5), 0.2))
    with pytest.raises(ValueError, match="y_true.shape"):
        metric.update_state(np.zeros((4, 3)), np.full((4, 5), 0.2))
    with pytest.raises(ValueError, match="sample_weight"):
        metric.update_state(np.zeros(4), np.full((4, 5), 0.2), np.ones(3))


def test_docstring_example():
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(metrics_module, optionflags=flags, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0

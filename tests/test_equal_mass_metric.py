"""Equal-mass ECE: the streaming histogram against the exact sorted bins.

The exact computation (`ece_reference.equal_mass_bin_statistics`) sorts the
predictions, lays them end to end by weight and splits blocks of equal
confidence that an edge cuts. The metric reads the bins off a fine
histogram; the documented bound is 1e-3 on (a) moderately confident
predictions and (b) a model with 95% of its confidences above 0.999.
"""

import ece_reference as reference
import keras
import numpy as np
import pytest

from keras_label_relax import ExpectedCalibrationError
from keras_label_relax import expected_calibration_error

NORMS = ("l1", "l2", "max")
BOUND = 1e-3


def calibrated_logits(num_samples, num_classes=10, seed=0):
    """Calibrated predictions: per-bin gaps of both signs."""
    rng = np.random.default_rng(seed)
    probs = reference.softmax(2.0 * rng.standard_normal((num_samples, num_classes)))
    labels = (probs.cumsum(axis=1) > rng.random(num_samples)[:, None]).argmax(axis=1)
    return labels, probs.astype(np.float32)


def moderately_confident(num_samples=100_000, num_classes=10, seed=0):
    """Over-confident softmax outputs: labels drawn at a softer temperature."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((num_samples, num_classes))
    true = reference.softmax(logits / 1.5)
    labels = (true.cumsum(axis=1) > rng.random(num_samples)[:, None]).argmax(axis=1)
    return labels, reference.softmax(logits).astype(np.float32)


def very_confident(num_samples=100_000, num_classes=10, seed=1):
    """95% of confidences above 0.999 (1 - c log-uniform in [1e-7, 1e-3]),
    the rest uniform in [0.3, 0.999]; correct with probability c**2."""
    rng = np.random.default_rng(seed)
    confident = rng.random(num_samples) < 0.95
    top = np.where(
        confident,
        1.0 - 10.0 ** rng.uniform(-7, -3, num_samples),
        rng.uniform(0.3, 0.999, num_samples),
    )
    rest = rng.dirichlet(np.ones(num_classes - 1), num_samples) * (1 - top)[:, None]
    probs = np.concatenate([top[:, None], rest], axis=1).astype(np.float32)
    predicted = rng.integers(0, num_classes, num_samples)
    rows = np.arange(num_samples)
    top_column = probs[:, 0].copy()
    probs[:, 0] = probs[rows, predicted]
    probs[rows, predicted] = top_column
    confidence = probs.max(axis=1).astype(np.float64)
    correct = rng.random(num_samples) < confidence**2
    wrong = (predicted + rng.integers(1, num_classes, num_samples)) % num_classes
    labels = np.where(correct, predicted, wrong)
    assert np.mean(confidence > 0.999) > 0.9
    return labels, probs


def streamed(labels, probs, sample_weight=None, batch_size=10_000, **kwargs):
    metric = ExpectedCalibrationError(binning="equal_mass", **kwargs)
    for start in range(0, len(labels), batch_size):
        batch = slice(start, start + batch_size)
        weight = None if sample_weight is None else sample_weight[batch]
        metric.update_state(labels[batch], probs[batch], weight)
    return metric


@pytest.mark.parametrize("data", [moderately_confident, very_confident])
@pytest.mark.parametrize("weighted", [False, True])
def test_within_the_bound_of_the_exact_sorted_computation(data, weighted):
    labels, probs = data()
    weights = None
    if weighted:
        weights = np.random.default_rng(2).uniform(0, 2, len(labels))
        weights = weights.astype(np.float32)
    stats = reference.equal_mass_bin_statistics(labels, probs, 15, weights)
    for norm in NORMS:
        metric = streamed(labels, probs, weights, num_bins=15, norm=norm)
        expected = reference.binned_error(*stats, norm)
        assert abs(float(metric.result()) - expected) <= BOUND, norm


@pytest.mark.parametrize("data", [calibrated_logits, very_confident])
def test_within_the_bound_with_few_predictions(data):
    # The hardest case: cut fine bins hold two or three predictions. ("l2"
    # and "max" divide per-bin gaps by W / num_bins, so there one prediction
    # on the wrong side of an edge moves them num_bins times as much.)
    for seed in range(3):
        labels, probs = data(3000, seed=seed)
        stats = reference.equal_mass_bin_statistics(labels, probs, 15)
        actual = expected_calibration_error(labels, probs, 15, binning="equal_mass")
        expected = reference.binned_error(*stats, "l1")
        assert abs(float(actual) - expected) <= BOUND, seed


def test_bin_statistics_match_the_exact_bins():
    labels, probs = very_confident(num_samples=50_000, seed=3)
    metric = streamed(labels, probs, num_bins=10)
    stats = metric.bin_statistics()
    weights, confidences, corrects = reference.equal_mass_bin_statistics(
        labels, probs, 10
    )
    np.testing.assert_allclose(stats["weight"], weights, rtol=1e-6)
    np.testing.assert_allclose(stats["confidence"], confidences / weights, atol=1e-5)
    np.testing.assert_allclose(stats["accuracy"], corrects / weights, atol=2e-3)
    edges = stats["edges"]
    assert len(edges) == 11 and np.all(np.diff(edges) >= 0)
    confidence = np.sort(probs.max(axis=1).astype(np.float64))
    exact_edges = confidence[np.arange(1, 10) * 5000]
    np.testing.assert_allclose(edges[1:-1], exact_edges, atol=1e-4)
    assert edges[0] <= confidence[0] and edges[-1] >= confidence[-1]


def test_tied_confidences_split_by_weight():
    # Three confidence values only: every edge cuts a block of ties, which
    # both computations split in proportion to weight.
    rng = np.random.default_rng(4)
    top = rng.choice([0.5, 0.75, 1.0], size=999, p=[0.2, 0.3, 0.5])
    probs = np.stack([top, 1.0 - top], axis=1).astype(np.float32)
    labels = rng.integers(0, 2, 999)
    weights = rng.uniform(0, 1, 999).astype(np.float32)
    for norm in NORMS:
        expected = reference.equal_mass_calibration_error(
            labels, probs, 7, norm, weights
        )
        actual = expected_calibration_error(
            labels, probs, 7, norm=norm, binning="equal_mass", sample_weight=weights
        )
        assert float(actual) == pytest.approx(expected, abs=1e-6), norm


def test_one_bin_equals_equal_width():
    labels, probs = moderately_confident(num_samples=5000, seed=5)
    for norm in NORMS:
        mass = expected_calibration_error(
            labels, probs, 1, norm=norm, binning="equal_mass"
        )
        width = expected_calibration_error(labels, probs, 1, norm=norm)
        assert float(mass) == pytest.approx(float(width), abs=1e-6)


@pytest.fixture(scope="module")
def netcal_ece():
    if keras.backend.backend() != "torch":
        pytest.skip("numpy-only comparison: runs once, from the PyTorch session")
    metrics = pytest.importorskip("netcal.metrics")
    return metrics.ECE


def calibrated(num_samples, seed):
    """Calibrated predictions: the per-bin gaps have both signs, so the
    binning shows in the ECE."""
    rng = np.random.default_rng(seed)
    probs = reference.softmax(2.0 * rng.standard_normal((num_samples, 5)))
    labels = (probs.cumsum(axis=1) > rng.random(num_samples)[:, None]).argmax(axis=1)
    return labels, probs


def test_netcal_agrees_when_bins_hold_whole_predictions(netcal_ece):
    # N a multiple of the number of bins, distinct confidences: netcal's
    # quantile edges fall between predictions, every bin holds N / bins.
    labels, probs = calibrated(1000, seed=6)
    theirs = netcal_ece(bins=10, equal_intervals=False).measure(probs, labels)
    exact = reference.equal_mass_calibration_error(labels, probs, 10)
    assert theirs == pytest.approx(exact, abs=1e-12)
    # 1000 predictions are the fine histogram's hardest case (one prediction
    # on the wrong side of an edge moves "l1" by 1e-3): see the docstring.
    ours = expected_calibration_error(labels, probs, 10, binning="equal_mass")
    assert float(ours) == pytest.approx(exact, abs=2 * BOUND)


def test_netcal_differs_where_an_edge_cuts_a_prediction(netcal_ece):
    # N = 1001: netcal keeps each prediction whole (its bins hold 100 or
    # 101), the definition here splits the prediction on an edge so that each
    # bin holds 100.1.
    labels, probs = calibrated(1001, seed=7)
    theirs = netcal_ece(bins=10, equal_intervals=False).measure(probs, labels)
    exact = reference.equal_mass_calibration_error(labels, probs, 10)
    assert abs(theirs - exact) > 1e-4
    # Whole predictions: netcal's bins are `[q_j, q_j+1)` over its quantiles.
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    quantiles = np.quantile(confidence, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(quantiles, confidence, "right") - 1, 0, 9)
    whole = sum(
        abs(correct[bins == b].sum() - confidence[bins == b].sum()) for b in range(10)
    )
    assert theirs == pytest.approx(whole / 1001, abs=1e-12)


def test_netcal_rejects_ties_that_are_split_here(netcal_ece):
    # Ties that fill more than a bin make netcal's quantile edges coincide,
    # and it raises; here the block of ties is split by weight.
    probs = np.tile([[0.6, 0.4]], (100, 1))
    probs[:30] = [0.9, 0.1]
    labels = np.random.default_rng(8).integers(0, 2, 100)
    with pytest.raises(ValueError):
        netcal_ece(bins=4, equal_intervals=False).measure(probs, labels)
    ours = expected_calibration_error(labels, probs, 4, binning="equal_mass")
    exact = reference.equal_mass_calibration_error(labels, probs, 4)
    assert float(ours) == pytest.approx(exact, abs=1e-6)

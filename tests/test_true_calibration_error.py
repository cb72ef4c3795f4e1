"""Tests of `benchmarks.training.true_calibration_error` (the synthetic task's
TCE) against a float64 numpy reference written here."""

import numpy as np
import pytest

from benchmarks.training import true_calibration_error


def reference_softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def reference_tce(logits, true_probs, num_bins=15):
    """A loop over the bins (lo, hi] of the top-label confidence."""
    probs = reference_softmax(logits)
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    true_top = np.asarray(true_probs, np.float64)[np.arange(len(probs)), predicted]
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    error = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        members = (confidence > lo) & (confidence <= hi)
        if members.any():
            gap = abs(true_top[members].mean() - confidence[members].mean())
            error += gap * members.mean()
    return error


def true_probabilities(n=20000, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(classes, 0.7), size=n)


def constant_confidence_logits(true_probs):
    """Bayes argmax, every confidence equal to the Bayes accuracy."""
    n, classes = true_probs.shape
    accuracy = true_probs.max(axis=1).mean()
    top = np.log(accuracy * (classes - 1) / (1.0 - accuracy))
    logits = np.zeros((n, classes))
    logits[np.arange(n), true_probs.argmax(axis=1)] = top
    return logits


def test_bayes_predictor_scores_zero():
    true_probs = true_probabilities()
    assert true_calibration_error(np.log(true_probs), true_probs) < 1e-12


def test_constant_confidence_at_the_accuracy_scores_zero():
    true_probs = true_probabilities()
    logits = constant_confidence_logits(true_probs)
    assert true_calibration_error(logits, true_probs) < 1e-12
    # The former measure, mean |p_hat(y_hat) - p*(y_hat)|, counted the
    # missing sharpness of this calibrated predictor as error.
    confidence = reference_softmax(logits).max(axis=1)
    assert np.mean(np.abs(confidence - true_probs.max(axis=1))) > 0.1


def test_sharpened_predictor_scores_clearly_above_zero():
    true_probs = true_probabilities()
    sharpened = 2.0 * np.log(true_probs)
    error = true_calibration_error(sharpened, true_probs)
    assert error > 0.05
    assert error == pytest.approx(reference_tce(sharpened, true_probs), abs=1e-12)


@pytest.mark.parametrize("num_bins", [1, 4, 15, 40])
def test_matches_reference_on_random_logits(num_bins):
    rng = np.random.default_rng(num_bins)
    true_probs = true_probabilities(n=3000, classes=7, seed=num_bins)
    logits = rng.normal(scale=3.0, size=true_probs.shape)
    assert true_calibration_error(logits, true_probs, num_bins) == pytest.approx(
        reference_tce(logits, true_probs, num_bins), abs=1e-12
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_extreme_logits_and_low_precision(dtype):
    rng = np.random.default_rng(1)
    true_probs = true_probabilities(n=500, classes=4, seed=1)
    true_probs[:50] = np.eye(4)[rng.integers(0, 4, 50)]  # exactly 0 and 1
    logits = rng.choice([-1e4, 0.0, 1e4], size=true_probs.shape)
    logits[:100] = rng.normal(size=(100, 4))
    logits = logits.astype(dtype)
    error = true_calibration_error(logits, true_probs)
    assert np.isfinite(error) and 0.0 <= error <= 1.0
    assert error == pytest.approx(reference_tce(logits, true_probs), abs=1e-12)


def test_bad_arguments_raise_value_errors():
    true_probs = true_probabilities(n=10)
    with pytest.raises(ValueError, match="num_bins=0"):
        true_calibration_error(np.log(true_probs), true_probs, num_bins=0)
    with pytest.raises(ValueError, match="num_bins=2.5"):
        true_calibration_error(np.log(true_probs), true_probs, num_bins=2.5)
    with pytest.raises(ValueError, match=r"true_probs.shape=\(10, 4\)"):
        true_calibration_error(np.log(true_probs), true_probs[:, :4])

"""Float64 numpy reference for the top-label calibration error.

Written independently of the package: a direct loop over bins `(lo, hi]`
(a confidence of 1.0 in the last bin, 0.0 in the first), in float64.
"""

import numpy as np


def softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def bin_statistics(labels, probs, num_bins=15, sample_weight=None):
    """Per-bin total weight, weighted confidence sum and correct sum."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    labels = np.asarray(labels).reshape(-1)
    weight = np.ones(len(labels))
    if sample_weight is not None:
        weight = np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape(-1), weight.shape
        )
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    weights, confidences, corrects = (np.zeros(num_bins) for _ in range(3))
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        members = (confidence > lo) & (confidence <= hi)
        if b == 0:
            members |= confidence == 0.0
        weights[b] = weight[members].sum()
        confidences[b] = (weight * confidence)[members].sum()
        corrects[b] = (weight * correct)[members].sum()
    return weights, confidences, corrects


def calibration_error(labels, probs, num_bins=15, norm="l1", sample_weight=None):
    weights, confidences, corrects = bin_statistics(
        labels, probs, num_bins, sample_weight
    )
    total = weights.sum()
    if total == 0:
        return 0.0
    gaps = np.abs(corrects - confidences)
    nonempty = weights > 0
    if norm == "l1":
        return float(gaps.sum() / total)
    if norm == "l2":
        return float(np.sqrt((gaps[nonempty] ** 2 / weights[nonempty]).sum() / total))
    if norm == "max":
        return float((gaps[nonempty] / weights[nonempty]).max())
    raise ValueError(norm)


def protocol_check_data(num_samples=10**6, num_classes=10, seed=0):
    """The data of PROTOCOL.md's ECE check value (0.56067 for 10 classes).

    Logits are 3 * N(0, 1) and labels uniform, drawn from
    `np.random.default_rng(seed)` in that order.
    """
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((num_samples, num_classes))
    labels = rng.integers(0, num_classes, num_samples)
    return logits, labels
